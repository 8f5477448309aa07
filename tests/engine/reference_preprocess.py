"""The published Reg2RG pre-processing, rebuilt from MONAI's own transforms (docs/reproduction.md §3).

Used by tests/engine/test_preprocess.py (equivalence) and bench/preprocess.py (speed and memory
baseline). It mirrors what the reference data loader does, step by step: float32 voxels from nibabel,
every mask loaded as a full float volume, ``volume * mask`` with -1024 outside, MONAI
``CropForeground(select_fn=x > -1000)`` + ``Resize`` (default mode "area"), clamp, scale, repeat;
the global image and the stacked masks go through ``CropForegroundd``/``Resized`` together.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai import transforms


def _foreground(x):
    return x > -1000


def reference_preprocess(volume_path, mask_paths: dict, size=(256, 256, 64)):
    """Returns (images, masks): ``images['image']`` and ``images[region]`` (3, H, W, D); ``masks[region]`` (1, H, W, D)."""
    region_transform = transforms.Compose([
        transforms.CropForeground(select_fn=_foreground),
        transforms.Resize(spatial_size=size),
        transforms.ToTensor(),
    ])
    image_transform = transforms.Compose([
        transforms.CropForegroundd(keys=["img", "seg"], source_key="img", select_fn=_foreground),
        transforms.Resized(keys=["img", "seg"], spatial_size=size),
        transforms.ToTensord(keys=["img", "seg"]),
    ])
    img = torch.from_numpy(np.asarray(nib.load(str(volume_path), mmap=True).dataobj)).float()
    images, stacked, keys = {}, [], []
    for region, path in mask_paths.items():
        mask = torch.from_numpy(np.asarray(nib.load(str(path), mmap=True).dataobj)).float()
        stacked.append(mask)
        keys.append(region)
        if torch.sum(mask) == 0:
            continue
        region_img = img * mask
        region_img[mask == 0] = -1024
        t = region_transform(region_img.unsqueeze(0))
        t = (torch.clamp(t, -1000, 200) + 400) / 600
        images[region] = torch.as_tensor(t).float().repeat(3, 1, 1, 1)
    out = image_transform({"img": img.unsqueeze(0), "seg": torch.stack(stacked, dim=0)})
    t = (torch.clamp(out["img"], -1000, 200) + 400) / 600
    images["image"] = torch.as_tensor(t).float().repeat(3, 1, 1, 1)
    masks = {k: torch.as_tensor(out["seg"][i]).unsqueeze(0).float() for i, k in enumerate(keys)}
    return images, masks
