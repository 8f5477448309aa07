"""Mask plausibility: masks that belong to the CT pass; another patient's, flipped, empty or off-grid masks
are caught with a sentence a radiologist understands. Real NIfTI files throughout (phantoms and the real
CT + TotalSegmentator output of ../shared/realct)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from reg2rg.engine.maskcheck import check_region_masks
from reg2rg.engine.masks import TOTALSEG_V2_CLASSES, save_label_map
from reg2rg.engine.phantom import make_study
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.studyio import read_study, write_study

REALCT = Path(__file__).resolve().parents[2] / ".." / "shared" / "realct"
SHAPE = (96, 96, 48)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom CT with its ten region masks on disk."""
    root = tmp_path_factory.mktemp("phantom")
    study = make_study(7, shape=SHAPE)
    write_study(study, root / "ct.nii.gz", root / "masks")
    return study, root


def _read(ct, masks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_study(ct, masks)


def _need_realct():
    if not (REALCT / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"{REALCT} (the real CT for tests) is not on this machine")


@pytest.mark.parametrize("seed", [1, 2])
def test_own_masks_pass(seed):
    study = make_study(seed, shape=SHAPE)
    assert check_region_masks(study.voxels, study.affine, study.masks) == []


def test_phantom_study_read_from_disk_has_no_problems(phantom):
    study = _read(phantom[1] / "ct.nii.gz", phantom[1] / "masks")
    assert study.regions_present == list(REGIONS) and study.mask_problems == []


def test_real_ct_with_its_own_totalsegmentator_output_passes():
    _need_realct()
    study = _read(REALCT / "example_ct_sm.nii.gz", REALCT / "example_seg_fast.nii.gz")
    assert study.mask_problems == []


def test_wrong_patient_label_map_on_the_same_sized_grid(phantom, tmp_path):
    """The real CT's TotalSegmentator map, put on the phantom's grid (same shape, same affine): opens
    without a reading error, and the lung drawn outside this patient is caught."""
    _need_realct()
    study, root = phantom
    seg = np.asarray(nib.load(str(REALCT / "example_seg_fast.nii.gz")).dataobj)
    labels = np.zeros(SHAPE, np.uint8)
    n = [min(a, b) for a, b in zip(seg.shape, SHAPE)]
    labels[:n[0], :n[1], :n[2]] = seg[:n[0], :n[1], :n[2]]
    save_label_map(tmp_path / "other_patient.nii.gz", labels, study.affine, TOTALSEG_V2_CLASSES)
    got = _read(root / "ct.nii.gz", tmp_path / "other_patient.nii.gz")
    assert "lung" in got.masks                                          # read fine: only the checks catch it
    assert got.mask_problems and all("another scan" in p for p in got.mask_problems)
    assert all(p in got.warnings for p in got.mask_problems)


def test_phantom_masks_on_the_real_ct(phantom, tmp_path):
    """Another patient's masks the other way round: the phantom's lungs and heart over the real upper abdomen."""
    _need_realct()
    study, _ = phantom
    ct = nib.load(str(REALCT / "example_ct_sm.nii.gz"))
    seg = tmp_path / "seg"
    seg.mkdir()
    for region, mask in study.masks.items():
        m = np.zeros(ct.shape, np.uint8)
        n = [min(a, b) for a, b in zip(mask.shape, ct.shape)]
        m[:n[0], :n[1], :n[2]] = mask[:n[0], :n[1], :n[2]]
        nib.save(nib.Nifti1Image(m, ct.affine), str(seg / f"{region}.nii.gz"))
    got = _read(REALCT / "example_ct_sm.nii.gz", seg)
    assert len(got.mask_problems) >= 2
    assert any("another scan" in p or "mirrored" in p for p in got.mask_problems)


def test_flipped_masks(phantom):
    study, _ = phantom
    head_to_foot = {r: m[:, :, ::-1] for r, m in study.masks.items()}
    text = "\n".join(check_region_masks(study.voxels, study.affine, head_to_foot))
    assert "The lung mask lies below the abdomen" in text.replace("Lung: the", "The")
    left_right = {r: m[::-1] for r, m in study.masks.items()}
    text = "\n".join(check_region_masks(study.voxels, study.affine, left_right))
    assert "heart mask lies on the patient's right" in text


def test_empty_mask(phantom, tmp_path):
    study, root = phantom
    seg = tmp_path / "seg"
    seg.mkdir()
    for region in ("lung", "heart"):
        m = study.masks[region] if region == "lung" else np.zeros(SHAPE, bool)
        nib.save(nib.Nifti1Image(m.astype(np.uint8), study.affine), str(seg / f"{region}.nii.gz"))
    got = _read(root / "ct.nii.gz", seg)
    assert list(got.masks) == ["lung"]
    assert got.mask_problems == ["Heart: the mask is empty — the heart section will not be drafted."]


def test_mask_on_another_scan_grid(phantom, tmp_path):
    """The same masks with an affine 60 mm off: resampled (as any off-grid mask), and flagged as another scan."""
    study, root = phantom
    shifted = study.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 60.0]
    seg = tmp_path / "seg"
    seg.mkdir()
    for region in ("lung", "abdomen", "heart"):
        nib.save(nib.Nifti1Image(study.masks[region].astype(np.uint8), shifted), str(seg / f"{region}.nii.gz"))
    got = _read(root / "ct.nii.gz", seg)
    grid = [p for p in got.mask_problems if "different scan grid" in p]
    assert len(grid) == 3 and "centred 60 mm away" in grid[0]
    # a mask on a finer grid over the same field of view is a small resampling: no problem
    fine = study.affine.copy()
    fine[:3, :3] /= 2
    fine[:3, 3] -= np.diag(study.affine)[:3] / 4
    big = np.repeat(np.repeat(np.repeat(study.masks["lung"], 2, 0), 2, 1), 2, 2).astype(np.uint8)
    seg2 = tmp_path / "seg2"
    seg2.mkdir()
    nib.save(nib.Nifti1Image(big, fine), str(seg2 / "lung.nii.gz"))
    got = _read(root / "ct.nii.gz", seg2)
    assert got.mask_problems == [] and got.masks["lung"].sum() == study.masks["lung"].sum()


def test_new_masks_replace_the_warnings_of_the_old_ones(phantom, tmp_path):
    """Opening masks again (or as segmentation tasks arrive) keeps the volume's warnings, not the old masks'."""
    from reg2rg.engine.studyio import read_volume, with_masks

    study, root = phantom
    seg = tmp_path / "seg"
    seg.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), study.affine), str(seg / "heart.nii.gz"))
    volume = read_volume(root / "ct.nii.gz")
    volume.warnings.append("ct.nii.gz: a warning about the volume")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = with_masks(volume, seg)
        assert any("'heart' mask is empty" in w for w in first.warnings)
        second = with_masks(first, root / "masks")
    assert second.warnings == ["ct.nii.gz: a warning about the volume"] and second.mask_problems == []
