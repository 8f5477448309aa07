"""DICOM series: geometry equals that of the equivalent NIfTI; rescale, series choice, bad slices."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dicom_fixtures import write_series
from reg2rg.engine.errors import StudyError, StudyWarning
from reg2rg.engine.studyio import list_dicom_series, read_study, read_volume, write_study
from reg2rg.engine.study import Study

SHAPE = (24, 20, 7)


def _volume(rng):
    return rng.integers(-1024, 1500, size=SHAPE).astype(np.int16)


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(kind):
    a = np.eye(4)
    if kind == "axial":            # the usual LPS-stored axial CT
        a[:3, :3] = np.diag([-0.7, -0.7, 2.5])
    elif kind == "axial_feet_first":   # slices stored head to feet
        a[:3, :3] = np.diag([-0.8, -0.8, -1.25])
    elif kind == "sagittal":       # rows along z, columns along y, slices along x
        a[:3, :3] = np.array([[0, 0, 1.5], [0.9, 0, 0], [0, -0.9, 0]])
    elif kind == "oblique":
        a[:3, :3] = _rotation(0.3, -0.2, 0.5) @ np.diag([0.6, 0.75, 3.0])
    a[:3, 3] = [12.5, -40.0, 200.0]
    return a


def _canonical(data, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.parametrize("kind", ["axial", "axial_feet_first", "sagittal", "oblique"])
def test_affine_and_voxels_match_the_equivalent_nifti(tmp_path, kind):
    rng = np.random.default_rng(0)
    hu, affine = _volume(rng), _affine(kind)
    write_series(tmp_path / "dcm", hu, affine)
    write_study(Study(voxels=hu, affine=affine), tmp_path / "same.nii.gz")

    from_dicom = read_volume(tmp_path / "dcm")
    from_nifti = read_volume(tmp_path / "same.nii.gz")
    assert from_dicom.voxels.dtype == np.int16
    assert from_dicom.shape == from_nifti.shape
    d_vox, d_aff = _canonical(from_dicom.voxels, from_dicom.affine)
    n_vox, n_aff = _canonical(from_nifti.voxels, from_nifti.affine)
    assert np.allclose(d_aff, n_aff, atol=1e-4)
    assert np.array_equal(d_vox, n_vox)
    assert np.allclose(from_dicom.spacing, from_nifti.spacing, atol=1e-4)
    assert not from_dicom.warnings
    assert from_dicom.metadata["n_slices"] == SHAPE[2]


def test_axial_series_keeps_the_stored_layout(tmp_path):
    """Slices sorted by position along the normal: the usual axial series reads as stored, no flips."""
    hu = _volume(np.random.default_rng(1))
    write_series(tmp_path, hu, _affine("axial"))
    study = read_volume(tmp_path)
    assert np.array_equal(study.voxels, hu)
    assert np.allclose(study.affine, _affine("axial"), atol=1e-4)
    assert study.orientation == "LPS"


def test_rescale_slope_and_intercept(tmp_path):
    hu = (np.random.default_rng(2).integers(-2048, 3000, size=SHAPE) // 2 * 2).astype(np.float32)
    write_series(tmp_path / "a", hu, _affine("axial"), slope=2.0, intercept=-2048.0)
    a = read_volume(tmp_path / "a")
    assert a.voxels.dtype == np.int16 and np.array_equal(a.voxels, hu.astype(np.int16))
    half = hu / 4                                           # multiples of 0.5
    write_series(tmp_path / "b", half, _affine("axial"), slope=0.5, intercept=-1024.0)
    b = read_volume(tmp_path / "b")
    assert b.voxels.dtype == np.float32 and np.array_equal(b.voxels, half)


def test_two_series_largest_ct_by_default_and_choice(tmp_path):
    rng = np.random.default_rng(3)
    big, small = _volume(rng), _volume(rng)[:, :, :3]
    write_series(tmp_path, big, _affine("axial"), series_number=2, description="thin")
    write_series(tmp_path, small, _affine("axial"), series_number=5, description="scout")
    series = list_dicom_series(tmp_path)
    assert [s.n_slices for s in series] == [SHAPE[2], 3]
    with pytest.warns(StudyWarning, match="2 series"):
        study = read_volume(tmp_path)
    assert study.shape == SHAPE and any("--series NUMBER_OR_UID" in w for w in study.warnings)   # the real option
    chosen = read_volume(tmp_path, series=5)
    assert chosen.shape == (SHAPE[0], SHAPE[1], 3) and np.array_equal(chosen.voxels, small)
    with pytest.raises(StudyError, match="no series '9'"):
        read_volume(tmp_path, series=9)


def test_non_ct_modality_is_refused(tmp_path):
    write_series(tmp_path, _volume(np.random.default_rng(4)) + 1024, _affine("axial"), modality="MR", intercept=0)
    with pytest.raises(StudyError, match="modality 'MR'"):
        read_volume(tmp_path)


def test_unreadable_file_is_skipped_with_a_warning(tmp_path):
    hu = _volume(np.random.default_rng(5))
    write_series(tmp_path, hu, _affine("axial"))
    (tmp_path / "notes.dcm").write_bytes(b"this is not dicom at all")
    with pytest.warns(StudyWarning, match="not a readable DICOM"):
        study = read_volume(tmp_path)
    assert np.array_equal(study.voxels, hu)


def test_slice_with_broken_pixel_data_names_the_file(tmp_path):
    paths = write_series(tmp_path, _volume(np.random.default_rng(6)), _affine("axial"))
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[: len(raw) - 300])            # cut into the pixel data
    with pytest.raises(StudyError) as err:
        read_volume(tmp_path)
    assert paths[2].name in str(err.value)


def test_missing_slice_is_interpolated_and_every_slice_keeps_its_position(tmp_path):
    """Issue 17: before, the slices after a gap were assumed evenly spaced and shifted towards it."""
    hu = _volume(np.random.default_rng(7))
    write_series(tmp_path, hu, _affine("axial"), skip_slices=(3,))
    with pytest.warns(StudyWarning, match="1 slice\\(s\\) missing.*1 slice\\(s\\) interpolated"):
        study = read_volume(tmp_path)
    assert study.shape == SHAPE                                        # back on the regular grid
    np.testing.assert_allclose(study.affine, _affine("axial"), atol=1e-4)
    present = [k for k in range(SHAPE[2]) if k != 3]
    assert np.array_equal(study.voxels[:, :, present], hu[:, :, present])   # real slices untouched, in place
    expected = np.round((hu[:, :, 2].astype(np.float64) + hu[:, :, 4]) / 2)
    assert np.array_equal(study.voxels[:, :, 3], expected)


def test_a_gap_too_wide_to_fill_is_refused(tmp_path):
    hu = np.random.default_rng(8).integers(-1024, 1500, size=(24, 20, 16)).astype(np.int16)
    write_series(tmp_path, hu, _affine("axial"), skip_slices=(5, 6, 7, 8))       # 12.5 mm where slices are 2.5
    with pytest.raises(StudyError, match="too wide to fill"):
        read_volume(tmp_path)


def test_corrupt_pixel_data_prints_no_pydicom_traceback(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    paths = write_series(tmp_path, _volume(np.random.default_rng(9)), _affine("axial"))
    ds = pydicom.dcmread(paths[1])
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"garbage" * 20])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(StudyError) as err:
        read_volume(tmp_path)
    assert paths[1].name in str(err.value) and "\n" not in str(err.value)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "reg2rg.engine.cli", "--volume", str(tmp_path), "--allow-no-masks",
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and paths[1].name in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_dicom_study_with_nifti_masks_from_a_converter(tmp_path):
    """Masks saved by a NIfTI converter (another storage order) land on the DICOM grid voxel for voxel."""
    rng = np.random.default_rng(8)
    hu, affine = _volume(rng), _affine("axial")
    write_series(tmp_path / "dcm", hu, affine)
    lung = np.zeros(SHAPE, dtype=bool)
    lung[3:15, 5:12, 1:6] = True
    canon = nib.as_closest_canonical(nib.Nifti1Image(lung.astype(np.uint8), affine))   # RAS-stored, as dcm2niix may
    (tmp_path / "seg").mkdir()
    nib.save(canon, tmp_path / "seg" / "lung.nii.gz")
    study = read_study(tmp_path / "dcm", tmp_path / "seg")
    assert np.array_equal(study.masks["lung"], lung)
