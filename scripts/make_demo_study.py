#!/usr/bin/env python
"""Write the embedded demo study to resources/demo_study/ (re-run after changing the phantom).

    .venv/bin/python scripts/make_demo_study.py [--out resources/demo_study]

One phantom study (seed `DEMO_SEED`, default grid) with planted findings (`DEMO_FINDINGS`: a 14 mm right upper
lobe nodule, a 28 mm left pleural effusion, a moderately enlarged heart; the effusion and the heart are visible at
the demo model's input, the nodule spans fewer than 3 voxels of the lung crop's 8.5 mm slices): the volume as NIfTI, masks/<region>.nii.gz
for the ten regions, report.txt (the whole report, then one paragraph per region) and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from reg2rg.engine.phantom import DEMO_FINDINGS, DEMO_SEED, make_study
from reg2rg.engine.phantom_cli import _json_ready
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.studyio import write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "resources" / "demo_study"))
    out = Path(parser.parse_args().out)
    study = make_study(DEMO_SEED, list(DEMO_FINDINGS))
    for old in list(out.glob("*.nii.gz")) + [out / "masks"]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    write_study(study, out / f"{study.name}.nii.gz", out / "masks")
    meta = study.metadata
    lines = [meta["report"], ""] + [f"{region}: {meta['region_reports'][region]}" for region in REGIONS]
    (out / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = {"volume": f"{study.name}.nii.gz", "seed": DEMO_SEED, "shape": list(study.shape),
                "spacing": [round(s, 4) for s in study.spacing], "orientation": study.orientation,
                "findings": _json_ready(meta["findings"]), "region_reports": meta["region_reports"],
                "report": meta["report"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB): {study.name} {study.shape} {study.spacing}")


if __name__ == "__main__":
    main()
