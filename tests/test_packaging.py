"""The installed distribution: console scripts answer --help, and the layering of architecture.md holds."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = ["reg2rg-viewer", "reg2rg-generate", "reg2rg-serve", "reg2rg-phantom", "reg2rg-segment", "reg2rg-train",
           "reg2rg-eval"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_prints_help(script):
    exe = BIN / script
    assert exe.exists(), f"{script} is not installed in {BIN}"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout.lower()
    assert "Traceback" not in proc.stderr


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # relative imports stay inside their own package unless they climb out of it
            if node.level >= 2 and node.module:
                names.add("reg2rg." + node.module)
    return names


FORBIDDEN = {
    "engine": ("PySide6", "vtk", "vtkmodules", "pytestqt", "reg2rg.app", "reg2rg.train"),
    "train": ("PySide6", "vtk", "vtkmodules", "pytestqt", "reg2rg.app"),
    "app": ("reg2rg.train",),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "layering broken (architecture.md):\n" + "\n".join(offenders)


def test_no_unsafe_torch_load():
    offenders = []
    for package in ("engine", "train", "app"):
        for path in (ROOT / package).rglob("*.py"):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)
