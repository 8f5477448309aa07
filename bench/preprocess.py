"""Pre-processing benchmark: the published MONAI pipeline vs ours, end to end from .nii.gz files.

Writes a 512x512x300 int16 chest-like volume and 10 region masks as .nii.gz in a temporary folder, then
runs each method in a fresh child process (so peak memory is that method's alone), one thread each:

    .venv/bin/python bench/preprocess.py            # full size (minutes)
    .venv/bin/python bench/preprocess.py --shape 128 128 60   # quick check

Prints wall time, CPU time (user + system of the child) and peak RSS per method, and the ratios
MONAI / ours. On a shared machine CPU time is the fairer speed measure: wall time also counts the
time other processes hold the cores. Each method's imports are done before its clock starts. The
MONAI reference is the one the equivalence test uses (tests/engine/reference_preprocess.py), so both
compute the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # (the parent only needs it for write_case in the child)

ROOT = Path(__file__).resolve().parents[1]
REGIONS_ORDER = ("abdomen", "bone", "breast", "esophagus", "heart", "lung", "mediastinum", "pleura", "thyroid",
                 "trachea and bronchie")


def _ellipsoid(shape, centre, radii):
    axes = [((np.arange(s, dtype=np.float32) - c) / r) ** 2 for s, c, r in zip(shape, centre, radii)]
    return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) <= 1.0


def write_case(folder: Path, shape) -> tuple[Path, Path]:
    """A chest-like int16 volume (air outside the body) and 10 masks, written as .nii.gz."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    X, Y, Z = shape
    vol = np.full(shape, -1024, dtype=np.int16)
    body = _ellipsoid(shape, (X / 2, Y / 2, Z / 2), (X * 0.45, Y * 0.35, Z * 0.6))
    vol[body] = 40
    lungs = (_ellipsoid(shape, (X * 0.32, Y * 0.5, Z * 0.55), (X * 0.13, Y * 0.22, Z * 0.4))
             | _ellipsoid(shape, (X * 0.68, Y * 0.5, Z * 0.55), (X * 0.13, Y * 0.22, Z * 0.4))) & body
    vol[lungs] = -850
    vol += (rng.integers(-40, 40, size=shape, dtype=np.int16) * body).astype(np.int16)
    masks = {
        "lung": lungs,
        "heart": _ellipsoid(shape, (X * 0.52, Y * 0.45, Z * 0.45), (X * 0.1, Y * 0.1, Z * 0.15)),
        "bone": _ellipsoid(shape, (X / 2, Y * 0.78, Z / 2), (X * 0.05, Y * 0.05, Z * 0.55)) & body,
        "trachea and bronchie": _ellipsoid(shape, (X / 2, Y * 0.45, Z * 0.8), (X * 0.03, Y * 0.03, Z * 0.2)),
        "esophagus": _ellipsoid(shape, (X / 2, Y * 0.62, Z * 0.6), (X * 0.02, Y * 0.02, Z * 0.3)),
        "thyroid": _ellipsoid(shape, (X / 2, Y * 0.4, Z * 0.93), (X * 0.06, Y * 0.03, Z * 0.04)),
        "abdomen": body & (np.arange(Z) < Z * 0.2)[None, None, :],
        "mediastinum": _ellipsoid(shape, (X / 2, Y * 0.5, Z * 0.55), (X * 0.08, Y * 0.15, Z * 0.3)),
        "pleura": lungs & ~_ellipsoid(shape, (X / 2, Y / 2, Z * 0.55), (X * 0.33, Y * 0.2, Z * 0.38)),
        "breast": body & (np.arange(Y) < Y * 0.3)[None, :, None],
    }
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    vpath = folder / "CT_bench.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(vpath))
    mdir = folder / "seg_CT_bench"
    mdir.mkdir(exist_ok=True)
    for region, m in masks.items():
        nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(mdir / f"{region}.nii.gz"))
    return vpath, mdir


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _run_method(method: str, vpath: Path, mdir: Path, size) -> dict:
    """Runs inside the child: one method end to end from files, one thread."""
    import torch

    torch.set_num_threads(1)
    if method == "monai":
        sys.path.insert(0, str(ROOT / "tests" / "engine"))
        from reference_preprocess import reference_preprocess

        base, c0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _cpu(), time.perf_counter()
        images, _ = reference_preprocess(vpath, {r: mdir / f"{r}.nii.gz" for r in REGIONS_ORDER}, size)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        n_regions = len(images) - 1
    else:
        import nibabel  # noqa: F401  (imported before timing, as the reference's imports are)
        from reg2rg.engine.preprocess import preprocess
        from reg2rg.engine.studyio import read_study

        base, c0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _cpu(), time.perf_counter()
        out = preprocess(read_study(vpath, mdir), input_size=size)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        n_regions = len(out.regions)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": elapsed, "cpu_seconds": cpu, "peak_rss_mb": peak / 1024, "work_rss_mb": (peak - base) / 1024,
            "regions": n_regions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 64))
    parser.add_argument("--child", choices=["monai", "ours", "write"], help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        write_case(Path(args.volume), tuple(args.shape))
        return
    if args.child:
        print(json.dumps(_run_method(args.child, Path(args.volume), Path(args.masks), tuple(args.size))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        # Written by a child process: Linux keeps ru_maxrss across fork+exec, so the parent must stay small.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", "write", "--volume", tmp, "--shape",
                        *map(str, args.shape)], check=True)
        vpath, mdir = Path(tmp) / "CT_bench.nii.gz", Path(tmp) / "seg_CT_bench"
        print(f"case: {tuple(args.shape)} int16 + 10 masks written in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.stat().st_size for p in Path(tmp).rglob('*.nii.gz')) / 1e6:.0f} MB of .nii.gz)")
        results = {}
        for method in ("monai", "ours"):
            cmd = [sys.executable, __file__, "--child", method, "--volume", str(vpath), "--masks", str(mdir),
                   "--size", *map(str, args.size)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f"{method:>6}: {r['seconds']:7.2f} s wall  {r['cpu_seconds']:7.2f} s CPU   peak RSS {r['peak_rss_mb']:7.0f} MB   "
                  f"(work {r['work_rss_mb']:6.0f} MB above the loaded interpreter)   {r['regions']} regions")
        m, o = results["monai"], results["ours"]
        print(f"speed-up MONAI/ours: {m['seconds'] / o['seconds']:.1f}x wall, "
              f"{m['cpu_seconds'] / o['cpu_seconds']:.1f}x CPU time   "
              f"peak RSS MONAI/ours: {m['peak_rss_mb'] / o['peak_rss_mb']:.1f}x   "
              f"working memory MONAI/ours: {m['work_rss_mb'] / max(o['work_rss_mb'], 1):.1f}x")


if __name__ == "__main__":
    main()
