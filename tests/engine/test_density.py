"""The crops' densitometry the fitted detector may read (``finding_density``, issue 12; off in the published
preset): histograms counted here by hand on crops built voxel by voxel, and the occlusion's exact shortcut
against recomputing the features with each patch emptied."""

from __future__ import annotations

import pytest
import torch

from reg2rg.engine.model.config import ConfigError, Reg2RGConfig
from reg2rg.engine.model.density import BINS, DENSITY_FEATURES, EROSIONS, occluded_density, region_density

LUNG, GLASS, VESSEL = -0.75, -0.2, 0.7          # scaled values: -850, -520 and +20 HU


def _bin(value: float) -> int:
    return min(int((value + 1.0) * BINS / 2), BINS - 1)


def _parts(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named parts of one region's features (the layout of engine.model.density's docstring)."""
    out = {"content": features[:BINS], "box": features[BINS:2 * BINS], "content_share": features[2 * BINS],
           "mask_share": features[2 * BINS + 1]}
    at = 2 * BINS + 2
    for size in EROSIONS:
        out[f"eroded{size}"], out[f"eroded{size}_box"] = features[at:at + BINS], features[at + BINS:at + 2 * BINS]
        at += 2 * BINS
    assert at == DENSITY_FEATURES
    return out


def _lung_crop():
    """A 32x32x16 crop: the fill (-1) outside a 16x16x8 block of lung, with a one-voxel-thin vessel along one
    axis and a 5x5x5 ground-glass patch inside; the mask (in its own box) covers a quarter of its volume."""
    crop = torch.full((32, 32, 16), -1.0)
    crop[10:26, 10:26, 5:13] = LUNG
    crop[12:24, 14, 9] = VESSEL                               # 12 voxels, one across
    crop[15:20, 15:20, 6:11] = GLASS                          # 125 voxels
    mask = torch.zeros(1, 32, 32, 16)
    mask[:, :16, :16] = 1.0
    return crop, mask


def test_histograms_count_the_content_and_the_erosion_keeps_a_patch_but_not_a_thin_vessel():
    crop, mask = _lung_crop()
    f = region_density(crop.expand(3, -1, -1, -1)[None], mask[None])
    assert f.shape == (1, DENSITY_FEATURES) and f.dtype == torch.float32
    p = _parts(f[0])
    box, content = float(crop.numel()), 16 * 16 * 8
    assert float(p["content_share"]) == pytest.approx(content / box)
    assert float(p["mask_share"]) == pytest.approx(0.25)
    counts = (p["box"] * box).round()
    assert counts[_bin(VESSEL)] == 12 and counts[_bin(GLASS)] == 125 and counts[_bin(LUNG)] == content - 137
    assert counts.sum() == content and float(p["content"].sum()) == pytest.approx(1.0)
    e3 = (p["eroded3_box"] * box).round()
    assert e3[_bin(VESSEL)] == 0                              # the thin vessel falls to the lung around it
    assert e3[_bin(GLASS)] == 27                              # the patch keeps its 3x3x3 core
    assert e3.sum() == 14 * 14 * 6                           # the lung block loses its one-voxel rim
    e5 = (p["eroded5_box"] * box).round()
    assert e5[_bin(GLASS)] == 1 and e5[_bin(VESSEL)] == 0 and e5.sum() == 12 * 12 * 4


def test_occluded_density_equals_recomputing_with_each_patch_emptied():
    torch.manual_seed(0)
    crop, mask = _lung_crop()
    crop = torch.where(crop > -1, crop + 0.1 * torch.rand_like(crop), crop).clamp(max=1.0)
    image = crop.expand(3, -1, -1, -1)
    patch, mask_patch = (8, 8, 4), (8, 8, 8)
    crop_rows, mask_rows = occluded_density(image, mask, patch, mask_patch)
    assert crop_rows.shape == (4 * 4 * 4 + 1, DENSITY_FEATURES) and mask_rows.shape == (4 * 4 * 2 + 1, DENSITY_FEATURES)
    assert torch.allclose(crop_rows[0], region_density(image[None], mask[None])[0])
    for index in range(64):                                   # the ViT's patch order: h, then w, then d fastest
        i, j, k = index // 16, index // 4 % 4, index % 4
        emptied = image.clone()
        emptied[:, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, k * 4:(k + 1) * 4] = -1.0
        assert torch.allclose(crop_rows[1 + index], region_density(emptied[None], mask[None])[0], atol=1e-6), index
    for index in range(32):
        i, j, k = index // 8, index // 2 % 4, index % 2
        emptied = mask.clone()
        emptied[:, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, k * 8:(k + 1) * 8] = 0.0
        assert torch.allclose(mask_rows[1 + index], region_density(image[None], emptied[None])[0], atol=1e-6), index
    assert (crop_rows[1:] != crop_rows[0]).any(dim=1).sum() > 8   # patches on the lung change it, the fill's do not
    assert torch.equal(crop_rows[1], crop_rows[0])               # patch 0 lies in the fill, 2 voxels from the lung


def test_finding_density_is_off_in_every_preset_and_needs_the_latent_detector():
    for preset in ("reg2rg-7b", "demo", "tiny"):
        assert not Reg2RGConfig.preset(preset).finding_density
    import dataclasses
    with pytest.raises(ConfigError, match="finding_density"):
        dataclasses.replace(Reg2RGConfig.preset("tiny"), finding_density=True).validate(require_llm=False)
