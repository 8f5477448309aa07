"""Python's cyclic garbage collection, run on the GUI thread only.

The collector runs in whichever thread happens to allocate. When that is a worker (loading a study,
generating a report) and the garbage holds Qt or VTK objects of a closed window or view, they are
destroyed off the GUI thread, which crashes the process at a random place in the worker. So, as
pyqtgraph does, automatic collection is switched off and a GUI-thread timer collects instead, one
generation at a time when its count passes the usual threshold.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

_collector: "GuiThreadCollector | None" = None


class GuiThreadCollector(QObject):
    def __init__(self, parent: QObject, interval_ms: int = 500):
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        self.timer.start(interval_ms)

    def check(self) -> None:
        """Collect the generations whose allocation counts passed their thresholds."""
        counts = gc.get_count()
        for generation in (2, 1, 0):
            if counts[generation] > self.thresholds[generation]:
                gc.collect(generation)
                return


def collect_on_gui_thread(app: QObject) -> GuiThreadCollector:
    """Install (once per process) the GUI-thread collector on the application object."""
    global _collector
    if _collector is None:
        _collector = GuiThreadCollector(app)
    gc.disable()            # again: a host (a test runner) may have switched it back on meanwhile
    return _collector
