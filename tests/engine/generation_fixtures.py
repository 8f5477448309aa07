"""Shared pieces of the generation / attention / CLI tests: a tiny random Reg2RG, a locally trained
tokenizer and a small synthetic study whose masks are boxes (so every crop box is known)."""

from __future__ import annotations

import numpy as np
import torch

from reg2rg.engine.model.config import Reg2RGConfig
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.study import Study
from reg2rg.engine.tokens import train_tokenizer

REPORT_TEXTS = [
    f"The region {i} is {area}: No {area} abnormality is seen. Mild changes are noted."
    for i, area in enumerate(REGIONS)
] + ["The heart size is normal. There is no pleural effusion. Lungs are clear."]

#: three regions, each a box of the synthetic volume: (start, stop) in stored voxel indices
BOXES = {
    "heart": ((10, 14, 6), (22, 26, 14)),
    "lung": ((4, 4, 2), (16, 20, 10)),
    "bone": ((20, 6, 3), (30, 18, 12)),
}
SHAPE = (34, 30, 18)


def tiny_engine(seed: int = 0):
    """A `ReportEngine` over a randomly initialised tiny Reg2RG (CPU, float32)."""
    from reg2rg.engine.generation import ReportEngine

    torch.manual_seed(seed)
    tok = train_tokenizer(REPORT_TEXTS, 300)
    model = Reg2RG.from_config(Reg2RGConfig.preset("tiny"), tok).eval()
    return ReportEngine(model, tok)


def box_study(affine=None, flip_axis: int | None = None, name: str = "box") -> Study:
    """A synthetic CT (body = HU 40 everywhere except an air border) with box masks.

    With ``flip_axis`` the same anatomy is stored flipped along that axis (affine adjusted so world
    coordinates are unchanged)."""
    rng = np.random.default_rng(0)
    vox = np.full(SHAPE, -1024, dtype=np.int16)
    vox[2:-2, 2:-2, 1:-1] = rng.integers(-200, 200, size=(SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 2))
    masks = {}
    for region, (a, b) in BOXES.items():
        m = np.zeros(SHAPE, dtype=bool)
        m[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = True
        masks[region] = m
    aff = np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    if flip_axis is not None:
        vox = np.flip(vox, flip_axis).copy()
        masks = {r: np.flip(m, flip_axis).copy() for r, m in masks.items()}
        flip = np.eye(4)
        flip[flip_axis, flip_axis] = -1
        flip[flip_axis, 3] = SHAPE[flip_axis] - 1
        aff = aff @ flip
    return Study(voxels=vox, affine=aff, masks=masks, name=name, source=f"synthetic:{name}")
