"""Our pre-processing reproduces the published MONAI pipeline (docs/reproduction.md §3) on real .nii.gz files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from reference_preprocess import reference_preprocess
from reg2rg.engine.preprocess import ModelInputs, preprocess
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.study import Study
from reg2rg.engine.studyio import read_study, write_study

SHAPE = (96, 96, 40)


def _ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def phantom_like(rng, shape=SHAPE):
    """A chest-like volume: air outside a body ellipse, lungs, heart, bones; int16 HU with noise."""
    vol = np.full(shape, -1024, dtype=np.int16)
    X, Y, Z = shape
    body = _ellipsoid(shape, (X / 2, Y / 2, Z / 2), (X * 0.42, Y * 0.33, Z * 0.45))
    vol[body] = 40
    lung_l = _ellipsoid(shape, (X * 0.32, Y * 0.5, Z / 2), (X * 0.12, Y * 0.2, Z * 0.35)) & body
    lung_r = _ellipsoid(shape, (X * 0.68, Y * 0.5, Z / 2), (X * 0.12, Y * 0.2, Z * 0.35)) & body
    vol[lung_l | lung_r] = -850
    heart = _ellipsoid(shape, (X * 0.52, Y * 0.45, Z * 0.45), (X * 0.1, Y * 0.1, Z * 0.2))
    vol[heart] = 45
    spine = _ellipsoid(shape, (X / 2, Y * 0.75, Z / 2), (X * 0.05, Y * 0.05, Z * 0.5)) & body
    vol[spine] = 700
    vol = vol + rng.integers(-30, 30, size=shape).astype(np.int16) * body
    masks = {
        "lung": lung_l | lung_r,
        "heart": heart,
        "bone": spine,
        "trachea and bronchie": _ellipsoid(shape, (X / 2, Y * 0.45, Z * 0.8), (3, 3, Z * 0.25)),
        "esophagus": _ellipsoid(shape, (X / 2, Y * 0.6, Z * 0.6), (2, 2, Z * 0.3)),
        "thyroid": _ellipsoid(shape, (X / 2, Y * 0.4, Z * 0.92), (6, 3, 3)),
        "abdomen": body & (np.arange(Z) < Z * 0.2)[None, None, :],
        "mediastinum": _ellipsoid(shape, (X / 2, Y * 0.5, Z * 0.55), (X * 0.08, Y * 0.15, Z * 0.3)),
        "pleura": (lung_l | lung_r) & ~_ellipsoid(shape, (X / 2, Y / 2, Z / 2), (X * 0.34, Y * 0.18, Z * 0.3)),
        "breast": body & (np.arange(Y) < Y * 0.3)[None, :, None],
    }
    return vol, masks


def random_volume(rng, shape=SHAPE):
    """Random HU with an air margin, so the foreground crop is a proper sub-box; random blob masks."""
    vol = np.full(shape, -1024, dtype=np.int16)
    inner = (slice(5, shape[0] - 9), slice(3, shape[1] - 4), slice(2, shape[2] - 5))
    vol[inner] = rng.integers(-1100, 1500, size=vol[inner].shape)
    masks = {}
    for region in REGIONS:
        lo = rng.integers((6, 4, 3), np.array(shape) // 2)      # inside the body: the reference fails on air-only regions
        hi = lo + rng.integers(3, np.array(shape) // 2)
        m = np.zeros(shape, dtype=bool)
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(hi - lo)) < 0.6
        masks[region] = m
    return vol, masks


def _affine():
    a = np.diag([-0.75, -0.75, 2.0, 1.0])   # an LPS-stored scan, as most DICOM conversions are
    a[:3, 3] = [100.0, 120.0, -50.0]
    return a


def _write(tmp_path, vol, masks, name="CT_0001"):
    study = Study(voxels=vol, affine=_affine(), masks=masks, name=name)
    vpath, mdir = tmp_path / f"{name}.nii.gz", tmp_path / f"seg_{name}"
    write_study(study, vpath, mdir)
    return vpath, mdir


def _assert_matches(ours: ModelInputs, ref_images, ref_masks, regions):
    assert ours.image.shape == ref_images["image"].shape
    assert torch.max(torch.abs(ours.image - ref_images["image"])).item() <= 1e-4
    assert list(ours.regions) == [r for r in REGIONS if r in regions]
    for region in regions:
        assert ours.regions[region].shape == ref_images[region].shape
        assert torch.max(torch.abs(ours.regions[region] - ref_images[region])).item() <= 1e-4, region
        assert ours.masks[region].shape == ref_masks[region].shape
        assert torch.max(torch.abs(ours.masks[region] - ref_masks[region])).item() <= 1e-4, region


@pytest.mark.parametrize("kind", ["phantom", "random"])
@pytest.mark.parametrize("size", [(256, 256, 64), (40, 36, 16)])   # up-sampling and non-integer down-sampling
def test_matches_monai_reference_all_regions(tmp_path, kind, size):
    rng = np.random.default_rng(7 if kind == "phantom" else 11)
    vol, masks = phantom_like(rng) if kind == "phantom" else random_volume(rng)
    vpath, mdir = _write(tmp_path, vol, masks)

    ref_images, ref_masks = reference_preprocess(vpath, {r: mdir / f"{r}.nii.gz" for r in REGIONS}, size)
    study = read_study(vpath, mdir)
    assert study.voxels.dtype == np.int16                    # read as stored, not float64
    ours = preprocess(study, input_size=size)

    assert set(ref_images) - {"image"} == set(REGIONS)       # every region really exercised
    _assert_matches(ours, ref_images, ref_masks, REGIONS)
    # the region crop really is the region's own box, not the volume box
    assert ours.geometry.region_boxes["thyroid"] != ours.geometry.box


def test_value_range_and_soft_masks(tmp_path):
    vol, masks = phantom_like(np.random.default_rng(3))
    ours = preprocess(Study(voxels=vol, affine=_affine(), masks=masks), input_size=(40, 36, 16))
    lo, hi = (-1000 + 400) / 600, (200 + 400) / 600
    assert ours.image.min() >= lo - 1e-6 and ours.image.max() <= hi + 1e-6
    assert ours.image.dtype == torch.float32 and ours.image.shape == (3, 40, 36, 16)
    soft = ours.masks["heart"]
    assert ((soft > 0) & (soft < 1)).any()                    # "area" resize makes masks soft
    assert torch.equal(ours.image[0], ours.image[2])


def test_empty_and_air_only_masks_are_skipped(tmp_path):
    vol, masks = phantom_like(np.random.default_rng(5))
    masks = dict(masks)
    masks["breast"] = np.zeros(SHAPE, dtype=bool)
    air = np.zeros(SHAPE, dtype=bool)
    air[0:3, 0:3, 0:3] = True                                 # a corner of pure air (-1024 HU)
    masks["pleura"] = air
    ours = preprocess(Study(voxels=vol, affine=_affine(), masks=masks), input_size=(32, 32, 16))
    assert "breast" not in ours.regions and "breast" not in ours.masks
    assert "pleura" not in ours.regions
    assert any("pleura" in w for w in ours.warnings)
    assert "lung" in ours.regions


def test_regions_argument_selects_regions():
    vol, masks = phantom_like(np.random.default_rng(1))
    ours = preprocess(Study(voxels=vol, affine=_affine(), masks=masks), input_size=(16, 16, 8),
                      regions=["lung", "heart"])
    assert list(ours.regions) == ["heart", "lung"]          # REGIONS order, not argument order


def test_flipped_storage_reaches_model_the_same_way():
    """With an orientation code, a scan saved with flipped/permuted axes gives the same tensors."""
    vol, masks = phantom_like(np.random.default_rng(9))
    a = _affine()
    original = Study(voxels=vol, affine=a, masks=masks)
    # same physical scan stored with axis 0 reversed and axes 1/2 swapped
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    perm = np.eye(4)[[0, 2, 1, 3]]
    def stored(x):
        return np.ascontiguousarray(np.flip(x, 0).transpose(0, 2, 1))

    flipped = Study(voxels=stored(vol), affine=a @ flip @ perm, masks={r: stored(m) for r, m in masks.items()})
    assert original.orientation != flipped.orientation

    size = (32, 32, 16)
    ours_a = preprocess(original, input_size=size, orientation="LPS")
    ours_b = preprocess(flipped, input_size=size, orientation="LPS")
    assert torch.equal(ours_a.image, ours_b.image)
    for r in ours_a.regions:
        assert torch.equal(ours_a.regions[r], ours_b.regions[r])
        assert torch.equal(ours_a.masks[r], ours_b.masks[r])
    # as stored, they differ (published behaviour: no reorientation)
    assert not torch.equal(preprocess(original, input_size=size).image, preprocess(flipped, input_size=size).image)


def test_model_inputs_pickle(tmp_path):
    vol, masks = phantom_like(np.random.default_rng(2))
    ours = preprocess(Study(voxels=vol, affine=_affine(), masks=masks), input_size=(16, 16, 8), orientation="RAS")
    back = pickle.loads(pickle.dumps(ours))
    assert back.geometry.box == ours.geometry.box
    assert np.allclose(back.geometry.to_original([[1, 2, 3]]), ours.geometry.to_original([[1, 2, 3]]))
    assert torch.equal(back.image, ours.image)


# --------------------------------------------------------------------------------------------
# The exact window-sum resize gives the pooling kernel's very floats (no float copy of the crop)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, size", [
    ((37, 29, 23), (16, 12, 8)),      # shrink, uneven overlapping windows
    ((20, 13, 9), (32, 13, 17)),      # enlarge, same size, windows of one or two voxels
    ((41, 8, 30), (41, 25, 7)),
])
@pytest.mark.parametrize("order", ["F", "C"])
def test_exact_resize_is_bitwise_the_area_resize(shape, size, order):
    from reg2rg.engine.preprocess import OUTSIDE_REGION_HU, _resize, _resize_exact

    rng = np.random.default_rng(sum(shape) + len(order))
    vol = np.asarray(rng.integers(-1024, 3071, size=shape), dtype=np.int16, order=order)
    mask = np.asarray(rng.random(shape) > 0.4, order=order)
    assert torch.equal(_resize_exact(vol, size), _resize(vol, size))
    masked = np.where(mask, vol.astype(np.float32), np.float32(OUTSIDE_REGION_HU))
    fast = _resize_exact(vol, size, fill_mask=mask, fill_value=OUTSIDE_REGION_HU)
    assert fast.shape == (1, *size) and fast.is_contiguous()
    assert torch.equal(fast, _resize(masked, size))


def test_exact_resize_declines_floats_and_inexact_sums():
    from reg2rg.engine.preprocess import _resize_exact

    assert _resize_exact(np.zeros((8, 8, 8), np.float32), (4, 4, 4)) is None
    # 2**24 / 32768 = 512-voxel windows could sum past float32's exact integers
    assert _resize_exact(np.zeros((64, 64, 64), np.int16), (8, 8, 8)) is None


@pytest.mark.parametrize("mask_box", [((3, 2, 0), (30, 11, 9)), ((0, 0, 0), (40, 31, 12)), ((39, 30, 11), (40, 31, 12))])
def test_mask_resize_from_its_box_is_bitwise_the_area_resize(mask_box):
    from reg2rg.engine.preprocess import _resize, _resize_mask

    rng = np.random.default_rng(7)
    mask = np.zeros((40, 31, 12), bool, order="F")
    inside = tuple(slice(a, b) for a, b in zip(*mask_box))
    mask[inside] = rng.random(mask[inside].shape) > 0.3
    crop = ((2, 1, 1), (37, 31, 12))
    ref = _resize(mask[tuple(slice(a, b) for a, b in zip(*crop))].astype(np.float32), (16, 20, 5))
    assert torch.equal(_resize_mask(mask, crop, (16, 20, 5), mask_box), ref)
    assert torch.equal(_resize_mask(mask, crop, (16, 20, 5)), ref)


@pytest.mark.parametrize("orientation", [None, "LPS", "SAL", "IRP"])
@pytest.mark.parametrize("mask_order", ["F", "C"])
def test_regions_bitwise_equal_the_float_path_in_any_layout(orientation, mask_order):
    """Flipped/permuted views and mixed memory layouts: the exact path keeps the float path's last bit."""
    from reg2rg.engine.preprocess import OUTSIDE_REGION_HU, _intensity, _orient, _resize

    rng = np.random.default_rng(11)
    shape = (30, 26, 21)
    vol = np.asfortranarray(rng.integers(-1100, 3000, size=shape).astype(np.int16))
    masks = {"lung": np.asarray(rng.random(shape) > 0.5, order=mask_order)}
    affine = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    study = Study(voxels=vol, affine=affine, masks=masks)
    size = (16, 12, 5)                                     # windows of 1..6 voxels: divisions by 3 and 5 round
    out = preprocess(study, input_size=size, orientation=orientation)
    ovol, omasks, _ = _orient(study, orientation)
    rsl = tuple(slice(a, b) for a, b in zip(*out.geometry.region_boxes["lung"]))
    masked = np.where(omasks["lung"][rsl], ovol[rsl].astype(np.float32), np.float32(OUTSIDE_REGION_HU))
    assert torch.equal(out.regions["lung"], _intensity(_resize(masked, size)))
    box = tuple(slice(a, b) for a, b in zip(*out.geometry.box))
    assert torch.equal(out.image, _intensity(_resize(ovol[box], size)))
