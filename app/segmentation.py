"""Segment regions… in the viewer: TotalSegmentator (engine.segment) on a worker thread.

The same code as ``reg2rg-segment``: `SegmentationWorker` runs `reg2rg.engine.segment.segment_study` on a
QThread, reports progress (fraction and text), announces each finished task (so the window can show the
masks as they come) and ends with `finished` (the folder of label maps), `failed` (one line for the user:
the install command when TotalSegmentator is missing, how to get its weights when they are missing) or
`cancelled`. Everything the worker calls is imported at module level (see loader.py for why).
"""

from __future__ import annotations

import logging
import threading
import traceback

from PySide6.QtCore import QObject, QThread, Signal, Slot

from reg2rg.engine.segment import (
    DEFAULT_TASKS,
    INSTALL_HINT,
    SegmentationCancelled,
    SegmentationError,
    region_masks_folder,
    segment_study,
    totalsegmentator_available,
)
from reg2rg.engine.study import Study

from .generation import wired_thread

logger = logging.getLogger("reg2rg.app.segmentation")

NOT_INSTALLED = ("Segment regions needs TotalSegmentator, which is not installed.\n\n"
                 f"Install it with:  {INSTALL_HINT}\n\nand its weights (once, on a machine with internet):  "
                 "totalseg_download_weights -t total (and -t trunk_cavities, -t breasts, -t pleural_pericard_effusion)."
                 "\n\nOr open masks you already have with File ▸ Open masks….")


class SegmentationWorker(QObject):
    """Runs `segment_study` in a worker thread; `cancel()` may be called from the GUI thread."""

    progress = Signal(int, str)          # percent, what is happening
    taskDone = Signal(str, str)          # task, folder of label maps so far (a task run now, not from the cache)
    finished = Signal(str)               # folder of the ten region masks (RadGenome layout, in the cache)
    failed = Signal(str)
    cancelled = Signal()
    done = Signal()

    def __init__(self, study: Study, tasks=DEFAULT_TASKS, fast: bool = False, device: str = "cpu") -> None:
        super().__init__()
        self.study, self.tasks, self.fast, self.device = study, tuple(tasks), fast, device
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @Slot()
    def run(self) -> None:
        try:
            result = segment_study(
                self.study, self.tasks, fast=self.fast, device=self.device, cancel=self._cancel,
                progress=lambda f, text: self.progress.emit(int(round(100 * f)), text),
                on_task_done=lambda task, folder, cached: None if cached else self.taskDone.emit(task, str(folder)))
        except SegmentationCancelled:
            self.cancelled.emit()
        except SegmentationError as exc:
            self.failed.emit(str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure must reach the user as a message
            logger.debug("segmentation failed:\n%s", traceback.format_exc())
            self.failed.emit(f"segmentation failed: {type(exc).__name__}: {exc}")
        else:
            try:
                self.finished.emit(str(region_masks_folder(self.study, result)))
            except Exception as exc:  # noqa: BLE001 - writing the region masks can fail like any output
                self.failed.emit(f"segmentation done, but its region masks could not be written: {exc}")
        finally:
            self.done.emit()


def start_segmentation(study: Study, parent: QObject, **options) -> tuple[QThread, SegmentationWorker]:
    """The thread + worker pair, wired to clean themselves up; the caller connects and starts the thread."""
    worker = SegmentationWorker(study, **options)
    return wired_thread(worker, parent), worker


__all__ = ["NOT_INSTALLED", "SegmentationWorker", "start_segmentation", "totalsegmentator_available"]
