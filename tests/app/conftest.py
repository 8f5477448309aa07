"""GUI test set-up: a private Xvfb display for the session when none is given, real Qt + VTK rendering."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def _start_xvfb() -> subprocess.Popen | None:
    """Start Xvfb on a free display number and point DISPLAY at it; None if Xvfb is not installed."""
    if shutil.which("Xvfb") is None:
        return None
    for number in range(90, 140):
        if Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists():
            continue
        # A watchdog shell owns the server and stops it once this Python process has exited: killing
        # it earlier (at session finish) would break Qt's X connection while Qt still tears down.
        script = (
            f"Xvfb :{number} -screen 0 1600x1000x24 -nolisten tcp >/dev/null 2>&1 & x=$!; "
            f"while kill -0 {os.getpid()} 2>/dev/null && kill -0 $x 2>/dev/null; do sleep 1; done; kill $x 2>/dev/null"
        )
        proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):  # the socket appears when the server is ready
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                os.environ["DISPLAY"] = f":{number}"
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.kill()
    return None


# Module level, before pytest-qt creates the QApplication: Qt reads DISPLAY and the platform on start.
_XVFB = None
if not os.environ.get("DISPLAY"):
    _XVFB = _start_xvfb()
os.environ.setdefault("QT_QPA_PLATFORM", "xcb" if os.environ.get("DISPLAY") else "offscreen")
os.environ.setdefault("REG2RG_NO_EXCEPTHOOK_DIALOG", "0")


@pytest.fixture
def screenshot_dir() -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR


@pytest.fixture(autouse=True)
def _user_data_dir(tmp_path, monkeypatch):
    """Keep autosaved drafts of tests out of the real per-user data folder."""
    monkeypatch.setenv("REG2RG_DATA_DIR", str(tmp_path / "userdata"))


def make_chest_study(shape=(96, 80, 48), spacing=(3.0, 3.0, 5.0), flip_x=True):
    """A small synthetic chest CT in HU with masks for a few regions (body, lungs, heart, spine).

    ``flip_x`` stores the first axis right-to-left (LPS-like, as DICOM-derived NIfTI usually is) so the
    display reorientation is exercised.
    """
    import numpy as np

    from reg2rg.engine.study import Study

    X, Y, Z = shape
    x, y, z = np.meshgrid(np.linspace(-1, 1, X), np.linspace(-1, 1, Y), np.linspace(-1, 1, Z), indexing="ij")
    vox = np.full(shape, -1000, dtype=np.int16)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    vox[body] = 30
    # Lungs sit left and right of the midline; x grows towards the patient's LEFT when flipped.
    lung_r = ((x + 0.42) / 0.32) ** 2 + (y / 0.45) ** 2 + (z / 0.9) ** 2 < 1
    lung_l = ((x - 0.45) / 0.30) ** 2 + (y / 0.45) ** 2 + (z / 0.85) ** 2 < 1
    vox[lung_r | lung_l] = -850
    heart = ((x - 0.08) / 0.22) ** 2 + ((y - 0.15) / 0.22) ** 2 + ((z + 0.2) / 0.35) ** 2 < 1
    vox[heart] = 45
    spine = (x / 0.1) ** 2 + ((y + 0.55) / 0.1) ** 2 < 1   # posterior: y grows anteriorly
    vox[spine] = 700
    affine = np.diag([*spacing, 1.0])
    if flip_x:
        affine[0, 0] = -spacing[0]
        affine[0, 3] = spacing[0] * (X - 1)
    masks = {"lung": lung_r | lung_l, "heart": heart, "bone": spine}
    return Study(voxels=vox, affine=affine, masks=masks, name="synthetic", source="synthetic://chest")


@pytest.fixture
def main_window(qtbot):
    """Factory of shown, exposed `MainWindow`s of a given size; each is closed after the test."""
    from reg2rg.app.main_window import MainWindow

    opened = []

    def make(width: int = 1300, height: int = 850):
        win = MainWindow()
        win.resize(width, height)
        qtbot.addWidget(win)
        win.show()
        qtbot.waitExposed(win)
        opened.append(win)
        return win

    yield make
    for win in opened:
        win.close()
    import gc

    gc.collect()      # the closed windows' Qt/VTK objects go on this (the GUI) thread, not in a worker


@pytest.fixture(autouse=True)
def _garbage_on_the_gui_thread(qapp):
    """As in the app: no automatic collection in worker threads; collect on this thread after each test."""
    import gc

    from reg2rg.app.gui_gc import collect_on_gui_thread

    collect_on_gui_thread(qapp)
    yield
    gc.collect()


def peak_mark_pixels(frame: np.ndarray) -> np.ndarray:
    """(y, x) of the pixels painted in the peak marker's magenta (no colour map, region colour, crosshair or
    grey CT value has red and blue both high with green low)."""
    f = frame.astype(int)
    return np.argwhere((f[..., 0] > 200) & (f[..., 2] > 200) & (f[..., 1] < 110))


def assert_peak_marked_at(view, ijk) -> None:
    """The view paints the peak marker (a ring with ticks) around the widget position of display voxel ijk,
    and nowhere else."""
    from PySide6.QtWidgets import QApplication

    from reg2rg.app.main_window import frame_pixels

    QApplication.processEvents()
    mark = peak_mark_pixels(frame_pixels(view))
    assert len(mark) > 20, "no peak marker painted"
    at = view.world_to_widget(ijk)
    ratio = view.devicePixelRatioF()
    centre = np.array([at.y(), at.x()]) * ratio
    # the marker is symmetric about the peak: its pixels' mean is the peak's screen position
    assert np.abs(mark.mean(axis=0) - centre).max() < 3, (mark.mean(axis=0), centre)
    # and it is a ring with an open centre (the anatomy at the peak stays visible)
    dist = np.hypot(*(mark - centre).T)
    assert dist.min() > 2 and dist.max() < 0.25 * min(view.width(), view.height()) * ratio
