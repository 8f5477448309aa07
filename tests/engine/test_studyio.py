"""NIfTI volumes in any orientation, the NIfTI scaling, and the RadGenome-layout writer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from reg2rg.engine.regions import REGIONS
from reg2rg.engine.study import Study
from reg2rg.engine.studyio import read_study, read_volume, write_study

SHAPE = (20, 16, 9)


def _vol(seed=0):
    return np.random.default_rng(seed).integers(-1024, 2000, size=SHAPE).astype(np.int16)


@pytest.mark.parametrize("diag, code", [
    ((-0.7, -0.7, 2.5), "LPS"), ((0.7, 0.7, 2.5), "RAS"), ((0.7, -0.7, -2.5), "RPI"),
])
def test_any_orientation_is_kept_as_stored(tmp_path, diag, code):
    a = np.diag([*diag, 1.0])
    a[:3, 3] = [3.0, -4.0, 5.0]
    vol = _vol()
    nib.save(nib.Nifti1Image(vol, a), str(tmp_path / "ct.nii.gz"))
    study = read_volume(tmp_path / "ct.nii.gz")
    assert study.orientation == code
    assert np.array_equal(study.voxels, vol) and study.voxels.dtype == np.int16
    assert np.allclose(study.affine, a)
    assert np.allclose(study.spacing, np.abs(diag))
    assert study.name == "ct" and study.source.endswith("ct.nii.gz")


def test_permuted_axes_are_not_reordered(tmp_path):
    a = np.array([[0, 0, 2.0, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(_vol(), a), str(tmp_path / "sag.nii.gz"))
    study = read_volume(tmp_path / "sag.nii.gz")
    assert study.shape == SHAPE and study.orientation == "ASR"   # axis 0 runs anterior, 1 superior, 2 right


def test_nifti_scaling_applied_without_float64(tmp_path):
    raw = np.random.default_rng(1).integers(0, 3000, size=SHAPE).astype(np.uint16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    study = read_volume(tmp_path / "scaled.nii.gz")
    assert study.voxels.dtype == np.int16
    assert np.array_equal(study.voxels, raw.astype(np.int32) - 1024)

    img = nib.Nifti1Image(raw.astype(np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, str(tmp_path / "half.nii.gz"))
    study = read_volume(tmp_path / "half.nii.gz")
    assert study.voxels.dtype == np.float32
    assert np.allclose(study.voxels, raw * 0.5 - 1024)


def test_float64_volume_read_as_float32(tmp_path):
    nib.save(nib.Nifti1Image(_vol().astype(np.float64), np.eye(4)), str(tmp_path / "f.nii.gz"))
    assert read_volume(tmp_path / "f.nii.gz").voxels.dtype == np.float32


def test_write_study_round_trip_radgenome_layout(tmp_path):
    vol = _vol(2)
    a = np.diag([-0.9, -0.9, 3.0, 1.0])
    masks = {r: np.random.default_rng(i).random(SHAPE) < 0.2 for i, r in enumerate(REGIONS)}
    write_study(Study(voxels=vol, affine=a, masks=masks), tmp_path / "p1" / "a1" / "CT_1.nii.gz",
                tmp_path / "masks" / "seg_CT_1")
    files = sorted(p.name for p in (tmp_path / "masks" / "seg_CT_1").iterdir())
    assert files == sorted(f"{r}.nii.gz" for r in REGIONS)
    assert nib.load(str(tmp_path / "masks" / "seg_CT_1" / "lung.nii.gz")).get_data_dtype() == np.uint8
    study = read_study(tmp_path / "p1" / "a1" / "CT_1.nii.gz", tmp_path / "masks" / "seg_CT_1")
    assert study.name == "CT_1"
    assert np.array_equal(study.voxels, vol) and np.allclose(study.affine, a)
    assert list(study.masks) == list(REGIONS)
    for r in REGIONS:
        assert np.array_equal(study.masks[r], masks[r])
    # random speckle masks are not anatomy: only the plausibility checks (maskcheck) speak
    assert not [w for w in study.warnings if w not in study.mask_problems]


def test_singleton_fourth_dimension_is_accepted(tmp_path):
    nib.save(nib.Nifti1Image(_vol()[..., None], np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert read_volume(tmp_path / "v.nii.gz").shape == SHAPE
