"""RadFM's learned 3D position embedding (docs/reproduction.md §1: three tables, concatenated, subsampled)."""

from __future__ import annotations

import torch
from torch import nn


def subsample_indices(table_len: int, grid_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Table entries used for a runtime grid of ``grid_len`` positions: ``(i+1)*(table_len//grid_len)-1``.

    E.g. 8 rows of a 16-entry table -> 1, 3, ..., 15; 16 depth steps of 128 -> 7, 15, ..., 127.
    """
    return (torch.arange(grid_len, device=device) + 1) * (table_len // grid_len) - 1


class PositionEmbeddingLearned3d(nn.Module):
    """Row, column and depth tables of width ``dim/3``; concatenated [row, col, depth] per patch."""

    def __init__(self, num_pos_feats: int, h_patch_num: int, w_patch_num: int, d_patch_num: int):
        super().__init__()
        self.h_patch_num, self.w_patch_num, self.d_patch_num = h_patch_num, w_patch_num, d_patch_num
        self.row_embed = nn.Embedding(h_patch_num, num_pos_feats)
        self.col_embed = nn.Embedding(w_patch_num, num_pos_feats)
        self.dep_embed = nn.Embedding(d_patch_num, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)
        nn.init.uniform_(self.dep_embed.weight)

    def forward(self, h: int, w: int, d: int) -> torch.Tensor:
        """Position codes for an (h, w, d) patch grid, flattened depth-fastest: (h*w*d, 3*feats)."""
        device = self.row_embed.weight.device
        rows = self.row_embed(subsample_indices(self.h_patch_num, h, device))   # (h, f)
        cols = self.col_embed(subsample_indices(self.w_patch_num, w, device))   # (w, f)
        deps = self.dep_embed(subsample_indices(self.d_patch_num, d, device))   # (d, f)
        f = rows.shape[-1]
        pos = torch.cat([
            rows[:, None, None, :].expand(h, w, d, f),
            cols[None, :, None, :].expand(h, w, d, f),
            deps[None, None, :, :].expand(h, w, d, f),
        ], dim=-1)                                                               # (h, w, d, 3f)
        return pos.reshape(h * w * d, 3 * f)
