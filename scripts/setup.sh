#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and the system packages the
# viewer and tests need. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# System packages: a virtual display and the xcb/GL libraries Qt and VTK need, WordNet for METEOR.
SYS_PKGS="xvfb xauth libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
  libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb-xfixes0
  libegl1 libgl1 libglu1-mesa libgl1-mesa-dri libfontconfig1 libdbus-1-3 libxrender1 libxi6
  libxtst6 libxrandr2 fonts-dejavu-core wordnet-base wordnet-sense-index"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $SYS_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends $missing >/dev/null || echo "setup: warning: some system packages could not be installed:$missing"
  else
    echo "setup: warning: missing system packages (install them as root):$missing"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.reg2rg-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  $PIP install -q --upgrade pip setuptools wheel
  # The CPU build of torch on these machines; an unpinned torch pulls several GB of CUDA wheels.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[app,train,test,report]"
  touch "$stamp"
fi
echo "setup: environment ready in $VENV"
