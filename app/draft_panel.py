"""The draft panel: generate, stream, edit, accept, regenerate and export a region-by-region report."""

from __future__ import annotations

import logging
import re
from html import escape
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor, QTextDocument
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QTextEdit,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from reg2rg.engine.regions import REGIONS

from .document import ViewerDocument
from .draft import (
    ACCEPTED,
    EDITED,
    NOT_DRAFTED,
    DraftFileError,
    DraftSection,
    DraftStore,
    ReportDraft,
    export_json,
    export_text,
    section_from_result,
    study_key,
)
from .generation import EngineLoader, GenerationWorker, ModelChoice, WorkerJobs

logger = logging.getLogger("reg2rg.app.draft")

AUTOSAVE_DELAY_MS = 800
LOW_CONFIDENCE = "low\u2011confidence"     # a non-breaking hyphen: the header never wraps inside the word
EDITOR_MIN_H, EDITOR_MAX_H = 34, 220     # a section editor's height range (pixels), fitted to its text
NO_MASKS_REASON = ("No region masks: Reg2RG drafts region by region. Open them (File ▸ Open masks…) "
                   "or make them (File ▸ Segment regions…).")


def confidence_color(prob: float, threshold: float) -> QColor:
    """Background for a token below the threshold: red when very unsure, amber near the threshold."""
    t = max(0.0, min(1.0, prob / max(threshold, 1e-6)))
    return QColor(int(200 + 30 * t), int(50 + 130 * t), 50, 150)


def describe_model_dir(path) -> str:
    """A short model name for the panel: "embedded demo" for the demo model, else the folder's name."""
    if not path:
        return "in memory"
    from reg2rg.engine.generation import default_model_dir

    try:
        if Path(path).resolve() == default_model_dir().resolve():
            return "embedded demo"
    except OSError:
        pass
    return Path(path).name


def sentence_span(text: str, pos: int) -> tuple[int, int]:
    """The sentence of ``text`` around character ``pos``: [start, end) without surrounding spaces."""
    pos = max(0, min(pos, len(text)))
    start = 0
    for m in re.finditer(r"[.!?;](\s+|$)", text):
        if m.end() <= pos:
            start = m.end()
        else:                                   # the first terminator at or after pos ends the sentence
            end = m.start() + 1
            break
    else:
        end = len(text)
    while start < end and text[start].isspace():
        start += 1
    return start, max(start, end)


def token_tooltip(tok) -> str:
    """Rich text for a word's tooltip: its probability and the model's top alternatives."""
    word = escape(tok.text.strip() or "␣")
    rows = "".join(
        f"<tr><td>{escape(a.strip() or '␣')}</td><td align='right'>&nbsp;{p:.1%}</td></tr>" for a, p in tok.top[:5])
    return (f"<b>{word}</b> — probability {tok.prob:.1%}"
            + (f"<br><span style='color:#888'>top alternatives</span><table>{rows}</table>" if rows else ""))


class SectionEditor(QFrame):
    """One region section: header (region, grounding, state, low-confidence words), text, actions."""

    textEdited = Signal(object, str)      # slot, text
    acceptRequested = Signal(object)
    resetRequested = Signal(object)
    regenerateRequested = Signal(str)     # region
    spanSelected = Signal(object, int, int)   # slot, start, end (characters of the section text)

    def __init__(self, section: DraftSection, parent=None) -> None:
        super().__init__(parent)
        self.section = section
        self.setFrameShape(QFrame.StyledPanel)
        self.setObjectName(f"section_{section.slot}")
        # As tall as its content, never stretched: spare room in the draft list stays below the sections.
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        self.header = QLabel()
        self.header.setTextFormat(Qt.RichText)
        self.low_label = QLabel()
        self.low_label.setStyleSheet("color: #c9a15a; font-size: 11px;")
        self.low_label.setWordWrap(True)
        self.editor = QTextEdit()
        self.editor.setAcceptRichText(False)
        self.editor.setPlainText(section.text)
        self.editor.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded)
        # The editor is as tall as its text (within limits): short sections take little room, so
        # several sections fit on screen, and the draft list scrolls instead of squashing them.
        self.editor.document().documentLayout().documentSizeChanged.connect(lambda _s: self._fit_height())
        self.editor.viewport().installEventFilter(self)
        self.editor.textChanged.connect(lambda: self.textEdited.emit(self.section.slot, self.editor.toPlainText()))
        self.accept_button = QPushButton("Accept")
        self.reset_button = QPushButton("Reset")
        self.regenerate_button = QPushButton("Regenerate")
        self.accept_button.clicked.connect(lambda: self.acceptRequested.emit(self.section.slot))
        self.reset_button.clicked.connect(lambda: self.resetRequested.emit(self.section.slot))
        self.regenerate_button.clicked.connect(lambda: self.regenerateRequested.emit(self.section.region or ""))
        self.regenerate_button.setEnabled(bool(section.region))
        self.attention_button = QPushButton("Attention")
        self.attention_button.setToolTip("Where the model looked while writing this section")
        self.attention_button.clicked.connect(
            lambda: self.spanSelected.emit(self.section.slot, 0, len(self.section.text)))
        self.editor.selectionChanged.connect(self._on_selection)
        self.editor.setToolTip("")
        # The actions sit on the header line (small buttons): more sections fit on screen at once.
        self.header.setWordWrap(True)
        top = QHBoxLayout()
        top.setSpacing(3)
        top.addWidget(self.header, 1)
        for b in (self.attention_button, self.accept_button, self.regenerate_button, self.reset_button):
            b.setObjectName("section_action")
            b.setStyleSheet("QPushButton { padding: 1px 7px; }")
            top.addWidget(b)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 5)
        lay.setSpacing(3)
        lay.addLayout(top)
        lay.addWidget(self.editor)
        lay.addWidget(self.low_label)
        self.threshold = 0.5
        self.colour_on = False
        self.refresh()

    def _fit_height(self) -> None:
        doc_h = self.editor.document().size().height()
        frame = 2 * self.editor.frameWidth() + 6
        self.editor.setFixedHeight(int(max(EDITOR_MIN_H, min(EDITOR_MAX_H, doc_h + frame))))

    def refresh(self) -> None:
        self._update_header()
        s = self.section
        mismatch = s.slot is not None and not s.grounding_ok
        self.setProperty("grounding_mismatch", mismatch)
        self.setStyleSheet("SectionEditor { border: %s; }" % ("2px solid #d0603f" if mismatch else "1px solid #3b424d"))
        if self.editor.toPlainText() != s.text:
            self.editor.blockSignals(True)
            self.editor.setPlainText(s.text)
            self.editor.blockSignals(False)
        self.apply_confidence(self.colour_on, self.threshold)

    def _update_header(self) -> None:
        """Region, slot, state, the count of words below the threshold, and any grounding mismatch."""
        s = self.section
        state = {ACCEPTED: "<span style='color:#6fcf7f'>✔ accepted</span>",
                 EDITED: "<span style='color:#8fb8ff'>✎ edited</span>",
                 NOT_DRAFTED: f"<span style='color:#e0a050'>not drafted: {escape(s.note or 'no text')}</span>",
                 }.get(s.state, "<span style='color:#999'>draft</span>")
        slot = f"region {s.slot}" if s.slot is not None else "report"
        grounding = "" if s.grounding_ok or s.slot is None or s.state == NOT_DRAFTED else (
            f" &nbsp;<span style='color:#ff7a5c'>⚠ the model named “{s.area or 'no area'}”, "
            f"the mask is {s.region or 'missing'}</span>")
        n_low = len(s.low_confidence(self.threshold if hasattr(self, "threshold") else 0.5))
        low = (f" &nbsp;<span style='color:#e0a050'>{n_low}&nbsp;{LOW_CONFIDENCE}</span>" if n_low else "")
        # The slot number is for checking against the prompt, not for reading: it lives in the tooltip.
        self.header.setToolTip(f"{slot} of the prompt" + (f" · mask: {s.region}" if s.region else ""))
        self.header.setText(f"<b>{s.title}</b> &nbsp;{state}{low}{grounding}")

    def apply_confidence(self, on: bool, threshold: float) -> None:
        """Colour words below ``threshold``; list the section's lowest-confidence words."""
        self.colour_on, self.threshold = on, threshold
        self._update_header()
        s = self.section
        low = s.low_confidence(threshold)
        words = ", ".join(f"{t.text.strip()} ({t.prob:.0%})" for t in low[:5])
        self.low_label.setText(f"{len(low)} word(s) below {threshold:.0%} — lowest: {words}" if low else "")
        self.low_label.setVisible(bool(low))
        selections = []
        if on and not s.is_edited:              # offsets only hold for the generated text
            for t in low:
                sel = QTextEdit.ExtraSelection()
                cur = QTextCursor(self.editor.document())
                cur.setPosition(t.start)
                cur.setPosition(t.end, QTextCursor.KeepAnchor)
                fmt = QTextCharFormat()
                fmt.setBackground(confidence_color(t.prob, threshold))
                sel.cursor, sel.format = cur, fmt
                selections.append(sel)
        self.editor.setExtraSelections(selections)

    def token_at(self, pos: int):
        if self.section.is_edited:
            return None
        return next((t for t in self.section.tokens if t.start <= pos < t.end), None)

    def tooltip_at(self, pos) -> str:
        """The tooltip for a viewport position: the word's probability and alternatives ("" if none)."""
        tok = self.token_at(self.editor.cursorForPosition(pos).position())
        return token_tooltip(tok) if tok is not None else ""

    def _on_selection(self) -> None:
        cur = self.editor.textCursor()
        if cur.hasSelection():
            self.spanSelected.emit(self.section.slot, cur.selectionStart(), cur.selectionEnd())

    def eventFilter(self, obj: QObject, ev: QEvent) -> bool:  # noqa: N802
        if ev.type() == QEvent.ToolTip:
            tip = self.tooltip_at(ev.pos())
            if tip:
                QToolTip.showText(ev.globalPos(), tip, self.editor)
            else:
                QToolTip.hideText()
            return True
        if ev.type() == QEvent.MouseButtonRelease and ev.modifiers() & Qt.ControlModifier:
            # Ctrl+click: the whole sentence under the mouse
            pos = self.editor.cursorForPosition(ev.position().toPoint()).position()
            a, b = sentence_span(self.editor.toPlainText(), pos)
            if b > a:
                self.spanSelected.emit(self.section.slot, a, b)
            return False
        return False


class DraftPanel(QWidget):
    """Drafting with the engine; observes the document's study, owns the ReportDraft and its autosave."""

    errorOccurred = Signal(str)
    tokenStreamed = Signal(object)        # engine TokenEvent, re-emitted on the GUI thread
    resultReady = Signal(object)          # engine DraftResult
    generationFinished = Signal()
    draftChanged = Signal()
    attentionRequested = Signal(object, object, str)   # DraftResult, token indices (list), description

    def __init__(self, document: ViewerDocument, parent=None, store: DraftStore | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.setObjectName("draft_panel")
        self.store = store or DraftStore()
        self.engine = None
        self.model_dir: str | None = None
        self.model_choice = ModelChoice()
        self.draft: ReportDraft | None = None
        self.restore_box: QMessageBox | None = None
        self.mask_check_box: QMessageBox | None = None
        self._masks_acknowledged = None     # the study whose mask problems the reader chose to draft past
        self._jobs = WorkerJobs(self)  # (thread, worker) pairs kept alive while they run
        self._worker: GenerationWorker | None = None
        self._regenerating: str | None = None
        self._editors: list[SectionEditor] = []
        self.results: dict = {}            # section slot -> the DraftResult its tokens belong to
        self._selection = None
        self._selection_timer = QTimer(self)
        self._selection_timer.setSingleShot(True)
        self._selection_timer.setInterval(250)   # a drag selects many spans; ask for the last one only
        self._selection_timer.timeout.connect(lambda: self._selection and self.request_attention(*self._selection))
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_DELAY_MS)
        self._autosave.timeout.connect(self.autosave_now)
        self._build()
        document.studyChanged.connect(self._on_study)

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.model_label = QLabel("Model: embedded demo")
        self.model_button = QToolButton()
        self.model_button.setText("Model ▾")
        self.model_button.setPopupMode(QToolButton.InstantPopup)
        menu = QMenu(self.model_button)
        menu.addAction("Embedded demo model", lambda: self.set_model(ModelChoice()))
        menu.addAction("Model folder…", self._choose_model)
        menu.addAction("Published checkpoint + LLaMA folder…", self._choose_published)
        self.model_button.setMenu(menu)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.device.setToolTip("Where the model runs (auto: CUDA when available)")
        self.device.currentTextChanged.connect(lambda _d: self._forget_engine())
        self.settings_button = QToolButton()
        self.settings_button.setText("Decoding ▸")
        self.settings_button.setCheckable(True)
        self.settings_button.toggled.connect(self._toggle_settings)
        row1 = QHBoxLayout()
        row1.addWidget(self.model_label, 1)
        for w in (self.model_button, QLabel("Device"), self.device, self.settings_button):
            row1.addWidget(w)
        self.settings_box = self._build_settings()
        self.settings_box.hide()
        self.region_list = QListWidget()
        self.region_list.setFlow(QListWidget.LeftToRight)
        self.region_list.setWrapping(True)
        self.region_list.setMaximumHeight(46)   # two rows of region check boxes
        self.generate_button = QPushButton("Generate")
        self.generate_button.setStyleSheet("QPushButton { background: #2f6f4f; font-weight: bold; }")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.generate_button.clicked.connect(lambda: self.generate())
        self.stop_button.clicked.connect(self.stop)
        self.status = QLabel("Open a study to draft a report")
        self.status.setWordWrap(True)
        self.busy = QProgressBar()
        self.busy.setMaximumHeight(8)
        self.busy.setTextVisible(False)
        self.busy.hide()
        row2 = QHBoxLayout()
        row2.addWidget(self.generate_button)
        row2.addWidget(self.stop_button)
        row2.addWidget(self.status, 1)
        self.colour_box = QCheckBox("Confidence colours")
        self.colour_box.setChecked(True)        # on by default: the draft opens showing where the model was unsure
        self.threshold = QSlider(Qt.Horizontal)
        self.threshold.setRange(5, 95)
        self.threshold.setValue(50)
        self.threshold_label = QLabel("50%")
        self.colour_box.toggled.connect(self._apply_confidence)
        self.threshold.valueChanged.connect(self._apply_confidence)
        row3 = QHBoxLayout()
        row3.addWidget(self.colour_box)
        row3.addWidget(self.threshold, 1)
        row3.addWidget(self.threshold_label)
        self.stream = QPlainTextEdit()
        self.stream.setReadOnly(True)
        self.stream.setPlaceholderText("The draft streams here while the model writes.")
        self.stream.setMaximumHeight(120)
        self.sections_host = QWidget()
        self.sections_layout = QVBoxLayout(self.sections_host)
        self.sections_layout.setContentsMargins(0, 0, 0, 0)
        self.sections_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.sections_host)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(row1)
        lay.addWidget(self.settings_box)
        lay.addWidget(self.region_list)
        lay.addLayout(row2)
        lay.addWidget(self.busy)
        lay.addLayout(row3)
        lay.addWidget(self.stream)
        lay.addWidget(scroll, 1)

    # -- engine ------------------------------------------------------------------------------
    def set_engine(self, engine) -> None:
        """Use this engine (injected by tests or after loading a model)."""
        self.engine = engine
        where = getattr(engine, "model_dir", None)
        self.model_label.setText(f"Model: {describe_model_dir(where)}")
        self.model_label.setToolTip(str(where or "a model built in memory"))

    def set_model(self, choice: ModelChoice) -> None:
        """Draft with this model from the next generation on (loaded then, off the GUI thread)."""
        self.model_choice = choice
        self.model_dir = choice.path if choice.kind == "folder" else (choice.checkpoint if choice.kind == "published" else None)
        self.engine = None
        self.model_label.setText(f"Model: {choice.describe()}")
        self.model_label.setToolTip(choice.describe(full=True))
        if getattr(self, "decoding_preset", None) is not None and self.decoding_preset.currentText() == "published":
            self._apply_decoding_preset()       # the published preset follows the new model's LLaMA folder

    def set_model_dir(self, path: str | None) -> None:
        """A model folder (None: the embedded demo model)."""
        self.set_model(ModelChoice("folder", path) if path else ModelChoice())

    def _forget_engine(self) -> None:
        if self.engine is not None and self._worker is None:
            self.engine = None              # the next generation loads the model on the new device
            self.model_label.setText(f"Model: {self.model_choice.describe()}")

    def _choose_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if path:
            self.set_model_dir(path)

    def _choose_published(self) -> None:
        ckpt, _ = QFileDialog.getOpenFileName(self, "Published Reg2RG checkpoint", "",
                                              "Checkpoints (*.bin *.pt *.pth *.safetensors);;All files (*)")
        if not ckpt:
            return
        llm = QFileDialog.getExistingDirectory(self, "Local LLaMA-2-7B-chat folder (tokenizer and weights)")
        if llm:
            self.set_model(ModelChoice("published", checkpoint=ckpt, llm_path=llm))

    def _build_settings(self) -> QWidget:
        """Decoding settings (GenerationSettings): a preset, then strategy, temperature, top-k, top-p, seed,
        beams and length; editing any of them makes the settings "custom"."""
        box = QFrame()
        box.setObjectName("decoding_settings")
        box.setFrameShape(QFrame.StyledPanel)
        self.decoding_preset = QComboBox()
        self.decoding_preset.addItems(["greedy", "published", "custom"])
        self.decoding_preset.setToolTip(
            "greedy: the most probable word each step, the same draft every time (default)\n"
            "published: as the published run — the LLaMA folder's generation_config.json, top-k 30, seed 20\n"
            "custom: the settings below as you set them")
        self.strategy = QComboBox()
        self.strategy.addItems(["greedy", "sample", "beam"])
        self.strategy.setToolTip("greedy: the most probable word; sample: top-k/top-p sampling; beam: beam search")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.05, 5.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(1.0)
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 1000)
        self.top_k.setValue(30)
        self.top_k.setSpecialValueText("off")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        self.num_beams = QSpinBox()
        self.num_beams.setRange(1, 16)
        self.num_beams.setValue(4)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(8, 2048)
        self.max_tokens.setValue(500)
        grid = QGridLayout(box)
        grid.setContentsMargins(6, 4, 6, 4)
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(3)
        cells = (("Preset", self.decoding_preset), ("Decoding", self.strategy), ("Max new tokens", self.max_tokens),
                 ("Temperature", self.temperature), ("Top-k", self.top_k), ("Top-p", self.top_p), ("Seed", self.seed),
                 ("Beams", self.num_beams))
        for n, (label, w) in enumerate(cells):
            r, c = divmod(n, 2)
            grid.addWidget(QLabel(label), r, 2 * c, Qt.AlignRight)
            grid.addWidget(w, r, 2 * c + 1)
        self.strategy.currentTextChanged.connect(self._strategy_changed)
        self._strategy_changed(self.strategy.currentText())
        self._filling_preset = False
        self.decoding_preset.currentTextChanged.connect(lambda _name: self._apply_decoding_preset())
        for w in (self.temperature, self.top_p):
            w.valueChanged.connect(self._settings_edited)
        for w in (self.top_k, self.seed, self.num_beams, self.max_tokens):
            w.valueChanged.connect(self._settings_edited)
        self.strategy.currentTextChanged.connect(self._settings_edited)
        self._apply_decoding_preset()
        return box

    def _apply_decoding_preset(self) -> None:
        """Fill the settings from the chosen preset (engine/presets.py); "custom" leaves them as they are."""
        name = self.decoding_preset.currentText()
        if name == "custom":
            return
        from reg2rg.engine.presets import decoding_preset

        try:
            s = decoding_preset(name, self.model_choice.llm_folder())
        except ValueError as err:                   # a generation_config.json the engine cannot follow
            self.decoding_preset.setCurrentText("custom")
            self.errorOccurred.emit(f"Decoding preset {name!r}: {err}")
            return
        self._filling_preset = True
        try:
            self.strategy.setCurrentText(s.strategy)
            self.max_tokens.setValue(s.max_new_tokens)
            self.temperature.setValue(s.temperature)
            self.top_k.setValue(s.top_k)
            self.top_p.setValue(s.top_p)
            self.seed.setValue(-1 if s.seed is None else s.seed)
            self.num_beams.setValue(s.num_beams)
        finally:
            self._filling_preset = False
        self._strategy_changed(self.strategy.currentText())

    def _settings_edited(self, *_args) -> None:
        if not self._filling_preset and self.decoding_preset.currentText() != "custom":
            self.decoding_preset.blockSignals(True)
            self.decoding_preset.setCurrentText("custom")
            self.decoding_preset.blockSignals(False)
            self._strategy_changed(self.strategy.currentText())

    def _strategy_changed(self, strategy: str) -> None:
        for w in (self.temperature, self.top_k, self.top_p, self.seed):
            w.setEnabled(strategy == "sample")
        self.num_beams.setEnabled(strategy == "beam")
        preset = self.decoding_preset.currentText() if hasattr(self, "decoding_preset") else "custom"
        label = strategy if preset == "custom" else f"{preset} ({strategy})"
        self.settings_button.setText(f"Decoding: {label} {'▾' if self.settings_button.isChecked() else '▸'}")

    def _toggle_settings(self, on: bool) -> None:
        self.settings_box.setVisible(on)
        self._strategy_changed(self.strategy.currentText())

    def can_generate(self) -> bool:
        return self.generate_blocked_reason() is None and self._worker is None

    def generate_blocked_reason(self) -> str | None:
        """Why Generate is off (None when it is on): no study, or a study without region masks."""
        study = self.document.study
        if study is None:
            return "Open a study to draft a report"
        if not study.regions_present:
            return NO_MASKS_REASON
        return None

    def _update_generate_button(self) -> None:
        reason = self.generate_blocked_reason()
        self.generate_button.setEnabled(reason is None and self._worker is None)
        self.generate_button.setToolTip(reason or "Draft the report of the checked regions")

    def selected_regions(self) -> list[str]:
        return [self.region_list.item(i).text() for i in range(self.region_list.count())
                if self.region_list.item(i).checkState() == Qt.Checked]

    def settings(self):
        """The decoding settings chosen in the panel, as the engine's `GenerationSettings`."""
        from reg2rg.engine.generation import GenerationSettings

        return GenerationSettings(strategy=self.strategy.currentText(), max_new_tokens=self.max_tokens.value(),
                                  temperature=self.temperature.value(), top_k=self.top_k.value(),
                                  top_p=self.top_p.value(), seed=None if self.seed.value() < 0 else self.seed.value(),
                                  num_beams=self.num_beams.value(),
                                  preset=None if self.decoding_preset.currentText() == "custom"
                                  else self.decoding_preset.currentText())

    def generate(self, regions: list[str] | None = None, regenerate: str | None = None) -> None:
        """Draft the report (or one region's section); loads the engine first when needed. When the masks
        may not belong to this CT (`Study.mask_problems`) the reader is asked first; they may proceed."""
        if not self.can_generate():
            return
        study = self.document.study
        if study.mask_problems and self._masks_acknowledged is not study:
            box = QMessageBox(QMessageBox.Warning, "Check the region masks",
                              "The region masks may not belong to this CT:\n\n"
                              + "\n".join(f"• {p}" for p in study.mask_problems[:8])
                              + "\n\nThe draft describes what lies under each mask. Draft anyway?",
                              QMessageBox.Cancel, self)
            box.addButton("Draft anyway", QMessageBox.AcceptRole)
            box.setWindowModality(Qt.WindowModal)

            def answered(_code, box=box, study=study):
                if box.buttonRole(box.clickedButton()) == QMessageBox.AcceptRole:
                    self._masks_acknowledged = study
                    self.generate(regions, regenerate)
            box.finished.connect(answered)
            self.mask_check_box = box
            box.open()
            return
        if self.engine is None:
            self._set_busy(True, "Loading the model…")
            loader = EngineLoader(self.model_choice, self.device.currentText())
            self._after_load = (regions, regenerate)
            loader.loaded.connect(self._on_engine_loaded)      # bound: queued onto the GUI thread
            loader.failed.connect(self._on_load_failed)
            self._run(loader)
            return
        regions = [regenerate] if regenerate else (regions or self.selected_regions() or None)
        self._regenerating = regenerate
        worker = GenerationWorker(self.engine, self.document.study, regions, self.settings())
        worker.encodingStarted.connect(self._on_encoding_started)   # bound methods: run on the GUI thread
        worker.encodingDone.connect(self._on_encoding_done)
        worker.tokenGenerated.connect(self._on_token)
        worker.finished.connect(self._on_finished)
        worker.failed.connect(self._on_failed)
        worker.done.connect(self._on_done)
        self._worker = worker
        self.stream.clear()
        self.stream.show()
        self.generate_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self._set_busy(True, "Starting…")
        self._run(worker)

    def _on_load_failed(self, message: str) -> None:
        """The model did not load: say so, and end this generation attempt (the app stays usable)."""
        self._on_failed(message)
        self.busy.hide()
        self.generationFinished.emit()

    def _on_engine_loaded(self, engine) -> None:
        self.set_engine(engine)
        self._set_busy(False, "")
        regions, regenerate = self._after_load
        self.generate(regions, regenerate)

    def _on_encoding_started(self, ev) -> None:
        self._set_busy(True, f"Encoding {len(ev.regions)} region(s)…")

    def _on_encoding_done(self, ev) -> None:
        self.busy.setRange(0, 0)
        self.status.setText(f"Writing… (prompt {ev.prompt_tokens} tokens, encoded in {ev.seconds:.1f} s)")

    def regenerate(self, region: str) -> None:
        if region:
            self.generate(regenerate=region)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self.status.setText("Stopping…")

    def _run(self, worker) -> None:
        self._jobs.start(worker)

    def _set_busy(self, on: bool, text: str) -> None:
        self.busy.setVisible(on)
        self.busy.setRange(0, 0)
        if text:
            self.status.setText(text)

    def _on_token(self, ev) -> None:
        if ev.text:
            self.stream.moveCursor(QTextCursor.End)
            self.stream.insertPlainText(ev.text)
        self.status.setText(f"Writing… {ev.index + 1} tokens")
        self.tokenStreamed.emit(ev)

    def _on_finished(self, result) -> None:
        study = self.document.study
        if study is None:
            return
        if self._regenerating and self.draft is not None:
            for s in result.sections:
                if s.region == self._regenerating:
                    self.draft.replace_section(section_from_result(result, s))
                    self.results[self.draft.section_of_region(s.region).slot] = result
        else:
            self.draft = ReportDraft.from_result(result, study, model=str(self.model_dir or "demo"),
                                                 study_key=study_key(study),
                                                 not_drafted=getattr(result, "not_drafted", None))
            self.results = {sec.slot: result for sec in self.draft.sections}
        self.resultReady.emit(result)
        how = "stopped" if result.cancelled else f"{len(result.tokens)} tokens"
        self.status.setText(f"Draft ready ({how})")
        self._rebuild_sections()
        self._changed()

    def _on_failed(self, message: str) -> None:
        self._set_busy(False, "Generation failed")
        self.errorOccurred.emit(message)

    def _on_done(self) -> None:
        self._worker = None
        self._regenerating = None
        self._update_generate_button()
        self.stop_button.setEnabled(False)
        self.busy.hide()
        self.generationFinished.emit()

    # -- draft -------------------------------------------------------------------------------
    def _rebuild_sections(self) -> None:
        for ed in self._editors:
            ed.setParent(None)
            ed.deleteLater()
        self._editors = []
        # The raw stream is for watching the model write; once sections exist they say the same, editable.
        self.stream.setVisible(self.draft is None)
        if self.draft is None:
            return
        for s in self.draft.sections:
            ed = SectionEditor(s, self.sections_host)
            ed.textEdited.connect(self._on_text)
            ed.acceptRequested.connect(lambda slot: (self.draft.accept(slot), self._refresh(slot), self._changed()))
            ed.resetRequested.connect(lambda slot: (self.draft.reset(slot), self._refresh(slot), self._changed()))
            ed.regenerateRequested.connect(self.regenerate)
            ed.spanSelected.connect(self._on_span)
            self.sections_layout.insertWidget(self.sections_layout.count() - 1, ed)
            self._editors.append(ed)
        self._apply_confidence()

    def _on_span(self, slot, start: int, end: int) -> None:
        self._selection = (slot, start, end)
        self._selection_timer.start()

    def request_attention(self, slot, start: int | None = None, end: int | None = None) -> list[int]:
        """Ask for the attention of the generated tokens of section ``slot`` overlapping ``[start, end)``
        (the whole section by default). Emits ``attentionRequested``; returns the token indices."""
        if self.draft is None:
            return []
        section = self.draft.section(slot)
        result = self.results.get(slot)
        if result is None or self.engine is None:
            self.status.setText("Attention needs the draft's model run: regenerate to see where it looked")
            return []
        if section.is_edited:
            self.status.setText("This section was edited: reset it to see the model's attention")
            return []
        start = 0 if start is None else start
        end = len(section.text) if end is None else end
        picked = [t for t in section.tokens if t.start < end and t.end > start and t.text.strip()]
        if not picked:
            return []
        idx = [t.index for t in picked]
        words = section.text[max(0, min(t.start for t in picked)):max(t.end for t in picked)].strip()
        label = f"{section.title}: “{words if len(words) <= 90 else words[:87] + '…'}”"
        self.attentionRequested.emit(result, idx, label)
        return idx

    def section_editor(self, slot) -> SectionEditor:
        return next(e for e in self._editors if e.section.slot == slot)

    def _refresh(self, slot) -> None:
        self.section_editor(slot).refresh()

    def _on_text(self, slot, text: str) -> None:
        if self.draft is not None and self.draft.set_text(slot, text):
            self._refresh(slot)
            self._changed()

    def _apply_confidence(self, *_args) -> None:
        thr = self.threshold.value() / 100.0
        self.threshold_label.setText(f"{thr:.0%}")
        for ed in self._editors:
            ed.apply_confidence(self.colour_box.isChecked(), thr)

    def _changed(self) -> None:
        self._autosave.start()
        self.draftChanged.emit()

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

    # -- study changes and restore -----------------------------------------------------------
    def _on_study(self) -> None:
        if self.draft is not None and self.draft.study_key != (study_key(self.document.study) if self.document.study else None):
            self.close_study_cleanly()
        self.draft = None
        self.results = {}
        self._rebuild_sections()
        self.stream.clear()
        study = self.document.study
        self.region_list.clear()
        if study is None:
            self._update_generate_button()
            return
        for region in REGIONS:
            if region in study.regions_present:
                item = QListWidgetItem(region)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked)
                self.region_list.addItem(item)
        self._update_generate_button()
        self.status.setText(self.generate_blocked_reason() or f"{len(study.regions_present)} region(s) to report on")
        try:
            saved = self.store.load(study_key(study))
        except DraftFileError as exc:
            self.errorOccurred.emit(str(exc))
            return
        if saved is None:
            return
        if saved.clean:
            self._restore(saved.draft, f"Restored {saved.describe()}")
            return
        box = QMessageBox(QMessageBox.Question, "Restore draft?",
                          f"The viewer did not close normally. Restore {saved.describe('autosaved')}?",
                          QMessageBox.Yes | QMessageBox.No, self)
        box.setWindowModality(Qt.WindowModal)
        restored = f"Restored {saved.describe('autosaved')}"
        box.finished.connect(lambda code, d=saved.draft: self._restore(d, restored)
                             if code == QMessageBox.Yes else self.store.discard(d.study_key))
        self.restore_box = box
        box.open()

    def _restore(self, draft: ReportDraft, message: str) -> None:
        self.draft = draft
        self.results = {}                  # a restored draft has no model run behind it
        self._rebuild_sections()
        self.status.setText(message)
        self.draftChanged.emit()

    # -- export ------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Export by extension: .txt (report), .json (sections, tokens, confidences, edits), .pdf."""
        path = Path(path)
        if self.draft is None:
            raise ValueError("there is no draft to export")
        suffix = path.suffix.lower()
        if suffix == ".json":
            export_json(self.draft, path)
        elif suffix == ".pdf":
            self._export_pdf(path)
        else:
            export_text(self.draft, path)
        return path

    def _export_pdf(self, path: Path) -> None:
        from html import escape

        from PySide6.QtGui import QPageSize, QPdfWriter

        d = self.draft
        html = [f"<h2>CT chest report — {escape(d.study_name)}</h2>",
                f"<p style='color:#555'>Drafted with Reg2RG ({escape(d.model or 'demo')}), reviewed {escape(d.modified)}</p>"]
        for s in d.sections:
            if s.text.strip():
                html.append(f"<p><b>{escape(s.title)}:</b> {escape(s.text.strip())}</p>")
        doc = QTextDocument()
        doc.setHtml("\n".join(html))
        writer = QPdfWriter(str(path))
        writer.setPageSize(QPageSize(QPageSize.A4))
        writer.setResolution(150)
        doc.setPageSize(writer.pageLayout().paintRectPixels(writer.resolution()).size().toSizeF())
        doc.print_(writer)

    def export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export report", f"{self.draft.study_name or 'report'}.txt",
                                              "Text (*.txt);;JSON (*.json);;PDF (*.pdf)")
        if path:
            try:
                self.export(path)
            except OSError as exc:
                self.errorOccurred.emit(f"{path}: could not export ({exc})")
