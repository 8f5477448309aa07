"""Input warnings reach the reader once and are kept with the report (issue 17, defect 6).

Before: each warning printed twice (warnings module and log), ``--quiet`` still drew the weight-loading
bar, and neither ``report.json`` nor ``report.txt`` said that the input had problems.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import bad_inputs
from reg2rg.engine.checkpoint import save_pretrained

from generation_fixtures import tiny_engine

NAN_WARNING = "18 voxel(s) are NaN or infinite"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    engine = tiny_engine()
    return save_pretrained(engine.model, engine.tokenizer, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def nan_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan")
    volume = bad_inputs.with_nans(folder)
    masks = folder / "masks"
    masks.mkdir()
    lung = np.zeros(bad_inputs.SHAPE, dtype=np.uint8)
    lung[5:25, 5:20, 2:8] = 1
    nib.save(nib.Nifti1Image(lung, bad_inputs._affine()), str(masks / "lung.nii.gz"))
    return volume, masks


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reg2rg.engine.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_warnings_print_once_quiet_hides_the_bar_and_reports_keep_them(model_dir, nan_study, tmp_path):
    volume, masks = nan_study
    out = tmp_path / "out"
    proc = run_cli("--volume", str(volume), "--masks", str(masks), "--model", str(model_dir), "--out", str(out),
                   "--max-new-tokens", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count(NAN_WARNING) == 1, proc.stderr
    assert f"reg2rg-generate: warning: {volume}: {NAN_WARNING}" in proc.stderr
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr
    data = json.loads((out / "report.json").read_text())
    assert any(NAN_WARNING in w for w in data["input"]["warnings"])
    assert data["input"]["orientation"]["model"] == "RAS"
    first = (out / "report.txt").read_text().splitlines()[0]
    assert first.startswith("INPUT WARNINGS (") and NAN_WARNING in first


def test_the_report_document_carries_the_input_warnings(model_dir, nan_study, tmp_path):
    volume, masks = nan_study
    out = tmp_path / "out"
    proc = run_cli("--volume", str(volume), "--masks", str(masks), "--model", str(model_dir), "--out", str(out),
                   "--max-new-tokens", "4", "--quiet", "--export", "txt,json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "report.txt").read_text().splitlines()
    assert lines[0].startswith("***") and lines[1].startswith("INPUT WARNINGS (") and NAN_WARNING in lines[1]
    doc = json.loads((out / "report.json").read_text())
    assert any(NAN_WARNING in w for w in doc["input_warnings"])
    assert doc["orientation"]["model"] == "RAS"
