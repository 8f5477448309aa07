"""Output files are complete or absent (issue 17, defect 3): temporary name + rename, clear errors.

The full disk is real: a small tmpfs where the test may mount one (root), and everywhere the process's
file-size limit (RLIMIT_FSIZE), under which the kernel refuses writes past the limit as a full disk does.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from reg2rg.engine.checkpoint import save_pretrained
from reg2rg.engine.cli import main, write_outputs
from reg2rg.engine.fileio import OutputError, atomic_folder, atomic_path, atomic_write, is_temp_name, staged_files
from reg2rg.engine.generation import GenerationSettings
from reg2rg.engine.model.config import Reg2RGConfig

from generation_fixtures import box_study, tiny_engine


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG (Python ignores SIGXFSZ), as on a nearly full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "48k", read_only: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the file-size-limit tests cover the full disk")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_temp_name(p.name))


@pytest.fixture(scope="module")
def engine_and_result():
    torch.set_num_threads(1)
    engine = tiny_engine()
    result = engine.draft(box_study(), ["heart", "lung"], GenerationSettings(max_new_tokens=6))
    return engine, result


# ---- the helper itself --------------------------------------------------------------------------
def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "report.json"
    with atomic_write(target) as f:
        json.dump({"v": 1}, f)
    assert json.loads(target.read_text()) == {"v": 1}
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write('{"v": 2, "trunc')                 # half-written, then the writer fails
            raise RuntimeError("bug half-way")
    assert json.loads(target.read_text()) == {"v": 1}  # the previous file, whole
    assert _leftovers(tmp_path) == []
    with atomic_write(tmp_path / "data.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01"


def test_full_disk_leaves_the_previous_file_and_names_it(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous")
    with file_size_limit(4096), pytest.raises(OutputError) as err:
        with atomic_write(target) as f:
            f.write("x" * 100_000)
    assert target.read_text() == "previous"
    assert str(err.value).startswith(f"cannot write {target}:") and "\n" not in str(err.value)
    assert "file size limit" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_temporary_names_are_unique_so_concurrent_writers_never_collide(tmp_path):
    target = tmp_path / "autosave.json"
    errors = []

    def writer(n):
        try:
            for i in range(40):
                with atomic_write(target) as f:
                    json.dump({"writer": n, "i": i, "pad": "x" * 20_000}, f)
        except Exception as exc:  # noqa: BLE001 - any failure is the collision this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 39       # complete, from one writer
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_the_extension_for_libraries(tmp_path):
    with atomic_path(tmp_path / "attention_report.nii.gz") as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        Path(tmp).write_bytes(b"gz")
    assert (tmp_path / "attention_report.nii.gz").read_bytes() == b"gz"


def test_atomic_folder_replaces_the_previous_folder_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (Path(tmp) / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (Path(tmp) / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "one"
    assert _leftovers(tmp_path) == []


def test_staged_files_are_replaced_together(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    with pytest.raises(OutputError) as err:
        with file_size_limit(4096), staged_files(tmp_path) as stage:
            with stage.open("a.txt") as f:
                f.write("new a")
            with stage.open("b.txt") as f:
                f.write("b" * 100_000)
    assert (tmp_path / "a.txt").read_text() == "old a"         # not a new a beside an old b
    assert (tmp_path / "b.txt").read_text() == "old b"
    assert str(tmp_path / "b.txt") in str(err.value)
    assert _leftovers(tmp_path) == []


# ---- the engine's outputs ---------------------------------------------------------------------
def test_report_files_on_a_full_disk_keep_the_previous_outputs(engine_and_result, tmp_path):
    """Before: a new report.txt beside a truncated report.json / broken attention NIfTI."""
    engine, result = engine_and_result
    out = tmp_path / "out"
    write_outputs(engine, result, out, attention=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "relevance_report.nii.gz" in before
    other = tiny_engine(seed=1)
    new = other.draft(box_study(), ["heart", "lung"], GenerationSettings(max_new_tokens=6))
    assert new.text != result.text
    with file_size_limit(2000), pytest.raises(OutputError) as err:
        write_outputs(other, new, out, attention=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    message = str(err.value)
    assert message.startswith(f"cannot write {out / 'relevance_'}") or message.startswith(f"cannot write {out / 'report'}")
    assert ".tmp-" not in message


def test_report_files_on_a_full_tmpfs(engine_and_result, tmp_path):
    engine, result = engine_and_result
    with small_tmpfs(tmp_path / "disk", "8k") as disk:
        with pytest.raises(OutputError) as err:
            write_outputs(engine, result, disk / "out", attention=True)
        assert "the disk is full" in str(err.value)
        assert list((disk / "out").iterdir()) == []                 # nothing half-written


def test_read_only_disk_is_one_clear_line(tmp_path, capsys):
    with small_tmpfs(tmp_path / "ro", "16k", read_only=True) as disk:
        assert main(["--demo", "--out", str(disk / "out"), "--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reg2rg-generate: cannot write {disk / 'out'}: the file system is read-only"


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert main(["--demo", "--out", str(existing), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an existing file" in err[0] and str(existing) in err[0]
    assert existing.read_text() == "mine"


def test_model_folder_save_is_all_or_nothing(engine_and_result, tmp_path):
    engine, _ = engine_and_result
    folder = tmp_path / "model"
    save_pretrained(engine.model, engine.tokenizer, folder)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    vision = (folder / "vision.safetensors").read_bytes()
    with file_size_limit(50_000), pytest.raises(OutputError):
        save_pretrained(tiny_engine(seed=3).model, engine.tokenizer, folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert (folder / "vision.safetensors").read_bytes() == vision
    assert Reg2RGConfig.load(folder) == engine.model.config        # the previous model folder still loads
    assert _leftovers(tmp_path) == []


def test_a_folder_that_is_not_a_model_folder_is_not_replaced(engine_and_result, tmp_path):
    engine, _ = engine_and_result
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputError, match="not a model folder"):
        save_pretrained(engine.model, engine.tokenizer, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
