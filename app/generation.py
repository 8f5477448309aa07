"""Running the report engine off the GUI thread.

`EngineLoader` loads a `ReportEngine`; `GenerationWorker` consumes `engine.generate(...)` and turns
its events into Qt signals. Both are QObjects moved to a QThread. The engine is injected, so tests
pass a real small engine and the app passes whichever model the user chose. Stop sets a
`threading.Event` the engine checks between tokens; the engine then finishes with a cancelled result.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from reg2rg.engine.interface import EngineUnavailable

logger = logging.getLogger("reg2rg.app.generation")


_LOCKS_GUARD = threading.Lock()


def engine_lock(engine):
    """The lock serialising one engine's work (a generation, an attention pass) across worker threads.

    Attention passes switch the model to eager attention; they must not overlap a generation. An engine
    that has its own lock (``ReportEngine.lock``, re-entrant) is serialised by that one.
    """
    own = getattr(engine, "lock", None)
    if own is not None and hasattr(own, "acquire"):
        return own
    with _LOCKS_GUARD:
        lock = getattr(engine, "_viewer_lock", None)
        if lock is None:
            lock = threading.Lock()
            engine._viewer_lock = lock
        return lock


def describe_engine_error(exc: BaseException) -> str:
    """A message for the radiologist; out-of-memory gets advice instead of a stack trace."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        if "try" not in text.lower():
            text += " — try fewer regions, fewer new tokens, or the CPU."
        return f"Out of memory: {text}"
    # our own errors already name the file and the problem in the reader's words
    return text if type(exc).__name__ in ("ModelFolderError", "GenerationError", "CheckpointError", "TokenizerError",
                                          "ConfigError", "StudyError", "OutputError", "EngineUnavailable",
                                          "TokenError") \
        else f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class ModelChoice:
    """Which model drafts: the embedded demo model, a model folder, or the published checkpoint + LLaMA."""

    kind: str = "demo"                       # demo | folder | published | server
    path: str | None = None                  # the model folder (kind "folder")
    checkpoint: str | None = None            # the published checkpoint file (kind "published")
    llm_path: str | None = None              # the local LLaMA folder (kind "published")
    strict: bool = True                      # kind "published": refuse a checkpoint whose keys do not match
    url: str | None = None                   # kind "server": the reg2rg-serve URL
    token_file: str | None = None            # kind "server": the token file (None: REG2RG_SERVER_TOKEN / default)

    def describe(self, full: bool = False) -> str:
        def name(p) -> str:
            return str(p) if full else Path(p).name

        if self.kind == "folder":
            return name(self.path)
        if self.kind == "published":
            return f"{name(self.checkpoint)} + {name(self.llm_path)}"
        if self.kind == "server":
            return f"server {self.url}"
        return "embedded demo"

    def where(self) -> str:
        """What to name in an error message: the folder or files that failed to load."""
        if self.kind == "server":
            return f"the engine server {self.url}"
        if self.kind == "folder":
            return str(self.path)
        if self.kind == "published":
            return f"{self.checkpoint} with LLaMA folder {self.llm_path}"
        return "the embedded demo model"

    def llm_folder(self):
        """The LLaMA folder this model decodes with (its generation_config.json drives the published preset)."""
        from reg2rg.engine.presets import llm_folder_of

        if self.kind == "server":
            return None                      # the LLaMA folder is on the server
        if self.kind == "published":
            return llm_folder_of(llm_path=self.llm_path)
        return llm_folder_of(self.path if self.kind == "folder" else None)

    def load(self, device: str = "auto"):
        from reg2rg.engine.generation import ReportEngine

        if self.kind == "server":             # the same engine interface, the model on a reg2rg-serve
            from reg2rg.engine.service.client import connect

            return connect(self.url, self.token_file)

        if self.kind == "published":
            return ReportEngine.from_published(self.checkpoint, self.llm_path, device=device, strict=self.strict)
        return ReportEngine.load(self.path if self.kind == "folder" else None, device=device)


class EngineLoader(QObject):
    """Loads a ReportEngine (a `ModelChoice`, a model folder, or None for the demo model) on a worker thread."""

    loaded = Signal(object)
    failed = Signal(str)
    done = Signal()

    def __init__(self, model: ModelChoice | str | None = None, device: str = "auto") -> None:
        super().__init__()
        if not isinstance(model, ModelChoice):
            model = ModelChoice("folder", str(model)) if model else ModelChoice()
        self.model, self.device = model, device

    @Slot()
    def run(self) -> None:
        try:
            engine = self.model.load(self.device)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the app stays open
            logger.debug("engine load failed:\n%s", traceback.format_exc())
            message = describe_engine_error(exc)
            where = self.model.where()
            if self.model.kind == "folder" and str(Path(self.model.path).name) not in message:
                message = f"{where}: {message}"
            what = "Could not connect to" if self.model.kind == "server" else "Could not load the model"
            self.failed.emit(f"{what} ({where}):\n{message}")
        else:
            self.loaded.emit(engine)
        finally:
            self.done.emit()


class GenerationWorker(QObject):
    """Streams one generation: ``encodingStarted`` → ``encodingDone`` → ``tokenGenerated``… → ``finished``.

    ``failed`` replaces ``finished`` when the engine raises; ``done`` always comes last.
    """

    encodingStarted = Signal(object)      # engine EncodingStarted
    encodingDone = Signal(object)         # engine EncodingDone
    tokenGenerated = Signal(object)       # engine TokenEvent
    finished = Signal(object)             # engine DraftResult (result.cancelled after Stop)
    failed = Signal(str)
    unavailable = Signal(str, bool)       # a remote engine failed: message, whether a retry can help
    done = Signal()

    def __init__(self, engine, study, regions=None, settings=None) -> None:
        super().__init__()
        self.engine, self.study, self.regions, self.settings = engine, study, regions, settings
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop after the current token (thread-safe)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @Slot()
    def run(self) -> None:
        try:
            with engine_lock(self.engine):
                self._consume()
        except EngineUnavailable as exc:
            # network loss, a server restart, 401/4xx/5xx: the draft so far is kept (marked stopped)
            if exc.partial is not None:
                self.finished.emit(exc.partial)
            self.unavailable.emit(str(exc), bool(exc.retry))
            self.failed.emit(str(exc))
        except Exception as exc:  # noqa: BLE001 - the draft and the study stay open
            logger.debug("generation failed:\n%s", traceback.format_exc())
            self.failed.emit(describe_engine_error(exc))
        finally:
            self.done.emit()

    def _consume(self) -> None:
        from reg2rg.engine.generation import EncodingDone, EncodingStarted, Finished, GenerationSettings, TokenEvent

        events = self.engine.generate(self.study, regions=self.regions,
                                      settings=self.settings or GenerationSettings(), cancel=self._cancel)
        for event in events:
            if isinstance(event, TokenEvent):
                self.tokenGenerated.emit(event)
            elif isinstance(event, EncodingStarted):
                self.encodingStarted.emit(event)
            elif isinstance(event, EncodingDone):
                self.encodingDone.emit(event)
            elif isinstance(event, Finished):
                self.on_result(event.result)
                self.finished.emit(event.result)

    def on_result(self, result) -> None:
        """Work on the finished result before it is handed over (still on the worker thread)."""


def wired_thread(worker: QObject, parent: QObject) -> QThread:
    """A thread for ``worker`` (with ``run`` and ``done``) that quits when it is done and then deletes
    both; not started yet, so the caller can connect the worker's signals first."""
    thread = QThread(parent)
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.done.connect(thread.quit, Qt.DirectConnection)   # thread-safe; works while the GUI thread waits
    thread.finished.connect(worker.deleteLater)
    thread.finished.connect(thread.deleteLater)
    return thread


def start_in_thread(worker: QObject, parent: QObject) -> QThread:
    """Move ``worker`` (with ``run`` and ``done``) to a new thread that ends and cleans up when done.

    The caller keeps a reference to ``worker`` until ``done``: it has no Qt parent.
    """
    thread = QThread(parent)
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.done.connect(thread.quit, Qt.DirectConnection)   # thread-safe; works while the GUI thread waits
    thread.finished.connect(thread.deleteLater)
    thread.start()
    return thread


class WorkerJobs(QObject):
    """Keeps (thread, worker) pairs alive while they run; forgets them once their thread has finished.

    Workers have no Qt parent (they move to their thread), so Python must hold them; pruning happens
    on this object's (the GUI) thread after ``QThread.finished``, when ``run`` has returned.
    """

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self.jobs: list[tuple[QThread, QObject]] = []

    def start(self, worker: QObject) -> QThread:
        thread = start_in_thread(worker, self.parent())
        self.jobs.append((thread, worker))
        thread.finished.connect(self._prune)
        return thread

    @Slot()
    def _prune(self) -> None:
        alive = []
        for thread, worker in self.jobs:
            try:
                running = not thread.isFinished()
            except RuntimeError:            # already deleted by deleteLater: it has finished
                running = False
            if running:
                alive.append((thread, worker))
        self.jobs = alive

    def wait(self, timeout_ms: int = 120_000) -> bool:
        """Block until every running job's thread has finished (or ``timeout_ms`` passed for one of
        them); True when none is left running. Their queued signals arrive at the next event loop turn."""
        done = True
        for thread, _ in list(self.jobs):
            try:
                if not thread.isFinished():
                    done = thread.wait(timeout_ms) and done
            except RuntimeError:            # already deleted by deleteLater: it has finished
                pass
        return done

    def __len__(self) -> int:
        return len(self.jobs)
