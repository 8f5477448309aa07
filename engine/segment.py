"""Segmentation on demand: TotalSegmentator -> the ten Reg2RG region masks of any chest CT.

RadGenome-ChestCT's masks come from SAT, which cannot be installed here; TotalSegmentator (pip package
``TotalSegmentator``, optional extra ``reg2rg-viewer[segment]``) is what the field uses. `segment_study`
runs its Python API, ``totalsegmentator.python_api.totalsegmentator(input, output, ml=True, task=…,
fast=…, device=…)``, once per task, and `reg2rg.engine.masks` (the one home of the mapping rules) turns
the multi-label files into the ten regions.

* Tasks: ``total`` (abdomen, bone, esophagus, heart, lung, thyroid, trachea), ``trunk_cavities``
  (mediastinum, pleura), ``breasts`` (breast), ``pleural_pericard_effusion`` (effusions into pleura and
  heart); ``lung_vessels`` (airways) on request. All are openly licensed CT tasks; ``--fast`` applies to
  ``total`` only (TotalSegmentator has no fast model of the others).
* Offline, as users run it: the weights come from TotalSegmentator's own home folder
  (``TOTALSEG_HOME_DIR``, default ``~/.totalsegmentator``; ``TOTALSEG_WEIGHTS_PATH`` overrides the weights
  folder). Missing weights are found by looking for their folders before anything runs (our code makes no
  network call; TotalSegmentator would otherwise download them); its usage statistics are switched off
  in its ``config.json`` (``send_usage_stats: false``) before each run.
* Each task runs in a child process: a crash or ``sys.exit`` inside TotalSegmentator or nnU-Net becomes one
  line, and cancelling kills the child at once.
* Results are cached per study content (a hash of the voxels and the geometry): the raw label map of each
  finished task is kept under ``$REG2RG_CACHE_DIR`` (default ``~/.cache/reg2rg``)``/segment/<hash>/``, so
  a second run, or a run cancelled after some tasks, is instant for what is done.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .regions import REGIONS

DEFAULT_TASKS: tuple[str, ...] = ("total", "trunk_cavities", "breasts", "pleural_pericard_effusion")
KNOWN_TASKS: tuple[str, ...] = DEFAULT_TASKS + ("lung_vessels",)
INSTALL_HINT = "pip install 'reg2rg-viewer[segment]' (or: pip install TotalSegmentator)"

#: Weight folders (``Dataset<ID>_…`` in TotalSegmentator's weights folder) each task needs, TotalSegmentator
#: 2.x; (task, fast). The tasks that crop around the lungs first also run the coarse ``total`` model (298/297).
TASK_WEIGHTS: dict[tuple[str, bool], tuple[int, ...]] = {
    ("total", False): (291, 292, 293, 294, 295),
    ("total", True): (297,),
    ("trunk_cavities", False): (343,),
    ("breasts", False): (527,),
    ("pleural_pericard_effusion", False): (315, 298),
    ("lung_vessels", False): (117, 297),
}

#: Rough CPU minutes per task for a 512 x 512 x 300 chest CT (scaled by voxel count; a GPU is ~10x faster).
_CPU_MINUTES = {("total", False): 12.0, ("total", True): 1.5, ("trunk_cavities", False): 4.0,
                ("breasts", False): 4.0, ("pleural_pericard_effusion", False): 3.0, ("lung_vessels", False): 6.0}
_REFERENCE_VOXELS = 512 * 512 * 300


class SegmentationError(RuntimeError):
    """Segmentation cannot run or failed; the message is one line for the user (what to do included)."""


class SegmentationCancelled(SegmentationError):
    """The user cancelled; tasks finished before stay in the cache."""


@dataclass
class SegmentationResult:
    """What `segment_study` produced: the folder of raw label maps (one per task) and what was run."""

    folder: Path                              # cache folder: <task>.nii.gz multi-label files + segmentation.json
    tasks: list[str]
    cached_tasks: list[str]                   # tasks found in the cache (not run again)
    seconds: float
    provenance: dict = field(default_factory=dict)

    @property
    def label_maps(self) -> list[Path]:
        return [self.folder / f"{t}.nii.gz" for t in self.tasks]


# ---- environment -------------------------------------------------------------------------------------
def totalseg_home() -> Path:
    """TotalSegmentator's home folder: ``TOTALSEG_HOME_DIR``, else ``~/.totalsegmentator`` (its own rule)."""
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"])
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator"


def weights_folder() -> Path:
    """Where TotalSegmentator looks for its weights: ``TOTALSEG_WEIGHTS_PATH``, else ``<home>/nnunet/results``."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    return totalseg_home() / "nnunet" / "results"


def cache_root() -> Path:
    """Our cache of segmentations: ``REG2RG_CACHE_DIR``, else ``$XDG_CACHE_HOME/reg2rg`` or ``~/.cache/reg2rg``."""
    if os.environ.get("REG2RG_CACHE_DIR"):
        return Path(os.environ["REG2RG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reg2rg"


def totalsegmentator_available() -> bool:
    """True when the TotalSegmentator package can be imported (checked without importing it)."""
    return importlib.util.find_spec("totalsegmentator") is not None


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks in run order (``total`` first: it gives most regions), unknown names refused."""
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise SegmentationError(f"unknown TotalSegmentator task(s) {', '.join(unknown)}; "
                                f"known: {', '.join(KNOWN_TASKS)}")
    return [t for t in KNOWN_TASKS if t in set(tasks)]


def missing_weights(tasks: Sequence[str], fast: bool = False) -> dict[str, list[int]]:
    """Task -> the weight folders (dataset IDs) not in TotalSegmentator's weights folder. No network."""
    root = weights_folder()
    missing: dict[str, list[int]] = {}
    for task in tasks:
        ids = TASK_WEIGHTS[(task, fast and task == "total")]
        lacking = [i for i in ids if not (root.is_dir() and any(root.glob(f"Dataset{i:03d}_*")))]
        if lacking:
            missing[task] = lacking
    return missing


def disable_usage_statistics() -> None:
    """Switch TotalSegmentator's usage statistics off in its ``config.json`` (kept otherwise as it was)."""
    home = totalseg_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    if config.get("send_usage_stats") is False and "prediction_counter" in config and "totalseg_id" in config:
        return
    config.setdefault("totalseg_id", "totalseg_offline")
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    from .fileio import atomic_write

    with atomic_write(path) as f:
        json.dump(config, f, indent=4)


def study_hash(study) -> str:
    """Content hash of a study's voxels and geometry (the cache key: the same scan from any path)."""
    h = hashlib.blake2b(digest_size=16)
    v = np.ascontiguousarray(study.voxels)
    h.update(f"{v.dtype.str}{v.shape}".encode())
    h.update(np.round(np.asarray(study.affine, dtype=np.float64), 4).tobytes())
    h.update(memoryview(v).cast("B"))
    return h.hexdigest()


def estimate_seconds(task: str, n_voxels: int, fast: bool = False, device: str = "cpu") -> float:
    """A rough run time for one task (minutes on a laptop CPU for a full chest CT; GPU ~10x faster)."""
    minutes = _CPU_MINUTES[(task, fast and task == "total")] * max(n_voxels / _REFERENCE_VOXELS, 0.05)
    return 60.0 * minutes / (10.0 if device.startswith("gpu") or device.startswith("cuda") else 1.0)


def describe_estimate(seconds: float) -> str:
    return f"about {max(1, round(seconds / 60))} min" if seconds >= 90 else f"about {max(5, round(seconds, -1)):.0f} s"


# ---- running -------------------------------------------------------------------------------------------
Progress = Callable[[float, str], None]


def _ct_input(study, work: Path) -> Path:
    """The CT as a NIfTI file for TotalSegmentator: the study's own file when it is one, else a copy
    written from the voxels (DICOM, in-memory studies) with the same grid, so the labels land on it."""
    src = Path(study.source) if study.source else None
    if src is not None and src.is_file() and src.name.lower().endswith((".nii", ".nii.gz")):
        return src
    import nibabel as nib

    path = work / "ct.nii.gz"
    img = nib.Nifti1Image(np.asarray(study.voxels), study.affine)
    img.set_qform(study.affine, code=1)
    img.set_sform(study.affine, code=1)
    nib.save(img, str(path))
    return path


def _child_command(ct: Path, out: Path, task: str, fast: bool, device: str) -> list[str]:
    call = {"input": str(ct), "output": str(out), "ml": True, "task": task, "fast": bool(fast and task == "total"),
            "device": device, "quiet": True, "nr_thr_saving": 1, "statistics": False, "preview": False}
    return [sys.executable, "-c", "from reg2rg.engine.segment import _child_main; _child_main()", json.dumps(call)]


def _child_main() -> None:
    """In the child process: one TotalSegmentator call with the JSON keyword arguments in argv[1]."""
    call = json.loads(sys.argv[1])
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as exc:
        print(f"TotalSegmentator cannot be imported ({exc})", file=sys.stderr)
        sys.exit(3)
    totalsegmentator(**call)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def _run_child(cmd: list[str], task: str, est: float, progress: Progress, share: tuple[float, float],
               cancel: threading.Event | None) -> None:
    env = dict(os.environ)
    # the child sees what this process imports (an editable checkout, a test's stand-in package)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          errors="replace") as proc:
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        t0 = time.monotonic()
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                proc.kill()
                proc.wait()
                raise SegmentationCancelled(f"segmentation cancelled during the '{task}' task")
            done = min((time.monotonic() - t0) / max(est, 1.0), 0.95)
            progress(share[0] + done * (share[1] - share[0]), f"TotalSegmentator '{task}'…")
            time.sleep(0.25)
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise SegmentationError(f"TotalSegmentator's '{task}' task failed: {_last_line(''.join(output))}")


def segment_study(study, tasks: Sequence[str] = DEFAULT_TASKS, fast: bool = False, device: str = "cpu",
                  progress: Progress | None = None, cancel: threading.Event | None = None,
                  on_task_done: Callable[[str, Path, bool], None] | None = None,
                  use_cache: bool = True) -> SegmentationResult:
    """Run TotalSegmentator's ``tasks`` on ``study`` (a `Study`; NIfTI or DICOM as read by `studyio`).

    Returns the cache folder holding one multi-label file per task; read it with
    `reg2rg.engine.studyio.with_masks` (or `write_region_masks`) to get the ten regions. ``progress(f, text)``
    is called with the fraction done (about 4 times a second; times are estimates), ``on_task_done(task,
    folder, from_cache)`` after each task (the masks can be shown as they come), ``cancel`` stops at once.
    Raises `SegmentationError` with one line: package missing (with the install command), weights
    missing (with how to get them), or the task that failed and its last message.
    """
    progress = progress or (lambda f, t: None)
    tasks = check_tasks(tasks)
    device = {"gpu": "gpu", "cuda": "gpu", "cpu": "cpu"}.get(device, device)
    t_start = time.monotonic()
    folder = cache_root() / "segment" / study_hash(study) / ("fast" if fast else "full")
    cached = [t for t in tasks if use_cache and (folder / f"{t}.nii.gz").is_file()]
    todo = [t for t in tasks if t not in cached]
    if todo:
        if not totalsegmentator_available():
            raise SegmentationError(f"TotalSegmentator is not installed; install it with: {INSTALL_HINT}")
        lacking = missing_weights(todo, fast)
        if lacking:
            what = ", ".join(f"{t} (Dataset{', Dataset'.join(str(i) for i in ids)})" for t, ids in lacking.items())
            raise SegmentationError(
                f"TotalSegmentator's weights for {what} are not in {weights_folder()}; on a machine with internet "
                f"run `totalseg_download_weights -t <task>` for {', '.join(lacking)}, then copy its "
                "~/.totalsegmentator folder here or point TOTALSEG_HOME_DIR at it")
        disable_usage_statistics()
    folder.mkdir(parents=True, exist_ok=True)
    for t in cached:
        progress(0.0, f"'{t}' from the cache")
        if on_task_done is not None:
            on_task_done(t, folder, True)
    if todo:
        ests = [estimate_seconds(t, int(np.prod(study.shape)), fast, device) for t in todo]
        total_est = sum(ests)
        progress(0.0, f"TotalSegmentator: {len(todo)} task(s) on {device.upper()}, {describe_estimate(total_est)} "
                      "(estimate)")
        work = folder / ".work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            ct = _ct_input(study, work)
            done_s = 0.0
            for task, est in zip(todo, ests):
                share = (done_s / total_est, (done_s + est) / total_est)
                out = work / f"{task}.nii.gz"
                _run_child(_child_command(ct, out, task, fast, device), task, est, progress, share, cancel)
                if not out.is_file():
                    raise SegmentationError(f"TotalSegmentator's '{task}' task wrote no output file")
                os.replace(out, folder / f"{task}.nii.gz")          # a cached task is always a whole file
                shutil.rmtree(folder / "regions", ignore_errors=True)  # region masks made from older maps
                done_s += est
                progress(share[1], f"'{task}' done")
                if on_task_done is not None:
                    on_task_done(task, folder, False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    provenance = {"tool": "TotalSegmentator", "version": _totalseg_version(), "tasks": tasks, "fast": fast,
                  "device": device, "study": study.name, "cached_tasks": cached}
    (folder / "segmentation.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    progress(1.0, "segmentation done")
    return SegmentationResult(folder, tasks, cached, time.monotonic() - t_start, provenance)


def _totalseg_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("TotalSegmentator")
    except PackageNotFoundError:
        return None


def write_region_masks(study, result: SegmentationResult, out: str | os.PathLike) -> "object":
    """Write the ten region masks (RadGenome layout ``<out>/<region>.nii.gz``), the raw label maps
    (``<out>/totalsegmentator/<task>.nii.gz``) and ``<out>/segmentation.json``; returns the study with
    the masks (``with_masks``: warnings and plausibility problems included)."""
    import nibabel as nib

    from .fileio import atomic_path, ensure_folder
    from .studyio import with_masks

    out = ensure_folder(out)
    raw = ensure_folder(Path(out) / "totalsegmentator")
    for path in result.label_maps:
        with atomic_path(raw / path.name) as tmp:
            shutil.copyfile(path, tmp)
    masked = with_masks(study, raw)
    for region in REGIONS:
        if region in masked.masks:
            img = nib.Nifti1Image(masked.masks[region].astype(np.uint8), study.affine)
            img.set_qform(study.affine, code=1)
            img.set_sform(study.affine, code=1)
            with atomic_path(Path(out) / f"{region}.nii.gz") as tmp:
                nib.save(img, tmp)
    info = dict(result.provenance, regions=list(masked.masks), absent=[r for r in REGIONS if r not in masked.masks],
                mask_sources=masked.mask_sources, warnings=masked.warnings, mask_problems=masked.mask_problems)
    with atomic_path(Path(out) / "segmentation.json") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return masked


def region_masks_folder(study, result: SegmentationResult) -> Path:
    """The ten region masks of ``result`` in the RadGenome layout, made once beside its label maps in the
    cache (`write_region_masks`) and reused: a second open reads ten masks, not the label maps again."""
    folder = result.folder / "regions" / "+".join(result.tasks)
    if not (folder / "segmentation.json").is_file():
        write_region_masks(study, result, folder)      # segmentation.json last: its presence means complete
    return folder


def segment_and_read(study, tasks: Sequence[str] = DEFAULT_TASKS, fast: bool = False, device: str = "cpu",
                     progress: Progress | None = None, cancel: threading.Event | None = None):
    """`segment_study` then the study with its region masks (warnings and plausibility included), read
    from the cached region folder (for reg2rg-generate --segment)."""
    from .studyio import with_masks

    result = segment_study(study, tasks, fast, device, progress, cancel)
    return with_masks(study, region_masks_folder(study, result))


__all__ = ["DEFAULT_TASKS", "KNOWN_TASKS", "SegmentationError", "SegmentationCancelled", "SegmentationResult",
           "segment_study", "segment_and_read", "write_region_masks", "missing_weights", "totalseg_home",
           "weights_folder", "cache_root", "study_hash", "estimate_seconds"]
