"""RadFM's 3D ViT (the Reg2RG vision and mask encoders). Module names follow the published state dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

from .config import VisionEncoderConfig
from .position import PositionEmbeddingLearned3d

#: At inference, a volume whose channels repeat one channel (as the pre-processing gives it) is patch-embedded from
#: that one channel (`ViT3D._embed_one_channel`). False: always the published three-channel path (bench/encode.py).
FOLD_REPEATED_CHANNELS = True


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
        _, C, H, W, D = volume.shape
        h, w, d = self.config.grid((H, W, D))
        if C > 1 and FOLD_REPEATED_CHANNELS and not torch.is_grad_enabled() and _channels_repeat(volume):
            x = self._embed_one_channel(volume[:, :1])            # the pre-processing's 3 equal channels
        else:
            x = self.to_patch_embedding(volume)                   # (B, h*w*d, dim)
        x = x + self.pos_embedding(h, w, d).to(x.dtype)           # broadcast over the batch
        return self.dropout(x)

    def _embed_one_channel(self, volume: torch.Tensor) -> torch.Tensor:
        """`to_patch_embedding` of a volume whose C channels all equal ``volume`` (B, 1, H, W, D), reading it once.

        A patch vector u of C equal channels repeats each value C times (channel fastest), so LayerNorm(u) repeats
        the normalised one-channel vector n, and Linear(g * LayerNorm(u) + b) = (sum_c W_c g_c) n + (W b + bias):
        the patch Linear folded over the channels — the same numbers up to rounding at a third of the work."""
        rearrange, norm, linear, out_norm = self.to_patch_embedding
        C = self.config.channels
        v = rearrange(volume)                                     # (B, P, p*p*pf)
        n = nn.functional.layer_norm(v, (v.shape[-1],), eps=norm.eps)
        weight = (linear.weight * norm.weight).view(linear.out_features, -1, C).sum(-1)   # (dim, p*p*pf)
        bias = linear.weight @ norm.bias + linear.bias
        return out_norm(nn.functional.linear(n, weight, bias))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.embed_patches(volume))      # (B, h*w*d, dim)


def _channels_repeat(volume: torch.Tensor) -> bool:
    """Every channel of (B, C, ...) equals the first (the pre-processing repeats one channel)."""
    first = volume[:, :1]
    return all(torch.equal(volume[:, c:c + 1], first) for c in range(1, volume.shape[1]))
