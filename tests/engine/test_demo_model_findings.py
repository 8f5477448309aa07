"""Image conditioning of the shipped demo model (issue 12): on fixed held-out phantoms (seeds outside every
training and validation range of resources/demo_model/seeds.json) with one large planted finding, the
model's greedy draft names that finding, and the blind control's (the same model with the image and
region tokens zeroed) does not. A change that broke the path from the pixels to the words fails here."""

from __future__ import annotations

import json

import pytest
import torch

from reg2rg.engine.controls import BlindReportEngine
from reg2rg.engine.generation import GenerationSettings, ReportEngine, default_model_dir
from reg2rg.engine.phantom import Finding, make_study
from reg2rg.engine.labeller import label_report
from reg2rg.engine.sections import parse_sections, sections_by_area

pytestmark = pytest.mark.skipif(not (default_model_dir() / "config.json").is_file(),
                                reason="the embedded demo model (resources/demo_model) is not built yet")

# (held-out seed, the planted large finding, its region)
CASES = [
    (9601, Finding("Pleural effusion", side="left", size_mm=40.0), "pleura"),
    (9602, Finding("Cardiomegaly", amount="moderate"), "heart"),
    (9603, Finding("Pleural effusion", side="right", size_mm=45.0), "pleura"),
]


@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(2)
    model = ReportEngine.load(None)
    blind = BlindReportEngine(model.model, model.tokenizer)
    return model, blind


def test_the_held_out_seeds_were_never_trained_on():
    splits = json.loads((default_model_dir() / "seeds.json").read_text())["phantom_splits"]
    spans = list(splits["train"]) + [splits["validation"]]
    for key in ("new", "mixed_in"):
        spans += splits.get("finetune", {}).get(key, [])
    for seed, _, _ in CASES:
        assert not any(lo <= seed <= hi for lo, hi in spans), seed


@pytest.mark.parametrize("seed,finding,region", CASES, ids=[f"{c[0]}-{c[1].type}" for c in CASES])
def test_the_draft_names_the_planted_finding_and_the_blind_control_does_not(engines, seed, finding, region):
    model, blind = engines
    study = make_study(seed, [finding])
    settings = GenerationSettings(strategy="greedy", max_new_tokens=600)
    drafted = model.draft(study, settings=settings).text          # every region, as the viewer drafts
    blinded = blind.draft(study, settings=settings).text
    section = sections_by_area(parse_sections(drafted)).get(region, "")
    assert label_report(section)[finding.type] == 1, drafted         # named, in its own region's section
    assert label_report(blinded)[finding.type] == 0, blinded
    if finding.side in ("left", "right"):
        other = "right" if finding.side == "left" else "left"
        assert finding.side in section.lower() and other not in section.lower(), section
