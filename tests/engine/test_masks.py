"""Region masks: RadGenome folders, label maps + tables, TotalSegmentator output, resampling, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from reg2rg.engine.errors import StudyError, StudyWarning
from reg2rg.engine.masks import (
    TOTALSEG_ABSENT_REGIONS,
    TOTALSEG_TASK_CLASSES,
    TOTALSEG_TO_REGION,
    TOTALSEG_V2_CLASSES,
    label_table_from_header,
    load_label_table,
    region_for_name,
)
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.studyio import read_study, write_study
from reg2rg.engine.study import Study

SHAPE = (30, 26, 12)


def _affine():
    a = np.diag([-0.8, -0.8, 2.0, 1.0])
    a[:3, 3] = [10.0, 20.0, -30.0]
    return a


def _ct(tmp_path):
    vol = np.random.default_rng(0).integers(-1024, 400, size=SHAPE).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    write_study(Study(voxels=vol, affine=_affine()), path)
    return path


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), _affine() if affine is None else affine), str(path))


def _box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


# ---- the TotalSegmentator table ---------------------------------------------------------------

def test_totalsegmentator_table():
    assert len(TOTALSEG_V2_CLASSES) == 117 and TOTALSEG_V2_CLASSES[117] == "costal_cartilages"
    assert TOTALSEG_V2_CLASSES[32] == "vertebrae_T12" and TOTALSEG_V2_CLASSES[50] == "vertebrae_C1"
    assert TOTALSEG_V2_CLASSES[92] == "rib_left_1" and TOTALSEG_V2_CLASSES[115] == "rib_right_12"
    expected = {
        "lung_upper_lobe_left": "lung", "lung_middle_lobe_right": "lung", "lung_lower_lobe_right": "lung",
        "trachea": "trachea and bronchie", "rib_left_7": "bone", "vertebrae_T4": "bone", "sternum": "bone",
        "clavicula_right": "bone", "scapula_left": "bone", "humerus_left": "bone", "costal_cartilages": "bone",
        "liver": "abdomen", "stomach": "abdomen", "spleen": "abdomen", "pancreas": "abdomen",
        "kidney_left": "abdomen", "gallbladder": "abdomen", "adrenal_gland_right": "abdomen",
        "duodenum": "abdomen", "colon": "abdomen", "esophagus": "esophagus", "heart": "heart",
        "heart_ventricle_left": "heart", "heart_atrium_right": "heart", "heart_myocardium": "heart",
        "thyroid_gland": "thyroid",
    }
    for name, region in expected.items():
        assert TOTALSEG_TO_REGION[name] == region, name
    assert set(TOTALSEG_TO_REGION.values()) <= set(REGIONS)
    assert set(TOTALSEG_ABSENT_REGIONS) == {"breast", "mediastinum", "pleura"}
    for unmapped in ("aorta", "spinal_cord", "gluteus_maximus_left", "brain"):
        assert unmapped not in TOTALSEG_TO_REGION
    assert region_for_name("Trachea_and_Bronchie") == "trachea and bronchie"
    assert region_for_name("lung_lower_lobe_left") == "lung"


# ---- RadGenome folders --------------------------------------------------------------------------

def test_radgenome_folder_reads_all_regions(tmp_path):
    ct = _ct(tmp_path)
    (tmp_path / "seg").mkdir()
    for i, region in enumerate(REGIONS):
        _save(tmp_path / "seg" / f"{region}.nii.gz", _box((i, 2, 1), (i + 5, 20, 10)))
    study = read_study(ct, tmp_path / "seg")
    assert list(study.masks) == list(REGIONS)
    assert all(m.dtype == bool and m.shape == SHAPE for m in study.masks.values())
    assert study.masks["bone"].sum() == 5 * 18 * 9
    assert study.mask_sources["heart"].endswith("heart.nii.gz")
    assert study.regions_present == list(REGIONS)
    # boxes on noise are anatomical nonsense: only the plausibility checks speak, no reading warning
    assert study.mask_problems and not [w for w in study.warnings if w not in study.mask_problems]


def test_unknown_empty_nonbinary_masks_warn_and_study_opens(tmp_path):
    ct = _ct(tmp_path)
    seg = tmp_path / "seg"
    seg.mkdir()
    _save(seg / "Lung.nii.gz", _box((2, 2, 2), (10, 10, 8)))                    # case variant
    _save(seg / "spleenish.nii.gz", _box((2, 2, 2), (4, 4, 4)))                 # unknown name
    _save(seg / "heart.nii.gz", np.zeros(SHAPE, np.uint8))                      # empty
    _save(seg / "bone.nii.gz", _box((5, 5, 5), (9, 9, 9)) * 255)                # 0/255
    prob = np.zeros(SHAPE, np.float32)
    prob[10:14, 10:14, 2:6] = 0.8
    prob[14:16, 10:14, 2:6] = 0.3
    _save(seg / "thyroid.nii.gz", prob)                                         # probabilities
    with pytest.warns(StudyWarning):
        study = read_study(ct, seg)
    assert set(study.masks) == {"lung", "bone", "thyroid"}
    assert study.masks["bone"].sum() == 4 ** 3
    assert study.masks["thyroid"].sum() == 4 * 4 * 4                           # thresholded at 0.5
    text = "\n".join(study.warnings)
    assert "unknown region name 'spleenish'" in text
    assert "'heart' mask is empty" in text
    assert "bone.nii.gz: mask is not binary" in text and "thyroid.nii.gz: mask is not binary" in text


def test_mask_on_another_grid_is_resampled_by_affines(tmp_path):
    ct = _ct(tmp_path)
    seg = tmp_path / "seg"
    seg.mkdir()
    # a half-resolution mask grid covering the same space: voxel (i,j,k) of the CT is (i//2, j//2, k) there
    coarse = np.zeros((15, 13, 12), np.uint8)
    coarse[2:6, 3:7, 4:8] = 1
    a = _affine().copy()
    a[:3, :2] *= 2.0
    a[:3, 3] += (np.array([-0.8, -0.8, 0.0]) * 0.5)        # voxel centres of the coarse grid
    _save(seg / "lung.nii.gz", coarse, a)
    # a mask far outside the CT
    far = _affine().copy()
    far[:3, 3] += [500.0, 0.0, 0.0]
    _save(seg / "heart.nii.gz", _box((2, 2, 2), (8, 8, 8)), far)
    with pytest.warns(StudyWarning, match="resampled"):
        study = read_study(ct, seg)
    expected = np.zeros(SHAPE, bool)
    expected[4:12, 6:14, 4:8] = True
    assert np.array_equal(study.masks["lung"], expected)
    assert "heart" not in study.masks
    assert any("does not overlap the CT" in w for w in study.warnings)


# ---- label maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("table_kind", ["dict", "json", "csv", "txt"])
def test_label_map_with_table(tmp_path, table_kind):
    ct = _ct(tmp_path)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[6:9, 6:9, 6:9] = 2
    labels[10:12, 10:12, 2:4] = 3
    labels[20:22, 20:22, 2:4] = 4
    _save(tmp_path / "labels.nii.gz", labels)
    table = {1: "lung", 2: "Trachea_and_Bronchie", 3: "heart", 4: "lung"}
    if table_kind == "json":
        (tmp_path / "t.json").write_text(json.dumps({str(k): v for k, v in table.items()}))
        table = tmp_path / "t.json"
    elif table_kind == "csv":
        (tmp_path / "t.csv").write_text("value,name\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
        table = tmp_path / "t.csv"
    elif table_kind == "txt":
        (tmp_path / "t.txt").write_text("# label table\n" + "".join(f"{k} {v}\n" for k, v in table.items()))
        table = tmp_path / "t.txt"
    study = read_study(ct, tmp_path / "labels.nii.gz", label_table=table)
    assert list(study.masks) == ["heart", "lung", "trachea and bronchie"]
    assert study.masks["lung"].sum() == 4 ** 3 + 2 * 2 * 2
    assert study.masks["trachea and bronchie"].sum() == 27
    assert "labels 1, 4" in study.mask_sources["lung"]


def test_bad_label_table_names_the_file(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(StudyError, match="t.json"):
        load_label_table(tmp_path / "t.json")
    with pytest.raises(StudyError, match="not found"):
        load_label_table(tmp_path / "missing.csv")


# ---- TotalSegmentator output ---------------------------------------------------------------------

def test_totalsegmentator_multilabel_file(tmp_path):
    ct = _ct(tmp_path)
    inv = {v: k for k, v in TOTALSEG_V2_CLASSES.items()}
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:4, 1:4, 1:4] = inv["lung_upper_lobe_left"]
    labels[4:6, 1:4, 1:4] = inv["lung_lower_lobe_right"]
    labels[8:10, 8:10, 8:10] = inv["rib_left_3"]
    labels[10:12, 8:10, 8:10] = inv["vertebrae_T7"]
    labels[14:16, 2:4, 2:4] = inv["trachea"]
    labels[20:24, 2:4, 2:4] = inv["liver"]
    labels[20:24, 10:12, 2:4] = inv["aorta"]                 # no Reg2RG region: ignored
    _save(tmp_path / "totalseg.nii.gz", labels)
    with pytest.warns(StudyWarning, match="TotalSegmentator"):
        study = read_study(ct, tmp_path / "totalseg.nii.gz")
    assert list(study.masks) == ["abdomen", "bone", "lung", "trachea and bronchie"]
    assert study.masks["lung"].sum() == 27 + 18
    assert study.masks["bone"].sum() == 16
    text = "\n".join(study.warnings)
    assert "without its 'breasts' task: no mask for breast" in text and "'trunk_cavities' task: no mask for mediastinum, pleura" in text


def test_totalsegmentator_folder(tmp_path):
    ct = _ct(tmp_path)
    seg = tmp_path / "segmentations"
    seg.mkdir()
    _save(seg / "lung_upper_lobe_left.nii.gz", _box((1, 1, 1), (4, 4, 4)))
    _save(seg / "lung_lower_lobe_left.nii.gz", _box((4, 1, 1), (6, 4, 4)))
    _save(seg / "heart.nii.gz", _box((10, 10, 2), (14, 14, 6)))
    _save(seg / "thyroid_gland.nii.gz", _box((20, 10, 9), (22, 12, 11)))
    _save(seg / "aorta.nii.gz", _box((15, 15, 2), (17, 17, 9)))
    _save(seg / "esophagus.nii.gz", np.zeros(SHAPE, np.uint8))     # empty in this scan
    with pytest.warns(StudyWarning):
        study = read_study(ct, seg)
    assert list(study.masks) == ["heart", "lung", "thyroid"]
    assert study.masks["lung"].sum() == 27 + 18
    assert "+" in study.mask_sources["lung"]                        # union of two lobes
    text = "\n".join(study.warnings)
    assert "without its 'breasts' task: no mask for breast" in text and "'trunk_cavities' task: no mask for mediastinum, pleura" in text
    assert "'esophagus' mask is empty" in text
    assert "aorta" not in text                                       # known structure, just not a region


# ---- all ten regions from TotalSegmentator's tasks -------------------------------------------------

REALCT = Path(__file__).resolve().parents[2] / ".." / "shared" / "realct"


def _phantom_with_totalseg(tmp_path, findings=None):
    """A phantom CT (RadGenome masks) and the same anatomy as TotalSegmentator task files, as reg2rg-phantom writes."""
    from reg2rg.engine.phantom import make_study
    from reg2rg.engine.phantom_cli import write_totalseg

    study = make_study(11, findings=findings, shape=(80, 80, 40), totalseg=True)
    ct = tmp_path / "ct.nii.gz"
    write_study(study, ct, tmp_path / "radgenome")
    write_totalseg(study, tmp_path / "totalseg")
    return study, ct


def test_phantom_totalseg_tasks_give_all_ten_regions(tmp_path):
    from reg2rg.engine.phantom import PERICARDIAL_EFFUSION, PLEURAL_EFFUSION, Finding

    study, ct = _phantom_with_totalseg(tmp_path, [Finding(PLEURAL_EFFUSION, side="right", size_mm=30.0),
                                                  Finding(PERICARDIAL_EFFUSION, size_mm=12.0)])
    (tmp_path / "totalseg" / "lung_vessels.nii.gz").unlink()        # optional task: not run by default
    files = sorted(p.name for p in (tmp_path / "totalseg").iterdir())
    assert files == ["breasts.nii.gz", "pleural_pericard_effusion.nii.gz", "total.nii.gz", "trunk_cavities.nii.gz"]
    header = label_table_from_header(nib.load(str(tmp_path / "totalseg" / "trunk_cavities.nii.gz")))
    assert header == TOTALSEG_TASK_CLASSES["trunk_cavities"]
    got = read_study(ct, tmp_path / "totalseg")
    assert list(got.masks) == list(REGIONS)
    for region in REGIONS:       # the mapping rules give back exactly the phantom's painted regions
        assert np.array_equal(got.masks[region], study.masks[region]), region
    effusion = np.asarray(nib.load(str(tmp_path / "totalseg" / "pleural_pericard_effusion.nii.gz")).dataobj)
    assert (effusion == 2).sum() > 50 and got.masks["pleura"][effusion == 2].all()     # effusion inside pleura
    assert (effusion == 3).sum() > 20 and got.masks["heart"][effusion == 3].all()      # pericardial: heart
    assert "thoracic cavity minus lungs" in got.mask_sources["pleura"]
    assert not any("stay absent" in w for w in got.warnings)


def test_per_structure_totalseg_folder_derives_mediastinum_and_pleura(tmp_path):
    """TotalSegmentator without --ml writes one file per structure; 'mediastinum.nii.gz' there is its
    trunk_cavities structure (heart, esophagus, trachea removed), not a RadGenome region file."""
    study, ct = _phantom_with_totalseg(tmp_path)
    seg = tmp_path / "structures"
    seg.mkdir()
    for task in ("total", "trunk_cavities", "breasts"):
        labels = study.metadata["totalseg"][task]
        for value, name in TOTALSEG_TASK_CLASSES[task].items():
            if (labels == value).any():
                _save(seg / f"{name}.nii.gz", (labels == value).astype(np.uint8), study.affine)
    got = read_study(ct, seg)
    assert list(got.masks) == list(REGIONS)
    assert np.array_equal(got.masks["mediastinum"], study.masks["mediastinum"])
    assert np.array_equal(got.masks["pleura"], study.masks["pleura"])
    assert not (got.masks["mediastinum"] & got.masks["esophagus"]).any()


def test_older_totalseg_output_names_the_missing_tasks(tmp_path):
    study, ct = _phantom_with_totalseg(tmp_path)
    only_total = tmp_path / "only_total"
    only_total.mkdir()
    (tmp_path / "totalseg" / "total.nii.gz").rename(only_total / "total.nii.gz")
    with pytest.warns(StudyWarning, match="trunk_cavities"):
        got = read_study(ct, only_total)
    assert list(got.masks) == ["abdomen", "bone", "esophagus", "heart", "lung", "thyroid", "trachea and bronchie"]
    text = "\n".join(got.warnings)
    assert "without its 'breasts' task: no mask for breast" in text
    assert "without its 'trunk_cavities' task: no mask for mediastinum, pleura" in text
    # without trunk_cavities' abdominal cavity the abdomen is the organs only (smaller than the phantom's cavity)
    assert got.masks["abdomen"].sum() < study.masks["abdomen"].sum()


def test_real_totalsegmentator_output_on_the_real_ct():
    """The real `total --fast` output of TotalSegmentator's test CT (lower chest, upper abdomen)."""
    ct, seg = REALCT / "example_ct_sm.nii.gz", REALCT / "example_seg_fast.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{REALCT} (the real CT for tests) is not on this machine")
    got = read_study(ct, seg)
    assert set(got.masks) == {"abdomen", "bone", "lung"}
    assert "labels 10, 11, 14" in got.mask_sources["lung"]   # lobes, values from the file's own table
    assert float(got.voxels[got.masks["lung"]].mean()) < -600          # aerated lung
    assert 0 < float(np.median(got.voxels[got.masks["abdomen"]])) < 100   # liver, spleen, bowel
    text = "\n".join(got.warnings)
    assert "without a label table" not in text                        # the table came from the header
    assert "no usable mask for esophagus, heart, thyroid, trachea and bronchie" in text
    assert "'breasts' task" in text and "'trunk_cavities' task" in text
