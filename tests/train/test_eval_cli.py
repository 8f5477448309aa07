"""``reg2rg-eval`` end to end on predictions in the format ``reg2rg-generate`` writes."""

import csv
import json

import numpy as np
import pytest

from reg2rg.engine.cli import COLUMNS, combined_reference
from reg2rg.engine.phantom_reports import region_reports
from reg2rg.engine.sections import strip_region_prefixes
from reg2rg.train import metrics as M
from reg2rg.train.eval_cli import main


def _phantom_rows(n=6):
    """Rows like reg2rg-generate's predictions.csv: GT from phantom reports, predictions perturbed."""
    rows = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        gt_reports = region_reports([], rng)
        pred_reports = region_reports([], np.random.default_rng(200 + i))  # other templates: imperfect text
        slots = {0: "heart", 1: "lung", 2: "pleura", 3: "bone"}
        gt = combined_reference(gt_reports, slots).strip()
        named = dict(slots)
        if i % 2:  # every other study names the wrong area in slot 3
            named[3] = "abdomen"
            pred_reports["abdomen"] = pred_reports["bone"]
        pred = combined_reference(pred_reports, named).strip()
        if i == 0:  # one model output with a finding the reference does not have
            pred += " The region 4 is mediastinum: Pleural effusion is seen."
        rows.append([f"phantom_{i:06d}_a_1", gt, pred, json.dumps({str(k): v for k, v in slots.items()})])
    return rows


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_generate_format_with_by_region(tmp_path, capsys):
    rows = _phantom_rows()
    csv_path = _write(tmp_path / "predictions.csv", COLUMNS, rows)
    out = tmp_path / "eval"
    assert main([str(csv_path), "--out", str(out), "--by-region", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU-4" in printed and "region prediction accuracy" in printed and "weighted" in printed

    result = json.loads((out / "metrics.json").read_text())
    refs = [strip_region_prefixes(r[1]) for r in rows]
    preds = [strip_region_prefixes(r[2]) for r in rows]
    assert "The region" not in " ".join(refs + preds)
    expected = M.compute_metrics(refs, preds)
    for name in M.METRIC_NAMES:
        assert result[name] == pytest.approx(expected[name])
    # by region: heart/lung/pleura everywhere; bone only where the model named it (even rows)
    assert result["by_region"]["heart"]["n_samples"] == 6
    assert result["by_region"]["bone"]["n_samples"] == 3
    assert "abdomen" not in result["by_region"]  # never in the reference
    # accuracy per study: 4/4 on even rows, 3/4 on odd rows
    accs = [1.0, 0.75] * 3
    acc = result["region_prediction_accuracy"]
    assert acc["mean"] == pytest.approx(np.mean(accs)) and acc["std"] == pytest.approx(np.std(accs))
    # clinical efficacy: one false positive pleural effusion
    assert result["clinical_efficacy"]["Pleural effusion"]["support"] == 0
    assert result["meta"]["n_samples"] == 6 and result["meta"]["region_prefixes_stripped"] is True

    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["scope"] for r in table} >= {"whole", "heart", "regions"}
    assert (out / "clinical_efficacy.csv").read_text().splitlines()[0] == "abnormality,precision,recall,f1,support"


def test_region_truth_from_reference_headers_without_slots_column(tmp_path):
    rows = [r[:3] for r in _phantom_rows(2)]
    csv_path = _write(tmp_path / "p.csv", COLUMNS[:3], rows)
    assert main([str(csv_path), "--out", str(tmp_path / "o"), "--by-region", "--format", "json", "--no-progress"]) == 0
    acc = json.loads((tmp_path / "o" / "metrics.json").read_text())["region_prediction_accuracy"]
    assert acc["mean"] == pytest.approx((1.0 + 0.75) / 2)


def test_formats_and_column_override(tmp_path, capsys):
    csv_path = _write(tmp_path / "p.csv", ["id", "ref", "hyp"], [["a", "No pleural effusion.", "No effusion."]])
    assert main([str(csv_path), "--gt-column", "ref", "--pred-column", "hyp", "--out", str(tmp_path / "o"),
                 "--format", "csv", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "scope,metric,mean,std,corpus" and len(lines) == 1 + len(M.METRIC_NAMES)
    assert main([str(csv_path), "--gt-column", "ref", "--pred-column", "hyp", "--out", str(tmp_path / "o"),
                 "--format", "json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["gt_column"] == "ref"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the file is empty"),
        ("AccNum,GT_combined_report,Pred_combined_report\n", "header but no rows"),
        ("AccNum,GT_combined_report\n1,text\n", "no report columns found"),
        ("AccNum,GT_whole_report,Pred_whole_report\n1,Some text.,\n", "line 2: empty or NaN cell in column 'Pred_whole_report'"),
        ("AccNum,GT_whole_report,Pred_whole_report\n1,Some text.,NaN\n", "empty or NaN cell"),
        ("AccNum,GT_combined_report,Pred_combined_report,Region_slots\n1,a,b,{bad\n", "Region_slots must be a JSON object"),
        ("AccNum,GT_combined_report,Pred_combined_report,Region_slots\n1,a,b,\"{\"\"0\"\": \"\"kidney\"\"}\"\n",
         "unknown region 'kidney'"),
    ],
)
def test_bad_input_names_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    assert main([str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_missing_file_and_by_region_on_whole_reports(tmp_path, capsys):
    assert main([str(tmp_path / "nope.csv"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    path = _write(tmp_path / "w.csv", ["GT_whole_report", "Pred_whole_report"], [["No effusion.", "No effusion."]])
    assert main([str(path), "--by-region", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--by-region needs reports with region sections" in capsys.readouterr().err
