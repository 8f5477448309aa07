"""The explanation panel: the evidence in the scan for a selected word, sentence or section.

A view of the drafting session's selection and heat layer (`session.DraftingSession`): a selection in
the draft becomes, computed by the session on a worker thread (`heat.AttentionWorker`),

- a heatmap over the CT in every view — by default the **relevance map** (``engine.relevance_map``:
  gradient × input on the ViT and mask patches, the evidence for exactly the selected words), or, as a
  clearly named option, **raw attention** (``engine.attention_map``, with its layer/head aggregation:
  all layers, the last or chosen layers; mean of heads or chosen heads); colour map and opacity
  adjustable, low values transparent so the anatomy stays readable; the status line says where the
  peak is and **Go to peak** moves the crosshair there;
- the **region dependence** chart (``engine.region_dependence``): how many nats the selected words'
  log-probability loses when the global image or each region slot is masked out of the prompt — what
  the words causally needed (it replaces the attention shares, which were flat whatever was selected);

and can be saved as NIfTI on the CT grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from .heat import (  # noqa: F401 - the heat layer's data helpers, re-exported for the panel's users
    COLORMAPS,
    HEAD_CHOICES,
    HEAT_LEVELS,
    LAYER_CHOICES,
    TRANSPARENT_BELOW,
    AttentionRequestError,
    AttentionWorker,
    colormap_table,
    heatmap_to_display,
    model_layout,
    parse_indices,
)
from .style import REGION_COLORS

METHOD_CHOICES = ("Relevance (evidence)", "Raw attention")

logger = logging.getLogger("reg2rg.app.attention")

class SharesChart(QWidget):
    """Horizontal bars: the share of attention on the global image, each region slot and the rest."""

    ROW = 20
    MIN_ROW = 14

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("attention_chart")
        self.rows: list[tuple[str, float, QColor]] = []
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.setMinimumHeight(self.ROW * 2)

    def set_shares(self, shares: dict[str, float] | None, other: float = 0.0) -> None:
        self.rows = []
        if shares:
            for group, share in shares.items():
                color = QColor(200, 200, 210) if group == "global" else QColor(*REGION_COLORS.get(group, (150, 150, 150)))
                self.rows.append(("global image" if group == "global" else group, float(share), color))
            self.rows.append(("text / prompt", float(other), QColor(110, 116, 126)))
        # Rows shrink to MIN_ROW in a short dock rather than being cut off at the bottom.
        n = max(2, len(self.rows))
        self.setMinimumHeight(n * self.MIN_ROW + 6)
        self.setMaximumHeight(n * self.ROW + 6)
        self.updateGeometry()
        self.update()

    min_scale = 0.0          # the value a full bar stands for at least

    def value_text(self, value: float) -> str:
        return f"{value:.1%}"

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(360, max(2, len(self.rows)) * self.ROW + 6)

    def row_height(self) -> float:
        """The height of one bar row now: ROW when there is room, down to MIN_ROW."""
        return max(float(self.MIN_ROW), min(float(self.ROW), (self.height() - 6) / max(1, len(self.rows))))

    def paintEvent(self, _ev) -> None:  # noqa: N802
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        font = QFont(self.font())
        font.setPointSizeF(max(8.0, font.pointSizeF() - 0.5))
        p.setFont(font)
        if not self.rows:
            p.setPen(QColor(140, 146, 156))
            p.drawText(self.rect(), Qt.AlignCenter, "Select words in the draft to see what they needed")
            return
        label_w, pct_w = 150, 52
        bar_w = max(20, self.width() - label_w - pct_w - 12)
        peak = max(max(r[1] for r in self.rows), self.min_scale) or 1.0
        row = self.row_height()
        pad = max(2.0, row * 0.2)
        for i, (name, share, color) in enumerate(self.rows):
            y = 3 + i * row
            p.setPen(QColor(216, 220, 226))
            p.drawText(QRectF(4, y, label_w - 8, row), Qt.AlignVCenter | Qt.AlignRight, name)
            p.setPen(Qt.NoPen)
            p.setBrush(QColor(44, 49, 57))
            p.drawRoundedRect(QRectF(label_w, y + pad, bar_w, row - 2 * pad), 2, 2)
            p.setBrush(color)
            p.drawRoundedRect(QRectF(label_w, y + pad, max(1.0, bar_w * max(share, 0.0) / peak), row - 2 * pad), 2, 2)
            p.setPen(QColor(216, 220, 226))
            p.drawText(QRectF(label_w + bar_w + 6, y, pct_w, row), Qt.AlignVCenter | Qt.AlignLeft,
                       self.value_text(share))


class DependenceChart(SharesChart):
    """Horizontal bars: how many nats the selection's log-probability loses without the global image or
    each region slot (`RegionDependence.drops`); a negative value (the words became likelier) has no bar."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("dependence_chart")
        self.setToolTip("Region dependence: the drop of the selected words' log-probability (nats) when the "
                        "global image or that region slot is masked out of the prompt")

    # a full bar is at least 1 nat (the words' probability divided by e): hundredths of a nat, which is
    # what a model that ignores the image shows, stay visibly negligible instead of filling the chart
    min_scale = 1.0

    def set_dependence(self, dependence) -> None:
        self.set_shares(None if dependence is None else dict(dependence.drops))
        self.rows = self.rows[:-1]            # no "text / prompt" row: nothing of the text was removed
        self.update()

    def value_text(self, value: float) -> str:
        return f"{value:+.2f}"


class AttentionPanel(QWidget):
    """Shows and adjusts the session's heat layer and attention aggregation (see the module docstring)."""

    def __init__(self, session, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("attention_panel")
        self.session = session
        self._build()
        for w in (self.layers, self.heads):          # the aggregation is for raw attention only
            w.setEnabled(session.explanation_method == "raw")
        session.attentionStarted.connect(self._on_started)
        session.attentionFailed.connect(self._on_failed)
        session.heatLayerChanged.connect(self._show_layer)
        self._show_layer()

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.selection_label = QLabel("No selection")
        self.selection_label.setWordWrap(True)
        self.selection_label.setStyleSheet("color: #c8ccd4;")
        self.method = QComboBox()
        self.method.setObjectName("explanation_method")
        self.method.addItems(METHOD_CHOICES)
        self.method.setToolTip("Relevance: the evidence in the CT for exactly the selected words (gradient × input)\n"
                               "Raw attention: where the model's attention weights went (not evidence; layers/heads)")
        self.method.activated.connect(lambda _i: self.set_method(self.method_name()))
        self.layers = QComboBox()
        self.layers.addItems(LAYER_CHOICES)
        self.layer_ids = QLineEdit()
        self.layer_ids.setPlaceholderText("e.g. 0, 2-3")
        self.heads = QComboBox()
        self.heads.addItems(HEAD_CHOICES)
        self.head_ids = QLineEdit()
        self.head_ids.setPlaceholderText("e.g. 0-3")
        for combo, edit in ((self.layers, self.layer_ids), (self.heads, self.head_ids)):
            # the index field only appears for "Chosen …": the panel stays short enough for its dock
            edit.setEnabled(False)
            edit.setVisible(False)
            combo.currentIndexChanged.connect(lambda i, c=combo, e=edit: self._show_ids(e, c.currentIndex() == c.count() - 1))
            combo.activated.connect(lambda _i: self.recompute())
            edit.returnPressed.connect(self.recompute)
        self.colormap = QComboBox()
        self.colormap.addItems(list(COLORMAPS))
        self.colormap.currentTextChanged.connect(lambda name: self.session.set_heat_style(colormap=name))
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(int(round(self.session.heat.opacity * 100)))
        self.opacity.valueChanged.connect(lambda v: self.session.set_heat_style(opacity=v / 100.0))
        self.opacity_label = QLabel(f"{self.opacity.value()}%")
        self.opacity_label.setMinimumWidth(36)
        self.show_box = QPushButton("Hide")
        self.show_box.setCheckable(True)
        self.show_box.toggled.connect(lambda hidden: self.session.set_heat_style(visible=not hidden))
        self.save_button = QPushButton("Save NIfTI…")
        self.save_button.setToolTip("Save the heatmap as NIfTI on the CT grid (the CT's affine)")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save_dialog)
        self.peak_button = QPushButton("Go to peak")
        self.peak_button.setEnabled(False)
        self.peak_button.clicked.connect(self.go_to_peak)
        self.status = QLabel("")
        self.status.setStyleSheet("color: #9aa3ad;")
        self.chart = DependenceChart()
        self.chart_title = QLabel("Region dependence: log-probability lost without each (nats)")
        self.chart_title.setStyleSheet("color: #9aa3ad; font-size: 11px;")

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.setHorizontalSpacing(8)
        form.setVerticalSpacing(4)
        row_l = QHBoxLayout()
        row_l.addWidget(self.layers, 1)
        row_l.addWidget(self.layer_ids, 1)
        row_h = QHBoxLayout()
        row_h.addWidget(self.heads, 1)
        row_h.addWidget(self.head_ids, 1)
        row_c = QHBoxLayout()
        row_c.addWidget(self.colormap)
        row_c.addWidget(self.opacity, 1)
        row_c.addWidget(self.opacity_label)
        row_c.addWidget(self.show_box)
        row_lh = QHBoxLayout()
        row_lh.addLayout(row_l, 1)
        row_lh.addWidget(QLabel("Heads"))
        row_lh.addLayout(row_h, 1)
        form.addRow("Map", self.method)
        form.addRow("Layers", row_lh)
        form.addRow("Overlay", row_c)
        buttons = QHBoxLayout()
        buttons.addWidget(self.status, 1)
        buttons.addWidget(self.peak_button)
        buttons.addWidget(self.save_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.setSpacing(4)
        lay.addWidget(self.selection_label)
        lay.addLayout(form)
        lay.addWidget(self.chart_title)
        lay.addWidget(self.chart)
        lay.addLayout(buttons)
        lay.addStretch(1)

    @staticmethod
    def _show_ids(edit: QLineEdit, on: bool) -> None:
        edit.setEnabled(on)
        edit.setVisible(on)

    # -- requests ----------------------------------------------------------------------------
    def aggregation(self) -> tuple[str | list[int], str | list[int]]:
        """(layers, heads) for the session from the aggregation choices (``"last"``: the last layer)."""
        n_layers, n_heads = self.session.attention_layout()
        choice = self.layers.currentText()
        if choice == "All layers":
            layers: str | list[int] = "all"
        elif choice == "Last layer":
            layers = "last"
        else:
            layers = parse_indices(self.layer_ids.text(), n_layers, "Layers")
        heads: str | list[int] = "mean"
        if self.heads.currentText() == "Chosen heads":
            heads = parse_indices(self.head_ids.text(), n_heads, "Heads")
        return layers, heads

    def recompute(self) -> None:
        """Aggregation changed: the session computes the current selection again."""
        try:
            layers, heads = self.aggregation()
        except AttentionRequestError as exc:
            self._on_failed(str(exc))
            return
        self.session.set_attention_aggregation(layers, heads)

    def method_name(self) -> str:
        """``"relevance"`` or ``"raw"``: the map chosen in the panel."""
        return "relevance" if self.method.currentIndex() == 0 else "raw"

    def set_method(self, method: str) -> None:
        """Show the relevance map or raw attention; the layer/head choices only apply to raw attention."""
        self.method.setCurrentIndex(0 if method == "relevance" else 1)
        for w in (self.layers, self.heads):
            w.setEnabled(method == "raw")
        self.session.set_explanation_method(method)

    # -- display -----------------------------------------------------------------------------
    def _on_started(self, label: str) -> None:
        sel = self.session.selection
        n = len(sel.token_indices) if sel is not None else 0
        what = "relevance" if self.session.explanation_method == "relevance" else "attention"
        self.status.setText(f"Computing the {what} of {n} token(s)…")
        self.selection_label.setText(f"<b>Selection:</b> {label}")

    def _on_failed(self, message: str) -> None:
        self.status.setText(message if len(message) < 90 else "Attention map failed")
        self.status.setToolTip(message)

    def _show_layer(self) -> None:
        heat = self.session.heat
        self.opacity_label.setText(f"{int(round(heat.opacity * 100))}%")
        amap = heat.amap
        self.save_button.setEnabled(amap is not None)
        self.peak_button.setEnabled(amap is not None)
        if amap is None:
            self.chart.set_dependence(None)
            if self.session.selection is None:
                self.selection_label.setText("No selection — select a word, a sentence (Ctrl+click) or use a "
                                             "section's “Attention” button in the draft")
                self.status.setText("")
            return
        self.selection_label.setText(f"<b>Selection:</b> {heat.label}")
        self.chart.set_dependence(heat.dependence)
        if hasattr(amap, "layers"):                 # raw attention: how layers and heads were combined
            try:
                n_layers = self.session.attention_layout()[0]
            except AttentionRequestError:
                n_layers = 0
            layers = "all layers" if len(amap.layers) == n_layers else \
                "layer" + ("s " if len(amap.layers) > 1 else " ") + ", ".join(map(str, amap.layers))
            heads = "mean of heads" if amap.heads == "mean" else "heads " + ", ".join(map(str, amap.heads))
            how = f"raw attention · {layers} · {heads}"
        else:
            how = "relevance"
        self.status.setText(f"{len(amap.token_indices)} token(s) · {how} · peak {self.session.peak_description()}")

    @property
    def current(self):
        """The attention map shown now (None when nothing is shown)."""
        return self.session.heat.amap

    def is_busy(self) -> bool:
        return self.session.attention_busy()

    def go_to_peak(self) -> None:
        """Move the crosshair to the voxel with the most attention."""
        peak = self.session.peak_voxel()
        if peak is not None:
            self.session.document.set_cursor(peak)

    # -- saving ------------------------------------------------------------------------------
    def save_nifti(self, path: str | Path) -> Path:
        """Write the current heatmap as NIfTI on the CT grid (float32, the CT's affine)."""
        return self.session.save_heatmap(path)

    def save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save heatmap as NIfTI", "attention.nii.gz",
                                              "NIfTI (*.nii.gz *.nii)")
        if path:
            try:
                self.save_nifti(path)
                self.status.setText(f"Saved {Path(path).name}")
            except (OSError, AttentionRequestError) as exc:
                self.session.errorOccurred.emit(f"{path}: could not save the heatmap ({exc})")
