"""On-disk cache of pre-processed studies, so training never waits on ``.nii.gz`` decoding and resizing.

An entry is keyed by the SHA-256 of the volume file, of every mask file (name and bytes), and of the
pre-processing settings (input size, orientation, engine pre-processing version): change any of them
and the key changes, so a stale entry is never used. Each entry is two files written atomically
(temporary name, then rename)::

    <cache>/<key[:2]>/<key>.safetensors   image (1 channel, repeated to 3 on load), region.<r>, mask.<r>
    <cache>/<key[:2]>/<key>.json          study name, regions, geometry, warnings  (or the error, for a bad study)

A study that cannot be read is cached as its error, so every rank (and the next run) skips it the same
way without reading it again. The reading itself is `reg2rg.engine.studyio.read_study` and
`reg2rg.engine.preprocess.preprocess`; nothing here re-implements them.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import StudyRecord, StudyTensors

logger = logging.getLogger("reg2rg.train.cache")

#: Bump when what the cache stores changes meaning (not needed when the engine's pre-processing changes:
#: the engine's source file is part of the key).
CACHE_FORMAT = 1


class CachedStudyError(ValueError):
    """A study could not be read or pre-processed (remembered in the cache); the message names the file."""


def _file_digest(path: str, h=None, chunk: int = 1 << 20):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h


def _preprocess_source_digest() -> str:
    """A digest of the engine's pre-processing code: a change in it invalidates the cache."""
    from reg2rg.engine import preprocess as module

    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]


def preprocess_settings(input_size: Sequence[int], orientation: str | None) -> dict[str, Any]:
    """The settings that decide the pre-processed tensors (part of every cache key)."""
    return {"format": CACHE_FORMAT, "input_size": [int(s) for s in input_size],
            "orientation": orientation, "preprocess": _preprocess_source_digest()}


def content_digest(path: str, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's bytes. With ``memo_dir``, remembered under the file's (path, size, mtime) so
    a new run does not re-read every unchanged volume just to find its cache entry."""
    if memo_dir is None:
        return _file_digest(path).hexdigest()
    st = os.stat(path)
    stamp = hashlib.sha1(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / "digests" / stamp[:2] / stamp
    if memo.is_file():
        return memo.read_text(encoding="ascii").strip()
    digest = _file_digest(path).hexdigest()
    _atomic_write(memo, lambda tmp: Path(tmp).write_text(digest, encoding="ascii"))
    return digest


def cache_key(record: StudyRecord, settings: dict[str, Any], memo_dir: Path | None = None) -> str:
    """SHA-256 over the volume's content, the mask files (names and content) and the settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(b"volume\0" + content_digest(record.volume, memo_dir).encode())
    if record.masks and os.path.isdir(record.masks):
        for name in sorted(os.listdir(record.masks)):
            path = os.path.join(record.masks, name)
            if os.path.isfile(path):
                h.update(b"\0mask\0" + name.encode() + b"\0" + content_digest(path, memo_dir).encode())
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class PreprocessCache:
    """Pre-processed studies on disk (see module docstring). Safe to share between processes and ranks."""

    def __init__(self, directory: str | os.PathLike, input_size: Sequence[int], orientation: str | None = None):
        self.directory = Path(directory)
        self.input_size = tuple(int(s) for s in input_size)
        self.orientation = orientation
        self.settings = preprocess_settings(self.input_size, orientation)
        self._keys: dict[str, str] = {}

    def key(self, record: StudyRecord) -> str:
        if record.name not in self._keys:
            self._keys[record.name] = cache_key(record, self.settings, self.directory)
        return self._keys[record.name]

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def info(self, record: StudyRecord) -> dict[str, Any] | None:
        """The JSON side of an entry (regions, geometry, or ``error``), None when not cached yet."""
        _, meta = self._paths(self.key(record))
        if not meta.is_file():
            return None
        with open(meta, encoding="utf-8") as f:
            return json.load(f)

    def build(self, record: StudyRecord) -> dict[str, Any]:
        """Read and pre-process one study through the engine and store it; returns its info.

        A study that cannot be read is stored as ``{"error": message}`` rather than raised.
        """
        from reg2rg.engine.errors import StudyError

        key = self.key(record)
        tensors_path, meta_path = self._paths(key)
        try:
            tensors = read_and_preprocess(record, self.input_size, self.orientation)
        except (StudyError, OSError, ValueError) as err:
            info = {"name": record.name, "error": str(err)}
            _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(info), encoding="utf-8"))
            return info
        flat = {"image": tensors.image[:1].contiguous()}                       # (1, H, W, D)
        for region, t in tensors.regions.items():
            flat[f"region.{region}"] = t[:1].contiguous()
            flat[f"mask.{region}"] = tensors.masks[region].detach().contiguous()
        info = {"name": record.name, "regions": list(tensors.regions), "geometry": tensors.geometry,
                "warnings": tensors.geometry.pop("warnings", []), "settings": self.settings}
        _atomic_write(tensors_path, lambda tmp: save_file(flat, tmp))
        # The JSON is written last: an entry counts as complete only when it exists.
        _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(info), encoding="utf-8"))
        return info

    def load(self, record: StudyRecord) -> StudyTensors:
        """The cached tensors of a study (building the entry first if needed).

        Raises `CachedStudyError` for a study whose entry records an error.
        """
        info = self.info(record)
        if info is None:
            info = self.build(record)
        if "error" in info:
            raise CachedStudyError(info["error"])
        tensors_path, _ = self._paths(self.key(record))
        flat = load_file(str(tensors_path))

        def three(t: torch.Tensor) -> torch.Tensor:
            return t.expand(3, *t.shape[1:])                                 # (3, H, W, D), as preprocess

        return StudyTensors(
            image=three(flat["image"]),
            regions={r: three(flat[f"region.{r}"]) for r in info["regions"]},
            masks={r: flat[f"mask.{r}"] for r in info["regions"]},
            geometry=info.get("geometry", {}),
        )

    def __call__(self, record: StudyRecord) -> StudyTensors:
        return self.load(record)


def read_and_preprocess(record: StudyRecord, input_size: Sequence[int], orientation: str | None = None) -> StudyTensors:
    """Read one study with `read_study` and pre-process it with `preprocess` (no cache)."""
    import warnings

    from reg2rg.engine.errors import StudyWarning
    from reg2rg.engine.preprocess import preprocess
    from reg2rg.engine.studyio import read_study

    with warnings.catch_warnings():
        # Non-fatal reading problems are kept in the entry's warnings, not printed once per epoch.
        warnings.simplefilter("ignore", StudyWarning)
        study = read_study(record.volume, record.masks)
        inputs = preprocess(study, input_size, orientation=orientation)
    geometry = _jsonable(asdict(inputs.geometry)) if inputs.geometry is not None else {}
    geometry["warnings"] = list(study.warnings) + list(inputs.warnings)
    return StudyTensors(image=inputs.image, regions=dict(inputs.regions), masks=dict(inputs.masks), geometry=geometry)


class UncachedLoader:
    """`load_study` callable that reads and pre-processes every time (the no-cache baseline)."""

    def __init__(self, input_size: Sequence[int], orientation: str | None = None):
        self.input_size = tuple(int(s) for s in input_size)
        self.orientation = orientation

    def __call__(self, record: StudyRecord) -> StudyTensors:
        return read_and_preprocess(record, self.input_size, self.orientation)


def _build_one(args) -> tuple[str, dict[str, Any]]:
    directory, input_size, orientation, record = args
    torch.set_num_threads(1)
    cache = PreprocessCache(directory, input_size, orientation)
    info = cache.info(record)
    return record.name, info if info is not None else cache.build(record)


def build_cache(cache: PreprocessCache, records: Iterable[StudyRecord], workers: int = 2,
                progress=None) -> dict[str, dict[str, Any]]:
    """Build every missing entry, ``workers`` processes in parallel; returns ``{name: info}``.

    Entries already present are not rebuilt (so this is also how a run finds out which studies are bad).
    """
    records = list(records)
    todo = [r for r in records if cache.info(r) is None]
    results: dict[str, dict[str, Any]] = {}
    if todo:
        jobs = [(str(cache.directory), cache.input_size, cache.orientation, r) for r in todo]
        if workers <= 1 or len(todo) == 1:
            for job in jobs:
                name, info = _build_one(job)
                results[name] = info
                if progress:
                    progress(1)
        else:
            # spawn, not fork: forking a process that already ran torch ops can deadlock in OpenMP.
            ctx = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for name, info in pool.map(_build_one, jobs, chunksize=1):
                    results[name] = info
                    if progress:
                        progress(1)
    for record in records:
        if record.name not in results:
            results[record.name] = cache.info(record) or cache.build(record)
    return results
