"""`RenderWidget`: a VTK render window in Qt that coalesces render requests into one frame."""

from __future__ import annotations

import threading

from PySide6.QtCore import QTimer
from vtkmodules.qt.QVTKRenderWindowInteractor import QVTKRenderWindowInteractor

# VTK is not safe to run in two threads at once (its pipeline executives and object deletion share state): the
# loader thread's surface filters (`view3d.region_surfaces`) and the GUI thread's frames take this lock, so a
# frame waits for at most one region's filters. Without it the two met in CI: a segmentation fault while the
# loader smoothed a region's surface and a view painted.
VTK_LOCK = threading.RLock()


class RenderWidget(QVTKRenderWindowInteractor):
    """Views ask for a frame with `request_render`; several changes in one event-loop step cost one frame."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._render_pending = False
        self.render_count = 0                  # frames rendered (tests and benchmarks)

    def request_render(self) -> None:
        """Render once the event loop is idle."""
        if not self._render_pending:
            self._render_pending = True
            QTimer.singleShot(0, self, self._render_now)  # bound to self: no call after deletion

    def _render_now(self) -> None:
        self._render_pending = False
        if self.isVisible():
            self.render_count += 1
            with VTK_LOCK:
                self.GetRenderWindow().Render()

    def render_now(self) -> None:
        """Render immediately (screenshots, benchmarks)."""
        self._render_pending = False
        self.render_count += 1
        with VTK_LOCK:
            self.GetRenderWindow().Render()

    def paintEvent(self, ev) -> None:  # noqa: N802 - Qt's name
        with VTK_LOCK:
            super().paintEvent(ev)
