#!/usr/bin/env bash
# The main job: the viewer on the embedded demo study (phantom CT + its 10 region masks) with the
# embedded demo model, drafting a report. With a display it opens the window; without one (a remote
# shell, CI) it runs the same app under a virtual display, saves a screenshot of the window and the
# drafted report under artifacts/demo/, and prints the report.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BIN="$VENV/bin"
OUT=artifacts/demo
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; then
  exec "$BIN/reg2rg-viewer" --demo --generate "$@"
fi
echo "demo: no display found: running the viewer under Xvfb, then the headless report generator"
xvfb-run -a -s "-screen 0 1600x1000x24" "$BIN/reg2rg-viewer" --demo --generate --screenshot "$OUT/viewer.png" "$@"
echo "demo: screenshot of the viewer: $OUT/viewer.png"
"$BIN/reg2rg-generate" --demo --out "$OUT" --quiet
echo "demo: report written to $OUT/report.txt"
echo "----------------------------------------------------------------------"
cat "$OUT/report.txt"
