"""Opening studies off the GUI thread: read (engine), reorient for display, extract 3D surfaces.

Everything the worker calls is imported here, at module level: an import statement executed in a worker
thread goes through PySide's import hook while the GUI thread runs, which crashed (segfault) once in tests.

`StudyLoader` is a QObject moved to a QThread; it reports progress and ends with `loaded` (a
`LoadedStudy`) or `failed` (a message naming the file and the problem). The GUI stays responsive and
an error never leaves a half-open study behind.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal, Slot

from reg2rg.engine.phantom import demo_study
from reg2rg.engine.study import Study
from reg2rg.engine.studyio import read_study, with_masks

from .display import DisplayVolume, build_display_volume
from .generation import wired_thread
from .view3d import region_surfaces

logger = logging.getLogger("reg2rg.app.loader")


@dataclass
class LoadRequest:
    """What to open: a volume path (+ masks), the demo study, an in-memory Study, or masks for the open study."""

    volume: str | None = None
    masks: str | None = None
    demo: bool = False
    study: Study | None = None
    masks_only: bool = False          # add ``masks`` to ``study`` (the open one) instead of a new study
    series: str | None = None         # DICOM folder with several series: number or UID (None = largest CT)

    def describe(self) -> str:
        if self.demo:
            return "demo study"
        if self.masks_only:
            return Path(self.masks or "").name
        if self.volume:
            return Path(self.volume).name
        return self.study.name if self.study is not None else "study"


@dataclass
class LoadedStudy:
    study: Study
    volume: DisplayVolume
    surfaces: dict = field(default_factory=dict)      # region -> SurfaceMesh (display-world mm)


def load_study(request: LoadRequest, progress=lambda text, pct: None) -> LoadedStudy:
    """Do the whole load synchronously (the worker's body; also used by the CLI and benchmarks)."""
    progress(f"Reading {request.describe()}…", 5)
    if request.masks_only:
        study = with_masks(request.study, request.masks)
    elif request.study is not None:
        study = request.study
    elif request.demo:
        study = demo_study()
    else:
        study = read_study(request.volume, request.masks, series=request.series)
    study.content_digest()      # the draft key (app.draft.study_key), hashed here rather than on the GUI thread
    progress("Preparing the views…", 45)
    volume = build_display_volume(study)
    progress("Building region surfaces…", 65)
    surfaces = region_surfaces(volume)
    progress("Done", 100)
    return LoadedStudy(study, volume, surfaces)


class StudyLoader(QObject):
    """Runs `load_study` in a worker thread."""

    progress = Signal(str, int)
    loaded = Signal(object)           # LoadedStudy
    failed = Signal(str)
    done = Signal()

    def __init__(self, request: LoadRequest) -> None:
        super().__init__()
        self.request = request

    @Slot()
    def run(self) -> None:
        try:
            result = load_study(self.request, lambda t, p: self.progress.emit(t, p))
        except MemoryError:
            self.failed.emit(f"{self.request.describe()}: not enough memory to open this study")
        except Exception as exc:  # noqa: BLE001 - every reader error must reach the user as a message, not a traceback
            logger.debug("load failed:\n%s", traceback.format_exc())
            self.failed.emit(_describe_error(self.request, exc))
        else:
            self.loaded.emit(result)
        finally:
            self.done.emit()


def _describe_error(request: LoadRequest, exc: Exception) -> str:
    from reg2rg.engine.errors import StudyError

    if isinstance(exc, StudyError):
        return str(exc)                # already names the file and the problem
    where = request.masks if request.masks_only else (request.volume or request.describe())
    return f"{where}: {exc}" if str(exc) else f"{where}: {type(exc).__name__}"


def start_loader(request: LoadRequest, parent: QObject) -> tuple[QThread, StudyLoader]:
    """Create the thread + worker pair, wired to clean themselves up; the caller connects and starts."""
    worker = StudyLoader(request)
    return wired_thread(worker, parent), worker
