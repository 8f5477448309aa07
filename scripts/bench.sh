#!/usr/bin/env bash
# The benchmarks that need no GPU, one after another, each printing its ratio against a baseline measured
# in the same run (bench/RESULTS.md records results and commands). By default at quick sizes (about
# 5 minutes of CPU time; 2-3 times that in wall time on a loaded machine); `--full` runs each at the
# size documented in its docstring (much longer).
# bench/gpu.py needs a CUDA device: `make bench-gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
full=0
[ "${1:-}" = "--full" ] && full=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# held-out phantoms for the explanation benchmark (the demo model's test and validation seeds)
phantoms() {
  "$VENV/bin/reg2rg-phantom" --out "$work/test" --n "$1" --seed 9000 >/dev/null
  "$VENV/bin/reg2rg-phantom" --out "$work/val" --n "$2" --seed 5000 >/dev/null
}

run() {
  echo "== $PY $*"
  local t0=$SECONDS
  "$PY" "$@"
  echo "   ($((SECONDS - t0)) s)"
}

if [ $full = 1 ]; then
  run bench/preprocess.py
  run bench/embed.py
  run bench/encode.py
  run bench/generate.py --tokens 100 --repeats 3
  run bench/train.py
  run bench/viewer.py --shape 512x512x300 --steps 60
  phantoms 40 16
  run bench/explain.py --test "$work/test" --val "$work/val" --out "$work/explain.json"
  run bench/serve.py --drafts 3 --tokens 64
  run bench/segment.py
else
  run bench/preprocess.py --shape 256 256 100
  run bench/embed.py --repeats 1
  run bench/encode.py --regions 2
  run bench/generate.py --tokens 50 --repeats 1
  run bench/train.py --studies 2 --steps 2 --batch 1
  run bench/viewer.py --shape 256x256x100 --steps 30
  phantoms 3 3
  run bench/explain.py --test "$work/test" --val "$work/val" --limit 3 --deletion 2 --out "$work/explain.json"
  run bench/serve.py --clients 1 8 --drafts 1 --tokens 32
  run bench/segment.py --shape 160 160 80 --repeats 1
fi
