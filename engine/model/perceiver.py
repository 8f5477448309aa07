"""Flamingo/RadFM perceiver resampler: a fixed number of latents attend to the patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents query concat(media, latents). Optionally returns the latent -> media attention."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, return_attention: bool = False):
        b, n_media, _ = media.shape
        n_lat = latents.shape[1]
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)                                               # (b, L, inner)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # (b, P+L, inner)
        q = q.view(b, n_lat, self.heads, -1).transpose(1, 2)                 # (b, h, L, dh)
        k = k.view(b, n_media + n_lat, self.heads, -1).transpose(1, 2)       # (b, h, P+L, dh)
        v = v.view(b, n_media + n_lat, self.heads, -1).transpose(1, 2)
        attn = None
        if return_attention:
            attn = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)  # (b, h, L, P+L)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n_lat, -1)                      # (b, L, inner)
        return self.to_out(out), (None if attn is None else attn[..., :n_media])


class PerceiverResampler(nn.Module):
    """(B, P, dim) patch tokens -> (B, num_latents, dim); final LayerNorm.

    With ``return_attention`` also returns one (B, heads, L, P) latent -> patch attention per layer,
    which the attention maps follow back to the ViT patch grid.
    """

    def __init__(self, dim: int, num_latents: int, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, return_attention: bool = False):
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)   # (B, L, dim)
        attentions = []
        for attn, ff in self.layers:
            out, weights = attn(media, latents, return_attention)
            latents = out + latents
            latents = ff(latents) + latents
            attentions.append(weights)
        latents = self.norm(latents)
        return (latents, tuple(attentions)) if return_attention else latents
