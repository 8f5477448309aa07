"""Rule-based CT-RATE labeller: every abnormality affirmed and negated, negation forms, phantom reports."""

import numpy as np
import pytest

from reg2rg.train.labeller import ABNORMALITIES, clinical_efficacy, finding_sides, label_report

# abnormality -> (affirming sentence, negating sentence), written by hand
CASES = {
    "Medical material": ("A central venous catheter is seen with its tip in the superior vena cava.",
                         "No catheter or other medical material is seen."),
    "Arterial wall calcification": ("Atherosclerotic calcifications are present in the wall of the thoracic aorta.",
                                    "No calcification is seen in the aortic wall."),
    "Cardiomegaly": ("The heart is enlarged.", "The heart is not enlarged."),
    "Pericardial effusion": ("A small pericardial effusion is present.", "Pericardial effusion is not observed."),
    "Coronary artery wall calcification": ("Calcific plaques are seen in the coronary arteries.",
                                           "There is no calcification in the coronary arteries."),
    "Hiatal hernia": ("A small hiatal hernia is present.", "No hiatal hernia."),
    "Lymphadenopathy": ("Enlarged lymph nodes are seen in the mediastinum.",
                        "No mass or enlarged lymph node is found in mediastinum."),
    "Emphysema": ("Centrilobular emphysema is seen in both upper lobes.", "There is no emphysema."),
    "Atelectasis": ("Subsegmental atelectasis is seen in the left lower lobe.", "Atelectasis is not seen."),
    "Lung nodule": ("A 5 mm nodule is seen in the right upper lobe.", "The lungs are free of nodules."),
    "Lung opacity": ("Ground-glass opacities are present in both lungs.", "No opacity is seen in the lung parenchyma."),
    "Pulmonary fibrotic sequela": ("Fibrotic sequelae are seen in the right middle lobe.", "No fibrotic changes."),
    "Pleural effusion": ("Bilateral pleural effusion is present.", "Effusion is not observed."),
    "Mosaic attenuation pattern": ("A mosaic attenuation pattern is seen in both lungs.", "There is no mosaic attenuation."),
    "Peribronchial thickening": ("Peribronchial thickening is seen in the lower lobes.",
                                 "No peribronchial thickening is observed."),
    "Consolidation": ("Consolidation is seen in the left lower lobe.",
                      "No consolidation, nodule, or pleural effusion is seen."),
    "Bronchiectasis": ("Cylindrical bronchiectasis is present in the right lower lobe.", "No bronchiectasis."),
    "Interlobular septal thickening": ("Interlobular septal thickening is seen in both lungs.",
                                       "There is no interlobular septal thickening."),
}


def _positives(text: str, **kw) -> set[str]:
    return {k for k, v in label_report(text, **kw).items() if v}


def test_cases_cover_all_18():
    assert set(CASES) == set(ABNORMALITIES) and len(ABNORMALITIES) == 18


@pytest.mark.parametrize("name", ABNORMALITIES)
def test_each_abnormality_affirmed_and_negated(name):
    affirmed, negated = CASES[name]
    assert _positives(affirmed) == {name}
    assert _positives(negated) == set()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No pleural effusion.", set()),
        ("Effusion is not observed.", set()),
        ("No pleural or pericardial effusion.", set()),
        ("No consolidation or pleural effusion was detected.", set()),
        ("The lungs are free of nodules and consolidation.", set()),
        ("Lymph nodes in pathological size were not observed in the mediastinum.", set()),
        ("No pleural effusion, but a small pericardial effusion is present.", {"Pericardial effusion"}),
        ("No pleural effusion. Small pericardial effusion.", {"Pericardial effusion"}),
        ("Pericardial and pleural effusion.", {"Pericardial effusion", "Pleural effusion"}),
        ("No significant change in the nodule in the right lung.", {"Lung nodule"}),
        ("Thyroid nodule is seen.", set()),
        ("Subcutaneous emphysema is seen in the chest wall.", set()),
        ("Calcification in the coronary arteries and the aorta.",
         {"Coronary artery wall calcification", "Arterial wall calcification"}),
        ("Calcific atherosclerotic plaques are observed in the coronary arteries.", {"Coronary artery wall calcification"}),
        ("A lymph node measuring 14 mm in short axis is observed.", {"Lymphadenopathy"}),
        ("The region 0 is lung: Emphysema. The region 1 is pleura: No effusion.", {"Emphysema"}),
    ],
)
def test_negation_scope_and_look_alikes(text, expected):
    assert _positives(text) == expected


@pytest.mark.parametrize(
    "text",
    ["Pleural effusion cannot be excluded.", "Possible consolidation in the left lower lobe.",
     "Atelectasis can not be ruled out."],
)
def test_uncertain_mentions_follow_uncertain_as(text):
    assert _positives(text) == set()
    assert len(_positives(text, uncertain_as=1)) == 1


def test_clinical_efficacy_hand_computed():
    refs = ["Pleural effusion.", "Pleural effusion. Cardiomegaly.", "Normal study.", "Lung nodule is seen."]
    preds = ["Pleural effusion.", "No pleural effusion.", "Cardiomegaly.", "Lung nodule is seen."]
    ce = clinical_efficacy(refs, preds)
    # pleural: TP 1, FN 1 -> P 1, R 0.5, F1 2/3, support 2
    assert ce["Pleural effusion"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    # cardiomegaly: TP 0, FP 1, FN 1 -> all 0, support 1
    assert ce["Cardiomegaly"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert ce["Lung nodule"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    w = ce["weighted"]
    assert w["support"] == 4
    assert w["precision"] == pytest.approx((1.0 * 2 + 0 + 1.0) / 4)
    assert w["recall"] == pytest.approx((0.5 * 2 + 0 + 1.0) / 4)
    assert w["f1"] == pytest.approx((2 / 3 * 2 + 0 + 1.0) / 4)


def test_phantom_reports_label_correctly():
    from reg2rg.engine import phantom
    from reg2rg.engine.phantom_reports import region_reports, study_report

    locations = {"Arterial wall calcification": "aortic arch", "Coronary artery wall calcification": "LAD and RCA",
                 "Lymphadenopathy": "subcarinal"}

    def record(kind_type, side="right", kind=None):
        rec = dict(type=kind_type, side=side, lobe="lower", size_mm=14.0, amount="moderate",
                   kind=kind or ("pacemaker" if kind_type == "Medical material" else "centrilobular"),
                   location=locations.get(kind_type), region=phantom.FINDING_REGION[kind_type])
        if kind == "port":
            rec["region"] = "mediastinum"
        return rec

    types = [t for t in phantom.FINDING_TYPES if t in ABNORMALITIES]
    assert len(types) >= 12
    for seed in range(12):  # different seeds pick different templates
        rng = np.random.default_rng(seed)
        cases = [[]] + [[record(t)] for t in types] + [
            [record("Medical material", kind="port")],
            [record("Pleural effusion", side="bilateral"), record("Lung nodule", side="left")],
        ]
        for findings in cases:
            text = study_report(region_reports(findings, rng))
            assert _positives(text) == {f["type"] for f in findings}, text


@pytest.mark.parametrize("text,left,right", [
    ("A small left pleural effusion is present.", 1, 0),
    ("A 12 mm nodule is seen in the right upper lobe. The left lung is clear.", 0, 1),
    ("Bilateral pleural effusions are seen.", 1, 1),
    ("Both lungs are clear. No pleural effusion on the right or the left.", 0, 0),
])
def test_finding_sides_come_from_abnormal_sentences_only(text, left, right):
    assert finding_sides(text) == {"Left side": left, "Right side": right}
