"""The viewer under a virtual display with real VTK rendering: what the radiologist sees and does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QApplication, QMessageBox

from reg2rg.app.display import AXIS_AXIAL, AXIS_CORONAL
from reg2rg.app.main_window import frame_pixels
from reg2rg.app.region_panel import COL_NAME
from reg2rg.engine.regions import REGIONS

from conftest import make_chest_study

pytestmark = pytest.mark.gui


@pytest.fixture
def window(main_window):
    return main_window(1300, 850)


def open_study(qtbot, win, study=None):
    with qtbot.waitSignal(win.studyLoaded, timeout=30000):
        win.open_study(study or make_chest_study())
    QApplication.processEvents()
    return win.document.volume


def wheel(view, steps: int, modifiers=Qt.NoModifier):
    pos = QPointF(view.width() / 2, view.height() / 2)
    ev = QWheelEvent(pos, view.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120 * steps), Qt.NoButton,
                     modifiers, Qt.NoScrollPhase, False)
    QApplication.sendEvent(view, ev)


def mouse(view, kind, pos: QPoint, button=Qt.LeftButton, buttons=None, modifiers=Qt.NoModifier):
    p = QPointF(pos)
    ev = QMouseEvent(kind, p, view.mapToGlobal(p), button, buttons if buttons is not None else button, modifiers)
    QApplication.sendEvent(view, ev)


def red_pixels(frame: np.ndarray) -> np.ndarray:
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    return (r > g + 60) & (r > b + 60)


def test_views_show_the_ct_in_radiological_convention(qtbot, window, screenshot_dir):
    vol = open_study(qtbot, window)
    axial = window.views[AXIS_AXIAL]
    frame = frame_pixels(axial)
    h, w, _ = frame.shape
    grey = frame.mean(axis=2)
    # A CT, not a blank or uniform frame: air (black) around a bright body, lungs dark inside it.
    assert grey.std() > 30
    assert (grey < 15).mean() > 0.2 and (grey > 100).mean() > 0.1
    # The heart is on the patient's left; radiological convention puts it on the screen's right.
    heart = red_pixels(frame)
    assert heart.sum() > 100
    assert np.argwhere(heart)[:, 1].mean() > w / 2
    centre = vol.region_centre("heart")
    left_pt = window.views[AXIS_AXIAL].world_to_widget((vol.shape[0] - 5, centre[1], centre[2]))  # patient right
    right_pt = window.views[AXIS_AXIAL].world_to_widget((4, centre[1], centre[2]))                # patient left
    assert left_pt.x() < w / 2 < right_pt.x()
    # The lung window shows the lungs brighter than the mediastinal window does.
    window.preset_actions["Lung"].trigger()
    lung_frame = frame_pixels(axial).mean(axis=2)
    assert lung_frame.mean() > grey.mean() + 5
    assert window.document.window == 1500 and window.document.level == -600
    window.save_screenshot(screenshot_dir / "viewer_synthetic.png")


def test_toggling_a_region_changes_pixels_only_where_its_mask_is(qtbot, window):
    vol = open_study(qtbot, window)
    window.region_panel._on_click(REGIONS.index("heart"), COL_NAME)          # centre views on the heart
    assert "heart" in vol.regions_at(window.document.cursor)
    axial = window.views[AXIS_AXIAL]
    before = frame_pixels(axial).astype(int)
    window.region_panel.checkboxes["heart"].setChecked(False)
    assert not window.document.region_styles["heart"].visible
    after = frame_pixels(axial).astype(int)
    changed = np.abs(after - before).sum(axis=2) > 30
    assert changed.sum() > 100
    # Every changed pixel lies on the heart's in-plane mask (as projected to the screen).
    k = window.document.cursor[2]
    heart2d = np.argwhere(vol.labels[:, :, k] & (1 << REGIONS.index("heart")))
    pts = np.array([[p.y(), p.x()] for p in (axial.world_to_widget((i, j, k)) for i, j in heart2d)])
    ys, xs = np.argwhere(changed).T
    pad = 12  # one voxel on screen is a few pixels; the outline is drawn on the boundary voxels
    assert ys.min() >= pts[:, 0].min() - pad and ys.max() <= pts[:, 0].max() + pad
    assert xs.min() >= pts[:, 1].min() - pad and xs.max() <= pts[:, 1].max() + pad
    assert not red_pixels(after.astype(np.uint8)).any()


def test_scrolling_keys_and_linked_crosshair(qtbot, window):
    vol = open_study(qtbot, window)
    axial, coronal = window.views[AXIS_AXIAL], window.views[AXIS_CORONAL]
    k0 = window.document.cursor[2]
    before = frame_pixels(axial)
    wheel(axial, +3)
    assert window.document.cursor[2] == k0 + 1                 # one slice per wheel event
    for _ in range(6):
        wheel(axial, +1)
    assert window.document.cursor[2] == k0 + 7
    assert np.abs(frame_pixels(axial).astype(int) - before).sum() > 0   # a different slice is shown
    assert "Slice" in axial._corner.GetText(0) and str(k0 + 8) in axial._corner.GetText(0)
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key_Down)
    assert window.document.cursor[2] == k0 + 6
    for _ in range(100):
        wheel(axial, -1)
    assert window.document.cursor[2] == 0                      # clamped at the first slice
    # A click in the coronal view moves the crosshair in-plane; the axial slice follows.
    target = (20, window.document.cursor[1], 30)
    pos = coronal.world_to_widget(target)
    mouse(coronal, QEvent.MouseButtonPress, pos)
    mouse(coronal, QEvent.MouseButtonRelease, pos, buttons=Qt.NoButton)
    assert window.document.cursor == target
    assert window.status_hu.text() == f"{vol.hu_at(target):.0f} HU"


def test_scrolling_renders_only_the_scrolled_view_until_it_pauses(qtbot, window):
    open_study(qtbot, window)
    axial, coronal = window.views[AXIS_AXIAL], window.views[AXIS_CORONAL]
    QApplication.processEvents()
    qtbot.wait(300)                                            # let the opening renders settle
    a0, c0 = axial.render_count, coronal.render_count
    before = frame_pixels(coronal)
    c0 += 1
    for _ in range(5):
        wheel(axial, +1)
        QApplication.processEvents()
    assert axial.render_count - a0 == 5                        # one frame per step in the scrolled view
    assert coronal.render_count == c0                          # the linked view waits…
    qtbot.waitUntil(lambda: coronal.render_count == c0 + 1, timeout=2000)   # …and follows once, after the pause
    after = frame_pixels(coronal)
    moved = np.abs(after.astype(int) - before.astype(int)).sum(axis=2) > 0
    rows = np.flatnonzero(moved.any(axis=1))
    assert 0 < len(rows) < after.shape[0] / 4                  # only the horizontal crosshair line moved


def test_window_level_drag_zoom_pan_reset_and_maximise(qtbot, window):
    open_study(qtbot, window)
    axial = window.views[AXIS_AXIAL]
    w0, l0 = window.document.window, window.document.level
    start = QPoint(200, 200)
    mouse(axial, QEvent.MouseButtonPress, start)
    mouse(axial, QEvent.MouseMove, QPoint(300, 260), button=Qt.NoButton, buttons=Qt.LeftButton)
    mouse(axial, QEvent.MouseButtonRelease, QPoint(300, 260), buttons=Qt.NoButton)
    assert window.document.window > w0 and window.document.level > l0
    assert window.document.cursor == tuple(n // 2 for n in window.document.volume.shape)  # a drag is no click
    cam = axial.renderer.GetActiveCamera()
    scale0 = cam.GetParallelScale()
    wheel(axial, 2, Qt.ControlModifier)
    assert cam.GetParallelScale() < scale0 * 0.9
    focal0 = cam.GetFocalPoint()
    mouse(axial, QEvent.MouseButtonPress, start, button=Qt.MiddleButton)
    mouse(axial, QEvent.MouseMove, QPoint(260, 200), button=Qt.NoButton, buttons=Qt.MiddleButton)
    mouse(axial, QEvent.MouseButtonRelease, QPoint(260, 200), button=Qt.MiddleButton, buttons=Qt.NoButton)
    assert cam.GetFocalPoint() != focal0
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key_R)
    assert cam.GetParallelScale() == pytest.approx(scale0, rel=1e-3)
    mouse(axial, QEvent.MouseButtonDblClick, start)
    assert axial.isVisible() and not window.views[AXIS_CORONAL].isVisible() and not window.view3d.isVisible()
    mouse(axial, QEvent.MouseButtonDblClick, start)
    assert window.views[AXIS_CORONAL].isVisible() and window.view3d.isVisible()


def test_bad_file_shows_a_message_and_the_app_stays_usable(qtbot, window, tmp_path, screenshot_dir):
    bad = tmp_path / "broken_ct.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    with qtbot.waitSignal(window.loadFailed, timeout=30000) as blocker:
        from reg2rg.app.loader import LoadRequest

        window.open_request(LoadRequest(volume=str(bad)))
    assert "broken_ct.nii.gz" in blocker.args[0]
    box = window.last_message_box
    assert isinstance(box, QMessageBox) and box.isVisible()
    assert "broken_ct.nii.gz" in box.text() and "Traceback" not in box.text()
    window.save_screenshot(screenshot_dir / "viewer_bad_file.png")
    box.done(QMessageBox.Ok)                                   # dismiss it, as the user would
    assert window.document.study is None
    vol = open_study(qtbot, window)                           # the app still opens studies
    assert vol is not None and window.document.study.name == "synthetic"


def test_3d_view_shows_region_surfaces(qtbot, window):
    open_study(qtbot, window)
    assert set(window.view3d._actors) == {"lung", "heart", "bone"}
    frame = frame_pixels(window.view3d)
    assert red_pixels(frame).sum() > 50                        # the heart surface is drawn
    window.region_panel.checkboxes["heart"].setChecked(False)
    assert red_pixels(frame_pixels(window.view3d)).sum() < red_pixels(frame).sum() / 4
    window.act_volume.trigger()
    assert window.act_volume.isChecked()
    assert window.view3d._volume_actor is not None
    assert frame_pixels(window.view3d).std() > 5


def test_cli_screenshot_writes_a_picture(tmp_path, screenshot_dir):
    from reg2rg.engine.studyio import write_study

    study = make_chest_study()
    write_study(study, tmp_path / "chest.nii.gz", tmp_path / "masks")
    out = screenshot_dir / "cli_screenshot.png"
    if out.exists():
        out.unlink()
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "reg2rg.app.main", str(tmp_path / "chest.nii.gz"), "--masks", str(tmp_path / "masks"),
         "--screenshot", str(out), "--size", "1200x800"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = QImage(str(out))
    assert not img.isNull() and img.width() >= 1000
    arr = np.frombuffer(img.convertToFormat(QImage.Format_RGB888).constBits(), dtype=np.uint8)
    assert arr.std() > 20                                      # not blank


def test_cli_bad_volume_exits_with_a_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "reg2rg.app.main", str(tmp_path / "missing.nii.gz"), "--screenshot",
         str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "missing.nii.gz" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_generate_with_a_missing_model_exits_with_a_message(tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "reg2rg.app.main", "--demo", "--generate", "--model", str(tmp_path / "no_model"),
         "--screenshot", str(out), "--size", "1200x800"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "no_model" in proc.stderr and "Could not load the model" in proc.stderr and "Traceback" not in proc.stderr
    assert out.is_file()                       # the window (with its message) was still pictured


def test_cli_published_checkpoint_needs_its_llama_folder_and_names_missing_files(tmp_path):
    """--published without --llm is refused; with both, a missing checkpoint is named in the message."""
    cmd = [sys.executable, "-m", "reg2rg.app.main", "--demo", "--size", "1200x800"]
    alone = subprocess.run(cmd + ["--published", str(tmp_path / "Reg2RG.pth")], capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 2 and "--llm" in alone.stderr and "Traceback" not in alone.stderr
    loose = subprocess.run(cmd + ["--non-strict"], capture_output=True, text=True, timeout=120)
    assert loose.returncode == 2 and "--non-strict applies to --published only" in loose.stderr
    out = tmp_path / "x.png"
    both = subprocess.run(cmd + ["--generate", "--published", str(tmp_path / "Reg2RG.pth"),
                                 "--llm", str(tmp_path / "llama"), "--screenshot", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 1
    assert "Reg2RG.pth" in both.stderr and "Traceback" not in both.stderr
    assert out.is_file()


def test_dicom_folder_with_two_series_lets_the_user_choose(qtbot, window, tmp_path):
    """A folder with several series asks which one to open (largest CT first); the choice is what opens."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QInputDialog

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from dicom_fixtures import write_series

    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    big = rng.integers(-1000, 400, size=(24, 24, 10)).astype(np.float32)
    small = rng.integers(-1000, 400, size=(24, 24, 4)).astype(np.float32)
    write_series(tmp_path, big, affine, series_number=2, description="thin")
    write_series(tmp_path, small, affine, series_number=7, description="scout")

    def pick_second():
        dialog = next((w for w in QApplication.topLevelWidgets()
                       if isinstance(w, QInputDialog) and w.isVisible()), None)
        if dialog is None:
            QTimer.singleShot(50, pick_second)
            return
        items = dialog.comboBoxItems()
        assert len(items) == 2 and "thin" in items[0] and "scout" in items[1]
        dialog.setTextValue(items[1])
        dialog.accept()

    QTimer.singleShot(50, pick_second)
    series = window.choose_dicom_series(str(tmp_path))
    assert series is not False and series is not None
    from reg2rg.app.loader import LoadRequest

    with qtbot.waitSignal(window.studyLoaded, timeout=30000):
        window.open_request(LoadRequest(volume=str(tmp_path), series=series))
    assert window.document.study.shape == (24, 24, 4)          # the scout, as chosen, not the largest
