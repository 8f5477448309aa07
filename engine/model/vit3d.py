"""RadFM's 3D ViT (the Reg2RG vision and mask encoders). Module names follow the published state dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

from .config import VisionEncoderConfig
from .position import PositionEmbeddingLearned3d


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Bias-free fused qkv, softmax attention (SDPA: same maths as the explicit product), output Linear."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (b, h, n, dh)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)                                  # (b, n, h*dh)
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head, dropout)),
                           PreNorm(dim, FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class ViT3D(nn.Module):
    """Patch embedding + learned 3D positions + pre-norm transformer. No CLS token, pooling or final norm.

    Input (B, C, H, W, D) -> tokens (B, h*w*d, dim), depth index fastest among patches.
    """

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config
        p, pf = config.patch_size, config.frame_patch_size
        patch_dim = config.channels * p * p * pf
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)", p1=p, p2=p, pf=pf),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, config.dim),
            nn.LayerNorm(config.dim),
        )
        rows, cols, deps = config.table_sizes
        self.pos_embedding = PositionEmbeddingLearned3d(config.dim // 3, rows, cols, deps)
        self.dropout = nn.Dropout(config.emb_dropout)
        self.transformer = Transformer(config.dim, config.depth, config.heads, config.dim_head,
                                       config.mlp_dim, config.dropout)

    def embed_patches(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W, D) -> position-embedded patch tokens (B, h*w*d, dim), before the transformer."""
        _, _, H, W, D = volume.shape
        h, w, d = self.config.grid((H, W, D))
        x = self.to_patch_embedding(volume)                       # (B, h*w*d, dim)
        x = x + self.pos_embedding(h, w, d).to(x.dtype)           # broadcast over the batch
        return self.dropout(x)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.embed_patches(volume))      # (B, h*w*d, dim)
