"""Every bad input gives one clear StudyError naming the file, or a warning and a usable study."""

from __future__ import annotations

import numpy as np
import pytest

import bad_inputs
from reg2rg.engine.errors import StudyError, StudyWarning
from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.studyio import read_study


@pytest.mark.parametrize("case, words", [
    ("truncated_nifti", "truncated or corrupt"),
    ("image_2d", "not a 3D volume"),
    ("image_4d", "4D image with 3 volumes"),
])
def test_unusable_volumes_raise_one_clear_error(tmp_path, case, words):
    path = getattr(bad_inputs, case)(tmp_path)
    with pytest.raises(StudyError) as err:
        read_study(path)
    message = str(err.value)
    assert words in message
    assert path.name in message                                 # names the file
    assert isinstance(err.value, ValueError)                    # callers may catch ValueError too
    assert "Traceback" not in message


def test_nans_warn_and_become_air(tmp_path):
    path = bad_inputs.with_nans(tmp_path)
    with pytest.warns(StudyWarning, match="NaN"):
        study = read_study(path)
    assert np.all(np.isfinite(study.voxels))
    assert np.all(study.voxels[5:8, 5:8, 2:4] == -1024)
    assert any("18 voxel(s) are NaN" in w for w in study.warnings)
    preprocess(study, input_size=(8, 8, 4))                    # usable


def test_mr_like_range_warns_and_study_opens(tmp_path):
    path = bad_inputs.mr_like(tmp_path)
    with pytest.warns(StudyWarning, match="MR image"):
        study = read_study(path)
    assert study.shape == bad_inputs.SHAPE
    assert any(path.name in w for w in study.warnings)


def test_mask_with_another_shape_is_resampled_with_a_warning(tmp_path):
    ct, seg = bad_inputs.mask_other_shape(tmp_path)
    with pytest.warns(StudyWarning, match="differs from the CT grid"):
        study = read_study(ct, seg)
    assert study.masks["lung"].shape == study.shape
    # same affine, smaller grid: voxels keep their indices, the rest of the CT is outside the mask
    expected = np.zeros(study.shape, bool)
    expected[4:12, 4:12, 2:8] = True
    assert np.array_equal(study.masks["lung"], expected)
    assert "heart" in study.masks


def test_dicom_folder_with_two_series(tmp_path):
    path = bad_inputs.dicom_two_series(tmp_path)
    with pytest.warns(StudyWarning, match="holds 2 series"):
        study = read_study(path)
    assert study.shape == bad_inputs.SHAPE
    assert study.metadata["series_number"] == 3
    assert read_study(path, series="localizer").shape[2] == 4


def test_make_all_writes_every_case(tmp_path):
    cases = bad_inputs.make_all(tmp_path)
    assert set(cases) == {"truncated", "2d", "4d", "nans", "mr_like", "mask_other_shape", "dicom_two_series"}


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing.nii.gz", "not found"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "unsupported file type"),
    (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "without DICOM files"),
])
def test_wrong_paths(tmp_path, make, words):
    with pytest.raises(StudyError, match=words):
        read_study(make(tmp_path))


def test_volume_without_foreground_cannot_be_preprocessed(tmp_path):
    from reg2rg.engine.study import Study

    study = Study(voxels=np.full((8, 8, 4), -1024, np.int16), affine=np.eye(4), source="air.nii.gz")
    with pytest.raises(StudyError, match="air.nii.gz: no voxel above -1000 HU"):
        preprocess(study, input_size=(4, 4, 2))


def test_study_error_names_the_file_once(tmp_path):
    from reg2rg.engine.errors import StudyError
    from reg2rg.engine.studyio import read_study

    path = tmp_path / "broken_ct.nii.gz"
    path.write_bytes(b"\x00not a gzip stream at all")
    with pytest.raises(StudyError) as info:
        read_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert message.count(str(path)) == 1          # nibabel's own text quoted the full path a second time
    assert "NIfTI" in message


def test_sheared_affine_warns_with_its_angle(tmp_path):
    """Issue 17: a shear passed silently."""
    path = bad_inputs.sheared_affine(tmp_path)
    with pytest.warns(StudyWarning, match="sheared"):
        study = read_study(path)
    assert any("10.0\u00b0 off perpendicular" in w and path.name in w for w in study.warnings)
    plain = read_study(bad_inputs.with_nans(tmp_path))
    assert not any("off perpendicular" in w for w in plain.warnings)
