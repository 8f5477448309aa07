"""Output files that are either complete or absent: write to a temporary name, then rename into place.

Every file the engine (and the tools built on it) writes goes through this module, so a failure (a full
or read-only disk, an interrupted run, a bug half-way through) leaves the previous file or nothing, never
a truncated ``report.json`` or a broken ``attention_*.nii.gz`` next to a new ``report.txt``.

* `atomic_write` — a file object (``"w"`` text, UTF-8 by default, or ``"wb"``), for code that writes
  itself: ``with atomic_write(path) as f: json.dump(data, f)``.
* `atomic_path` — a temporary path with the same extension, for libraries that write by file name
  (``nib.save``, ``safetensors.save_file``).
* `atomic_folder` — a temporary folder for a set of files that belong together (a model folder); it
  replaces the old folder as a whole.
* `staged_files` — several files in one folder that are replaced together only when all are written
  (the per-study outputs of ``reg2rg-generate``).

The temporary name lives in the same folder (so the rename is atomic on POSIX and Windows) and is unique
per process and call (``.tmp-<pid>-<random>-<name>``), so two processes writing the same file never
write into each other's temporary file: the last one to finish wins with a complete file. The data is
``fsync``-ed before the rename. Any ``OSError`` becomes an `OutputError`: one line naming the final file
and the problem in plain words ("the disk is full", "the file system is read-only").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator

_PREFIX = ".tmp-"

#: The problem, in a reader's words, for the errors an output disk gives.
_PROBLEMS = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this system allows (file size limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "its folder does not exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder of that name is in the way",
    errno.EEXIST: "a file of that name is in the way",
}


class OutputError(OSError):
    """An output file or folder could not be written; ``str()`` is one line naming it and the problem.

    A subclass of `OSError`, so code that already handles ``OSError`` keeps working.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(problem)
        self.path = os.fspath(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.problem}"


def describe_os_error(err: BaseException) -> str:
    """The problem behind an ``OSError`` in plain words (no path: the caller names the file)."""
    if isinstance(err, OutputError):
        return err.problem
    code = getattr(err, "errno", None)
    if code in _PROBLEMS:
        return _PROBLEMS[code]
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def output_error(path: str | os.PathLike, err: BaseException) -> OutputError:
    """``err`` (an ``OSError``) as an `OutputError` naming ``path``; an `OutputError` is passed through
    unless it names one of our temporary files (then ``path``, the file the reader asked for, is named)."""
    if isinstance(err, OutputError) and not is_temp_name(os.path.basename(err.path)):
        return err
    return OutputError(path, describe_os_error(err))


def _wrapped_os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` inside a library's own exception (safetensors reports a full disk as
    ``SafetensorError: ... I/O error: No space left on device (os error 28)``), else None."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def temp_name(path: str | os.PathLike) -> Path:
    """A unique temporary name beside ``path`` that keeps its extension (``.nii.gz`` stays last)."""
    path = Path(path)
    return path.with_name(f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_name` (left behind only by a process killed mid-write)."""
    return name.startswith(_PREFIX)


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) for output; a file in the way or an unwritable disk -> `OutputError`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "this is a file, not a folder (name a folder for the output)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(folder, err) from err
    return folder


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise OutputError(path, "a folder of that name is in the way")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` (same extension); on success it is fsync-ed and
    renamed onto ``path``, on any failure removed. ``OSError`` -> `OutputError` naming ``path``."""
    path = Path(path)
    _check_target(path)
    tmp = temp_name(path)
    try:
        yield os.fspath(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        os_error = _wrapped_os_error(err)
        if os_error is not None:
            raise output_error(path, os_error) from err
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); when the block
    ends without an error the file is flushed, fsync-ed and renamed onto ``path`` (replacing it), else
    removed and ``path`` is left as it was. ``OSError`` -> `OutputError` naming ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        if mode == "wb":
            f = open(tmp, "xb")
        else:
            f = open(tmp, "x", encoding=encoding, newline=newline)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole (the old
    folder is renamed aside first and removed only after the new one is in place), on failure it is
    removed and ``path`` is left as it was. ``OSError`` -> `OutputError` naming ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(path, "a file of that name is in the way (expected a folder)")
    tmp = temp_name(path)
    try:
        ensure_folder(path.parent)
        tmp.mkdir()
        yield os.fspath(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
        old = None
        if path.exists():
            old = path.with_name(f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-old-{path.name}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:                  # put the previous folder back
                os.replace(old, path)
            raise
        if old is not None:
            _remove(old)
    except BaseException as err:
        _remove(tmp)
        os_error = _wrapped_os_error(err)
        if os_error is not None:
            raise output_error(path, os_error) from err
        raise
    _fsync_folder(path.parent)


class StagedFiles:
    """Files written under temporary names in one folder; see `staged_files`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._staged: list[tuple[Path, Path]] = []       # (temporary, final)
        self.current: Path = folder                        # the file being written (named in errors)

    def _stage(self, name: str) -> Path:
        final = self.folder / name
        _check_target(final)
        tmp = temp_name(final)
        self._staged.append((tmp, final))
        self.current = final
        return tmp

    def path(self, name: str) -> str:
        """A temporary file name for ``name`` (same extension), for libraries that write by name."""
        return os.fspath(self._stage(name))

    @contextlib.contextmanager
    def open(self, name: str, mode: str = "w", *, encoding: str | None = "utf-8",
             newline: str | None = None) -> Iterator[IO]:
        """A file object for ``name`` (``"w"`` or ``"wb"``), written under its temporary name."""
        if mode not in ("w", "wb"):
            raise ValueError(f"staged open: mode must be 'w' or 'wb', not {mode!r}")
        tmp = self._stage(name)
        f = open(tmp, "xb") if mode == "wb" else open(tmp, "x", encoding=encoding, newline=newline)
        with f:
            yield f

    def _commit(self) -> None:
        for tmp, final in self._staged:
            self.current = final
            _fsync_file(tmp)
        self.current = self.folder
        for tmp, final in self._staged:
            os.replace(tmp, final)
        _fsync_folder(self.folder)

    def _discard(self) -> None:
        for tmp, _final in self._staged:
            _remove(tmp)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[StagedFiles]:
    """Write several files of ``folder`` together: each under a temporary name, and only when the block
    ends without an error are they all renamed into place (so a full disk half-way leaves every previous
    file as it was, never a new ``report.txt`` beside a truncated ``report.json``).

    >>> with staged_files(out) as stage:                               # doctest: +SKIP
    ...     with stage.open("report.json") as f: json.dump(data, f)
    ...     nib.save(img, stage.path("attention_report.nii.gz"))
    """
    folder = ensure_folder(folder)
    stage = StagedFiles(folder)
    try:
        yield stage
        stage._commit()
    except BaseException as err:
        stage._discard()
        os_error = _wrapped_os_error(err)
        if os_error is not None:
            raise output_error(stage.current, os_error) from err
        raise
