"""Run each variant of a benchmark in its own Python process, so its peak memory is its own.

A benchmark script calls itself with ``--mode NAME`` (plus its own arguments); the child prints one
JSON object, which `run_variant_process` returns. Import it from a script in bench/ (the script's
folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant_process(script: str, mode: str, *args: object) -> dict:
    """Run ``python SCRIPT --mode MODE ARGS…`` and return the JSON object it printed."""
    cmd = [sys.executable, script, "--mode", mode, *(str(a) for a in args)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
