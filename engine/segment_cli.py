"""``reg2rg-segment``: the ten Reg2RG region masks of a chest CT, made with TotalSegmentator.

Writes, under ``--out``: ``<region>.nii.gz`` for each region found (RadGenome layout, uint8 0/1 on the CT
grid: open them with ``reg2rg-viewer --masks`` or ``reg2rg-generate --masks``), ``totalsegmentator/<task>.nii.gz``
(TotalSegmentator's raw multi-label maps, its label table in the header) and ``segmentation.json`` (tasks,
version, regions found and absent, warnings). Results are cached per study content, so a second run is
instant. Needs ``pip install 'reg2rg-viewer[segment]'`` and TotalSegmentator's weights in its home folder
(``TOTALSEG_HOME_DIR``, default ``~/.totalsegmentator``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    from .segment import DEFAULT_TASKS, KNOWN_TASKS

    p = argparse.ArgumentParser(prog="reg2rg-segment",
                                description="The ten Reg2RG region masks of a chest CT, made with TotalSegmentator "
                                            "(RadGenome layout, cached per study).",
                                epilog="Weights: TotalSegmentator's home folder, TOTALSEG_HOME_DIR (default "
                                       "~/.totalsegmentator); fetch them once on a machine with internet with "
                                       "`totalseg_download_weights -t TASK`. Cache: REG2RG_CACHE_DIR (default "
                                       "~/.cache/reg2rg).")
    p.add_argument("ct", metavar="CT", help="CT volume: a NIfTI file or a DICOM series folder")
    p.add_argument("--out", required=True, metavar="MASKS", help="output folder for the region masks (created)")
    p.add_argument("--series", metavar="NUMBER_OR_UID", help="with a DICOM folder holding several series: which one")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm 'total' model (minutes faster on a "
                                                       "CPU, coarser masks; the other tasks have no fast model)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where TotalSegmentator runs (default cpu)")
    p.add_argument("--tasks", nargs="+", choices=KNOWN_TASKS, default=list(DEFAULT_TASKS), metavar="TASK",
                   help=f"TotalSegmentator tasks to run (default: {' '.join(DEFAULT_TASKS)}; also: lung_vessels)")
    p.add_argument("--no-cache", action="store_true", help="run again even when this study's result is cached")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``reg2rg-segment``."""
    args = build_parser().parse_args(argv)
    from .errors import StudyError
    from .fileio import OutputError
    from .regions import REGIONS
    from .segment import SegmentationError, segment_study, write_region_masks
    from .studyio import read_volume

    last = [0.0, ""]

    def progress(fraction: float, text: str) -> None:
        now = time.monotonic()
        if args.quiet or (text == last[1] and now - last[0] < 10.0):
            return                          # one line per step, and a heartbeat every 10 s
        last[:] = [now, text]
        print(f"[{100 * fraction:3.0f}%] {text}", file=sys.stderr)

    try:
        study = read_volume(args.ct, series=args.series)
        result = segment_study(study, args.tasks, fast=args.fast, device=args.device, progress=progress,
                               use_cache=not args.no_cache)
        masked = write_region_masks(study, result, args.out)
    except (SegmentationError, StudyError, OutputError) as err:
        print(f"reg2rg-segment: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reg2rg-segment: interrupted (finished tasks are cached)", file=sys.stderr)
        return 130
    absent = [r for r in REGIONS if r not in masked.masks]
    if not args.quiet:
        for w in masked.warnings:
            print(f"warning: {w}", file=sys.stderr)
        how = "from the cache" if result.cached_tasks == result.tasks else f"in {result.seconds:.0f} s"
        print(f"{len(masked.masks)} of {len(REGIONS)} regions -> {args.out} ({how})"
              + (f"; absent: {', '.join(absent)}" if absent else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
