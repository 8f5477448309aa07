"""Held-out quality of the demo model on test phantoms, and of a blind control, for its MODEL_CARD.md.

    .venv/bin/python scripts/eval_demo_model.py --model resources/demo_model --test runs/demo_model/data/test \
        --out runs/demo_model/eval

For every test phantom (written by ``reg2rg-phantom``, with its manifest of planted findings) the model
drafts a report through the engine (`ReportEngine.draft`, greedy, the project's default decoding) twice: normally, and as a
**blind control** whose global-image and region tokens are replaced by zeros in the prompt embeddings
(the text, the markers and the slot structure stay). Both go through ``reg2rg-eval`` (NLG metrics, region
prediction accuracy, CT-RATE clinical efficacy) and through a planted-finding check: a planted finding
is found when the labeller (`train.labeller`) affirms its abnormality in the generated report (bone
lesions: the word "lesion" in the bone section); its side is right when the generated section of its
region names the planted side; its size is right when a size stated there is within 25% (min 3 mm)
of the planted size. Results go to ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reg2rg.engine.checkpoint import load_pretrained
from reg2rg.engine.controls import BlindReportEngine
from reg2rg.engine.generation import GenerationSettings, ReportEngine
from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.sections import parse_sections
from reg2rg.engine.studyio import read_study
from reg2rg.train.labeller import ABNORMALITIES, label_report

BONE_LESION = "Bone lesion"
SIDE_WORDS = {"right": ("right",), "left": ("left",), "bilateral": ("both", "bilateral")}


def reference_report(reports: dict[str, str], slots: dict[int, str]) -> str:
    return "".join(f"The region {j} is {area}: {reports.get(area, '')} " for j, area in sorted(slots.items()))


def read_reports(csv_path: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["Volumename"], {})[row["Anatomy"]] = row["Sentence"]
    return out


def _section_texts(report: str) -> dict[str, str]:
    """Generated text by the area the model named (several slots naming one area are joined)."""
    out: dict[str, str] = {}
    for section in parse_sections(report):
        area = section.area or ""
        out[area] = (out.get(area, "") + " " + section.text).strip()
    return out


def finding_found(finding: dict, labels: dict[str, int], sections: dict[str, str]) -> bool:
    if finding["type"] == BONE_LESION:
        return "lesion" in sections.get("bone", "").lower()
    return bool(labels.get(finding["type"], 0))


def side_right(finding: dict, sections: dict[str, str]) -> bool | None:
    side = finding.get("side")
    if side not in SIDE_WORDS:
        return None
    text = sections.get(finding["region"], "").lower()
    wanted = any(re.search(rf"\b{w}\b", text) for w in SIDE_WORDS[side])
    others = [s for s in SIDE_WORDS if s != side and s != "bilateral" and side != "bilateral"]
    wrong = any(re.search(rf"\b{w}\b", text) for s in others for w in SIDE_WORDS[s])
    return wanted and not wrong


def size_right(finding: dict, sections: dict[str, str]) -> bool | None:
    size = finding.get("size_mm")
    if not size:
        return None
    stated = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*mm", sections.get(finding["region"], ""))]
    return any(abs(s - size) <= max(3.0, 0.30 * size) for s in stated)


# Extent (mm) of a planted finding along the crop's three axes, from the manifest and the phantom's shapes
# (engine/phantom.py): None means the finding fills its region (always visible).
LEAD_MM = 2.8           # pacemaker lead / port catheter diameter (the device itself lies outside every mask)
PLAQUE_MM = 6.4         # largest calcified plaque diameter (radius 1.6-3.2 mm)
HOLE_MM = 6.0           # emphysema: centrilobular holes of the phantom's 2.6 mm-scale texture, each a few mm
MIN_VOXELS = 3


def finding_extent(finding: dict) -> tuple[float, float, float] | str | None:
    kind, size = finding["type"], finding.get("size_mm")
    if kind == "Cardiomegaly":
        return None
    if kind == "Emphysema":                           # many small holes: each must be seen
        return (HOLE_MM,) * 3
    if kind in ("Pleural effusion", "Pericardial effusion"):
        return "thickness"
    if kind == "Atelectasis":
        return (size, 7.0, 14.0)                    # a plate: length x 7 mm x 14 mm (tilted)
    if kind in ("Arterial wall calcification", "Coronary artery wall calcification"):
        return (PLAQUE_MM,) * 3
    if kind == "Medical material":
        return (LEAD_MM,) * 3
    return (size,) * 3                                # round lesions: nodule, node, opacity, hernia, bone


def visible_at_input(finding: dict, crop_voxel_mm: tuple[float, float, float] | None) -> bool:
    """The rule of the module docstring; ``crop_voxel_mm``: the region crop's voxel size (None: the region
    was not read, so nothing in it is visible)."""
    if crop_voxel_mm is None:
        return False
    extent = finding_extent(finding)
    if extent is None:
        return True
    if extent == "thickness":                         # across the in-plane axes of the crop
        return finding["size_mm"] / max(crop_voxel_mm[:2]) >= MIN_VOXELS
    return all(e / v >= MIN_VOXELS for e, v in zip(extent, crop_voxel_mm))


def crop_voxel_sizes(study, input_size, orientation) -> dict[str, tuple[float, float, float]]:
    """Region -> voxel size (mm) of its crop at the model's input, from the pre-processing geometry."""
    inputs = preprocess(study, input_size, orientation)
    geometry = inputs.geometry
    spacing = np.asarray(study.spacing, dtype=float)[np.asarray(geometry.ornt)[:, 0].astype(int)]
    out = {}
    for region, (lo, hi) in geometry.region_boxes.items():
        extent_mm = (np.asarray(hi) - np.asarray(lo)) * spacing
        out[region] = tuple(float(e / n) for e, n in zip(extent_mm, geometry.input_size))
    return out


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def finding_scores(studies: list[dict], preds: dict[str, str], visible: dict[str, set[str]] | None = None) -> dict:
    """Micro P/R/F1 of planted findings (by abnormality type per study) over all of them and over the
    visible ones (``visible``: volume -> the visible planted types), per type, side and size correctness."""
    kinds = list(ABNORMALITIES) + [BONE_LESION]
    zero = {"tp": 0, "fp": 0, "fn": 0}
    per_type = {k: dict(zero, side_hits=0, side_checked=0, size_hits=0, size_checked=0) for k in kinds}
    vis = {k: dict(zero) for k in kinds}
    side_hits = side_total = size_hits = size_total = 0
    for study in studies:
        pred = preds[study["volume"]]
        labels = label_report(pred)
        sections = _section_texts(pred)
        planted = {f["type"] for f in study["findings"]}
        shown = visible.get(study["volume"], set()) if visible is not None else planted
        predicted = {k for k in ABNORMALITIES if labels[k]}
        if "lesion" in sections.get("bone", "").lower():
            predicted.add(BONE_LESION)
        for kind in kinds:
            p, t = kind in predicted, kind in planted
            per_type[kind]["tp"] += p and t
            per_type[kind]["fp"] += p and not t
            per_type[kind]["fn"] += t and not p
            if t and kind not in shown:
                continue                              # planted but invisible: neither way
            vis[kind]["tp"] += p and t
            vis[kind]["fp"] += p and not t
            vis[kind]["fn"] += t and not p
        for finding in study["findings"]:
            if not finding_found(finding, labels, sections):
                continue
            t = per_type[finding["type"]]
            s = side_right(finding, sections)
            if s is not None:
                side_total += 1
                side_hits += s
                t["side_checked"] += 1
                t["side_hits"] += s
            z = size_right(finding, sections)
            if z is not None:
                size_total += 1
                size_hits += z
                t["size_checked"] += 1
                t["size_hits"] += z
    total = lambda table, key: sum(v[key] for v in table.values())  # noqa: E731
    out = _prf(total(per_type, "tp"), total(per_type, "fp"), total(per_type, "fn"))
    out["visible"] = _prf(total(vis, "tp"), total(vis, "fp"), total(vis, "fn"))
    out.update({"side_correct": side_hits / side_total if side_total else None, "side_checked": side_total,
                "size_correct": size_hits / size_total if size_total else None, "size_checked": size_total,
                "per_type": {k: {**v, **{f"{m}_visible": vis[k][m] for m in ("tp", "fp", "fn")}}
                             for k, v in per_type.items() if any(v[m] for m in ("tp", "fp", "fn"))}})
    return out


def call_thresholds(model) -> dict[str, dict[str, float]]:
    """Volume key ("global" or a region) -> label -> the probability a call needs: the fitted detector's own
    thresholds (finding_head_input "latents"; inf where it never calls), else 0.5."""
    labels = model.config.finding_labels
    table = model.embedding_layer.finding_threshold
    keys = ["global", *REGIONS]
    if table is None:
        return {key: dict.fromkeys(labels, 0.5) for key in keys}
    return {key: dict(zip(labels, (float(t) for t in table[row]))) for row, key in enumerate(keys)}


def head_scores(labels: tuple[str, ...], studies: list[dict], probs: dict[str, dict],
                thresholds: dict[str, dict[str, float]]) -> dict | None:
    """What the image encoder itself detects: the finding head's study-level calls (a label is called when
    any volume's probability passes its threshold, `call_thresholds`) against the planted findings — micro
    P/R/F1 and per label. ``probs``: volume -> the draft's `PreparedStudy.finding_probabilities`."""
    labels = tuple(k for k in labels if k in ABNORMALITIES)          # not the side pseudo-labels
    if not labels:
        return None
    per_type = {k: {"tp": 0, "fp": 0, "fn": 0} for k in labels}
    for study_info in studies:
        volumes = probs[study_info["volume"]].items()
        called = {k for k in labels if any(p.get(k, 0.0) > thresholds[key][k] for key, p in volumes)}
        planted = {f["type"] for f in study_info["findings"]} & set(labels)
        for k in labels:
            per_type[k]["tp"] += k in called and k in planted
            per_type[k]["fp"] += k in called and k not in planted
            per_type[k]["fn"] += k in planted and k not in called
    tp, fp, fn = (sum(v[x] for v in per_type.values()) for x in ("tp", "fp", "fn"))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1, "per_type": per_type}


def visible_findings(model, studies: list[dict], test: Path) -> tuple[dict[str, set[str]], dict]:
    """Volume -> the planted types visible at the model's input, and the counts of the rule by type."""
    visible: dict[str, set[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for info in studies:
        study = read_study(test / info["path"], test / info["masks"])
        voxel = crop_voxel_sizes(study, model.config.input_size, model.config.orientation)
        visible[info["volume"]] = set()
        for finding in info["findings"]:
            seen = visible_at_input(finding, voxel.get(finding["region"]))
            c = counts.setdefault(finding["type"], {"planted": 0, "visible": 0})
            c["planted"] += 1
            c["visible"] += seen
            if seen:
                visible[info["volume"]].add(finding["type"])
    return visible, counts


def run(engine: ReportEngine, studies: list[dict], test: Path, reports: dict,
        out_csv: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Draft every study: (volume -> report, volume -> the finding head's probabilities of that draft)."""
    settings = GenerationSettings(strategy="greedy", max_new_tokens=600)
    preds: dict[str, str] = {}
    probs: dict[str, dict] = {}
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["AccNum", "GT_combined_report", "Pred_combined_report", "Region_slots"])
        for study_info in studies:
            study = read_study(test / study_info["path"], test / study_info["masks"])
            result = engine.draft(study, settings=settings)
            slots = result.slot_regions if hasattr(result, "slot_regions") else None
            if slots is None:
                slots = dict(enumerate(engine.select_regions(study)))
            preds[study_info["volume"]] = result.text
            probs[study_info["volume"]] = result.prepared.finding_probabilities
            writer.writerow([study_info["volume"], reference_report(reports[study_info["volume"]], slots), result.text,
                             json.dumps({str(k): v for k, v in slots.items()})])
    return preds, probs


def reg2rg_eval(csv_path: Path, out: Path) -> dict:
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "reg2rg-eval"), str(csv_path), "--out", str(out), "--by-region",
                    "--format", "json", "--no-progress"], check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resources/demo_model")
    p.add_argument("--test", required=True, help="reg2rg-phantom output folder of the test split")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    test, out = Path(args.test), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    studies = json.loads((test / "manifest.json").read_text())["studies"][: args.limit]
    reports = read_reports(test / "reports.csv")
    model, tokenizer = load_pretrained(args.model)
    summary = {"model_dir": args.model, "test": str(test), "n_studies": len(studies)}  # "model": its scores
    visible, counts = visible_findings(model, studies, test)
    summary["visibility"] = {"rule": f">= {MIN_VOXELS} voxels of the region crop along every axis (see the script)",
                             "planted": sum(c["planted"] for c in counts.values()),
                             "visible": sum(c["visible"] for c in counts.values()), "by_type": counts}
    print("visibility", json.dumps(summary["visibility"]), flush=True)
    for name, engine_cls in (("model", ReportEngine), ("blind_control", BlindReportEngine)):
        t0 = time.perf_counter()
        preds, probs = run(engine_cls(model, tokenizer), studies, test, reports, out / f"{name}_predictions.csv")
        head = (head_scores(model.config.finding_labels, studies, probs, call_thresholds(model))
                if name == "model" else None)
        if head is not None:   # the head reads the encoding itself (never blinded): scored once
            summary["finding_head"] = head
            print("finding_head", json.dumps({k: v for k, v in head.items() if k != "per_type"}), flush=True)
        metrics = reg2rg_eval(out / f"{name}_predictions.csv", out / f"{name}_eval")
        summary[name] = {
            "seconds_per_report": (time.perf_counter() - t0) / max(len(studies), 1),
            "region_prediction_accuracy": metrics.get("region_prediction_accuracy"),
            "findings": finding_scores(studies, preds, visible),
            "nlg": {k: metrics[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-1", "ROUGE-2",
                                            "ROUGE-L", "CIDEr") if k in metrics},
            "clinical_efficacy": metrics.get("clinical_efficacy"),
        }
        print(name, json.dumps({k: v for k, v in summary[name].items() if k != "clinical_efficacy"})[:2000], flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
