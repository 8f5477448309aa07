"""The RadGenome-ChestCT dataset layout: which volume, which mask folder, which report.

The one home of the layout (docs/reproduction.md §3), shared by ``reg2rg-train`` (``train/data.py``) and
``reg2rg-generate --dataset`` (``engine/cli.py``)::

    <root>/<patient>/<accession>/<volume>.nii.gz
    <mask_root>/seg_<volume>/<region>.nii.gz
    reports CSV: Volumename, Anatomy, Sentence      (empty Anatomy = the whole-study report)

Reading the voxels themselves is `studyio.read_study`'s job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from .csvtable import CsvFormatError, read_csv
from .regions import canonical_region

logger = logging.getLogger("reg2rg.engine.dataset")

VOLUME_SUFFIXES = (".nii.gz", ".nii")
REPORT_COLUMNS = ("Volumename", "Anatomy", "Sentence")


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no CSV, no usable study); the message names the file."""


def volume_key(name: str) -> str:
    """``train_1_a_1.nii.gz`` / ``train_1_a_1`` -> ``train_1_a_1`` (how volumes and CSV rows are matched)."""
    name = os.path.basename(name.strip())
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_reports(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """Read the region report CSV (or several) -> ``{volume: {region: sentence, "": whole-study report}}``.

    Several rows for the same (volume, region) are joined with a space. Rows naming an anatomy that
    is not one of the 10 regions are ignored (logged once per anatomy name). The CSV is read strictly
    (`csvtable.read_csv`): malformed rows — an unterminated quote, more or fewer fields than the header,
    a row cut off at the end — are **skipped**, never merged into another row's text, with one warning
    naming their lines. A file that is not UTF-8 or lacks a column raises `DatasetError`.
    """
    if isinstance(path, (list, tuple)):
        merged: dict[str, dict[str, str]] = {}
        for one in path:
            merged.update(read_reports(one))
        return merged
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: report CSV not found")
    out: dict[str, dict[str, str]] = {}
    unknown: set[str] = set()
    try:
        table = read_csv(path, REPORT_COLUMNS)        # a BOM (spreadsheet exports) is tolerated
    except CsvFormatError as err:
        raise DatasetError(str(err)) from None
    if table.all_problems:
        logger.warning("%s: %d malformed row(s) skipped: %s", path, len(table.all_problems), table.describe_problems())
    for _line, row in table.rows:
        name = volume_key(row["Volumename"] or "")
        if not name:
            continue
        anatomy = (row["Anatomy"] or "").strip()
        sentence = " ".join((row["Sentence"] or "").split())
        region = "" if not anatomy or anatomy.lower() == "nan" else canonical_region(anatomy)
        if region is None:
            if anatomy not in unknown:
                unknown.add(anatomy)
                logger.warning("%s: rows with anatomy %r (not one of the 10 regions) are ignored", path, anatomy)
            continue
        entry = out.setdefault(name, {})
        entry[region] = f"{entry[region]} {sentence}".strip() if region in entry else sentence
    return out


def scan_volumes(root: str | os.PathLike) -> dict[str, str]:
    """All volumes under ``root`` (any depth, ``seg_*`` mask folders excluded) -> ``{name: path}``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data root folder not found")
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("seg_"))
        for fname in sorted(filenames):
            if fname.lower().endswith(VOLUME_SUFFIXES):
                found.setdefault(volume_key(fname), os.path.join(dirpath, fname))
    return found


def find_mask_folder(mask_root: Path, volume: Path, name: str) -> Path | None:
    """``seg_<volume>`` under the mask root (directly or mirroring the volume's folders), else in the
    volume's folder or an ancestor of it, or their ``masks/`` sub-folder (the ``reg2rg-phantom`` layout)."""
    candidates = [mask_root / f"seg_{name}"]
    try:
        candidates.append(mask_root / volume.parent.relative_to(mask_root) / f"seg_{name}")
    except ValueError:
        pass
    for ancestor in [volume.parent, *volume.parent.parents][:4]:
        candidates += [ancestor / f"seg_{name}", ancestor / "masks" / f"seg_{name}"]
    return next((c for c in candidates if c.is_dir()), None)
