"""The chest CT phantom: anatomy and HU per region, planted findings where the metadata says, reports."""

from __future__ import annotations

import re

import numpy as np
import pytest

from reg2rg.engine import phantom as P
from reg2rg.engine.phantom import Finding, PhantomError, make_study
from reg2rg.engine.phantom_reports import region_reports
from reg2rg.engine.regions import REGIONS

SHAPE = (128, 128, 60)
SEED = 11

FINDINGS_A = [
    Finding(P.LUNG_NODULE, side="right", lobe="upper", size_mm=14.0),
    Finding(P.PLEURAL_EFFUSION, side="left", size_mm=30.0),
    Finding(P.CORONARY_CALCIFICATION, amount="severe", location="LAD, LCx and RCA"),
    Finding(P.HIATAL_HERNIA, size_mm=40.0),
    Finding(P.LYMPHADENOPATHY, location="subcarinal", size_mm=20.0),
    Finding(P.MEDICAL_MATERIAL, kind="pacemaker"),
    Finding(P.BONE_LESION, kind="lytic", location="T8", size_mm=14.0),
]
FINDINGS_B = [
    Finding(P.CONSOLIDATION, side="left", lobe="lower", size_mm=40.0),
    Finding(P.LUNG_OPACITY, side="right", lobe="upper", size_mm=36.0),
    Finding(P.ATELECTASIS, side="right", lobe="lower", size_mm=35.0),
    Finding(P.EMPHYSEMA, side="left", amount="severe"),
    Finding(P.CARDIOMEGALY, amount="moderate"),
    Finding(P.PERICARDIAL_EFFUSION, size_mm=14.0),
    Finding(P.ARTERIAL_CALCIFICATION, amount="severe", location="aortic arch and descending aorta"),
]


@pytest.fixture(scope="module")
def normal():
    return make_study(SEED, findings=[], shape=SHAPE)


@pytest.fixture(scope="module")
def study_a():
    return make_study(SEED, findings=FINDINGS_A, shape=SHAPE)


@pytest.fixture(scope="module")
def study_b():
    return make_study(SEED, findings=FINDINGS_B, shape=SHAPE)


def _mean(study, region):
    return float(study.voxels[study.masks[region]].mean())


def _centroid_world(study, mask):
    idx = np.argwhere(mask).mean(axis=0)
    return study.affine[:3, :3] @ idx + study.affine[:3, 3]


def _finding(study, type_):
    return next(f for f in study.metadata["findings"] if f["type"] == type_)


def _at(study, f):
    return int(study.voxels[tuple(f["centre_voxel"])])


def test_volume_and_geometry(normal):
    assert normal.voxels.dtype == np.int16 and normal.shape == SHAPE
    assert normal.orientation == "LPS"
    assert -1024 <= normal.voxels.min() and normal.voxels.max() <= 3071
    # air in front of the patient (j small = anterior) is about -1000 HU
    front = normal.voxels[SHAPE[0] // 2 - 5: SHAPE[0] // 2 + 5, 1:4, SHAPE[2] // 2]
    assert -1060 < front.mean() < -940
    assert normal.metadata["findings"] == []


def test_masks_cover_their_anatomy(normal):
    assert set(normal.masks) == set(REGIONS)
    total = np.zeros(SHAPE, dtype=np.int32)
    for region in REGIONS:
        m = normal.masks[region]
        assert m.dtype == bool and m.shape == SHAPE and m.any(), region
        total += m
    assert total.max() == 1, "regions are painted exclusively"
    assert _mean(normal, "lung") < -700
    assert _mean(normal, "bone") > 200
    assert 0 < _mean(normal, "heart") < 80
    assert 20 < float(np.median(normal.voxels[normal.masks["heart"]])) < 80      # myocardium and blood
    assert 50 < _mean(normal, "thyroid") < 140
    assert _mean(normal, "trachea and bronchie") < -300                         # mostly air lumen
    assert -120 < _mean(normal, "mediastinum") < 20                             # fat around vessels
    assert -130 < _mean(normal, "breast") < 10
    assert -80 < _mean(normal, "abdomen") < 80
    assert 1500 < normal.region_volume_ml("lung") < 9000


def test_anatomy_is_where_it_belongs(normal):
    mid = _centroid_world(normal, normal.masks["trachea and bronchie"])
    heart = _centroid_world(normal, normal.masks["heart"])
    lung = _centroid_world(normal, normal.masks["lung"])
    abdomen = _centroid_world(normal, normal.masks["abdomen"])
    thyroid = _centroid_world(normal, normal.masks["thyroid"])
    # RAS+ world: the heart lies to the patient's left (smaller x) and in front (larger y) of the airway
    assert heart[0] < mid[0] - 5 and heart[1] > mid[1]
    assert abdomen[2] < heart[2] < lung[2] + 40 and thyroid[2] > lung[2]
    liver = normal.masks["abdomen"] & (normal.voxels > 45) & (normal.voxels < 75)
    assert _centroid_world(normal, liver)[0] > mid[0]           # the liver is on the right
    # lung parenchyma has texture and vessels, not a flat value
    lung_hu = normal.voxels[normal.masks["lung"]]
    assert (lung_hu > -300).mean() > 0.01 and np.std(lung_hu) > 40


def test_same_seed_same_anatomy(normal):
    again = make_study(SEED, findings=[], shape=SHAPE)
    assert np.array_equal(again.voxels, normal.voxels)
    assert all(np.array_equal(again.masks[r], normal.masks[r]) for r in REGIONS)
    assert again.metadata == normal.metadata
    other = make_study(SEED + 1, findings=[], shape=SHAPE)
    assert not np.array_equal(other.voxels, normal.voxels)


def test_seed_varies_the_default_grid():
    grids = {make_study(s, findings=[], shape=None).shape[2] for s in (1, 2, 3)}
    assert len(grids) > 1 and all(64 <= z <= 96 for z in grids)


def test_random_findings_mix():
    drawn = [P.random_findings(np.random.default_rng(s)) for s in range(300)]
    normal_share = sum(not d for d in drawn) / len(drawn)
    assert 0.2 < normal_share < 0.45
    assert all(1 <= len(d) <= 4 for d in drawn if d)
    assert len({f.type for d in drawn for f in d}) == len(P.FINDING_TYPES)


def test_nodule_and_effusion_where_the_manifest_says(study_a, normal):
    X = SHAPE[0]
    nod = _finding(study_a, P.LUNG_NODULE)
    c = tuple(nod["centre_voxel"])
    assert nod["region"] == "lung" and nod["side"] == "right" and nod["lobe"] == "upper"
    assert study_a.masks["lung"][c]
    assert -150 < _at(study_a, nod) < 150             # soft tissue inside the lung
    assert normal.voxels[c] < -400                     # the same place without the finding is aerated
    assert c[0] < X // 2                               # LPS: small i = patient right
    eff = _finding(study_a, P.PLEURAL_EFFUSION)
    assert study_a.masks["pleura"][tuple(eff["centre_voxel"])] and eff["centre_voxel"][0] > X // 2
    pleura = study_a.masks["pleura"]
    fluid = pleura & (study_a.voxels > -40) & (study_a.voxels < 60)
    left, right = fluid[X // 2:].sum(), fluid[: X // 2].sum()
    # the thin normal pleura has some partial-volume voxels in this range; the fluid is many more
    base = normal.masks["pleura"] & (normal.voxels > -40) & (normal.voxels < 60)
    assert left > 5 * right and left > 5 * base[X // 2:].sum()
    assert right < 2 * base[: X // 2].sum() + 50
    assert study_a.region_volume_ml("pleura") > normal.region_volume_ml("pleura") + 50


def test_mediastinal_heart_and_bone_findings(study_a, normal):
    heart = study_a.masks["heart"]
    assert (study_a.voxels[heart] > 350).sum() > 3                     # calcified coronary plaques
    assert (normal.voxels[normal.masks["heart"]] > 350).sum() == 0
    node = _finding(study_a, P.LYMPHADENOPATHY)
    assert study_a.masks["mediastinum"][tuple(node["centre_voxel"])] and 0 < _at(study_a, node) < 90
    hernia = _finding(study_a, P.HIATAL_HERNIA)
    assert study_a.masks["esophagus"][tuple(hernia["centre_voxel"])]
    assert study_a.region_volume_ml("esophagus") > normal.region_volume_ml("esophagus") + 15
    pm = _finding(study_a, P.MEDICAL_MATERIAL)
    assert pm["region"] == "heart" and study_a.voxels.max() > 1500
    assert (study_a.voxels[heart] > 1000).any() and not (normal.voxels[normal.masks["heart"]] > 1000).any()
    bone = _finding(study_a, P.BONE_LESION)
    c = tuple(bone["centre_voxel"])
    assert study_a.masks["bone"][c] and _at(study_a, bone) < 150 and normal.voxels[c] > 150


def test_lung_and_heart_findings(study_b, normal):
    cons = _finding(study_b, P.CONSOLIDATION)
    assert study_b.masks["lung"][tuple(cons["centre_voxel"])] and _at(study_b, cons) > -250
    ggo = _finding(study_b, P.LUNG_OPACITY)
    assert -750 < _at(study_b, ggo) < -250 and ggo["centre_voxel"][0] < SHAPE[0] // 2
    atel = _finding(study_b, P.ATELECTASIS)
    assert study_b.masks["lung"][tuple(atel["centre_voxel"])] and _at(study_b, atel) > -450
    left = np.zeros(SHAPE, bool)
    left[SHAPE[0] // 2:] = True
    holes_b = (study_b.voxels < -950) & study_b.masks["lung"]
    holes_n = (normal.voxels < -950) & normal.masks["lung"]
    assert (holes_b & left).sum() > 3 * max((holes_n & left).sum(), 10)
    assert (holes_b & ~left).sum() < 2 * max((holes_n & ~left).sum(), 10)      # left-sided only
    assert study_b.region_volume_ml("heart") > 1.4 * normal.region_volume_ml("heart")
    pe = _finding(study_b, P.PERICARDIAL_EFFUSION)
    assert study_b.masks["heart"][tuple(pe["centre_voxel"])]
    assert -30 < _at(study_b, pe) < 60
    med = study_b.masks["mediastinum"]
    assert (study_b.voxels[med] > 350).sum() > 3 and (normal.voxels[normal.masks["mediastinum"]] > 350).sum() == 0


def test_lesion_map_marks_each_planted_finding(study_a, study_b, normal):
    """metadata["lesions"]: finding i's voxels labelled i + 1 — what it painted, less what was painted over it."""
    assert "lesions" not in normal.metadata
    for study in (study_a, study_b):
        lesions = study.metadata["lesions"]
        assert lesions.shape == study.shape
        labels = [f["lesion_label"] for f in study.metadata["findings"]]
        assert labels == list(range(1, len(labels) + 1))
        for f in study.metadata["findings"]:
            own = lesions == f["lesion_label"]
            assert own.sum() == f["lesion_voxels"] > 0, f["type"]
            inside = (own & study.masks[f["region"]]).sum()
            # mostly in its region; a pacemaker's box sits in the chest wall, its lead in the heart
            assert inside > (0 if f["type"] == P.MEDICAL_MATERIAL else 0.5 * own.sum()), f["type"]
        assert lesions.max() == len(labels)
    nodule = study_a.metadata["lesions"] == _finding(study_a, P.LUNG_NODULE)["lesion_label"]
    assert nodule[tuple(_finding(study_a, P.LUNG_NODULE)["centre_voxel"])]
    assert np.median(normal.voxels[nodule]) < -400 < np.median(study_a.voxels[nodule])  # aerated without it
    effusion = study_a.metadata["lesions"] == _finding(study_a, P.PLEURAL_EFFUSION)["lesion_label"]
    X = SHAPE[0]
    assert effusion[X // 2:].sum() > 0 and effusion[: X // 2].sum() == 0                  # the left side only
    assert -40 < np.median(study_a.voxels[effusion]) < 60                                  # fluid
    # the pericardial fluid is the rim the heart left: the myocardium painted inside it took its voxels back
    b = study_b.metadata["lesions"]
    rim = b == _finding(study_b, P.PERICARDIAL_EFFUSION)["lesion_label"]
    assert rim.any() and -10 < np.median(study_b.voxels[rim]) < 50 and study_b.masks["heart"][rim].all()
    heart = b == _finding(study_b, P.CARDIOMEGALY)["lesion_label"]
    assert not (heart & rim).any() and (heart | rim)[study_b.masks["heart"]].all()
    assert np.median(study_b.voxels[heart]) > np.median(study_b.voxels[rim])


def test_reports_state_each_finding_with_side_and_size(study_a, study_b):
    rr = study_a.metadata["region_reports"]
    assert set(rr) == set(REGIONS)
    assert re.search(r"14 mm", rr["lung"]) and "nodule" in rr["lung"] and "right" in rr["lung"]
    assert "upper lobe" in rr["lung"]
    assert "pleural effusion" in rr["pleura"].lower() and "left" in rr["pleura"] and "30 mm" in rr["pleura"]
    assert "no pleural effusion" not in rr["pleura"].lower()
    assert "coronary" in rr["heart"] and "pacemaker" in rr["heart"]
    assert "hiatal hernia" in rr["esophagus"].lower() and "No hiatal hernia" not in rr["esophagus"]
    assert "lymph" in rr["mediastinum"].lower() and "20 mm" in rr["mediastinum"]
    assert "lytic" in rr["bone"] and "T8" in rr["bone"]
    rb = study_b.metadata["region_reports"]
    assert "consolidation" in rb["lung"].lower() and "ground-glass opacity" in rb["lung"].lower()
    assert "atelectasis" in rb["lung"].lower() and "emphysema" in rb["lung"].lower()
    assert "cardiomegaly" in rb["heart"].lower() and "pericardial effusion" in rb["heart"].lower()
    assert "no pericardial effusion" not in rb["heart"].lower()
    assert "calcific" in rb["mediastinum"].lower() or "calcification" in rb["mediastinum"].lower()
    for study in (study_a, study_b):
        report = study.metadata["report"]
        assert all(study.metadata["region_reports"][r] in report for r in REGIONS)


def test_normal_reports_negate_cleanly(normal):
    rr = normal.metadata["region_reports"]
    assert all(1 <= len(re.findall(r"\.(?:\s|$)", rr[r])) <= 3 for r in REGIONS)
    assert re.search(r"Heart (contour and )?size (are|is) normal", rr["heart"])
    assert "pleural effusion" in rr["pleura"] and rr["pleura"].startswith("No")


def test_report_wording_varies_but_keeps_the_facts():
    f = {"type": P.LUNG_NODULE, "region": "lung", "side": "left", "lobe": "lower", "size_mm": 9.0}
    texts = {region_reports([f], np.random.default_rng(s))["lung"] for s in range(20)}
    assert len(texts) >= 3
    assert all("9 mm" in t and "left" in t and "lower lobe" in t and "nodule" in t for t in texts)


def test_bad_requests_name_the_problem():
    with pytest.raises(PhantomError, match="unknown finding type 'Pneumothorax'"):
        make_study(1, findings=[Finding("Pneumothorax")], shape=(32, 32, 16))
    with pytest.raises(PhantomError, match="middle"):
        make_study(1, findings=[Finding(P.LUNG_NODULE, side="left", lobe="middle")], shape=(32, 32, 16))
    with pytest.raises(PhantomError, match="shape"):
        make_study(1, findings=[], shape=(4, 64, 64))
