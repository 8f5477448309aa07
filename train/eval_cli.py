"""``reg2rg-eval``: score generated reports with the published metrics, per region and clinically.

Input is a predictions CSV. Columns are detected (or named with ``--gt-column``/``--pred-column``):

* ``AccNum, GT_combined_report, Pred_combined_report`` as written by ``reg2rg-generate``: reports
  keep their "The region i is area: " prefixes, which are stripped for whole-report metrics exactly
  as the published scripts strip them;
* ``GT_whole_report, Pred_whole_report``: whole reports already without prefixes (published files).

Optional column ``Region_slots``: JSON object ``{"slot": "true region", ...}`` giving the region fed
to the model in each slot. ``--by-region`` grades the area the model named for each slot against it
(region prediction accuracy); without the column the truth is taken from the slot headers of the
reference report, as the published ``region_pred_acc.py`` does.

Outputs (in ``--out``, default ``./<csv name>_eval``): ``metrics.json`` (the nine metrics at top
level, each ``{"mean", "std", "corpus"}``, then ``clinical_efficacy``, ``by_region``,
``region_prediction_accuracy`` and ``meta``), ``metrics.csv`` (one row per scope and metric) and
``clinical_efficacy.csv``. ``--format`` chooses what is printed: a table, the JSON or the CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reg2rg.engine.csvtable import CsvFormatError, read_csv
from reg2rg.engine.regions import REGIONS, canonical_region
from reg2rg.engine.sections import (
    parse_sections,
    region_prediction_accuracy,
    sections_by_area,
    slot_areas,
    strip_region_prefixes,
)
from reg2rg.train import metrics as nlg
from reg2rg.train.labeller import ABNORMALITIES, clinical_efficacy

COLUMN_PAIRS: tuple[tuple[str, str], ...] = (
    ("GT_combined_report", "Pred_combined_report"),
    ("GT_whole_report", "Pred_whole_report"),
)
ID_COLUMNS = ("AccNum", "Volumename", "id")
SLOTS_COLUMN = "Region_slots"
_NAN_CELLS = {"", "nan", "NaN", "NAN", "None", "null", "NULL"}


class EvalInputError(ValueError):
    """The predictions file cannot be evaluated; the message names the file and the problem."""


@dataclass
class Predictions:
    """The rows of a predictions CSV that matter for evaluation."""

    path: Path
    gt_column: str
    pred_column: str
    ids: list[str]
    gts: list[str]  # as written (region prefixes kept)
    preds: list[str]
    slots: list[dict[int, str] | None] = field(default_factory=list)


def _cell_is_missing(value: str | None) -> bool:
    return value is None or value.strip() in _NAN_CELLS


def _parse_slots(path: Path, line: int, raw: str) -> dict[int, str] | None:
    if _cell_is_missing(raw):
        return None
    try:
        data = json.loads(raw)
        slots = {int(k): str(v) for k, v in data.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise EvalInputError(
            f"{path}: line {line}: column {SLOTS_COLUMN} must be a JSON object {{slot: region}} ({e})"
        ) from None
    for slot, region in slots.items():
        if canonical_region(region) is None:
            raise EvalInputError(f"{path}: line {line}: {SLOTS_COLUMN} names unknown region {region!r} for slot {slot}")
    return slots


def read_predictions(path: str | Path, gt_column: str | None = None, pred_column: str | None = None) -> Predictions:
    """Read and validate a predictions CSV (see the module doc for the columns).

    Read strictly (`reg2rg.engine.csvtable.read_csv`, fields of any length): a malformed row (an
    unterminated quote, a wrong number of fields, a row cut off at the end) **refuses** the file with
    the lines named — scores computed without some rows would silently describe other studies."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    try:
        table = read_csv(path)
    except CsvFormatError as e:
        raise EvalInputError(str(e)) from None
    if table.all_problems:
        raise EvalInputError(f"{path}: {len(table.all_problems)} malformed row(s), nothing evaluated: "
                             f"{table.describe_problems()}")
    columns = table.header
    if gt_column or pred_column:
        pair = (gt_column or COLUMN_PAIRS[0][0], pred_column or COLUMN_PAIRS[0][1])
    else:
        pair = next((p for p in COLUMN_PAIRS if p[0] in columns and p[1] in columns), None)
        if pair is None:
            raise EvalInputError(
                f"{path}: no report columns found: expected one of "
                + " or ".join(f"{g!r}+{p!r}" for g, p in COLUMN_PAIRS)
                + f" (or --gt-column/--pred-column); the file has {columns}"
            )
    for col in pair:
        if col not in columns:
            raise EvalInputError(f"{path}: missing column {col!r}; the file has {columns}")
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    preds = Predictions(path, pair[0], pair[1], [], [], [], [])
    for i, (line, row) in enumerate(table.rows):
        for col in pair:
            if _cell_is_missing(row.get(col)):
                raise EvalInputError(f"{path}: line {line}: empty or NaN cell in column {col!r}")
        preds.ids.append(row[id_column] if id_column else str(i))
        preds.gts.append(row[pair[0]])
        preds.preds.append(row[pair[1]])
        preds.slots.append(_parse_slots(path, line, row.get(SLOTS_COLUMN)) if SLOTS_COLUMN in columns else None)
    if not preds.gts:
        raise EvalInputError(f"{path}: the file has a header but no rows")
    return preds


def _whole(text: str) -> str:
    # Whole-report files are scored as they are (published); only texts with headers are stripped.
    return strip_region_prefixes(text) if "The region " in text else text


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not arr.size:
        return {"mean": float("nan"), "std": float("nan"), "n_samples": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n_samples": int(arr.size)}


def evaluate_by_region(preds: Predictions) -> tuple[dict, dict]:
    """Per-area metrics over the samples where both reports have that area, and region accuracy."""
    gt_sections = [parse_sections(t) for t in preds.gts]
    pred_sections = [parse_sections(t) for t in preds.preds]
    per_area: dict[str, tuple[list[str], list[str]]] = {a: ([], []) for a in REGIONS}
    accuracies = []
    for gs, ps, slots in zip(gt_sections, pred_sections, preds.slots):
        g_by, p_by = sections_by_area(gs), sections_by_area(ps)
        for area in REGIONS:
            if area in g_by and area in p_by:
                per_area[area][0].append(g_by[area])
                per_area[area][1].append(p_by[area])
        truth = slots if slots is not None else {s: a for s, a in slot_areas(gs).items() if a is not None}
        accuracies.append(region_prediction_accuracy(ps, truth))
    by_region = {}
    for area, (refs, hyps) in per_area.items():
        if refs:
            by_region[area] = {**nlg.compute_metrics(refs, hyps), "n_samples": len(refs)}
    return by_region, _mean_std(accuracies)


def evaluate(preds: Predictions, by_region: bool = False, progress: bool = False, uncertain_as: int = 0) -> dict:
    """Every number ``reg2rg-eval`` reports, as the ``metrics.json`` dictionary."""
    refs = [_whole(t) for t in preds.gts]
    hyps = [_whole(t) for t in preds.preds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(refs), desc="METEOR", unit="report", file=sys.stderr, disable=None)
    try:
        result: dict = dict(nlg.compute_metrics(refs, hyps, progress=bar.update if bar else None))
    finally:
        if bar:
            bar.close()
    result["clinical_efficacy"] = clinical_efficacy(refs, hyps, uncertain_as=uncertain_as)
    if by_region:
        if not any(any(s.slot is not None for s in parse_sections(t)) for t in preds.gts):
            raise EvalInputError(
                f"{preds.path}: --by-region needs reports with region sections "
                f"('The region i is area: ...'); column {preds.gt_column!r} has none"
            )
        result["by_region"], result["region_prediction_accuracy"] = evaluate_by_region(preds)
    result["meta"] = {
        "file": str(preds.path),
        "n_samples": len(refs),
        "gt_column": preds.gt_column,
        "pred_column": preds.pred_column,
        "region_prefixes_stripped": any("The region " in t for t in preds.gts + preds.preds),
        "meteor_wordnet": nlg.wordnet_available(),
        "punkt_model": "nltk punkt_tab" if nlg.punkt_model_installed() else "embedded English Punkt lists",
        "corpus_rouge": nlg.CORPUS_ROUGE_NOTE,
        "std": "population (numpy ddof=0), as published",
        "clinical_efficacy": f"rule-based labeller, uncertain mentions counted as {uncertain_as}",
    }
    return result


# --- output --------------------------------------------------------------------------------


def metrics_rows(result: dict) -> list[dict[str, object]]:
    """``metrics.csv`` rows: scope (``whole`` or an area), metric, mean, std, corpus."""
    rows = []
    scopes = [("whole", result)] + list(result.get("by_region", {}).items())
    for scope, values in scopes:
        for name in nlg.METRIC_NAMES:
            v = values[name]
            rows.append({"scope": scope, "metric": name, "mean": v["mean"], "std": v["std"], "corpus": v["corpus"]})
    if "region_prediction_accuracy" in result:
        acc = result["region_prediction_accuracy"]
        rows.append({"scope": "regions", "metric": "region_prediction_accuracy", "mean": acc["mean"], "std": acc["std"], "corpus": ""})
    return rows


def _csv_text(rows: list[dict[str, object]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(result: dict) -> str:
    """Human-readable summary: metrics (mean ± std, corpus), region accuracy, clinical efficacy."""
    meta = result["meta"]
    lines = [f"{meta['file']}: {meta['n_samples']} reports"]
    lines.append(f"{'metric':<10} {'mean':>8} {'± std':>8} {'corpus':>8}")
    for name in nlg.METRIC_NAMES:
        v = result[name]
        lines.append(f"{name:<10} {v['mean']:>8.4f} {v['std']:>8.4f} {v['corpus']:>8.4f}")
    if not meta["meteor_wordnet"]:
        lines.append("note: WordNet not found, METEOR without synonyms (about 0.005 below the published protocol)")
    for area, values in result.get("by_region", {}).items():
        cells = " ".join(f"{n}={values[n]['mean']:.4f}" for n in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
        lines.append(f"  {area:<22} n={values['n_samples']:<5} {cells}")
    if "region_prediction_accuracy" in result:
        acc = result["region_prediction_accuracy"]
        lines.append(f"region prediction accuracy {acc['mean']:.4f} ± {acc['std']:.4f} (n={acc['n_samples']})")
    ce = result["clinical_efficacy"]
    lines.append(f"{'clinical efficacy':<36} {'P':>6} {'R':>6} {'F1':>6} {'n':>5}")
    for name in (*ABNORMALITIES, "weighted"):
        v = ce[name]
        lines.append(f"{name:<36} {v['precision']:>6.3f} {v['recall']:>6.3f} {v['f1']:>6.3f} {v['support']:>5}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path) -> None:
    """Write ``metrics.json``, ``metrics.csv`` and ``clinical_efficacy.csv`` into ``out_dir``."""
    from reg2rg.engine.fileio import staged_files

    ce_rows = [{"abnormality": k, **v} for k, v in result["clinical_efficacy"].items()]
    with staged_files(out_dir) as stage:          # the three files are replaced together or not at all
        with stage.open("metrics.json") as f:
            f.write(json.dumps(result, indent=2, allow_nan=True) + "\n")
        with stage.open("metrics.csv", newline="") as f:
            f.write(_csv_text(metrics_rows(result)))
        with stage.open("clinical_efficacy.csv", newline="") as f:
            f.write(_csv_text(ce_rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reg2rg-eval",
        description="Score generated CT reports with the published Reg2RG metrics "
        "(BLEU-1..4, METEOR, ROUGE-1/2/L, CIDEr), per region, and with clinical efficacy.",
    )
    p.add_argument("predictions", help="predictions CSV (AccNum, GT_combined_report, Pred_combined_report, ...)")
    p.add_argument("--out", type=Path, help="output folder (default: ./<csv name>_eval)")
    p.add_argument("--by-region", action="store_true", help="also score each anatomical region and the named areas")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="what to print")
    p.add_argument("--gt-column", help="reference report column (default: detected)")
    p.add_argument("--pred-column", help="generated report column (default: detected)")
    p.add_argument("--uncertain-as", type=int, choices=(0, 1), default=0, help="label for uncertain findings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for unusable input)."""
    args = build_parser().parse_args(argv)
    try:
        preds = read_predictions(args.predictions, args.gt_column, args.pred_column)
        result = evaluate(preds, by_region=args.by_region, progress=not args.no_progress, uncertain_as=args.uncertain_as)
        out_dir = args.out or Path.cwd() / f"{Path(args.predictions).stem}_eval"
        write_outputs(result, out_dir)
    except EvalInputError as e:
        print(f"reg2rg-eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # an output problem arrives as fileio.OutputError, which names the file
        print(f"reg2rg-eval: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.format == "csv":
        print(_csv_text(metrics_rows(result)), end="")
    else:
        print(format_table(result))
        print(f"results written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
