"""End to end with the real commands: phantoms -> reg2rg-generate --dataset (embedded demo model) -> reg2rg-eval.

This is the path a user takes to grade a model on their own data; every step is the installed console
script, run as a subprocess, on files written to disk.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reg2rg.engine.regions import REGIONS

BIN = Path(sys.executable).parent
DEMO_MODEL = Path(__file__).resolve().parents[2] / "resources" / "demo_model" / "config.json"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_MODEL.exists(), reason="the embedded demo model is not built")
def test_generate_on_phantom_dataset_then_evaluate(tmp_path):
    data = tmp_path / "data"
    # held-out seeds of the demo model's test split (scripts/train_demo_model.sh)
    _run("reg2rg-phantom", "--out", str(data), "--n", "3", "--seed", "9000")
    out = tmp_path / "pred"
    _run("reg2rg-generate", "--dataset", str(data), "--masks", str(data / "masks"),
         "--reports", str(data / "reports.csv"), "--out", str(out), "--quiet")

    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        slots = json.loads(row["Region_slots"])
        assert sorted(slots.values()) == sorted(REGIONS)          # every phantom has all 10 regions
        assert row["Pred_combined_report"].startswith("The region 0 is ")
        assert (out / row["AccNum"] / "report.json").is_file()

    # resuming the same run drafts nothing new and keeps the rows
    _run("reg2rg-generate", "--dataset", str(data), "--masks", str(data / "masks"),
         "--reports", str(data / "reports.csv"), "--out", str(out), "--quiet")
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3

    ev = tmp_path / "eval"
    _run("reg2rg-eval", str(out / "predictions.csv"), "--out", str(ev), "--by-region", "--format", "json",
         "--no-progress")
    metrics = json.loads((ev / "metrics.json").read_text())
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert set(metrics[key]) == {"mean", "std", "corpus"}
        assert 0.0 <= metrics[key]["mean"]
    # the demo model reads the anatomy: it names the area of (nearly) every slot from its mask and crop
    assert metrics["region_prediction_accuracy"]["mean"] >= 0.8
    # its drafts share real content with the phantom reports
    assert metrics["BLEU-1"]["mean"] > 0.3
    assert set(metrics["by_region"]) <= set(REGIONS) and len(metrics["by_region"]) >= 8
