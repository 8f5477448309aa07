"""The main window: four views (axial, sagittal, coronal, 3D), the region panel, the draft panel."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import numpy as np
from PySide6.QtCore import QThread, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QGridLayout,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QProgressDialog,
    QToolBar,
    QWidget,
)

from reg2rg.engine.study import Study

from .display import AXIS_AXIAL, AXIS_CORONAL, AXIS_SAGITTAL
from .document import ViewerDocument
from .gui_gc import collect_on_gui_thread
from .loader import LoadedStudy, LoadRequest, start_loader
from .region_panel import RegionPanel
from .slice_view import SliceView
from .style import VOLUME_PRESETS, WINDOW_PRESETS
from .view3d import View3D

logger = logging.getLogger("reg2rg.app")

DARK_STYLE = """
QMainWindow, QWidget { background: #1e2126; color: #d8dce2; }
QToolBar { background: #262a31; border: 0; spacing: 4px; padding: 2px; }
QToolButton { padding: 3px 8px; border-radius: 3px; }
QToolButton:hover { background: #343a44; }
QToolButton:checked { background: #3d5a80; }
QDockWidget::title { background: #262a31; padding: 4px; font-weight: bold; }
QTableWidget { background: #1b1e22; alternate-background-color: #22262c; gridline-color: #2c3038;
               selection-background-color: #3d5a80; }
QHeaderView::section { background: #262a31; color: #aab2bd; border: 0; padding: 3px; }
QStatusBar { background: #262a31; }
QStatusBar QLabel { padding: 0 8px; font-family: monospace; }
QPlainTextEdit, QTextEdit { background: #15171a; border: 1px solid #333a44; }
QPushButton { background: #30363f; border: 1px solid #424a56; padding: 4px 10px; border-radius: 3px; }
QPushButton:hover { background: #3a424d; }
QPushButton:disabled { color: #6a717b; }
QComboBox { background: #30363f; border: 1px solid #424a56; padding: 2px 6px; }
"""


DOCK_TABS_HEIGHT = 368     # pixels: ten region rows, or the attention controls and chart, without scrolling


class MainWindow(QMainWindow):
    """The viewer. Long work (loading) runs on worker threads; errors become message boxes."""

    studyLoaded = Signal()
    loadFailed = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        collect_on_gui_thread(QApplication.instance())
        self.setWindowTitle("Reg2RG Viewer")
        self.resize(1500, 950)
        self.document = ViewerDocument(self)
        self.views: dict[int, SliceView] = {}
        self.last_message_box: QMessageBox | None = None
        self._threads: list[QThread] = []
        self._maximised: QWidget | None = None
        self.segmentation = None              # (thread, worker) while Segment regions… runs
        self.segment_dialog: QProgressDialog | None = None
        self._segmented_study: Study | None = None
        self._segment_loading = False         # a load of segmented masks is in flight
        self._segment_pending: tuple[str, bool] | None = None

        grid_host = QWidget(self)
        grid_host.setObjectName("view_grid")
        self.grid = QGridLayout(grid_host)
        self.grid.setContentsMargins(2, 2, 2, 2)
        self.grid.setSpacing(2)
        for axis, (row, col) in ((AXIS_AXIAL, (0, 0)), (AXIS_SAGITTAL, (0, 1)), (AXIS_CORONAL, (1, 0))):
            view = SliceView(self.document, axis, grid_host)
            view.hovered.connect(self._show_hover)
            view.maximiseToggled.connect(lambda v=view: self.toggle_maximise(v))
            view.resetRequested.connect(self.reset_views)
            self.grid.addWidget(view, row, col)
            self.views[axis] = view
        self.view3d = View3D(self.document, grid_host)
        self.view3d.maximiseToggled.connect(lambda: self.toggle_maximise(self.view3d))
        self.grid.addWidget(self.view3d, 1, 1)
        self.setCentralWidget(grid_host)

        self.region_panel = RegionPanel(self.document, self)
        self.region_panel.setMinimumWidth(400)
        self.region_dock = self._add_dock("Regions", "dock_regions", self.region_panel)
        self._build_draft_dock()

        self._build_status_bar()
        self._build_actions()
        self.document.cursorChanged.connect(self._show_cursor)
        self.document.windowLevelChanged.connect(self._sync_preset_checks)
        self.setStyleSheet(DARK_STYLE)

    # -- construction ------------------------------------------------------------------------
    def _build_draft_dock(self) -> None:
        """The drafting session (engine, draft, selection, heat layer) and its views: the draft panel,
        the attention panel, and the heat layer in every slice and 3D view."""
        from .attention_panel import AttentionPanel
        from .draft_panel import DraftPanel
        from .session import DraftingSession

        self.session = DraftingSession(self.document, self)
        self.session.errorOccurred.connect(lambda msg: self.show_error("Report draft", msg))
        self.session.attentionFailed.connect(lambda msg: self.show_error("Attention map", msg))
        self.draft_panel = DraftPanel(self.session, self)
        self.draft_dock = self._add_dock("Report draft", "dock_draft", self.draft_panel)
        self.attention_panel = AttentionPanel(self.session, self)
        att = self._add_dock("Attention", "dock_attention", self.attention_panel)
        self.tabifyDockWidget(self.region_dock, att)
        self.region_dock.raise_()
        self.attention_dock = att
        self.session.attentionStarted.connect(lambda _label: self.attention_dock.raise_())
        self.session.heatLayerChanged.connect(self._show_heat_layer)

    def _show_heat_layer(self) -> None:
        """Draw the session's heat layer, its peak marked, in every view (or take it away)."""
        heat = self.session.heat
        table = heat.table()
        peak = self.session.peak_voxel() if heat.shown else None
        for view in self.all_views():
            view.set_heatmap(heat.codes if heat.shown else None, table, heat.opacity)
            view.set_peak(peak)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.status_position = QLabel("")
        self.status_hu = QLabel("")
        self.status_region = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setRange(0, 100)
        self.progress.hide()
        for w in (self.status_region, self.status_hu, self.status_position, self.progress):
            bar.addPermanentWidget(w)

    def _add_dock(self, title: str, name: str, widget) -> QDockWidget:
        """A movable, floatable (not closable) dock on the right holding ``widget``."""
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.addDockWidget(Qt.RightDockWidgetArea, dock)
        return dock

    def _build_actions(self) -> None:
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        self.act_open = self._action(file_menu, "Open CT…", self.open_ct_dialog, QKeySequence.Open)
        self.act_open_dicom = self._action(file_menu, "Open DICOM folder…", self.open_dicom_dialog)
        self.act_open_masks = self._action(file_menu, "Open masks…", self.open_masks_dialog, "Ctrl+M")
        self.act_segment = self._action(file_menu, "Segment regions…", lambda: self.segment_regions(), "Ctrl+Shift+M")
        self.act_segment.setToolTip("Make the ten region masks of this CT with TotalSegmentator")
        self.act_demo = self._action(file_menu, "Open demo study", lambda: self.open_request(LoadRequest(demo=True)), "Ctrl+D")
        file_menu.addSeparator()
        self.act_export = self._action(file_menu, "Export…", self.export_dialog, "Ctrl+E")
        self.act_screenshot = self._action(file_menu, "Save screenshot…", self.screenshot_dialog)
        file_menu.addSeparator()
        self._action(file_menu, "Quit", self.close, QKeySequence.Quit)

        view_menu = menu.addMenu("&View")
        tb = QToolBar("Main", self)
        tb.setObjectName("toolbar_main")
        tb.setMovable(False)
        self.addToolBar(tb)
        tb.addAction(self.act_open)
        tb.addAction(self.act_demo)
        tb.addSeparator()
        tb.addWidget(QLabel(" Window: "))
        self.preset_actions: dict[str, QAction] = {}
        group = QActionGroup(self)
        for preset in WINDOW_PRESETS:
            act = self._action(view_menu, preset.name,
                               lambda _checked=False, p=preset: self.document.set_window_level(p.window, p.level), preset.shortcut)
            act.setCheckable(True)
            act.setToolTip(f"{preset.name}: W {preset.window:.0f} / L {preset.level:.0f} ({preset.shortcut})")
            group.addAction(act)
            tb.addAction(act)
            self.preset_actions[preset.name] = act
        group.setExclusionPolicy(QActionGroup.ExclusionPolicy.ExclusiveOptional)
        self._sync_preset_checks(self.document.window, self.document.level)
        view_menu.addSeparator()
        tb.addSeparator()
        self.act_reset = self._action(view_menu, "Reset views", self.reset_views)
        tb.addAction(self.act_reset)
        tb.addSeparator()
        tb.addWidget(QLabel(" 3D: "))
        self.act_surfaces = self._action(view_menu, "Region surfaces", self.view3d.set_surfaces_visible)
        self.act_surfaces.setCheckable(True)
        self.act_surfaces.setChecked(True)
        tb.addAction(self.act_surfaces)
        self.act_volume = self._action(view_menu, "Volume rendering",
                                       lambda on: self.view3d.set_volume_rendering(on, self.volume_preset.currentText()))
        self.act_volume.setCheckable(True)
        tb.addAction(self.act_volume)
        self.volume_preset = QComboBox()
        self.volume_preset.addItems(list(VOLUME_PRESETS))
        self.volume_preset.currentTextChanged.connect(
            lambda name: self.view3d.set_volume_rendering(self.act_volume.isChecked(), name))
        tb.addWidget(self.volume_preset)
        view_menu.addSeparator()
        view_menu.addAction(self.region_dock.toggleViewAction())
        view_menu.addAction(self.draft_dock.toggleViewAction())
        view_menu.addAction(self.attention_dock.toggleViewAction())
        help_menu = menu.addMenu("&Help")
        self.act_about = self._action(help_menu, "About Reg2RG Viewer…", self.about_dialog)

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(slot)
        menu.addAction(act)
        return act

    # -- opening studies ---------------------------------------------------------------------
    def open_ct_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open CT volume", "", "NIfTI (*.nii *.nii.gz);;All files (*)")
        if path:
            self.open_request(LoadRequest(volume=path))

    def open_dicom_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open DICOM series folder")
        if not path:
            return
        series = self.choose_dicom_series(path)
        if series is not False:
            self.open_request(LoadRequest(volume=path, series=series))

    def choose_dicom_series(self, folder: str):
        """None (one series, or none readable: the reader explains), the chosen series number/UID, or
        False when the user cancels the choice among several series."""
        from reg2rg.engine.studyio import list_dicom_series

        try:
            found = list_dicom_series(folder)
        except (OSError, ValueError):
            return None
        if len(found) < 2:
            return None
        labels = [str(s) for s in found]
        label, ok = QInputDialog.getItem(self, "Choose a DICOM series",
                                         f"{Path(folder).name} holds {len(found)} series:", labels, 0, False)
        if not ok:
            return False
        return found[labels.index(label)].uid

    def open_masks_dialog(self) -> None:
        if self.document.study is None:
            self.show_error("Open masks", "Open a CT study first; masks are read onto its voxel grid.")
            return
        path = QFileDialog.getExistingDirectory(self, "Open region mask folder (or cancel to pick a label map)")
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Open label map", "", "NIfTI (*.nii *.nii.gz)")
        if path:
            self.open_request(LoadRequest(masks=path, study=self.document.study, masks_only=True))

    # -- segmentation on demand ----------------------------------------------------------------
    def segment_regions(self, fast: bool = False, device: str | None = None) -> None:
        """Segment regions…: TotalSegmentator on the open CT in the background (progress, cancel); the
        masks appear as each task finishes and stay cached for this scan. ``device``: cpu or gpu (default:
        the GPU when CUDA is available)."""
        from .segmentation import NOT_INSTALLED, start_segmentation, totalsegmentator_available

        if self.document.study is None:
            self.show_error("Segment regions", "Open a CT study first; its regions are segmented on its own grid.")
            return
        if self.segmentation is not None:
            return
        if not totalsegmentator_available():
            self.show_message("Segment regions", NOT_INSTALLED, QMessageBox.Information)
            return
        if device is None:
            import torch

            device = "gpu" if torch.cuda.is_available() else "cpu"
        thread, worker = start_segmentation(self.document.study, self, fast=fast, device=device)
        dialog = QProgressDialog("Starting TotalSegmentator…", "Cancel", 0, 100, self)
        dialog.setWindowTitle("Segment regions")
        dialog.setMinimumDuration(0)
        dialog.setAutoClose(False)
        dialog.setAutoReset(False)
        # the worker is busy in its thread: Cancel sets its event directly, from this (the GUI) thread
        dialog.canceled.connect(lambda: worker.cancel())
        # bound methods of this window: queued onto the GUI thread (a lambda would run in the worker's)
        worker.progress.connect(self._on_segment_progress)
        worker.taskDone.connect(self._on_segment_task_done)
        worker.finished.connect(self._on_segment_finished)
        worker.failed.connect(self._on_segment_failed)
        worker.cancelled.connect(self._on_segment_cancelled)
        worker.done.connect(self._on_segment_done)
        self.segmentation = (thread, worker)
        self._segmented_study = self.document.study
        self.segment_dialog = dialog
        dialog.show()
        thread.start()

    def _on_segment_task_done(self, _task: str, folder: str) -> None:
        self._load_segmented(folder, final=False)

    def _on_segment_finished(self, folder: str) -> None:
        self._load_segmented(folder, final=True)

    def _on_segment_failed(self, message: str) -> None:
        self.show_error("Segment regions", message)

    def _on_segment_cancelled(self) -> None:
        self.statusBar().showMessage("Segmentation cancelled (finished tasks are kept for this scan)", 8000)

    def _on_segment_progress(self, pct: int, text: str) -> None:
        if self.segment_dialog is not None:
            self.segment_dialog.setValue(pct)
            self.segment_dialog.setLabelText(text)
        self.statusBar().showMessage(f"Segmenting: {text}")

    def _load_segmented(self, folder: str, final: bool) -> None:
        """Show the masks of the tasks done so far: one load at a time (the loaders build VTK surfaces,
        which must not run twice at once), the newest request kept while one is in flight, and only onto
        the scan that was segmented (the user may have opened another meanwhile)."""
        study = self.document.study
        segmented = self.segmentation[1].study if self.segmentation is not None else self._segmented_study
        if study is None or segmented is None or study.voxels is not segmented.voxels:
            return
        if self._segment_loading:
            final = final or (self._segment_pending is not None and self._segment_pending[1])
            self._segment_pending = (folder, final)
            return
        self._segment_loading = True
        self._quiet_mask_load = not final          # warnings once, when all tasks are in
        self.open_request(LoadRequest(masks=folder, study=study, masks_only=True))

    def _segmented_load_ended(self) -> None:
        if not self._segment_loading:
            return
        self._segment_loading = False
        pending, self._segment_pending = self._segment_pending, None
        if pending is not None:
            self._load_segmented(*pending)

    def _on_segment_done(self) -> None:
        if self.segment_dialog is not None:
            self.segment_dialog.hide()
            self.segment_dialog.deleteLater()
        self.segment_dialog = None
        self.segmentation = None

    def open_study(self, study: Study) -> None:
        """Open an in-memory study (tests, the phantom, the engine)."""
        self.open_request(LoadRequest(study=study))

    def open_request(self, request: LoadRequest) -> None:
        """Start loading on a worker thread; the window stays usable and shows progress."""
        thread, worker = start_loader(request, self)
        worker.progress.connect(self._on_progress)
        worker.loaded.connect(self._on_loaded)
        worker.failed.connect(self._on_load_failed)
        # The worker has no Qt parent (it lives on the thread): keep the Python wrappers alive here.
        job = (thread, worker)
        thread.finished.connect(lambda j=job: self._threads.remove(j) if j in self._threads else None)
        self._threads.append(job)
        self.progress.setValue(0)
        self.progress.show()
        self.statusBar().showMessage(f"Opening {request.describe()}…")
        thread.start()

    def is_loading(self) -> bool:
        return bool(self._threads)

    def _on_progress(self, text: str, pct: int) -> None:
        self.progress.setValue(pct)
        self.statusBar().showMessage(text)

    def _on_loaded(self, loaded: LoadedStudy) -> None:
        self.progress.hide()
        self.document.set_study(loaded.study, loaded.volume, loaded.surfaces)
        study = loaded.study
        self.setWindowTitle(f"Reg2RG Viewer — {study.name}")
        msg = f"Opened {study.name}: {' × '.join(map(str, study.shape))} voxels, " \
              f"{' × '.join(f'{s:.2f}' for s in study.spacing)} mm, {study.orientation}"
        if study.warnings:
            msg += f" — {len(study.warnings)} warning(s)"
            if not getattr(self, "_quiet_mask_load", False):
                self.show_message("Study opened with warnings", self.describe_warnings(study), QMessageBox.Warning)
        self._quiet_mask_load = False
        self._segmented_load_ended()
        self.statusBar().showMessage(msg, 10000)
        self.studyLoaded.emit()

    def _on_load_failed(self, message: str) -> None:
        self._segmented_load_ended()
        self.progress.hide()
        self.statusBar().showMessage("Could not open the study", 5000)
        self.show_error("Could not open the study", message)
        self.loadFailed.emit(message)

    @staticmethod
    def describe_warnings(study: Study) -> str:
        """The study's warnings for a reader: mask problems first (they change what the draft means),
        folders shortened to file names (the full paths are in the log)."""
        import os

        problems = list(study.mask_problems)
        rest = [w for w in study.warnings if w not in problems]
        lines = []
        if problems:
            lines += ["The region masks may not belong to this CT:", *[f"• {p}" for p in problems[:8]], ""]
        for w in rest[:10]:
            head, sep, tail = w.partition(": ")
            lines.append(f"• {os.path.basename(head.rstrip('/'))}: {tail}" if sep and os.sep in head else f"• {w}")
        return "\n".join(lines).strip()

    # -- messages ----------------------------------------------------------------------------
    def show_message(self, title: str, text: str, icon=QMessageBox.Information) -> QMessageBox:
        """A window-modal, non-blocking message box (kept in ``last_message_box`` for tests)."""
        box = QMessageBox(icon, title, text, QMessageBox.Ok, self)
        box.setWindowModality(Qt.WindowModal)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.open()
        self.last_message_box = box
        return box

    def show_error(self, title: str, text: str) -> QMessageBox:
        logger.warning("%s: %s", title, text)
        return self.show_message(title, text, QMessageBox.Critical)

    # -- views -------------------------------------------------------------------------------
    def all_views(self) -> list[QWidget]:
        return [*self.views.values(), self.view3d]

    def toggle_maximise(self, view: QWidget) -> None:
        """Double-click: show one view alone; again: back to the four-up layout."""
        maximise = self._maximised is None
        for other in self.all_views():
            other.setVisible(not maximise or other is view)
        self._maximised = view if maximise else None
        for v in self.all_views():
            if v.isVisible():
                v.reset_camera()

    def reset_views(self) -> None:
        for v in self.views.values():
            v._user_zoomed = False
            v.reset_camera()
        self.view3d.reset_camera()

    def render_all(self) -> None:
        """Render every visible view now (screenshots, tests)."""
        for v in self.all_views():
            if v.isVisible():
                v.render_now()

    def _sync_preset_checks(self, window: float, level: float) -> None:
        for preset in WINDOW_PRESETS:
            self.preset_actions[preset.name].setChecked((preset.window, preset.level) == (window, level))

    def _show_cursor(self, ijk) -> None:
        self._show_hover(ijk)

    def _show_hover(self, ijk) -> None:
        vol = self.document.volume
        if vol is None or ijk is None:
            ijk = self.document.cursor if vol is not None else None
        if ijk is None:
            return
        x, y, z = vol.world_mm(ijk)
        i, j, k = vol.to_stored(ijk)
        self.status_position.setText(f"{x:.1f}, {y:.1f}, {z:.1f} mm RAS   [{i}, {j}, {k}]")
        self.status_hu.setText(f"{vol.hu_at(ijk):.0f} HU")
        regions = vol.regions_at(ijk)
        self.status_region.setText(", ".join(regions) if regions else "no region")

    # -- export ------------------------------------------------------------------------------
    def screenshot_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save screenshot", "reg2rg.png", "PNG (*.png)")
        if path:
            self.save_screenshot(path)

    def save_screenshot(self, path: str | Path) -> bool:
        """A picture of the whole window, VTK views included."""
        QApplication.processEvents()
        self.render_all()
        QApplication.processEvents()
        screen = self.screen() or QApplication.primaryScreen()
        pix = screen.grabWindow(self.winId())
        if pix.isNull() or pix.width() < 10:
            pix = self.grab()
        from reg2rg.engine.fileio import OutputError, atomic_path

        try:                                 # complete or absent, like every other output file
            with atomic_path(path) as tmp:
                if not pix.save(tmp):
                    raise OutputError(path, "the picture could not be encoded (unknown image format?)")
        except OutputError as err:
            logger.warning("%s", err)
            return False
        return True

    def export_dialog(self) -> None:
        """File → Export: the report draft in a format chosen by file name; without a draft, say so."""
        if self.session.draft is None:
            self.show_message("Export report", "There is no report draft to export yet. Open a study and press "
                              "Generate in the Report draft panel (File → Save screenshot… saves a picture "
                              "of the views).")
            return
        draft = self.session.draft
        path, chosen = QFileDialog.getSaveFileName(
            self, "Export report", f"{draft.study_name or 'report'}.pdf",
            "PDF (*.pdf);;Text (*.txt);;JSON (*.json);;DICOM SR (*.sr.dcm);;FHIR DiagnosticReport (*.fhir.json)")
        if not path:
            return
        for kind, ext in (("DICOM SR", ".sr.dcm"), ("FHIR", ".fhir.json")):
            if chosen.startswith(kind) and not path.lower().endswith(ext):
                path += ext
        try:
            out = self.session.export(path)
        except (OSError, ValueError) as exc:      # ExportError / OutputError name the file and the problem
            self.show_error("Export report", f"Could not export the report: {exc}")
            return
        self.statusBar().showMessage(f"Exported {out.name}", 8000)

    def about_dialog(self):
        """Help → About: version, engine, and the model card of the model in use."""
        from .about import AboutDialog

        dialog = AboutDialog(self.session, self)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.open()
        self.about_box = dialog
        return dialog

    def showEvent(self, ev) -> None:  # noqa: N802
        super().showEvent(ev)
        if not getattr(self, "_docks_sized", False):
            self._docks_sized = True
            QTimer.singleShot(0, self, self.size_docks)

    def size_docks(self) -> None:
        """The first layout of the dock column: wide enough for the draft's text, the region/attention
        tabs just tall enough for ten regions (or the attention chart), the draft the rest."""
        width = max(440, min(560, int(self.width() * 0.34)))
        self.resizeDocks([self.region_dock], [width], Qt.Horizontal)
        self.resizeDocks([self.region_dock, self.draft_dock], [DOCK_TABS_HEIGHT, max(300, self.height() - DOCK_TABS_HEIGHT)],
                         Qt.Vertical)

    def closeEvent(self, ev) -> None:  # noqa: N802
        self.session.close_study_cleanly()              # cancels a running draft
        self.session.wait_for_background(30_000, deliver=False)   # no thread may outlive the window
        if self.segmentation is not None:
            self.segmentation[1].cancel()             # kills TotalSegmentator's process at once
            self.segmentation[0].wait(10000)
        for thread, _worker in list(self._threads):
            thread.quit()
            thread.wait(5000)
        super().closeEvent(ev)


def install_excepthook(window: MainWindow | None) -> None:
    """Unexpected errors become a message box (the traceback goes to the log, not the user)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        logger.error("unexpected error:\n%s", "".join(traceback.format_exception(exc_type, exc, tb)))
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
            return
        try:
            if window is not None:
                window.show_error("Unexpected error", f"{exc_type.__name__}: {exc}\n\nThe viewer stays open; "
                                  "the details were written to the log.")
        except Exception:  # noqa: BLE001 - the hook must never raise
            previous(exc_type, exc, tb)

    sys.excepthook = hook


def frame_pixels(view) -> np.ndarray:
    """The last rendered frame of a VTK view as (H, W, 3) uint8, top row first."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    view.render_now()
    grab = vtkWindowToImageFilter()
    grab.SetInput(view.GetRenderWindow())
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    arr = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
    return np.ascontiguousarray(arr[::-1, :, :3])
