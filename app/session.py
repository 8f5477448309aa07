"""The drafting session: everything about drafting a report for the open study, as a Qt model.

`DraftingSession` sits beside `ViewerDocument` (which holds the study and how it is shown) and owns

- the engine handle and the lock that serialises its work, the model choice, device and decoding
  settings (loading the model off the GUI thread when a draft is asked for);
- the `ReportDraft` (the engine's report document) with the per-section review state, the model runs
  (`results`) its sections came from, the impression and the reviewer (asked once, remembered);
- the attention selection, the explanation method (relevance or raw attention), the heat layer drawn
  over the CT with the selection's region dependence, and each section's Findings check (with the
  omission threshold);
- autosave and restore (`DraftStore`).

It has no widgets. Panels and views observe its signals and send requests through its methods; it
never calls a panel (the napari layer-list pattern). The engine handle is any object with the methods
the session calls — ``generate(study, regions, settings, cancel)`` (streaming events),
``attention_map(result, token_indices, layers, heads)``, ``model_dir`` and optionally
``model_identity()`` and ``attention_layout()`` — so a remote engine can take the local one's place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PySide6.QtCore import QCoreApplication, QObject, QTimer, Signal

from reg2rg.engine.report import (ACCEPTED, REJECTED, ExportError, ReportDraft, section_from_result,
                                  write_report)
from reg2rg.engine.report.provenance import provenance_for, read_validation

from .document import ViewerDocument
from .draft import DraftFileError, DraftStore, SavedDraft, study_key, user_data_dir
from .generation import EngineLoader, GenerationWorker, ModelChoice, WorkerJobs, describe_engine_error
from .heat import (AttentionRequestError, AttentionWorker, colormap_table, heatmap_to_display, model_layout)

logger = logging.getLogger("reg2rg.app.session")

AUTOSAVE_DELAY_MS = 800
NO_MASKS_REASON = ("No region masks: Reg2RG drafts region by region. Open them (File ▸ Open masks…) "
                   "or make them (File ▸ Segment regions…).")
SELECTION_DELAY_MS = 250          # a drag selects many spans: the attention of the last one only


class ReportEngineHandle(Protocol):
    """What the session asks of an engine (the in-process `ReportEngine`, or a remote one)."""

    model_dir: Any

    def generate(self, study, regions=None, settings=None, cancel=None): ...

    def attention_map(self, result, token_indices, layers="all", heads="mean"): ...


class NoDraftError(ValueError):
    """An export or a review asked for while there is no draft."""


@dataclass
class HeatLayer:
    """The attention map shown over the CT, and how it is drawn."""

    amap: Any = None                       # engine RelevanceMap or AttentionMap (None: nothing to show)
    dependence: Any = None                 # engine RegionDependence of the same selection (None: not known)
    label: str = ""                        # what was selected ("Heart: “enlarged”")
    codes: np.ndarray | None = None        # uint8 heat codes in display order (see `heat.heatmap_to_display`)
    colormap: str = "Hot"
    opacity: float = 0.6
    visible: bool = True

    def table(self) -> np.ndarray:
        return colormap_table(self.colormap)

    @property
    def shown(self) -> bool:
        return self.visible and self.codes is not None


@dataclass
class AttentionSelection:
    """The words of the draft whose attention is asked for."""

    key: Any                               # the section (`DraftSection.key`)
    start: int
    end: int
    token_indices: list[int] = field(default_factory=list)
    label: str = ""


class ReviewerSettings:
    """The reviewer's name, remembered between sessions in ``<user data>/viewer.json``."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else user_data_dir() / "viewer.json"

    def load(self) -> str:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        name = data.get("reviewer", "") if isinstance(data, dict) else ""
        return name if isinstance(name, str) else ""

    def save(self, name: str) -> None:
        from reg2rg.engine.fileio import atomic_write, ensure_folder

        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        data["reviewer"] = name
        ensure_folder(self.path.parent)
        with atomic_write(self.path) as f:
            f.write(json.dumps(data, indent=1))


class DraftWorker(GenerationWorker):
    """A generation that also records the provenance of the draft (model identity, digest, settings) and
    runs the engine's findings check (omission/contradiction flags per region) on the worker thread:
    hashing a large model's weights or scoring findings never blocks the GUI."""

    findings_check = True

    def _consume(self) -> None:
        self.provenance = provenance_for(self.engine, self.settings)
        super()._consume()

    def on_result(self, result) -> None:
        if not (self.findings_check and hasattr(self.engine, "finding_check") and getattr(result, "tokens", None)
                and getattr(result, "prepared", None) is not None and not result.cancelled):
            return
        try:
            self.engine.finding_check(result)
        except Exception as exc:  # noqa: BLE001 - the draft stands without its findings check
            logger.warning("findings check failed: %s", describe_engine_error(exc))


class DraftingSession(QObject):
    """The drafting session (see the module docstring)."""

    modelChanged = Signal()                 # model choice, engine or device changed
    busyChanged = Signal(bool)              # a model load or a generation started / ended
    statusChanged = Signal(str)             # one line for the status label
    encodingStarted = Signal(object)        # engine EncodingStarted
    encodingDone = Signal(object)           # engine EncodingDone
    tokenStreamed = Signal(object)          # engine TokenEvent
    resultReady = Signal(object)            # engine DraftResult
    generationFinished = Signal()           # a generation attempt ended (done, stopped, failed)
    draftReplaced = Signal()                # a new draft (or none): views rebuild their sections
    sectionChanged = Signal(object)         # the key of a section whose text or state changed
    draftChanged = Signal()                 # anything in the draft changed (autosave, banner, review line)
    regionsChanged = Signal()               # the regions that can be drafted (a new study)
    restoreOffered = Signal(object)         # SavedDraft left by a crash: a view asks, then restore()/discard_restore()
    reviewerNeeded = Signal()               # accept/reject waits for the reviewer's name (set_reviewer / cancel_review)
    maskCheckNeeded = Signal(list)          # the masks may not belong to this CT: a view asks, then
                                            # draft_despite_masks() or nothing
    errorOccurred = Signal(str)
    engineUnavailable = Signal(str, bool)   # the engine server failed: message, retry offered (then retry())
    selectionChanged = Signal()             # the attention selection
    attentionStarted = Signal(str)          # an attention map is being computed for this label
    attentionFailed = Signal(str)
    heatLayerChanged = Signal()             # the heat layer (map, colour map, opacity, visibility)
    findingsChanged = Signal()              # a Findings check arrived (or was cleared)

    def __init__(self, document: ViewerDocument, parent: QObject | None = None, store: DraftStore | None = None,
                 reviewer_settings: ReviewerSettings | None = None) -> None:
        super().__init__(parent)
        from reg2rg.engine.generation import GenerationSettings

        self.document = document
        self.store = store or DraftStore()
        self.reviewer_settings = reviewer_settings or ReviewerSettings()
        self.reviewer = self.reviewer_settings.load()
        self.engine: ReportEngineHandle | None = None
        self.model_choice = ModelChoice()
        self.device = "auto"
        self.settings = GenerationSettings()
        self.draft: ReportDraft | None = None
        self.results: dict = {}             # section key -> the DraftResult its tokens belong to
        self.selected_regions: list[str] | None = None
        self.selection: AttentionSelection | None = None
        self.heat = HeatLayer()
        self.attention_layers: str | list[int] = "all"
        self.attention_heads: str | list[int] = "mean"
        self.explanation_method = "relevance"   # "relevance" (evidence, default) | "raw" (attention weights)
        from reg2rg.engine.explain.findings import DEFAULT_OMISSION_THRESHOLD

        self.omission_threshold = DEFAULT_OMISSION_THRESHOLD
        self.findings: dict = {}            # section key -> its Findings check (explain.findings.SectionFindings)
        self._findings_jobs = WorkerJobs(self)
        self.status = "Open a study to draft a report"
        self.confidence_threshold = 0.5
        self._jobs = WorkerJobs(self)
        self._worker: GenerationWorker | None = None
        self._loading = False
        self._unavailable = False          # the current failure was said by engineUnavailable
        self._last_request: tuple = (None, None)
        self._after_load: tuple | None = None
        self._regenerating: str | None = None
        self._pending_review: tuple | None = None
        self._masks_acknowledged = None     # the study whose mask problems the reader chose to draft past
        self._pending_generate: tuple | None = None
        self._attention_worker: AttentionWorker | None = None
        self._attention_pending: tuple | None = None
        self._selection_timer = QTimer(self)
        self._selection_timer.setSingleShot(True)
        self._selection_timer.setInterval(SELECTION_DELAY_MS)
        self._selection_timer.timeout.connect(self._request_selected)
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave.timeout.connect(self.autosave_now)
        document.studyChanged.connect(self._on_study)

    # -- status ------------------------------------------------------------------------------
    def _set_status(self, text: str) -> None:
        self.status = text
        self.statusChanged.emit(text)

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._loading

    def can_generate(self) -> bool:
        return self.generate_blocked_reason() is None and not self.busy

    def generate_blocked_reason(self) -> str | None:
        """Why Generate is off (None when it is on): no study, or a study without region masks."""
        study = self.document.study
        if study is None:
            return "Open a study to draft a report"
        if not study.regions_present:
            return NO_MASKS_REASON
        return None

    # -- model, device, settings ---------------------------------------------------------------
    def set_engine(self, engine) -> None:
        """Draft with this engine (injected by tests, or after a model was loaded)."""
        self.engine = engine
        self.modelChanged.emit()

    def set_model(self, choice: ModelChoice) -> None:
        """Draft with this model from the next generation on (loaded then, off the GUI thread)."""
        self.model_choice = choice
        self.engine = None
        self.modelChanged.emit()

    def set_model_dir(self, path: str | None) -> None:
        """A model folder (None: the embedded demo model)."""
        self.set_model(ModelChoice("folder", path) if path else ModelChoice())

    def set_device(self, device: str) -> None:
        if device == self.device:
            return
        self.device = device
        if self.engine is not None and not self.busy:
            self.engine = None              # the next generation loads the model on the new device
        self.modelChanged.emit()

    def set_settings(self, settings) -> None:
        """The decoding settings of the next generation (`GenerationSettings`)."""
        self.settings = settings

    def set_regions(self, regions: list[str] | None) -> None:
        """The regions to draft (None: every region with a mask)."""
        self.selected_regions = list(regions) if regions is not None else None

    def model_dir(self) -> Path | None:
        """The folder of the model in use (or chosen): the loaded engine's, else the choice's."""
        from reg2rg.engine.generation import default_model_dir

        if self.model_choice.kind == "server":
            return None                     # the model folder is on the engine server
        if self.engine is not None and getattr(self.engine, "model_dir", None) is not None:
            return Path(self.engine.model_dir)
        if self.engine is not None:
            return None                     # a model built in memory
        if self.model_choice.kind == "folder":
            return Path(self.model_choice.path)
        if self.model_choice.kind == "published":
            return Path(self.model_choice.checkpoint).parent
        return default_model_dir()

    def model_name(self) -> str:
        """A short name for the panel: "embedded demo", a folder's name, or checkpoint + LLaMA."""
        from reg2rg.engine.generation import default_model_dir

        if self.model_choice.kind == "server":
            return self.engine.describe() if self.engine is not None else self.model_choice.describe()
        if self.engine is not None:
            where = getattr(self.engine, "model_dir", None)
            if where is None:
                return "in memory"
            try:
                if Path(where).resolve() == default_model_dir().resolve():
                    return "embedded demo"
            except OSError:
                pass
            return Path(where).name
        return self.model_choice.describe()

    def validation_status(self) -> tuple[bool, str]:
        """(validated, what to show): a model is validated only with a ``validation.json`` record."""
        from reg2rg.engine.generation import default_model_dir

        if self.model_choice.kind == "server":
            ident = self.engine.model_identity() if self.engine is not None else {}
            return (True, f"validated ({ident.get('validation', '')})") if ident.get("validated") else \
                (False, "not validated" + (" (model on the engine server)" if not ident else ""))
        folder = self.model_dir()
        if folder is None:
            return False, "not validated (built in memory)"
        try:
            if folder.resolve() == default_model_dir().resolve():
                return False, "not validated (demonstration model)"
        except OSError:
            pass
        ok, what = read_validation(folder)
        return ok, (f"validated ({what})" if ok else "not validated")

    # -- generation --------------------------------------------------------------------------
    def generate(self, regions: list[str] | None = None, regenerate: str | None = None) -> None:
        """Draft the report (or one region's section again); loads the engine first when needed. When the
        masks may not belong to this CT (`Study.mask_problems`) the reader is asked first (`maskCheckNeeded`);
        they may proceed (`draft_despite_masks`)."""
        if not self.can_generate():
            return
        study = self.document.study
        if getattr(study, "mask_problems", None) and self._masks_acknowledged is not study:
            self._pending_generate = (regions, regenerate)
            self.maskCheckNeeded.emit(list(study.mask_problems))
            return
        if self.engine is None:
            self._loading = True
            self.busyChanged.emit(True)
            self._set_status("Loading the model…")
            loader = EngineLoader(self.model_choice, self.device)
            self._after_load = (regions, regenerate)
            loader.loaded.connect(self._on_engine_loaded)      # bound methods: queued onto the GUI thread
            loader.failed.connect(self._on_load_failed)
            self._jobs.start(loader)
            return
        regions = [regenerate] if regenerate else (regions or self.selected_regions or None)
        self._regenerating = regenerate
        worker = DraftWorker(self.engine, self.document.study, regions, self.settings)
        worker.encodingStarted.connect(self._on_encoding_started)
        worker.encodingDone.connect(self._on_encoding_done)
        worker.tokenGenerated.connect(self._on_token)
        worker.finished.connect(self._on_finished)
        worker.failed.connect(self._on_failed)
        worker.unavailable.connect(self._on_unavailable)
        worker.done.connect(self._on_done)
        self._worker = worker
        self._last_request = (regions if not regenerate else None, regenerate)
        self.busyChanged.emit(True)
        self._set_status("Starting…")
        self._jobs.start(worker)

    def draft_despite_masks(self) -> None:
        """The reader saw the mask problems and drafts anyway (asked once per study)."""
        self._masks_acknowledged = self.document.study
        pending, self._pending_generate = self._pending_generate, None
        if pending is not None:
            self.generate(*pending)

    def regenerate(self, region: str) -> None:
        if region:
            self.generate(regenerate=region)

    def stop(self) -> None:
        """Stop the generation after the current token (the draft keeps what was written, marked stopped)."""
        if self._worker is not None:
            self._worker.cancel()
            self._set_status("Stopping…")

    def _on_engine_loaded(self, engine) -> None:
        self._loading = False
        self.set_engine(engine)
        regions, regenerate = self._after_load or (None, None)
        self.generate(regions, regenerate)

    def _on_load_failed(self, message: str) -> None:
        self._loading = False
        self._set_status("Generation failed")
        self.errorOccurred.emit(message)
        self.busyChanged.emit(False)
        self.generationFinished.emit()

    def _on_encoding_started(self, ev) -> None:
        self._set_status(f"Encoding {len(ev.regions)} region(s)…")
        self.encodingStarted.emit(ev)

    def _on_encoding_done(self, ev) -> None:
        self._set_status(f"Writing… (prompt {ev.prompt_tokens} tokens, encoded in {ev.seconds:.1f} s)")
        self.encodingDone.emit(ev)

    def _on_token(self, ev) -> None:
        self._set_status(f"Writing… {ev.index + 1} tokens")
        self.tokenStreamed.emit(ev)

    def _on_finished(self, result) -> None:
        study = self.document.study
        if study is None:
            return
        provenance = getattr(self._worker, "provenance", None)
        if self._regenerating and self.draft is not None:
            one = ReportDraft.from_result(result, study, study_key=self.draft.study_key, provenance=provenance)
            for s in one.sections:
                if s.region == self._regenerating:
                    self.draft.replace_section(s)
                    self.results[s.key] = result
            self._clear_heat()
            self.resultReady.emit(result)
            self.draftReplaced.emit()
        else:
            self.draft = ReportDraft.from_result(result, study, study_key=study_key(study), provenance=provenance)
            if self.reviewer:
                self.draft.reviewer = self.reviewer
            self.draft.confidence_threshold = self.confidence_threshold
            self.results = {sec.key: result for sec in self.draft.sections if sec.tokens}
            self.findings = {}
            self._clear_heat()
            self.resultReady.emit(result)
            self.draftReplaced.emit()
        how = f"{len(result.tokens)} tokens" if getattr(result, "complete", True) else "stopped"
        self._set_status(f"Draft ready ({how})")
        self._changed()
        self.check_findings(result)

    def _on_failed(self, message: str) -> None:
        if self._unavailable:                 # said by engineUnavailable (with a retry), not twice
            self._unavailable = False
            return
        self._set_status("Generation failed")
        self.errorOccurred.emit(message)

    def _on_unavailable(self, message: str, retry: bool) -> None:
        """The engine server failed (network, restart, 401, 4xx/5xx): the draft so far is already kept,
        marked stopped; a view shows the message and offers `retry` when it can help."""
        self._unavailable = True
        self._set_status("Engine server unavailable — draft so far kept" if self.draft is not None
                         else "Engine server unavailable")
        self.engineUnavailable.emit(message, retry)

    def retry(self) -> None:
        """Draft again what the last generation asked for (after the engine server failed)."""
        regions, regenerate = getattr(self, "_last_request", (None, None))
        self.generate(regions, regenerate)

    def _on_done(self) -> None:
        self._worker = None
        self._regenerating = None
        self.busyChanged.emit(False)
        self.generationFinished.emit()

    # -- review ------------------------------------------------------------------------------
    def edit_section(self, key, text: str) -> None:
        """The reader typed in a section."""
        if self.draft is not None and self.draft.set_text(key, text):
            self.sectionChanged.emit(key)
            self._changed()

    def accept(self, key) -> None:
        self._review(key, ACCEPTED)

    def reject(self, key) -> None:
        self._review(key, REJECTED)

    def _review(self, key, state: str) -> None:
        if self.draft is None:
            return
        if not self.reviewer:                  # asked once, then remembered
            self._pending_review = (key, state)
            self.reviewerNeeded.emit()
            return
        (self.draft.accept if state == ACCEPTED else self.draft.reject)(key, reviewer=self.reviewer)
        self.sectionChanged.emit(key)
        self._changed()

    def set_reviewer(self, name: str) -> None:
        """The reader's name (remembered for the next sessions); finishes an accept/reject that waited."""
        name = " ".join(name.split())
        if not name:
            self.cancel_review()
            return
        self.reviewer = name
        try:
            self.reviewer_settings.save(name)
        except OSError as exc:
            self.errorOccurred.emit(f"could not remember the reviewer's name: {exc}")
        if self.draft is not None:
            self.draft.reviewer = name
        pending, self._pending_review = self._pending_review, None
        if pending is not None:
            self._review(*pending)

    def cancel_review(self) -> None:
        self._pending_review = None

    def reset(self, key) -> None:
        if self.draft is not None:
            self.draft.reset(key)
            self.sectionChanged.emit(key)
            self._changed()

    def set_impression(self, text: str) -> None:
        if self.draft is not None and self.draft.set_impression(text):
            self._changed()

    def seed_impression(self) -> str:
        """Start the impression from the sentences that report a finding (returns the new impression)."""
        if self.draft is None:
            return ""
        self.set_impression(self.draft.seed_impression())
        return self.draft.impression

    def set_confidence_threshold(self, threshold: float) -> None:
        """Words below this probability are flagged (on screen and in every export)."""
        self.confidence_threshold = float(threshold)
        if self.draft is not None and self.draft.confidence_threshold != self.confidence_threshold:
            self.draft.confidence_threshold = self.confidence_threshold
            self._changed()

    def _changed(self) -> None:
        self._autosave.start()
        self.draftChanged.emit()

    # -- export ------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write the draft as ``fmt`` (default: from the file name: .pdf .txt .json .sr.dcm .fhir.json).
        Raises `NoDraftError` without a draft, `ExportError`/`OSError` naming the file otherwise."""
        if self.draft is None:
            raise NoDraftError("there is no report draft to export: open a study and press Generate first")
        return write_report(self.draft, path, fmt)

    # -- autosave and restore ------------------------------------------------------------------
    def autosave_now(self) -> None:
        if self.draft is not None:
            try:
                self.store.save(self.draft, clean=False)
            except OSError as exc:          # fileio.OutputError: names the file and the problem
                self.errorOccurred.emit(f"could not autosave the draft: {exc}")

    def close_study_cleanly(self) -> None:
        """Normal close: save the draft marked clean so reopening restores it without a prompt."""
        self._autosave.stop()
        if self._worker is not None:
            self._worker.cancel()
        if self.draft is not None:
            try:
                self.store.save(self.draft, clean=True)
            except OSError:
                logger.warning("could not save the draft on close")

    def restore(self, draft: ReportDraft, message: str = "Restored the saved draft") -> None:
        """Open a saved draft (it has no model run behind it: attention needs a new draft)."""
        self.draft = draft
        self.results = {}
        self.findings = {}
        self.confidence_threshold = draft.confidence_threshold
        if self.reviewer and not draft.reviewer:
            draft.reviewer = self.reviewer
        self._clear_heat()
        self.draftReplaced.emit()
        self._set_status(message)
        self.draftChanged.emit()

    def discard_restore(self, key: str) -> None:
        self.store.discard(key)

    def _on_study(self) -> None:
        study = self.document.study
        if self.draft is not None and (study is None or self.draft.study_key != study_key(study)):
            self.close_study_cleanly()
        self.draft = None
        self.results = {}
        self.findings = {}
        self.selection = None
        self._clear_heat()
        self.draftReplaced.emit()
        self.draftChanged.emit()
        self.regionsChanged.emit()
        self._pending_generate = None
        if study is None:
            self._set_status("Open a study to draft a report")
            return
        self._set_status(self.generate_blocked_reason() or f"{len(study.regions_present)} region(s) to report on")
        try:
            saved = self.store.load(study_key(study))
        except DraftFileError as exc:
            self.errorOccurred.emit(str(exc))
            return
        if saved is None:
            return
        if saved.clean:
            self.restore(saved.draft, f"Restored {saved.describe()}")
        else:
            self.restoreOffered.emit(saved)

    def accept_restore(self, saved: SavedDraft) -> None:
        self.restore(saved.draft, f"Restored {saved.describe('autosaved')}")

    # -- attention and the heat layer ------------------------------------------------------------
    def select_span(self, key, start: int, end: int) -> None:
        """Words selected in a section: their attention is computed once the selection settles."""
        self._selected_span = (key, start, end)
        self._selection_timer.start()

    def _request_selected(self) -> None:
        span = getattr(self, "_selected_span", None)
        if span is not None:
            self.request_attention(*span)

    def attention_layout(self) -> tuple[int, int]:
        """(layers, heads) of the engine's language model."""
        if self.engine is None:
            raise AttentionRequestError("no model is loaded")
        return model_layout(self.engine)

    def set_attention_aggregation(self, layers: str | list[int] = "all", heads: str | list[int] = "mean") -> None:
        """How layers and heads are combined (``"all"``, ``"last"`` or layer indices; ``"mean"`` or head
        indices); the current selection is computed again."""
        self.attention_layers, self.attention_heads = layers, heads
        if self.selection is not None:
            self.request_attention(self.selection.key, self.selection.start, self.selection.end)

    def request_attention(self, key, start: int | None = None, end: int | None = None) -> list[int]:
        """The attention of the generated words of section ``key`` overlapping ``[start, end)`` (the whole
        section by default), computed off the GUI thread into the heat layer. Returns the token indices."""
        if self.draft is None:
            return []
        section = self.draft.section(key)
        result = self.results.get(key)
        if result is None or self.engine is None:
            self._set_status("Attention needs the draft's model run: regenerate to see where it looked")
            return []
        if section.is_edited:
            self._set_status("This section was edited: reset it to see the model's attention")
            return []
        start = 0 if start is None else start
        end = len(section.text) if end is None else end
        picked = [t for t in section.tokens if t.start < end and t.end > start and t.text.strip()]
        if not picked:
            return []
        idx = [t.index for t in picked]
        words = section.text[max(0, min(t.start for t in picked)):max(t.end for t in picked)].strip()
        label = f"{section.title}: “{words if len(words) <= 90 else words[:87] + '…'}”"
        self.selection = AttentionSelection(key, start, end, idx, label)
        self.selectionChanged.emit()
        try:
            n_layers, _n_heads = self.attention_layout()
        except AttentionRequestError as exc:
            self.attentionFailed.emit(str(exc))
            return idx
        layers = [n_layers - 1] if self.attention_layers == "last" else self.attention_layers
        job = (self.engine, result, idx, label, layers, self.attention_heads)
        if self._attention_worker is not None:     # one map at a time; the latest selection wins
            self._attention_pending = job
        else:
            self._start_attention(*job)
        return idx

    def set_explanation_method(self, method: str) -> None:
        """``"relevance"`` (gradient × input, the evidence) or ``"raw"`` (attention weights); the current
        selection is computed again."""
        if method not in ("relevance", "raw"):
            raise AttentionRequestError(f"unknown explanation {method!r}; use 'relevance' or 'raw'")
        self.explanation_method = method
        if self.selection is not None:
            self.request_attention(self.selection.key, self.selection.start, self.selection.end)

    def _start_attention(self, engine, result, idx, label, layers, heads) -> None:
        worker = AttentionWorker(engine, result, idx, layers, heads, self.explanation_method)
        worker.finished.connect(self._on_attention_map)     # bound: runs on the GUI thread
        worker.failed.connect(self.attentionFailed)
        worker.done.connect(self._on_attention_done)
        self._attention_worker = worker
        self._attention_label = label
        self.attentionStarted.emit(label)
        self._jobs.start(worker)

    def attention_busy(self) -> bool:
        return self._attention_worker is not None

    def _on_attention_done(self) -> None:
        self._attention_worker = None
        if self._attention_pending is not None:
            job, self._attention_pending = self._attention_pending, None
            self._start_attention(*job)

    def _on_attention_map(self, amap, dependence=None) -> None:
        vol = self.document.volume
        if vol is None:
            return
        try:
            codes = heatmap_to_display(amap.heatmap, vol)
        except AttentionRequestError as exc:
            self.attentionFailed.emit(str(exc))
            return
        self.heat.amap, self.heat.label, self.heat.codes = amap, self._attention_label, codes
        self.heat.dependence = dependence
        self.heatLayerChanged.emit()

    def set_heat_style(self, colormap: str | None = None, opacity: float | None = None,
                       visible: bool | None = None) -> None:
        """How the heat layer is drawn (colour map name, opacity 0..1, shown or hidden)."""
        if colormap is not None:
            self.heat.colormap = colormap
        if opacity is not None:
            self.heat.opacity = float(opacity)
        if visible is not None:
            self.heat.visible = bool(visible)
        self.heatLayerChanged.emit()

    def _clear_heat(self) -> None:
        self.heat.amap, self.heat.label, self.heat.codes = None, "", None
        self.heat.dependence = None
        self.selection = None
        self.heatLayerChanged.emit()

    def clear_heat(self) -> None:
        """Forget the attention map (the views stop drawing it)."""
        self._clear_heat()

    def save_heatmap(self, path: str | os.PathLike) -> Path:
        """Write the current heatmap as NIfTI on the CT grid (float32, the CT's affine)."""
        if self.heat.amap is None:
            raise AttentionRequestError("there is no attention map to save; select words in the draft first")
        return Path(self.heat.amap.save_nifti(path))

    def peak_voxel(self):
        """The display voxel with the most attention (None without a map)."""
        vol = self.document.volume
        if self.heat.amap is None or vol is None:
            return None
        return vol.from_stored(self.heat.amap.peak_voxel)


    def peak_description(self) -> str:
        """Where the current map peaks, in the reader's words: the region mask(s) holding its maximum, or
        'outside the region masks' ("" without a map)."""
        study = self.document.study
        if self.heat.amap is None or study is None:
            return ""
        peak = self.heat.amap.peak_voxel
        inside = [r for r, m in (study.masks or {}).items() if m is not None and m.shape == study.shape and m[peak]]
        return f"in {', '.join(inside)}" if inside else "outside the region masks"

    def wait_for_background(self, timeout_ms: int = 120_000, deliver: bool = True) -> bool:
        """Wait for the session's worker threads (loading, drafting, attention, findings check) to end,
        then (``deliver``) hand over their results; True when none is still running. For a headless run
        that must not take its screenshot, and a window that must not close, while a thread still works."""
        done = self._jobs.wait(timeout_ms) and self._findings_jobs.wait(timeout_ms)
        if deliver:
            QCoreApplication.processEvents()
        return done

    # -- findings check ----------------------------------------------------------------------
    def check_findings(self, result) -> None:
        """The Findings check of ``result`` (`engine.finding_check`), off the GUI thread; the sections it
        belongs to get it when it arrives (``findingsChanged``)."""
        from .findings_check import FindingsWorker

        if (self.engine is None or result is None or not result.tokens or not hasattr(self.engine, "finding_check")
                or getattr(result, "prepared", None) is None):
            return
        worker = FindingsWorker(self.engine, result, self.omission_threshold)
        worker.finished.connect(self._on_findings)           # bound: runs on the GUI thread
        worker.failed.connect(lambda msg: self._set_status(f"Findings check failed: {msg}"))
        self._findings_jobs.start(worker)

    def _on_findings(self, result, check) -> None:
        if self.draft is None:
            return
        for sec in check.sections:
            for s in self.draft.sections:
                if self.results.get(s.key) is result and s.region == sec.region:
                    self.findings[s.key] = sec
        self.findingsChanged.emit()

    def set_omission_threshold(self, threshold: float) -> None:
        """Flag unreported findings the model rates at least this likely; the draft is checked again."""
        self.omission_threshold = float(threshold)
        for result in {id(r): r for r in self.results.values()}.values():
            self.check_findings(result)


__all__ = ["DraftingSession", "HeatLayer", "AttentionSelection", "NoDraftError", "ExportError", "ReviewerSettings",
           "ReportEngineHandle", "section_from_result"]
