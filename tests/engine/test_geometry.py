"""Geometry: model-grid voxels map back onto the original CT (points and whole heatmaps)."""

from __future__ import annotations

import numpy as np
import pytest

from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.study import Study

SHAPE = (60, 50, 30)
SIZE = (16, 16, 8)


def _study(stored_flipped: bool):
    """A CT with air around a body box and one region; optionally stored with axes flipped/permuted."""
    vol = np.full(SHAPE, -1024, dtype=np.int16)
    vol[7:55, 4:41, 2:27] = 50
    lung = np.zeros(SHAPE, dtype=bool)
    lung[10:30, 8:35, 5:20] = True
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-20.0, -15.0, 30.0]
    if not stored_flipped:
        return Study(voxels=vol, affine=affine, masks={"lung": lung})
    # stored as (Z, Y, X) with the first and last axes reversed: index (i,j,k) holds voxel (X-1-k, j, Z-1-i)
    def t(a):
        return np.ascontiguousarray(np.flip(np.flip(a, 0), 2).transpose(2, 1, 0))

    m = np.zeros((4, 4))
    m[0, 2], m[0, 3] = -1, SHAPE[0] - 1
    m[1, 1] = 1
    m[2, 0], m[2, 3] = -1, SHAPE[2] - 1
    m[3, 3] = 1
    return Study(voxels=t(vol), affine=affine @ m, masks={"lung": t(lung)})


def _world(study, ijk):
    return ijk @ study.affine[:3, :3].T + study.affine[:3, 3]


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("orientation", [None, "LPS"])
@pytest.mark.parametrize("region", [None, "lung"])
def test_point_round_trip_below_one_model_voxel(flipped, orientation, region):
    study = _study(flipped)
    g = preprocess(study, input_size=SIZE, orientation=orientation).geometry
    rng = np.random.default_rng(0)
    model_pts = rng.uniform(0, np.array(SIZE) - 1, size=(50, 3))
    orig = g.to_original(model_pts, region)
    back = g.to_model(orig, region)
    assert np.max(np.abs(back - model_pts)) < 1e-6
    # rounding a mapped point to the nearest CT voxel and mapping it back costs less than one model voxel
    rounded = np.round(orig)
    err = np.abs(g.to_model(rounded, region) - model_pts)
    assert np.all(err < 1.0)


@pytest.mark.parametrize("orientation", [None, "LPS"])
def test_same_world_point_whatever_the_storage(orientation):
    """Model voxel -> original voxel -> world is the same for a scan and its flipped storage (with reorientation)."""
    a, b = _study(False), _study(True)
    ga = preprocess(a, input_size=SIZE, orientation="LPS").geometry
    gb = preprocess(b, input_size=SIZE, orientation="LPS").geometry
    pts = np.array([[0.0, 0.0, 0.0], [15.0, 15.0, 7.0], [3.2, 9.7, 4.1]])
    assert np.allclose(_world(a, ga.to_original(pts)), _world(b, gb.to_original(pts)), atol=1e-6)


def test_corners_of_box_map_to_box_edges():
    study = _study(False)
    g = preprocess(study, input_size=SIZE).geometry
    assert g.box == ((7, 4, 2), (55, 41, 27))              # the body box of _study
    (x0, y0, z0), (x1, y1, z1) = g.box
    lo = g.to_original([[-0.5, -0.5, -0.5]])[0]           # outer edge of the first model voxel
    hi = g.to_original([[SIZE[0] - 0.5, SIZE[1] - 0.5, SIZE[2] - 0.5]])[0]
    assert np.allclose(lo, [x0 - 0.5, y0 - 0.5, z0 - 0.5])
    assert np.allclose(hi, [x1 - 0.5, y1 - 0.5, z1 - 0.5])


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("orientation", [None, "RAS", "LPS"])
@pytest.mark.parametrize("region", [None, "lung"])
def test_heatmap_peak_lands_where_to_original_says(flipped, orientation, region):
    study = _study(flipped)
    g = preprocess(study, input_size=SIZE, orientation=orientation).geometry
    p = np.array([11, 4, 5])
    heat = np.zeros(SIZE, dtype=np.float32)
    heat[tuple(p)] = 1.0
    out = g.heatmap_to_original(heat, region)
    assert out.shape == study.shape and out.dtype == np.float32
    peak = np.array(np.unravel_index(np.argmax(out), out.shape), dtype=float)
    target = g.to_original(p[None].astype(float), region)[0]
    # below one model voxel, measured in original voxels along each stored axis
    start, stop = g.box_for(region)
    model_voxel = np.abs(g.reorient[:3, :3]) @ (np.subtract(stop, start) / np.array(SIZE))
    assert np.all(np.abs(peak - target) <= model_voxel + 1e-6)
    # zero outside the box
    inside = np.zeros(g.oriented_shape, dtype=bool)
    inside[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    from nibabel.orientations import apply_orientation
    from reg2rg.engine.preprocess import _inverse_ornt
    inside = apply_orientation(inside, _inverse_ornt(g.ornt))
    assert np.all(out[~inside] == 0)
    assert out[inside].max() > 0


def test_constant_heatmap_fills_exactly_the_box():
    study = _study(True)
    g = preprocess(study, input_size=SIZE, orientation="LPS").geometry
    out = g.heatmap_to_original(np.ones(SIZE, dtype=np.float32))
    box_voxels = np.prod(np.subtract(g.box[1], g.box[0]))
    assert np.count_nonzero(out) == box_voxels
    assert np.allclose(out[out > 0], 1.0)
    # the filled voxels are exactly the body (foreground), which is the crop box here
    assert np.array_equal(out > 0, study.voxels > -1000)
