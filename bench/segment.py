"""Opening a study whose segmentation is cached vs opening it with its mask folder (issue 14).

"Results cached per study, so a second open is instant": the second `reg2rg-segment` / Segment regions… /
`reg2rg-generate --segment` of a scan hashes its voxels, finds every task's label map in the cache, maps them
to the ten regions and checks them. The baseline, measured in the same run, is opening the same study with a
RadGenome mask folder (`read_study(ct, masks)`: reading ten masks and the same plausibility check), which any
open costs. The phantom's TotalSegmentator label maps stand in for a finished run (no TotalSegmentator needed);
the first run's own time is TotalSegmentator's and is only estimated (printed as such, not measured).

    .venv/bin/python bench/segment.py [--shape 320 320 160] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[320, 320, 160])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="reg2rg_bench_segment_"))
    os.environ["REG2RG_CACHE_DIR"] = str(tmp / "cache")

    from reg2rg.engine.phantom import make_study
    from reg2rg.engine.phantom_cli import write_totalseg
    from reg2rg.engine.segment import (DEFAULT_TASKS, cache_root, describe_estimate, estimate_seconds,
                                       segment_and_read, study_hash)
    from reg2rg.engine.studyio import read_study, read_volume, write_study

    try:
        study = make_study(3, shape=tuple(args.shape), totalseg=True)
        ct = tmp / "ct.nii.gz"
        write_study(study, ct, tmp / "masks")
        ct_study = read_volume(ct)
        folder = cache_root() / "segment" / study_hash(ct_study) / "full"
        write_totalseg(study, folder)                     # as a finished TotalSegmentator run leaves it
        (folder / "lung_vessels.nii.gz").unlink()         # not a default task

        def best(fn):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            return min(times), out

        t0 = time.perf_counter()
        segment_and_read(read_volume(ct))                 # once: label maps -> the ten region masks, cached
        first_s = time.perf_counter() - t0
        base_s, base = best(lambda: read_study(ct, tmp / "masks"))
        cached_s, cached = best(lambda: segment_and_read(read_volume(ct)))
        read_s, _ = best(lambda: read_volume(ct))
        hash_s, _ = best(lambda: study_hash(ct_study))
        assert list(cached.masks) == list(base.masks) and not cached.mask_problems
        est = sum(estimate_seconds(t, ct_study.voxels.size) for t in DEFAULT_TASKS)
        print(f"study {tuple(args.shape)} ({ct_study.voxels.size / 1e6:.1f} M voxels), best of {args.repeats}")
        print(f"baseline  open with the RadGenome mask folder (read_study): {base_s:6.2f} s")
        print(f"cached    read_volume + segment_and_read (all tasks cached): {cached_s:6.2f} s "
              f"(of which reading the CT {read_s:.2f} s, hashing it {hash_s:.2f} s)")
        print(f"ratio cached / baseline: {cached_s / base_s:.2f}x")
        print(f"once after TotalSegmentator: mapping its label maps to the ten regions and caching them: {first_s:.2f} s")
        print(f"first run (TotalSegmentator, {len(DEFAULT_TASKS)} tasks on a CPU): {describe_estimate(est)} "
              "(estimate, not measured)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
