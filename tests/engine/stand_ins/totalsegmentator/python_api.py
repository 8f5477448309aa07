"""Stand-in for ``totalsegmentator.python_api`` (see ../README.md): records the call, writes prepared labels."""

import json
import os
import shutil
import sys
import time
from pathlib import Path


def totalsegmentator(input, output=None, ml=False, fast=False, task="total", device="gpu", quiet=False, **kwargs):
    call = {"input": str(input), "output": str(output), "ml": ml, "fast": fast, "task": task, "device": device,
            "quiet": quiet, **kwargs}
    config = Path(os.environ.get("TOTALSEG_HOME_DIR", "")) / "config.json"
    call["send_usage_stats"] = json.loads(config.read_text())["send_usage_stats"] if config.is_file() else None
    with open(os.environ["FAKE_TOTALSEG_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(call) + "\n")
    time.sleep(float(os.environ.get("FAKE_TOTALSEG_SLEEP", "0")))
    if os.environ.get("FAKE_TOTALSEG_FAIL") == task:
        print(f"Predicting {task}...\nRuntimeError: CUDA out of memory (stand-in failure)", file=sys.stderr)
        sys.exit(1)
    shutil.copyfile(Path(os.environ["FAKE_TOTALSEG_LABELS"]) / f"{task}.nii.gz", output)
