"""`reg2rg-phantom`: write synthetic chest CT studies in the RadGenome-ChestCT layout.

Layout under ``--out`` (study i has seed S + i, so a study is reproducible on its own):

    <out>/phantom_<seed>/phantom_<seed>_a/phantom_<seed>_a_1.nii.gz      the CT (int16 HU, LPS voxel axes)
    <out>/masks/seg_phantom_<seed>_a_1/<region>.nii.gz                 the 10 region masks (uint8 0/1)
    <out>/reports.csv        Volumename, Anatomy, Sentence (empty Anatomy = whole-study report)
    <out>/manifest.json      the planted findings of every volume, its seed, shape and spacing
    <out>/lesions/seg_phantom_<seed>_a_1/lesions.nii.gz   where each planted finding is: a label map, finding i
                             of the manifest's list labelled i + 1 (its ``lesion_label``), the table in the header
    <out>/totalseg/seg_phantom_<seed>_a_1/<task>.nii.gz   with --totalseg: the same anatomy as TotalSegmentator
                             multi-label files (total, breasts, trunk_cavities, pleural_pericard_effusion,
                             lung_vessels), its label values, the label table in the header

The same arguments always give the same bytes (nibabel writes gzip with a zero timestamp).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .fileio import atomic_write, ensure_folder
from .regions import REGIONS


def _json_ready(value):
    """Numpy scalars and arrays in the findings -> plain JSON types."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def study_paths(out: Path, volume: str) -> tuple[Path, Path]:
    """(volume file, mask folder) of a volume named ``<patient>_<accession letter>_<n>`` in the layout."""
    patient, accession = volume.rsplit("_", 2)[0], volume.rsplit("_", 1)[0]
    return out / patient / accession / f"{volume}.nii.gz", out / "masks" / f"seg_{volume}"


MAX_REDRAWS = 5          # findings redrawn this many times before a study is skipped


def draw_findings(seed: int, abnormal_fraction: float | None, attempt: int = 0):
    """The findings to plant in study ``seed``: ``None`` = make_study's own draw (about a third normal).

    With ``abnormal_fraction`` F, a study is abnormal with probability F and then holds 2-4 distinct
    findings (types weighted as in make_study); this over-samples findings for training sets. ``attempt``
    > 0 redraws (after the grid could not show a finding). Deterministic per (seed, F, attempt): the draw
    uses its own random stream, so the anatomy and finding details still come from the seed alone.
    """
    import numpy as np

    from .phantom import _DRAW_WEIGHTS, Finding, random_findings

    if abnormal_fraction is None and attempt == 0:
        return None
    rng = np.random.default_rng([int(seed), 0x5EED, attempt])
    if abnormal_fraction is None:
        return random_findings(rng)
    if rng.random() >= abnormal_fraction:
        return []
    n = int(rng.choice([2, 3, 4], p=[0.4, 0.35, 0.25]))
    types = list(_DRAW_WEIGHTS)
    p = np.array([_DRAW_WEIGHTS[t] for t in types])
    chosen = rng.choice(len(types), size=n, replace=False, p=p / p.sum())
    return [Finding(types[i]) for i in sorted(chosen)]


def write_totalseg(study, folder: Path) -> None:
    """Write a phantom's TotalSegmentator-style label maps (``make_study(..., totalseg=True)``), one file per task."""
    from .masks import TOTALSEG_TASK_CLASSES, save_label_map

    ensure_folder(folder)
    for task, labels in study.metadata["totalseg"].items():
        save_label_map(folder / f"{task}.nii.gz", labels, study.affine, TOTALSEG_TASK_CLASSES[task])


def _make_study_redrawing(seed: int, shape, spacing, abnormal_fraction, log, totalseg: bool = False):
    """make_study, redrawing the findings when the grid cannot show one; None (logged) after MAX_REDRAWS."""
    from .phantom import PhantomError, make_study

    for attempt in range(MAX_REDRAWS + 1):
        findings = draw_findings(seed, abnormal_fraction, attempt)
        try:
            return make_study(seed, findings=findings, shape=shape, spacing=spacing, totalseg=totalseg)
        except PhantomError as exc:
            if "shape must" in str(exc) or "spacing must" in str(exc):
                raise                                   # a bad grid fails for every study: stop
            log(f"seed {seed}: {exc}; redrawing its findings (attempt {attempt + 1})")
    log(f"seed {seed}: skipped after {MAX_REDRAWS} redraws")
    return None


def write_dataset(out: str | Path, n: int, seed: int, shape=None, spacing=None, log=print,
                  abnormal_fraction: float | None = None, totalseg: bool = False) -> dict:
    """Write ``n`` phantom studies (seeds ``seed`` .. ``seed + n - 1``) under ``out``; returns the manifest.

    ``abnormal_fraction`` (0-1, default None = make_study's own mix) over-samples abnormal studies, see
    `draw_findings`. A study whose findings the grid cannot show is redrawn, or skipped with a logged line.
    ``totalseg`` also writes TotalSegmentator-style label maps of each study under ``out/totalseg/``.
    """
    from .studyio import write_study

    out = Path(out)
    ensure_folder(out)
    rows, studies = [], []
    for i in range(n):
        study = _make_study_redrawing(seed + i, shape, spacing, abnormal_fraction, log, totalseg)
        if study is None:
            continue
        volume_path, mask_dir = study_paths(out, study.name)
        write_study(study, volume_path, mask_dir)
        if totalseg:
            write_totalseg(study, out / "totalseg" / f"seg_{study.name}")
        lesions = None
        if "lesions" in study.metadata:      # where each planted finding is (a label map; the manifest names it)
            from .masks import save_label_map

            folder = out / "lesions" / f"seg_{study.name}"     # seg_: never taken for a volume (scan_volumes)
            ensure_folder(folder)
            lesions = folder / "lesions.nii.gz"
            save_label_map(lesions, study.metadata["lesions"], study.affine,
                           {f["lesion_label"]: f["type"] for f in study.metadata["findings"]})
        file_name = f"{study.name}.nii.gz"
        rows.append((file_name, "", study.metadata["report"]))
        for region in REGIONS:
            rows.append((file_name, region, study.metadata["region_reports"][region]))
        studies.append({
            "volume": file_name, "seed": seed + i, "path": volume_path.relative_to(out).as_posix(),
            "masks": mask_dir.relative_to(out).as_posix(), "shape": list(study.shape),
            "spacing": [round(s, 4) for s in study.spacing], "orientation": study.orientation,
            "findings": _json_ready(study.metadata["findings"]),
            **({"lesions": lesions.relative_to(out).as_posix()} if lesions else {}),
        })
        log(f"[{i + 1}/{n}] {file_name}: {len(study.metadata['findings'])} finding(s)")
    with atomic_write(out / "reports.csv", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Volumename", "Anatomy", "Sentence"])
        writer.writerows(rows)
    manifest = {"generator": "reg2rg.engine.phantom", "seed": seed, "n": n, "studies": studies}
    with atomic_write(out / "manifest.json") as fh:
        fh.write(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``reg2rg-phantom``."""
    parser = argparse.ArgumentParser(prog="reg2rg-phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=1, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first study (study i uses seed + i)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="voxel grid (default: per seed)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm")
    parser.add_argument("--abnormal-fraction", type=float, default=None, metavar="F",
                        help="share of abnormal studies, each with 2-4 findings (default: about two thirds, 1-4)")
    parser.add_argument("--totalseg", action="store_true",
                        help="also write each study's anatomy as TotalSegmentator multi-label files "
                             "(<out>/totalseg/seg_<volume>/<task>.nii.gz), for testing the region mapping")
    args = parser.parse_args(argv)
    if args.abnormal_fraction is not None and not 0.0 <= args.abnormal_fraction <= 1.0:
        parser.error("--abnormal-fraction must be between 0 and 1")
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    from .phantom import PhantomError

    try:
        write_dataset(args.out, args.n, args.seed, shape=args.shape, spacing=args.spacing,
                      abnormal_fraction=args.abnormal_fraction, totalseg=args.totalseg)
    except PhantomError as exc:
        print(f"reg2rg-phantom: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .fileio import output_error

        print(f"reg2rg-phantom: {output_error(args.out, exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
