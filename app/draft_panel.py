"""The draft panel: a view of the drafting session (`session.DraftingSession`).

It shows the model (with its validation status), the decoding settings, the regions, the streaming
text, one editor per region section (state, flags, confidence colours) and the impression, and the
AI-draft banner while a draft is open. Every action is a request to the session; the panel redraws
from the session's signals and holds no drafting state of its own.
"""

from __future__ import annotations

import logging
import re
from html import escape

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
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
from reg2rg.engine.report.txt import state_label

from .draft import ACCEPTED, EDITED, NOT_DRAFTED, REJECTED, STOPPED, DraftSection
from .findings_check import findings_html
from .generation import ModelChoice
from .session import DraftingSession

logger = logging.getLogger("reg2rg.app.draft")

LOW_CONFIDENCE = "low\u2011confidence"     # a non-breaking hyphen: the header never wraps inside the word
EDITOR_MIN_H, EDITOR_MAX_H = 34, 220     # a section editor's height range (pixels), fitted to its text


def confidence_color(prob: float, threshold: float) -> QColor:
    """Background for a token below the threshold: red when very unsure, amber near the threshold."""
    t = max(0.0, min(1.0, prob / max(threshold, 1e-6)))
    return QColor(int(200 + 30 * t), int(50 + 130 * t), 50, 150)


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

    textEdited = Signal(object, str)      # section key, text
    acceptRequested = Signal(object)      # section key
    rejectRequested = Signal(object)
    resetRequested = Signal(object)
    regenerateRequested = Signal(str)     # region
    spanSelected = Signal(object, int, int)   # section key, start, end (characters of the section text)
    attentionRequested = Signal(object)   # section key: the whole section

    def __init__(self, section: DraftSection, parent=None) -> None:
        super().__init__(parent)
        self.section = section
        self.setFrameShape(QFrame.StyledPanel)
        self.setObjectName(f"section_{section.key}")
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
        self.editor.textChanged.connect(lambda: self.textEdited.emit(self.section.key, self.editor.toPlainText()))
        self.accept_button = QPushButton("Accept")
        self.reject_button = QPushButton("Reject")
        self.reject_button.setToolTip("Leave this section out of the report")
        self.reset_button = QPushButton("Reset")
        self.regenerate_button = QPushButton("Regenerate")
        self.accept_button.clicked.connect(lambda: self.acceptRequested.emit(self.section.key))
        self.reject_button.clicked.connect(lambda: self.rejectRequested.emit(self.section.key))
        self.reset_button.clicked.connect(lambda: self.resetRequested.emit(self.section.key))
        self.regenerate_button.clicked.connect(lambda: self.regenerateRequested.emit(self.section.region or ""))
        self.regenerate_button.setEnabled(bool(section.region))
        self.attention_button = QPushButton("Attention")
        self.attention_button.setToolTip("Where the model looked while writing this section")
        self.attention_button.clicked.connect(lambda: self.attentionRequested.emit(self.section.key))
        self.editor.selectionChanged.connect(self._on_selection)
        self.editor.setToolTip("")
        # The actions sit on the header line (small buttons): more sections fit on screen at once.
        self.header.setWordWrap(True)
        top = QHBoxLayout()
        top.setSpacing(3)
        top.addWidget(self.header, 1)
        for b in (self.attention_button, self.accept_button, self.reject_button, self.regenerate_button,
                  self.reset_button):
            b.setObjectName("section_action")
            b.setStyleSheet("QPushButton { padding: 1px 7px; }")
            top.addWidget(b)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 5)
        lay.setSpacing(3)
        lay.addLayout(top)
        lay.addWidget(self.editor)
        lay.addWidget(self.low_label)
        self.findings_label = QLabel()                    # the section's Findings check (session.findings)
        self.findings_label.setObjectName("findings_check")
        self.findings_label.setTextFormat(Qt.RichText)
        self.findings_label.setWordWrap(True)
        self.findings_label.setStyleSheet("color: #b8bec8; font-size: 11px;")
        self.findings_label.setVisible(False)
        lay.addWidget(self.findings_label)
        self.findings = None
        self.threshold = 0.5
        self.colour_on = False
        self.refresh()

    def set_findings(self, section_findings) -> None:
        """Show the section's Findings check (`SectionFindings`; None hides it)."""
        self.findings = section_findings
        html, tip = findings_html(section_findings) if section_findings is not None else ("", "")
        self.findings_label.setText(html)
        self.findings_label.setToolTip(tip)
        self.findings_label.setVisible(bool(html))

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

    STATE_STYLE = {ACCEPTED: ("#6fcf7f", "✔ "), EDITED: ("#8fb8ff", "✎ "), REJECTED: ("#e07070", "✘ "),
                   STOPPED: ("#e0a050", "■ "), NOT_DRAFTED: ("#999999", "")}

    def _update_header(self) -> None:
        """Region, review state, the count of words below the threshold, and the section's flags."""
        s = self.section
        colour, mark = self.STATE_STYLE.get(s.state, ("#999999", ""))
        label = state_label(s) + (f": {s.note}" if s.state == NOT_DRAFTED and s.note else "")
        state = f"<span style='color:{colour}'>{mark}{escape(label)}</span>"
        slot = f"region {s.slot}" if s.slot is not None else "report"
        grounding = "" if s.grounding_ok or s.slot is None or s.state == NOT_DRAFTED else (
            f" &nbsp;<span style='color:#ff7a5c'>⚠ the model named “{s.area or 'no area'}”, "
            f"the mask is {s.region or 'missing'}</span>")
        n_low = len(s.low_confidence(self.threshold if hasattr(self, "threshold") else 0.5))
        low = (f" &nbsp;<span style='color:#e0a050'>{n_low}&nbsp;{LOW_CONFIDENCE}</span>" if n_low else "")
        cut = " &nbsp;<span style='color:#e0a050'>⚠ cut off</span>" if s.truncated else ""
        checks = "".join(f" &nbsp;<span style='color:#e0a050'>⚑ {escape(c.message)}</span>" for c in s.checks)
        # The slot number is for checking against the prompt, not for reading: it lives in the tooltip.
        self.header.setToolTip(f"{slot} of the prompt" + (f" · mask: {s.region}" if s.region else "")
                               + (f" · {s.note}" if s.note else ""))
        self.header.setText(f"<b>{escape(s.title)}</b> &nbsp;{state}{low}{grounding}{cut}{checks}")
        self.accept_button.setEnabled(s.state != ACCEPTED)
        self.reject_button.setEnabled(s.state != REJECTED)

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
            self.spanSelected.emit(self.section.key, cur.selectionStart(), cur.selectionEnd())

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
                self.spanSelected.emit(self.section.key, a, b)
            return False
        return False


class DraftPanel(QWidget):
    """A view of the drafting session: it observes the session's signals and sends it requests."""

    def __init__(self, session: DraftingSession, parent=None) -> None:
        super().__init__(parent)
        self.session = session
        self.setObjectName("draft_panel")
        self.restore_box: QMessageBox | None = None
        self.reviewer_dialog: QInputDialog | None = None
        self.mask_check_box: QMessageBox | None = None
        self._editors: list[SectionEditor] = []
        self._build()
        session.modelChanged.connect(self._show_model)
        session.busyChanged.connect(self._show_busy)
        session.statusChanged.connect(self.status.setText)
        session.encodingStarted.connect(self._on_encoding_started)
        session.encodingDone.connect(lambda _ev: self.busy.setRange(0, 0))
        session.tokenStreamed.connect(self._on_token)
        session.draftReplaced.connect(self._rebuild_sections)
        session.sectionChanged.connect(self._refresh)
        session.draftChanged.connect(self._show_review)
        session.regionsChanged.connect(self._show_regions)
        session.restoreOffered.connect(self._offer_restore)
        session.reviewerNeeded.connect(self._ask_reviewer)
        session.maskCheckNeeded.connect(self._ask_mask_check)
        session.engineUnavailable.connect(self._offer_retry)
        session.findingsChanged.connect(self._show_findings)
        self._show_model()
        self._show_regions()
        self._show_review()
        self._push_settings()

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.banner = QLabel()
        self.banner.setObjectName("ai_draft_banner")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("QLabel { background: #8c1d18; color: white; font-weight: bold; padding: 4px 6px;"
                                  " border-radius: 3px; }")
        self.banner.hide()
        self.model_label = QLabel()
        self.model_label.setTextFormat(Qt.RichText)
        self.model_button = QToolButton()
        self.model_button.setText("Model ▾")
        self.model_button.setPopupMode(QToolButton.InstantPopup)
        menu = QMenu(self.model_button)
        menu.addAction("Embedded demo model", lambda: self.session.set_model(ModelChoice()))
        menu.addAction("Model folder…", self._choose_model)
        menu.addAction("Published checkpoint + LLaMA folder…", self._choose_published)
        menu.addAction("Engine server (URL + token)…", self._choose_server)
        self.model_button.setMenu(menu)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.device.setToolTip("Where the model runs (auto: CUDA when available)")
        self.device.currentTextChanged.connect(self.session.set_device)
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
        self.region_list.itemChanged.connect(lambda _item: self.session.set_regions(self.selected_regions() or None))
        self.generate_button = QPushButton("Generate")
        self.generate_button.setStyleSheet("QPushButton { background: #2f6f4f; font-weight: bold; }")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.generate_button.clicked.connect(lambda: self.session.generate())
        self.stop_button.clicked.connect(self.session.stop)
        self.status = QLabel(self.session.status)
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
        self.impression_box = QFrame()
        self.impression_box.setObjectName("impression")
        self.impression_box.setFrameShape(QFrame.StyledPanel)
        self.impression = QPlainTextEdit()
        self.impression.setPlaceholderText("Impression (written by the reader)")
        self.impression.setMaximumHeight(80)
        self.impression.textChanged.connect(lambda: self.session.set_impression(self.impression.toPlainText()))
        self.seed_button = QPushButton("From findings")
        self.seed_button.setToolTip("Start the impression from the sentences that report a finding")
        self.seed_button.clicked.connect(self.session.seed_impression)
        self.review_label = QLabel()
        self.review_label.setWordWrap(True)
        self.review_label.setStyleSheet("color: #c8ccd4;")
        imp_top = QHBoxLayout()
        imp_top.addWidget(QLabel("<b>Impression</b>"), 1)
        imp_top.addWidget(self.seed_button)
        imp_lay = QVBoxLayout(self.impression_box)
        imp_lay.setContentsMargins(6, 4, 6, 5)
        imp_lay.addLayout(imp_top)
        imp_lay.addWidget(self.impression)
        imp_lay.addWidget(self.review_label)
        self.sections_layout.addWidget(self.impression_box)
        self.sections_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.sections_host)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.banner)
        lay.addLayout(row1)
        lay.addWidget(self.settings_box)
        lay.addWidget(self.region_list)
        lay.addLayout(row2)
        lay.addWidget(self.busy)
        lay.addLayout(row3)
        lay.addWidget(self.stream)
        lay.addWidget(scroll, 1)

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
        self.omission_threshold = QSpinBox()
        self.omission_threshold.setRange(1, 100)
        self.omission_threshold.setSuffix(" %")
        self.omission_threshold.setValue(int(round(100 * self.session.omission_threshold)))
        self.omission_threshold.setToolTip("Findings check: flag a finding the draft does not report when the model "
                                           "itself rates it at least this likely (default chosen on validation phantoms)")
        self.omission_threshold.valueChanged.connect(lambda v: self.session.set_omission_threshold(v / 100.0))
        cells = (("Preset", self.decoding_preset), ("Decoding", self.strategy), ("Max new tokens", self.max_tokens),
                 ("Temperature", self.temperature), ("Top-k", self.top_k), ("Top-p", self.top_p), ("Seed", self.seed),
                 ("Beams", self.num_beams), ("Omission alert ≥", self.omission_threshold))
        for n, (label, w) in enumerate(cells):
            r, c = divmod(n, 2)
            grid.addWidget(QLabel(label), r, 2 * c, Qt.AlignRight)
            grid.addWidget(w, r, 2 * c + 1)
        self.strategy.currentTextChanged.connect(self._strategy_changed)
        self._filling_preset = False
        self.decoding_preset.currentTextChanged.connect(lambda _name: self._apply_decoding_preset())
        for w in (self.temperature, self.top_p):
            w.valueChanged.connect(self._settings_edited)
        for w in (self.top_k, self.seed, self.num_beams, self.max_tokens):
            w.valueChanged.connect(self._settings_edited)
        self.strategy.currentTextChanged.connect(self._settings_edited)
        self._strategy_changed(self.strategy.currentText())
        self._apply_decoding_preset()
        return box

    def _apply_decoding_preset(self) -> None:
        """Fill the settings from the chosen preset (engine/presets.py); "custom" leaves them as they are."""
        name = self.decoding_preset.currentText()
        if name == "custom":
            return
        from reg2rg.engine.presets import decoding_preset

        try:
            s = decoding_preset(name, self.session.model_choice.llm_folder())
        except ValueError as err:                   # a generation_config.json the engine cannot follow
            self.decoding_preset.setCurrentText("custom")
            self.session.errorOccurred.emit(f"Decoding preset {name!r}: {err}")
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
        self._push_settings()

    def _strategy_changed(self, strategy: str) -> None:
        for w in (self.temperature, self.top_k, self.top_p, self.seed):
            w.setEnabled(strategy == "sample")
        self.num_beams.setEnabled(strategy == "beam")
        preset = self.decoding_preset.currentText() if hasattr(self, "decoding_preset") else "custom"
        label = strategy if preset == "custom" else f"{preset} ({strategy})"
        self.settings_button.setText(f"Decoding: {label} {'▾' if self.settings_button.isChecked() else '▸'}")
        self._push_settings()

    def _toggle_settings(self, on: bool) -> None:
        self.settings_box.setVisible(on)
        self._strategy_changed(self.strategy.currentText())

    def settings(self):
        """The decoding settings chosen in the panel, as the engine's `GenerationSettings`."""
        from reg2rg.engine.generation import GenerationSettings

        return GenerationSettings(strategy=self.strategy.currentText(), max_new_tokens=self.max_tokens.value(),
                                  temperature=self.temperature.value(), top_k=self.top_k.value(),
                                  top_p=self.top_p.value(), seed=None if self.seed.value() < 0 else self.seed.value(),
                                  num_beams=self.num_beams.value(),
                                  preset=None if self.decoding_preset.currentText() == "custom"
                                  else self.decoding_preset.currentText())

    def _push_settings(self) -> None:
        if hasattr(self, "decoding_preset") and not getattr(self, "_filling_preset", True):
            self.session.set_settings(self.settings())

    def selected_regions(self) -> list[str]:
        return [self.region_list.item(i).text() for i in range(self.region_list.count())
                if self.region_list.item(i).checkState() == Qt.Checked]

    # -- model -------------------------------------------------------------------------------
    def _choose_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if path:
            self.session.set_model_dir(path)

    def _choose_published(self) -> None:
        ckpt, _ = QFileDialog.getOpenFileName(self, "Published Reg2RG checkpoint", "",
                                              "Checkpoints (*.bin *.pt *.pth *.safetensors);;All files (*)")
        if not ckpt:
            return
        llm = QFileDialog.getExistingDirectory(self, "Local LLaMA-2-7B-chat folder (tokenizer and weights)")
        if llm:
            self.session.set_model(ModelChoice("published", checkpoint=ckpt, llm_path=llm))

    def _choose_server(self) -> None:
        """Draft on a reg2rg-serve: its URL, then its token file (Cancel: REG2RG_SERVER_TOKEN or the file a
        local reg2rg-serve writes)."""
        url, ok = QInputDialog.getText(self, "Engine server", "reg2rg-serve URL (http(s)://host:port):",
                                       QLineEdit.Normal, "http://127.0.0.1:8765")
        if not ok or not url.strip():
            return
        token_file, _ = QFileDialog.getOpenFileName(self, "Token file of the engine server (Cancel: the default)")
        self.session.set_model(ModelChoice("server", url=url.strip(), token_file=token_file or None))

    def _offer_retry(self, message: str, retry: bool) -> None:
        """The engine server failed: say so (the draft so far is kept, marked stopped) and offer Retry."""
        box = QMessageBox(QMessageBox.Warning, "Engine server", message, QMessageBox.Close, self)
        if retry:
            box.addButton("Retry", QMessageBox.AcceptRole)
        box.setWindowModality(Qt.WindowModal)

        def answered(_code, box=box):
            if box.clickedButton() is not None and box.buttonRole(box.clickedButton()) == QMessageBox.AcceptRole:
                self.session.retry()
        box.finished.connect(answered)
        self.retry_box = box
        box.open()

    def _show_model(self) -> None:
        """"Model: embedded demo · not validated (demonstration model)", the status coloured."""
        if getattr(self, "decoding_preset", None) is not None and self.decoding_preset.currentText() == "published":
            self._apply_decoding_preset()       # the published preset follows the new model's LLaMA folder
        ok, what = self.session.validation_status()
        colour = "#6fcf7f" if ok else "#e0a050"
        self.model_label.setText(f"Model: {escape(self.session.model_name())} "
                                 f"<span style='color:{colour}'>· {escape(what)}</span>")
        where = self.session.model_dir()
        self.model_label.setToolTip(str(where) if where is not None else "a model built in memory")

    # -- generation --------------------------------------------------------------------------
    def _show_busy(self, on: bool) -> None:
        self.busy.setVisible(on)
        self.busy.setRange(0, 0)
        self._update_generate_button()
        self.stop_button.setEnabled(on)

    def _update_generate_button(self) -> None:
        reason = self.session.generate_blocked_reason()
        self.generate_button.setEnabled(reason is None and not self.session.busy)
        self.generate_button.setToolTip(reason or "Draft the report of the checked regions")

    def _on_encoding_started(self, _ev) -> None:
        self.stream.clear()
        self.stream.show()

    def _on_token(self, ev) -> None:
        if ev.text:
            self.stream.moveCursor(QTextCursor.End)
            self.stream.insertPlainText(ev.text)

    def _show_regions(self) -> None:
        study = self.session.document.study
        self.region_list.blockSignals(True)
        self.region_list.clear()
        for region in REGIONS:
            if study is not None and region in study.regions_present:
                item = QListWidgetItem(region)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked)
                self.region_list.addItem(item)
        self.region_list.blockSignals(False)
        self.session.set_regions(None)
        self._update_generate_button()

    def _show_findings(self) -> None:
        for ed in self._editors:
            ed.set_findings(self.session.findings.get(ed.section.key))

    # -- the draft ---------------------------------------------------------------------------
    def _rebuild_sections(self) -> None:
        for ed in self._editors:
            ed.setParent(None)
            ed.deleteLater()
        self._editors = []
        draft = self.session.draft
        # The raw stream is for watching the model write; once sections exist they say the same, editable.
        self.stream.setVisible(draft is None)
        if draft is None:
            self.stream.clear()
        for s in (draft.ordered_sections() if draft is not None else []):
            ed = SectionEditor(s, self.sections_host)
            ed.textEdited.connect(self.session.edit_section)
            ed.acceptRequested.connect(self.session.accept)
            ed.rejectRequested.connect(self.session.reject)
            ed.resetRequested.connect(self.session.reset)
            ed.regenerateRequested.connect(self.session.regenerate)
            ed.spanSelected.connect(self.session.select_span)
            ed.attentionRequested.connect(self.session.request_attention)
            ed.set_findings(self.session.findings.get(s.key))
            self.sections_layout.insertWidget(len(self._editors), ed)
            self._editors.append(ed)
        if draft is not None:               # the draft's threshold (a restored draft keeps its own)
            self.threshold.blockSignals(True)
            self.threshold.setValue(int(round(draft.confidence_threshold * 100)))
            self.threshold.blockSignals(False)
        self._show_confidence()
        self._show_review()

    def section_editor(self, key) -> SectionEditor:
        return next(e for e in self._editors if e.section.key == key)

    def _refresh(self, key) -> None:
        for ed in self._editors:
            if ed.section.key == key:
                ed.refresh()

    def _apply_confidence(self, *_args) -> None:
        """The reader moved the threshold (or toggled the colours): tell the session, redraw."""
        self.session.set_confidence_threshold(self.threshold.value() / 100.0)
        self._show_confidence()

    def _show_confidence(self) -> None:
        thr = self.threshold.value() / 100.0
        self.threshold_label.setText(f"{thr:.0%}")
        for ed in self._editors:
            ed.apply_confidence(self.colour_box.isChecked(), thr)

    def _show_review(self) -> None:
        """The AI-draft banner and the review line while a draft is open; the impression text."""
        draft = self.session.draft
        self.banner.setVisible(draft is not None)
        self.impression_box.setVisible(draft is not None)
        if draft is None:
            return
        self.banner.setText(f"{draft.statement()} {draft.review_line()}")
        self.review_label.setText(draft.review_line() + (f" Reviewer: {draft.reviewer}." if draft.reviewer else ""))
        if self.impression.toPlainText() != draft.impression:
            self.impression.blockSignals(True)
            self.impression.setPlainText(draft.impression)
            self.impression.blockSignals(False)

    # -- questions to the reader -----------------------------------------------------------------
    def _offer_restore(self, saved) -> None:
        box = QMessageBox(QMessageBox.Question, "Restore draft?",
                          f"The viewer did not close normally. Restore {saved.describe('autosaved')}?",
                          QMessageBox.Yes | QMessageBox.No, self)
        box.setWindowModality(Qt.WindowModal)
        box.finished.connect(lambda code, s=saved: self.session.accept_restore(s)
                             if code == QMessageBox.Yes else self.session.discard_restore(s.draft.study_key))
        self.restore_box = box
        box.open()

    def _ask_mask_check(self, problems: list) -> None:
        """The masks may not belong to this CT: draft anyway?"""
        box = QMessageBox(QMessageBox.Warning, "Check the region masks",
                          "The region masks may not belong to this CT:\n\n"
                          + "\n".join(f"• {p}" for p in problems[:8])
                          + "\n\nThe draft describes what lies under each mask. Draft anyway?",
                          QMessageBox.Cancel, self)
        box.addButton("Draft anyway", QMessageBox.AcceptRole)
        box.setWindowModality(Qt.WindowModal)

        def answered(_code, box=box):
            if box.buttonRole(box.clickedButton()) == QMessageBox.AcceptRole:
                self.session.draft_despite_masks()
        box.finished.connect(answered)
        self.mask_check_box = box
        box.open()

    def _ask_reviewer(self) -> None:
        """The reviewer's name, asked once (the session remembers it)."""
        dialog = QInputDialog(self)
        dialog.setWindowTitle("Reviewer")
        dialog.setLabelText("Your name, recorded as the reviewer of the sections you accept or reject:")
        dialog.setTextEchoMode(QLineEdit.Normal)
        dialog.setWindowModality(Qt.WindowModal)
        dialog.accepted.connect(lambda: self.session.set_reviewer(dialog.textValue()))
        dialog.rejected.connect(self.session.cancel_review)
        self.reviewer_dialog = dialog
        dialog.open()
