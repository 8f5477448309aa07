"""A fixed draft for the report-document tests: a known report text with word tokens of known
probabilities, from a real DICOM series (pydicom-written, read by the engine's reader) or a NIfTI name."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from reg2rg.engine.confidence import TokenConfidence
from reg2rg.engine.generation import ground_sections
from reg2rg.engine.report import Provenance, ReportDraft

TEXT = ("The region 0 is heart: The heart is enlarged. The region 1 is lung: "
        "A 6 mm nodule in the right upper lobe. The region 2 is lung: Bone is intact. "
        "The region 3 is thyroid: The thyroid is normal.")
SLOTS = {0: "heart", 1: "lung", 2: "bone", 3: "thyroid", 4: "pleura"}
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-0042", "AccessionNumber": "ACC-7781",
           "StudyDate": "20260314", "StudyTime": "101500", "StudyDescription": "CT CHEST W/O",
           "StudyID": "S1", "PatientBirthDate": "19600101", "PatientSex": "F", "ReferringPhysicianName": ""}


def word_tokens(text: str) -> list[TokenConfidence]:
    """Tokens = words with their leading space; probabilities fall along the text (known answers)."""
    tokens, pos = [], 0
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        p = max(0.05, 1.0 - i / 40)
        tokens.append(TokenConfidence(index=i, token_id=100 + i, text=piece, start=pos, end=pos + len(piece),
                                      prob=p, entropy=0.1 * i, top=((piece, p), (" x", 0.01))))
        pos += len(piece)
    return tokens


def make_result(text=TEXT, slots=SLOTS, stop_reason="eos"):
    tokens = word_tokens(text)
    return SimpleNamespace(text=text, tokens=tokens, sections=ground_sections(text, slots, tokens),
                           settings={"strategy": "greedy", "max_new_tokens": 500}, stop_reason=stop_reason,
                           slot_regions=dict(slots), seed=None, cancelled=stop_reason == "cancelled")


def dicom_study(tmp_path, n_slices: int = 4):
    """A real DICOM CT series with patient/study identification, read by the engine."""
    from dicom_fixtures import write_series

    from reg2rg.engine.studyio import read_volume

    hu = np.full((8, 8, n_slices), -1000, dtype=np.int16)
    hu[2:6, 2:6, :] = 40
    write_series(tmp_path / "dicom", hu, np.diag([0.7, 0.7, 2.5, 1.0]), header=PATIENT, description="Chest 2.5",
                 series_number=3)
    return read_volume(tmp_path / "dicom")


PROVENANCE = dict(model_name="Reg2RG demo (embedded demo model)", model_version="0+abc", model_path="demo_model",
                  model_digest="sha256:" + "ab" * 32, engine="Reg2RG Viewer engine", engine_version="0.1.0")


def fixed_draft(study, **changes) -> ReportDraft:
    """The draft of `TEXT` for ``study``: heart edited and accepted, bone rejected, the rest as drafted."""
    draft = ReportDraft.from_result(make_result(**changes), study, study_key="key", provenance=Provenance(**PROVENANCE))
    draft.set_text(0, "The heart is mildly enlarged.")
    draft.accept(0, reviewer="Jane Smith")
    draft.reject(2)
    draft.set_impression("Mild cardiomegaly. 6 mm right upper lobe nodule.")
    return draft


def review_all(draft: ReportDraft) -> ReportDraft:
    for s in draft.sections:
        if s.state not in ("accepted", "rejected"):
            draft.accept(s.key, reviewer="Jane Smith")
    return draft
