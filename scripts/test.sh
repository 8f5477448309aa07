#!/usr/bin/env bash
# Run the whole test suite in the project's environment. GUI tests start their own Xvfb display
# (tests/app/conftest.py) when no DISPLAY is set. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
mkdir -p artifacts/screenshots
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
