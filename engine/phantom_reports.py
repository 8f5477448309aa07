"""Ground-truth report text for phantom studies, in the register of RadGenome-ChestCT region reports.

Each fact has several templates and the study's seed picks one, so a model cannot learn one sentence per
finding; every template states the finding with its standard CT-RATE term (nodule, pleural effusion,
cardiomegaly, ...), its side and its size, and normal sentences negate cleanly ("No pleural effusion was
detected."), which is what the rule-based abnormality labeller of the evaluator reads. The vocabulary is
kept small on purpose: the demo model's tokenizer is trained on it.
"""

from __future__ import annotations

import numpy as np

from .regions import REGIONS

# Whole-study report: region paragraphs in the order a radiologist dictates a chest CT.
REPORT_ORDER = ("trachea and bronchie", "mediastinum", "thyroid", "heart", "esophagus", "lung", "pleura",
                "breast", "abdomen", "bone")

_NORMAL: dict[str, list[list[str]]] = {
    # region -> sentence slots; each slot is a list of alternatives (one is chosen per study)
    "trachea and bronchie": [
        ["Trachea and both main bronchi are open.", "Trachea and both main bronchi are in the midline and open.",
         "The trachea and both main bronchi are patent."],
        ["No occlusive pathology was detected in the trachea and both main bronchi.",
         "No obstructive lesion was seen in the lumen of the trachea and main bronchi."],
    ],
    "mediastinum": [
        ["Calibration of mediastinal main vascular structures is normal.", "Thoracic aorta diameter is normal.",
         "The mediastinal vascular structures have normal calibration."],
    ],
    "thyroid": [
        ["Thyroid gland is normal in size and density.", "The thyroid gland has a normal appearance.",
         "No pathology was detected in the thyroid gland."],
    ],
    "heart": [],
    "esophagus": [
        ["Thoracic esophagus calibration was normal and no significant wall thickening was detected.",
         "The esophagus has normal calibration and no wall thickening.",
         "No pathological wall thickening was observed in the thoracic esophagus."],
    ],
    "lung": [],
    "pleura": [],
    "breast": [
        ["No mass lesion was detected in both breasts.", "Both breasts have a normal appearance.",
         "No pathology was observed in the breast tissue."],
    ],
    "abdomen": [
        ["Upper abdominal organs included in the sections are normal as far as can be seen.",
         "No space-occupying lesion was detected in the liver that entered the cross-sectional area.",
         "The liver, stomach and spleen included in the sections have a normal appearance."],
    ],
    "bone": [
        ["Bone structures in the study area are normal.", "No lytic or sclerotic lesion was detected in the bone structures.",
         "Bone structures within the sections have a normal appearance."],
    ],
}

# Negations per finding type (said when the finding is absent from its region).
_ABSENT = {
    "Lymphadenopathy": ["No lymph node was observed in the mediastinum in pathological size.",
                        "No lymphadenopathy was detected in the mediastinum."],
    "Arterial wall calcification": ["No calcification was observed in the wall of the thoracic aorta."],
    "Cardiomegaly": ["Heart contour and size are normal.", "Heart size is normal."],
    "Pericardial effusion": ["No pericardial effusion was detected.",
                             "No pericardial effusion or thickening was detected."],
    "Coronary artery wall calcification": ["No calcification was observed in the coronary arteries."],
    "Hiatal hernia": ["No hiatal hernia was detected."],
    "Pleural effusion": ["No pleural effusion was detected.", "No pleural effusion or thickening was detected.",
                         "No pleural effusion was observed on either side."],
    "Lung nodule": ["No nodule was detected in both lungs.", "No mass or nodule was detected in both lungs."],
    "Consolidation": ["No consolidation or infiltrative lesion was detected in both lungs."],
    "Lung opacity": ["No consolidation or infiltrative lesion was detected in both lungs."],
    "Emphysema": ["No emphysema was detected."],
    "Atelectasis": ["No atelectasis was detected."],
}


def _lung_place(f: dict) -> str:
    if f.get("lobe"):
        return f"the {f['lobe']} lobe of the {f['side']} lung"
    return "both lungs" if f.get("side") == "bilateral" else f"the {f['side']} lung"


def _mm(f: dict) -> int:
    return int(round(float(f["size_mm"])))


def finding_sentence(f: dict, rng: np.random.Generator) -> str:
    """One sentence stating a planted finding with its side, place and size (template chosen by ``rng``)."""
    t, place = f["type"], None
    if t == "Lung nodule":
        place = _lung_place(f)
        options = [f"A {_mm(f)} mm nodule is observed in {place}.",
                   f"A nodule measuring {_mm(f)} mm was detected in {place}.",
                   f"In {place}, a solid nodule of {_mm(f)} mm is seen."]
    elif t == "Lung opacity":
        place = _lung_place(f)
        options = [f"A ground-glass opacity measuring {_mm(f)} mm is observed in {place}.",
                   f"An area of ground-glass opacity of {_mm(f)} mm was detected in {place}."]
    elif t == "Consolidation":
        place = _lung_place(f)
        options = [f"A consolidation area measuring {_mm(f)} mm is observed in {place}.",
                   f"Consolidation of {_mm(f)} mm with air bronchograms was detected in {place}."]
    elif t == "Atelectasis":
        place = _lung_place(f)
        options = [f"Subsegmental atelectasis measuring {_mm(f)} mm is observed in {place}.",
                   f"Linear atelectasis of {_mm(f)} mm was detected in {place}."]
    elif t == "Emphysema":
        where = "the upper lobes of both lungs" if f["side"] == "bilateral" else f"the upper lobe of the {f['side']} lung"
        options = [f"{f['amount'].capitalize()} centrilobular emphysema is observed in {where}.",
                   f"{f['amount'].capitalize()} emphysematous changes were detected in {where}."]
    elif t == "Pleural effusion":
        if f["side"] == "bilateral":
            options = [f"Bilateral pleural effusion measuring up to {_mm(f)} mm in thickness was observed.",
                       f"Pleural effusion of {_mm(f)} mm in thickness is seen on both sides."]
        else:
            options = [f"Pleural effusion measuring {_mm(f)} mm in thickness was observed on the {f['side']}.",
                       f"A {f['amount']} {f['side']} pleural effusion of {_mm(f)} mm in thickness is seen.",
                       f"On the {f['side']}, pleural effusion with a thickness of {_mm(f)} mm was detected."]
    elif t == "Pericardial effusion":
        options = [f"Pericardial effusion measuring {_mm(f)} mm in thickness is observed.",
                   f"A pericardial effusion of {_mm(f)} mm in thickness was detected."]
    elif t == "Cardiomegaly":
        options = ["Cardiomegaly is observed.", "The heart is enlarged, consistent with cardiomegaly.",
                   f"{f['amount'].capitalize()} cardiomegaly was detected."]
    elif t == "Arterial wall calcification":
        options = [f"Atherosclerotic calcifications are observed in the wall of the {f['location']}.",
                   f"{f['amount'].capitalize()} calcific atherosclerotic plaques were detected in the {f['location']}."]
    elif t == "Coronary artery wall calcification":
        arteries = f["location"]
        options = [f"Calcific atherosclerotic plaques are observed in the coronary arteries ({arteries}).",
                   f"{f['amount'].capitalize()} coronary artery calcification was detected in the {arteries}."]
    elif t == "Lymphadenopathy":
        options = [f"A lymph node measuring {_mm(f)} mm in short axis is observed in the {f['location']} area.",
                   f"Lymphadenopathy of {_mm(f)} mm was detected in the {f['location']} station."]
    elif t == "Hiatal hernia":
        options = [f"A hiatal hernia measuring {_mm(f)} mm is observed.",
                   f"Hiatal hernia of {_mm(f)} mm was detected at the lower end of the esophagus."]
    elif t == "Medical material":
        if f["kind"] == "pacemaker":
            options = [f"A pacemaker is observed in the {f['side']} chest wall with its lead in the right ventricle.",
                       f"Medical material: a {f['side']} pacemaker with a lead ending in the right ventricle."]
        else:
            options = [f"A port catheter is observed in the {f['side']} chest wall with its tip in the superior vena cava.",
                       f"Medical material: a {f['side']} port with the catheter tip in the superior vena cava."]
    elif t == "Bone lesion":
        options = [f"A {f['kind']} lesion measuring {_mm(f)} mm is observed in the {f['location']} vertebral body.",
                   f"In the {f['location']} vertebral body, a {f['kind']} lesion of {_mm(f)} mm was detected."]
    else:
        raise ValueError(f"no report template for finding type {t!r}")
    return str(options[int(rng.integers(len(options)))])


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


# Which absent-finding negations each region may say (one or two are chosen).
_REGION_NEGATIONS = {
    "mediastinum": ["Lymphadenopathy", "Arterial wall calcification"],
    "heart": ["Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"],
    "esophagus": ["Hiatal hernia"],
    "pleura": ["Pleural effusion"],
    "lung": ["Lung nodule", "Consolidation", "Emphysema", "Atelectasis"],
}


def region_reports(findings: list[dict], rng: np.random.Generator) -> dict[str, str]:
    """Report text for each of the ten regions (1-3 sentences) given the planted findings."""
    out: dict[str, str] = {}
    for region in REGIONS:
        mine = [f for f in findings if f["region"] == region]
        present = {f["type"] for f in findings}
        sentences = [finding_sentence(f, rng) for f in mine]
        if region == "heart" and "Cardiomegaly" not in present:
            sentences.insert(0, _pick(rng, _ABSENT["Cardiomegaly"]))   # heart size is always stated
        negations = [t for t in _REGION_NEGATIONS.get(region, []) if t not in present and t != "Cardiomegaly"]
        if region == "lung" and present & {"Lung opacity", "Consolidation"}:
            negations = [t for t in negations if t != "Consolidation"]
        room = 3 - len(sentences)
        if negations and room > 0:
            k = min(room, 1 if sentences else min(2, len(negations)))
            for i in sorted(rng.choice(len(negations), size=k, replace=False)):
                sentences.append(_pick(rng, _ABSENT[negations[i]]))
        if not sentences or (region in _NORMAL and _NORMAL[region] and not mine):
            slots = _NORMAL[region][: max(1, 3 - len(sentences))]
            sentences = [_pick(rng, slot) for slot in slots] + sentences
        # finding sentences are never dropped; the normal filler is what the 3-sentence budget trims
        out[region] = " ".join(sentences[: max(3, len(mine) + 1)])
    return out


def study_report(region_reports: dict[str, str]) -> str:
    """The whole-study report: the region paragraphs in dictation order."""
    return " ".join(region_reports[r] for r in REPORT_ORDER if region_reports.get(r))
