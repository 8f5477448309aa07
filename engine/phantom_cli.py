"""`reg2rg-phantom`: write synthetic chest CT studies in the RadGenome-ChestCT layout.

Layout under ``--out`` (study i has seed S + i, so a study is reproducible on its own):

    <out>/phantom_<seed>/phantom_<seed>_a/phantom_<seed>_a_1.nii.gz      the CT (int16 HU, LPS voxel axes)
    <out>/masks/seg_phantom_<seed>_a_1/<region>.nii.gz                 the 10 region masks (uint8 0/1)
    <out>/reports.csv        Volumename, Anatomy, Sentence (empty Anatomy = whole-study report)
    <out>/manifest.json      the planted findings of every volume, its seed, shape and spacing

The same arguments always give the same bytes (nibabel writes gzip with a zero timestamp).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

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


def write_dataset(out: str | Path, n: int, seed: int, shape=None, spacing=None, log=print) -> dict:
    """Write ``n`` phantom studies (seeds ``seed`` .. ``seed + n - 1``) under ``out``; returns the manifest."""
    from .phantom import make_study
    from .studyio import write_study

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, studies = [], []
    for i in range(n):
        study = make_study(seed + i, shape=shape, spacing=spacing)
        volume_path, mask_dir = study_paths(out, study.name)
        write_study(study, volume_path, mask_dir)
        file_name = f"{study.name}.nii.gz"
        rows.append((file_name, "", study.metadata["report"]))
        for region in REGIONS:
            rows.append((file_name, region, study.metadata["region_reports"][region]))
        studies.append({
            "volume": file_name, "seed": seed + i, "path": volume_path.relative_to(out).as_posix(),
            "masks": mask_dir.relative_to(out).as_posix(), "shape": list(study.shape),
            "spacing": [round(s, 4) for s in study.spacing], "orientation": study.orientation,
            "findings": _json_ready(study.metadata["findings"]),
        })
        log(f"[{i + 1}/{n}] {file_name}: {len(study.metadata['findings'])} finding(s)")
    with open(out / "reports.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Volumename", "Anatomy", "Sentence"])
        writer.writerows(rows)
    manifest = {"generator": "reg2rg.engine.phantom", "seed": seed, "n": n, "studies": studies}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``reg2rg-phantom``."""
    parser = argparse.ArgumentParser(prog="reg2rg-phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=1, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first study (study i uses seed + i)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="voxel grid (default: per seed)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    from .phantom import PhantomError

    try:
        write_dataset(args.out, args.n, args.seed, shape=args.shape, spacing=args.spacing)
    except PhantomError as exc:
        print(f"reg2rg-phantom: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"reg2rg-phantom: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
