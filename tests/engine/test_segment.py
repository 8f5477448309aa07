"""Segmentation on demand (engine.segment, reg2rg-segment).

TotalSegmentator cannot run here (nnU-Net, gigabytes of weights that cannot be downloaded), so most tests
put a stated stand-in package on the path (tests/engine/stand_ins/totalsegmentator, a third-party fake): it
records the exact call and writes the TotalSegmentator label maps of a phantom, as `reg2rg-phantom --totalseg`
makes them. Everything of ours runs for real: the child processes, the weights check, the cache, the mapping
to the ten regions, the files written. The missing-package message is tested with the package absent; the
real run is skipped with its reason unless TotalSegmentator and its weights are on the machine.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reg2rg.engine.masks import TOTALSEG_TASK_CLASSES
from reg2rg.engine.phantom import make_study
from reg2rg.engine.phantom_cli import write_totalseg
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.segment import (
    DEFAULT_TASKS,
    TASK_WEIGHTS,
    SegmentationCancelled,
    SegmentationError,
    segment_and_read,
    segment_study,
    totalsegmentator_available,
)
from reg2rg.engine.segment_cli import main
from reg2rg.engine.studyio import read_study, read_volume, with_masks, write_study

STAND_INS = Path(__file__).resolve().parent / "stand_ins"
REALCT = Path(__file__).resolve().parents[2] / ".." / "shared" / "realct"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom CT on disk and its anatomy as TotalSegmentator task files (what the stand-in returns)."""
    root = tmp_path_factory.mktemp("phantom")
    study = make_study(9, shape=(72, 72, 36), totalseg=True)
    write_study(study, root / "ct.nii.gz")
    write_totalseg(study, root / "labels")
    return study, root


@pytest.fixture
def env(tmp_path, monkeypatch, phantom):
    """TotalSegmentator's home and our cache in tmp; the log the stand-in writes its calls to."""
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("REG2RG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_TOTALSEG_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TOTALSEG_LABELS", str(phantom[1] / "labels"))
    return tmp_path


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.syspath_prepend(str(STAND_INS))
    assert totalsegmentator_available()


def _weights(home: Path, tasks=DEFAULT_TASKS, fast=False):
    for task in tasks:
        for i in TASK_WEIGHTS[(task, fast and task == "total")]:
            (home / "tshome" / "nnunet" / "results" / f"Dataset{i}_weights").mkdir(parents=True, exist_ok=True)


def _calls(env: Path) -> list[dict]:
    log = env / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_missing_package_says_how_to_install(env, phantom, capsys):
    if totalsegmentator_available():
        pytest.skip("the real TotalSegmentator is installed here; this test needs it absent")
    assert main([str(phantom[1] / "ct.nii.gz"), "--out", str(env / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reg2rg-segment: TotalSegmentator is not installed; install it with: "
                   "pip install 'reg2rg-viewer[segment]' (or: pip install TotalSegmentator)"]
    assert not (env / "out").exists()


def test_missing_weights_are_found_without_running_anything(env, phantom, stand_in, capsys):
    _weights(env, tasks=("total",))                       # total present, the other three tasks missing
    assert main([str(phantom[1] / "ct.nii.gz"), "--out", str(env / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "weights for trunk_cavities (Dataset343), breasts (Dataset527), pleural_pericard_effusion (Dataset315, Dataset298)" in err[0]
    assert str(env / "tshome" / "nnunet" / "results") in err[0]
    assert "totalseg_download_weights -t <task>" in err[0] and "TOTALSEG_HOME_DIR" in err[0]
    assert _calls(env) == []                               # nothing ran, nothing was downloaded


def test_the_call_outputs_and_cache(env, phantom, stand_in, capsys):
    study, root = phantom
    _weights(env)
    ct = root / "ct.nii.gz"
    assert main([str(ct), "--out", str(env / "out")]) == 0
    calls = _calls(env)
    assert [c["task"] for c in calls] == ["total", "trunk_cavities", "breasts", "pleural_pericard_effusion"]
    for c in calls:
        assert c["input"] == str(ct)                       # a NIfTI CT is passed as it is (same grid back)
        assert c["ml"] is True and c["fast"] is False and c["device"] == "cpu" and c["quiet"] is True
        assert c["output"].endswith(f"{c['task']}.nii.gz")
        assert c["send_usage_stats"] is False              # switched off before TotalSegmentator runs
    err = capsys.readouterr().err
    assert "(estimate)" in err and "10 of 10 regions" in err
    out = env / "out"
    assert sorted(p.name for p in (out / "totalsegmentator").iterdir()) == sorted(f"{t}.nii.gz" for t in DEFAULT_TASKS)
    back = read_study(ct, out)                             # the RadGenome layout: <region>.nii.gz
    assert list(back.masks) == list(REGIONS)
    for region in REGIONS:
        assert np.array_equal(back.masks[region], study.masks[region]), region
    info = json.loads((out / "segmentation.json").read_text())
    assert info["tool"] == "TotalSegmentator" and info["tasks"] == list(DEFAULT_TASKS) and info["absent"] == []
    assert info["mask_problems"] == []

    # a second run of the same scan (another path, same content) comes from the cache: no new call
    copy = env / "copy.nii.gz"
    copy.write_bytes(ct.read_bytes())
    result = segment_study(read_volume(copy))
    assert len(_calls(env)) == 4 and result.cached_tasks == list(DEFAULT_TASKS)
    # reg2rg-generate --segment: the ten region masks are made once beside the label maps and reused
    again = segment_and_read(read_volume(copy))
    regions = result.folder / "regions" / "+".join(DEFAULT_TASKS)
    assert (regions / "segmentation.json").is_file() and len(list(regions.glob("*.nii.gz"))) == 10
    assert all(src.startswith(str(regions)) for src in again.mask_sources.values())
    assert all(np.array_equal(again.masks[r], study.masks[r]) for r in REGIONS) and len(_calls(env)) == 4
    # --fast is passed to 'total' only (TotalSegmentator has no fast model of the other tasks)
    _weights(env, fast=True)
    segment_study(read_volume(ct), tasks=["total", "breasts"], fast=True, device="gpu")
    fast_calls = _calls(env)[4:]
    assert [(c["task"], c["fast"], c["device"]) for c in fast_calls] == [("total", True, "gpu"), ("breasts", False, "gpu")]


def test_dicom_or_in_memory_study_is_written_as_nifti_on_its_grid(env, phantom, stand_in):
    study, _ = phantom
    _weights(env)
    in_memory = make_study(9, shape=(72, 72, 36))          # source "phantom seed=9": no file to pass
    seen = []
    result = segment_study(in_memory, tasks=["total"], on_task_done=lambda task, folder, cached: seen.append((task, cached)))
    call = _calls(env)[0]
    assert call["input"].endswith("ct.nii.gz") and Path(call["input"]).parent.name == ".work"
    assert seen == [("total", False)]
    got = with_masks(in_memory, result.folder)
    assert np.array_equal(got.masks["lung"], study.masks["lung"])


def test_a_failing_task_is_one_line_and_finished_tasks_stay_cached(env, phantom, stand_in, monkeypatch, capsys):
    _weights(env)
    monkeypatch.setenv("FAKE_TOTALSEG_FAIL", "breasts")
    assert main([str(phantom[1] / "ct.nii.gz"), "--out", str(env / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reg2rg-segment: TotalSegmentator's 'breasts' task failed: "
                   "RuntimeError: CUDA out of memory (stand-in failure)"]
    monkeypatch.delenv("FAKE_TOTALSEG_FAIL")
    assert main([str(phantom[1] / "ct.nii.gz"), "--out", str(env / "out"), "--quiet"]) == 0
    tasks = [c["task"] for c in _calls(env)]
    assert tasks == ["total", "trunk_cavities", "breasts", "breasts", "pleural_pericard_effusion"]


def test_cancel_stops_the_running_task_at_once(env, phantom, stand_in, monkeypatch):
    _weights(env)
    monkeypatch.setenv("FAKE_TOTALSEG_SLEEP", "60")
    cancel = threading.Event()
    threading.Timer(1.5, cancel.set).start()
    t0 = time.perf_counter()
    with pytest.raises(SegmentationCancelled, match="cancelled during the 'total' task"):
        segment_study(read_volume(phantom[1] / "ct.nii.gz"), cancel=cancel)
    assert time.perf_counter() - t0 < 60                   # the stand-in's 60 s task was killed, not waited for
    assert not list((env / "cache").rglob("total.nii.gz"))  # nothing half-done is cached


def test_unknown_task_is_refused(env):
    with pytest.raises(SegmentationError, match="unknown TotalSegmentator task"):
        segment_study(make_study(1, shape=(32, 32, 16)), tasks=["total", "brain_structures"])


def test_real_totalsegmentator_run():
    """Runs the real TotalSegmentator (fast total) on the real CT when it and its weights are installed."""
    from reg2rg.engine.segment import missing_weights

    if str(STAND_INS) in sys.path or not totalsegmentator_available():
        pytest.skip("TotalSegmentator is not installed here (it needs nnU-Net; pip install 'reg2rg-viewer[segment]')")
    if missing_weights(["total"], fast=True):
        pytest.skip("TotalSegmentator's weights are not on this machine (none can be downloaded here)")
    ct = REALCT / "example_ct_sm.nii.gz"
    study = read_volume(ct)
    result = segment_study(study, tasks=["total"], fast=True, use_cache=False)
    got = with_masks(study, result.folder)
    assert {"lung", "abdomen", "bone"} <= set(got.masks) and got.mask_problems == []
    assert TOTALSEG_TASK_CLASSES["total"][5] == "liver"
