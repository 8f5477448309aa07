"""Measure the explanations on held-out phantoms with a given model folder (issue 13).

    python bench/explain.py --model resources/demo_model --test PHANTOMS_TEST [--val PHANTOMS_VAL] --out explain.json

``--test``/``--val`` are `reg2rg-phantom` folders (``manifest.json`` lists the planted findings; the demo
model's are seeds 9000-9039 and 5000-5015: ``reg2rg-phantom --out X --n 40 --seed 9000``). Per study the
model drafts the report (greedy), then:

- **findings check**: each planted CT-RATE finding type's probability in its region's section; AUROC per
  type and pooled against the manifest (a study without that finding is a negative), over the findings the
  model assesses (a detector model marks the others "not assessed"; they are counted, not scored);
- **omission alerts**: an alert is right when the finding was planted in that region and the draft does not
  affirm it; precision and recall (over all omitted planted findings, and over the assessed ones) on the test
  phantoms at the threshold chosen on ``--val`` (the F1-best threshold over 0.05..0.95 against the assessed
  omissions of the validation phantoms; never chosen on test);
- **pointing game**: for each planted finding the draft reports correctly, is the relevance maximum of the
  sentence that reports it inside the lesion dilated by 10 mm (the finding's voxels in the folder's lesion
  label maps, ``reg2rg-phantom``'s ``lesions/``; for cardiomegaly, whose lesion is the organ, the heart mask
  dilated by 10 mm; for a folder without lesion maps, a sphere of radius size/2 + 10 mm around its centre)? Hit rate vs the
  chance rate (that volume over the body's). The same for the whole
  section of the finding's region (``section_pointing``), which is defined even when a model reports nothing;
- **deletion test** (section of each planted finding's region): the CT voxels of that region ranked by
  relevance are replaced, top 0/2/5/10/20 %, by the region's median HU, and the section's probability
  (geometric mean per token) is re-measured; the same for random voxels of the region. Area under each
  curve and their ratio (relevance / random: < 1 means the relevant voxels matter more);
- **cost**: seconds per relevance map of one sentence and of the region dependence, vs the 2-s budget.

Writes a JSON summary (``--out``) and prints it. Everything runs on the CPU unless ``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))

from reg2rg.engine.explain.findings import NOT_ASSESSED, REGION_FINDINGS, finding_check      # noqa: E402
from reg2rg.engine.explain.relevance import relevance_map, selected_log_prob     # noqa: E402
from reg2rg.engine.generation import ReportEngine             # noqa: E402
from reg2rg.engine.labeller import AFFIRMED, find_mentions, split_sentences      # noqa: E402
from reg2rg.engine.study import Study                                             # noqa: E402
from reg2rg.engine.studyio import read_study                                      # noqa: E402

BUDGET_S = 2.0
DELETION_STEPS = (0.0, 0.02, 0.05, 0.10, 0.20)
CHECKED = {f for names in REGION_FINDINGS.values() for f in names}


def auroc(scores, labels) -> float | None:
    """Rank-based AUROC (ties count half); None without both classes."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def studies(folder: Path, limit: int | None):
    """(manifest entry, study) of the folder's first ``limit`` studies; the entry's ``lesion_map`` is its planted
    findings' label map (``reg2rg-phantom`` writes one since the lesions were tracked; None for older folders)."""
    import nibabel as nib

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["studies"][:limit]:
        study = read_study(folder / entry["path"], folder / entry["masks"])
        lesions = entry.get("lesions")
        entry = {**entry, "lesion_map": np.asarray(nib.load(folder / lesions).dataobj) if lesions else None}
        yield entry, study


# findings whose lesion is the whole organ: the organ's mask is the lesion (an enlarged heart is the heart)
ORGAN_FINDINGS = {"Cardiomegaly": "heart"}


def lesion_ball(study: Study, finding: dict, lesion_map: np.ndarray | None = None) -> np.ndarray:
    """The lesion dilated by 10 mm: with the study's ``lesion_map`` (`studies`), the finding's own voxels
    (its ``lesion_label``) dilated by 10 mm; for a whole-organ finding (`ORGAN_FINDINGS`) the organ's mask
    dilated by 10 mm; else (a folder written before the lesions were tracked) a ball of radius size/2 + 10 mm
    (20 mm size when not given) around the finding's centre."""
    from scipy.ndimage import distance_transform_edt

    spacing = np.sqrt((np.asarray(study.affine)[:3, :3] ** 2).sum(0))
    organ = ORGAN_FINDINGS.get(finding.get("type"))
    if organ and organ in study.masks:
        return distance_transform_edt(~study.masks[organ], sampling=spacing) <= 10.0
    if lesion_map is not None and finding.get("lesion_voxels"):
        return distance_transform_edt(lesion_map != finding["lesion_label"], sampling=spacing) <= 10.0
    radius = float(finding.get("size_mm") or 20.0) / 2 + 10.0
    grids = np.ogrid[tuple(slice(0, n) for n in study.shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, finding["centre_voxel"], spacing))
    return d2 <= radius * radius


def sentence_of(result, section, finding_type):
    """Token indices of the first sentence of ``section`` that affirms ``finding_type`` (None if none)."""
    for st in result.sentences:
        if section.body_start <= st.start < section.end and any(
                s == AFFIRMED for *_, s in find_mentions(st.text, finding_type)):
            return list(st.token_indices)
    return None


def affirms(text: str, finding_type: str) -> bool:
    return any(s == AFFIRMED for sent in split_sentences(text) for *_, s in find_mentions(sent, finding_type))


def section_prob(engine, study, regions, result, idx) -> float:
    """Geometric-mean probability of the tokens ``idx`` of ``result`` with ``study`` as the image."""
    prepared = engine.prepare(study, regions)
    P = len(prepared.prompt_ids)
    ids = torch.tensor([result.token_ids[: max(idx)]], dtype=torch.long, device=engine.device)
    with torch.inference_mode():
        gen = engine.model.lang_model.get_input_embeddings()(ids).to(prepared.prompt_embeds.dtype)
        embeds = torch.cat([prepared.prompt_embeds, gen], dim=1)
        lp = selected_log_prob(engine.model.lang_model, embeds, None,
                               torch.tensor([[P - 1 + i for i in idx]]), torch.tensor([[result.token_ids[i] for i in idx]]))
    return float(np.exp(float(lp[0]) / len(idx)))


def deletion_curves(engine, study, regions, result, idx, heatmap, region, rng) -> tuple[list[float], list[float]]:
    mask = study.masks[region]
    where = np.flatnonzero(mask.ravel())
    fill = np.int16(np.median(study.voxels.ravel()[where]))
    by_relevance = where[np.argsort(-heatmap.ravel()[where], kind="stable")]
    random_order = rng.permutation(where)
    curves = []
    for order in (by_relevance, random_order):
        curve = []
        for frac in DELETION_STEPS:
            vox = study.voxels.copy().ravel()
            vox[order[: int(round(frac * len(order)))]] = fill
            mod = Study(voxels=vox.reshape(study.shape), affine=study.affine, masks=study.masks, name=study.name,
                        source=study.source)
            curve.append(section_prob(engine, mod, regions, result, idx))
        curves.append(curve)
    return curves[0], curves[1]


def run_folder(engine, folder: Path, limit, threshold, deletion: int, rng, log, maps: bool = True) -> dict:
    """Draft every study of ``folder`` and collect the findings-check rows; with ``maps`` also the
    pointing games, up to ``deletion`` deletion curves and the costs."""
    rows, pointing, section_pointing, deletions, costs = [], [], [], [], {"relevance_s": [], "dependence_s": []}
    for entry, study in studies(folder, limit):
        t0 = time.perf_counter()
        result = engine.draft(study)
        with engine.lock:
            check = finding_check(engine, result, threshold)
        planted = {(f["type"], f["region"]): f for f in entry["findings"]}
        regions = list(result.slot_regions.values())
        for sec in check.sections:
            body = next(s for s in result.sections if s.slot == sec.slot)
            for fp in sec.findings:
                f = planted.get((fp.finding, sec.region))
                rows.append({"study": entry["volume"], "region": sec.region, "finding": fp.finding,
                             "p": fp.probability, "planted": f is not None, "reported": fp.stated == AFFIRMED,
                             "source": fp.source})
        body_of = {s.region: s for s in result.sections if s.region is not None and s.grounding_ok}
        for f in entry["findings"] if maps else ():
            sec = body_of.get(f["region"])
            if sec is None or "centre_voxel" not in f or f["type"] not in CHECKED:   # (a bone lesion is not a CT-RATE label)
                continue
            ball = lesion_ball(study, f, entry["lesion_map"])
            body = study.voxels > -500
            chance = float((ball & body).sum() / max(body.sum(), 1))
            sel = sentence_of(result, sec, f["type"])
            if sel:
                rm = relevance_map(engine, result, sel)
                costs["relevance_s"].append(rm.seconds)
                pointing.append({"finding": f["type"], "hit": bool(ball[rm.peak_voxel]), "chance": chance})
            idx = result.token_indices_in_span(sec.body_start, sec.end)
            if not idx:
                continue
            with engine.lock:
                rm = relevance_map(engine, result, idx)
                t = time.perf_counter()
                engine.region_dependence(result, idx)
                costs["dependence_s"].append(time.perf_counter() - t)
            costs["relevance_s"].append(rm.seconds)
            section_pointing.append({"finding": f["type"], "hit": bool(ball[rm.peak_voxel]), "chance": chance})
            if deletion and len(deletions) < deletion:
                rel, rnd = deletion_curves(engine, study, regions, result, idx, rm.heatmap, f["region"], rng)
                deletions.append({"finding": f["type"], "relevance": rel, "random": rnd})
        log(f"{entry['volume']}: {len(entry['findings'])} planted, {time.perf_counter() - t0:.1f} s")
    return {"rows": rows, "pointing": pointing, "section_pointing": section_pointing, "deletions": deletions,
            "costs": costs}


def _assessed(row) -> bool:
    """The findings check gave this row a probability (rows written before ``source`` existed: yes)."""
    return row.get("source") != NOT_ASSESSED


def omission_stats(rows, threshold) -> dict:
    """Alerts = assessed, not reported and p >= threshold; right when the finding was planted there. Recall is
    over every omitted planted finding (a not-assessed one cannot be alerted: it counts as missed), and also
    over the assessed ones only."""
    assessed = [r for r in rows if _assessed(r)]
    alerts = [r for r in assessed if not r["reported"] and r["p"] >= threshold]
    missed = [r for r in rows if r["planted"] and not r["reported"]]
    missed_assessed = [r for r in assessed if r["planted"] and not r["reported"]]
    tp = sum(r["planted"] for r in alerts)
    return {"threshold": threshold, "alerts": len(alerts), "true_alerts": tp, "omitted_planted": len(missed),
            "omitted_planted_assessed": len(missed_assessed),
            "precision": tp / len(alerts) if alerts else None, "recall": tp / len(missed) if missed else None,
            "recall_assessed": tp / len(missed_assessed) if missed_assessed else None}


def choose_threshold(rows) -> tuple[float, dict]:
    """The F1-best omission threshold over 0.95..0.05: F1 of the alerts against the omitted findings the check
    assesses (a finding the model cannot assess is never alerted, whatever the threshold)."""
    best, best_f1 = 0.95, -1.0
    # from the top down, so a tie keeps the higher threshold (fewer alerts for the same F1)
    for t in np.round(np.arange(0.95, 0.04, -0.05), 2):
        s = omission_stats(rows, float(t))
        p, r = s["precision"] or 0.0, s["recall_assessed"] or 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best, {"f1": best_f1}


def summarise(run: dict, threshold: float) -> dict:
    rows = run["rows"]
    assessed = [r for r in rows if _assessed(r)]
    per_type = {}
    for name in sorted(CHECKED):     # over the assessed rows: a finding the model cannot assess has no score
        sel = [r for r in assessed if r["finding"] == name]
        per_type[name] = {"auroc": auroc([r["p"] for r in sel], [r["planted"] for r in sel]),
                          "positives": sum(r["planted"] for r in sel), "n": len(sel),
                          "not_assessed": sum(r["finding"] == name and not _assessed(r) for r in rows)}
    areas = [(float(np.mean(d["relevance"])), float(np.mean(d["random"]))) for d in run["deletions"]]
    pointing = run["pointing"]
    sp = run["section_pointing"]
    costs = run["costs"]
    return {
        "findings_reported_correctly": sum(r["planted"] and r["reported"] for r in rows),
        "findings_planted_in_checked_regions": sum(r["planted"] for r in rows),
        "auroc_pooled": auroc([r["p"] for r in assessed], [r["planted"] for r in assessed]),
        "rows_not_assessed": len(rows) - len(assessed),
        "auroc_per_finding": per_type,
        "omission": omission_stats(rows, threshold),
        "pointing_game": {"n": len(pointing), "hit_rate": float(np.mean([p["hit"] for p in pointing])) if pointing else None,
                          "chance": float(np.mean([p["chance"] for p in pointing])) if pointing else None,
                          "hits_by_finding": {t: [sum(p["hit"] for p in pointing if p["finding"] == t),
                                                  sum(p["finding"] == t for p in pointing)]
                                              for t in sorted({p["finding"] for p in pointing})}},
        "section_pointing_game": {"n": len(sp), "hit_rate": float(np.mean([p["hit"] for p in sp])) if sp else None,
                                  "chance": float(np.mean([p["chance"] for p in sp])) if sp else None},
        "deletion": {"n": len(areas), "steps": list(DELETION_STEPS),
                     "auc_relevance": float(np.mean([a for a, _ in areas])) if areas else None,
                     "auc_random": float(np.mean([b for _, b in areas])) if areas else None,
                     "ratio_relevance_vs_random": float(np.mean([a for a, _ in areas]) / np.mean([b for _, b in areas]))
                     if areas else None},
        "cost": {"relevance_map_s_median": float(np.median(costs["relevance_s"])) if costs["relevance_s"] else None,
                 "region_dependence_s_median": float(np.median(costs["dependence_s"])) if costs["dependence_s"] else None,
                 "budget_s": BUDGET_S,
                 "ratio_vs_budget": float(np.median(costs["relevance_s"]) / BUDGET_S) if costs["relevance_s"] else None},
    }


def demo_cost(engine, sentences: int = 8) -> dict:
    """Seconds of a relevance map per sentence of the demo study's draft, against the draft itself in the
    same run (the baseline) and the 2-s budget; the region dependence and the findings check too."""
    import statistics

    from reg2rg.engine.phantom import demo_study

    study = demo_study()
    result = engine.draft(study)                            # warm-up
    t = time.perf_counter()
    engine.draft(study)
    draft_s = time.perf_counter() - t
    rel, dep = [], []
    for st in [s for s in result.sentences if s.token_indices][:sentences]:
        t = time.perf_counter()
        engine.relevance_map(result, list(st.token_indices))
        rel.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.region_dependence(result, list(st.token_indices))
        dep.append(time.perf_counter() - t)
    t = time.perf_counter()
    engine.finding_check(result)
    check_s = time.perf_counter() - t
    med = statistics.median(rel)
    return {"sentences": len(rel), "draft_s": draft_s, "relevance_map_s_median": med,
            "ratio_vs_draft": med / draft_s, "ratio_vs_budget": med / BUDGET_S,
            "region_dependence_s_median": statistics.median(dep), "findings_check_s": check_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--test", type=Path, help="reg2rg-phantom folder of test phantoms")
    p.add_argument("--cost-only", action="store_true",
                   help="only time the maps on the demo study's draft (ratio vs the draft and the 2-s budget)")
    p.add_argument("--val", type=Path, nargs="+", help="reg2rg-phantom folder(s) of validation phantoms (choose the "
                                                        "threshold; never the test seeds)")
    p.add_argument("--threshold", type=float, default=None, help="omission threshold (default: chosen on --val, "
                                                                   "else the engine's default)")
    p.add_argument("--limit", type=int, default=None, help="at most this many studies per folder")
    p.add_argument("--deletion", type=int, default=8, help="deletion curves for at most this many findings (0: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("explain.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
    engine = ReportEngine.load(args.model, args.device)
    if args.cost_only:
        cost = demo_cost(engine)
        args.out.write_text(json.dumps({"model": str(engine.model_dir), "demo_cost": cost}, indent=1))
        print(json.dumps(cost, indent=1))
        return 0
    if args.test is None:
        p.error("--test is required (a reg2rg-phantom folder) unless --cost-only")
    rng = np.random.default_rng(0)
    summary: dict = {"model": str(engine.model_dir), "test": str(args.test),
                     "val": [str(v) for v in args.val] if args.val else None}
    threshold = args.threshold
    if args.val is not None:
        val = {"rows": [row for folder in args.val
                        for row in run_folder(engine, folder, args.limit, 0.5, 0, rng, log, maps=False)["rows"]]}
        chosen, info = choose_threshold(val["rows"])
        summary["validation_rows"] = val["rows"]
        summary["validation"] = {"chosen_threshold": chosen, **info, "omission_at_chosen": omission_stats(val["rows"], chosen),
                                 "findings_planted_in_checked_regions": sum(r["planted"] for r in val["rows"])}
        threshold = chosen if threshold is None else threshold
    if threshold is None:
        from reg2rg.engine.explain.findings import DEFAULT_OMISSION_THRESHOLD

        threshold = DEFAULT_OMISSION_THRESHOLD
    test = run_folder(engine, args.test, args.limit, threshold, args.deletion, rng, log)
    summary["test_summary"] = summarise(test, threshold)
    summary["test_rows"] = test["rows"]
    summary["deletion_curves"] = test["deletions"]
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("test_rows", "deletion_curves", "validation_rows")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
