"""Small phantom datasets in the RadGenome-ChestCT layout, written with the engine's own phantom and writer.

Used by the training tests; the shapes are small so that reading and pre-processing stay fast.
"""

from __future__ import annotations

import csv
from pathlib import Path

from reg2rg.engine.phantom import make_study
from reg2rg.engine.studyio import write_study

SMALL_SHAPE = (48, 48, 24)


def write_phantom_dataset(root: Path, seeds, shape=SMALL_SHAPE, mask_root: Path | None = None,
                          prefix: str = "train") -> tuple[Path, list[str]]:
    """Write one phantom study per seed as ``<root>/<p>/<p>_a/<p>_a_1.nii.gz`` with masks under
    ``<mask_root>/seg_<volume>/`` and a ``reports.csv`` (Volumename, Anatomy, Sentence); returns
    (csv path, volume names)."""
    root = Path(root)
    mask_root = Path(mask_root) if mask_root else root / "masks"
    rows, names = [], []
    for seed in seeds:
        study = make_study(seed, shape=shape)
        patient = f"{prefix}_{seed}"
        name = f"{patient}_a_1"
        write_study(study, root / patient / f"{patient}_a" / f"{name}.nii.gz", mask_root / f"seg_{name}")
        for region, sentence in study.metadata["region_reports"].items():
            rows.append((f"{name}.nii.gz", region, sentence))
        rows.append((f"{name}.nii.gz", "", study.metadata["report"]))
        names.append(name)
    csv_path = root / "reports.csv"
    write_reports(csv_path, rows)
    return csv_path, names


def write_reports(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Volumename", "Anatomy", "Sentence"])
        writer.writerows(rows)


def read_report_texts(csv_path: Path) -> list[str]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [row["Sentence"] for row in csv.DictReader(f)]


def add_bad_samples(root: Path, csv_path: Path, mask_root: Path, good_name: str) -> dict[str, str]:
    """Add the bad samples of issue 6 next to good ones; returns {volume name: expected reason category}.

    A CSV row without a volume, a volume without a report, a volume without a mask folder, a study whose
    masks are all empty, and a volume that is not a readable NIfTI file.
    """
    import shutil

    import nibabel as nib
    import numpy as np

    root, mask_root = Path(root), Path(mask_root)
    good_volume = next(root.rglob(f"{good_name}.nii.gz"))
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    good_rows = [r for r in rows if r[0] == f"{good_name}.nii.gz"]

    def copy_study(name: str, masks: bool = True) -> Path:
        folder = root / name.rsplit("_a_1", 1)[0] / name.replace("_1", "", 1)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.nii.gz"
        shutil.copy(good_volume, target)
        if masks:
            shutil.copytree(mask_root / f"seg_{good_name}", mask_root / f"seg_{name}")
        return target

    def with_rows(name: str) -> None:
        rows.extend([[f"{name}.nii.gz", r[1], r[2]] for r in good_rows])

    with_rows("ghost_1_a_1")                       # report rows, no volume
    copy_study("noreport_1_a_1")                   # volume + masks, no report rows
    copy_study("nomask_1_a_1", masks=False)        # no seg_ folder
    with_rows("nomask_1_a_1")
    copy_study("empty_1_a_1")                      # masks present but all empty
    for path in (mask_root / "seg_empty_1_a_1").iterdir():
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(path))
    with_rows("empty_1_a_1")
    broken = copy_study("broken_1_a_1")            # not a NIfTI file any more
    broken.write_bytes(b"this is not gzip data")
    with_rows("broken_1_a_1")
    write_reports(csv_path, rows)
    return {"ghost_1_a_1": "no volume", "noreport_1_a_1": "no report", "nomask_1_a_1": "no masks",
            "empty_1_a_1": "empty masks", "broken_1_a_1": "unreadable"}
