"""The attention panel: where in the scan the model looked while writing a selected word, sentence or section.

A selection in the draft becomes ``engine.attention_map(result, token_indices, layers, heads)``,
computed on a worker thread (`AttentionWorker`). The resulting `AttentionMap` is shown as

- a heatmap over the CT in every slice view (its own layer in each view's image stack; colour map and
  opacity adjustable; low attention is transparent so the anatomy stays readable),
- a bar chart of how the attention split between the global image, each region slot and the rest
  of the prompt (text, markers),

and can be saved as NIfTI on the CT grid. Layer/head aggregation is selectable: all layers, the last
layer or chosen layers; mean of heads or chosen heads.
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
from PySide6.QtCore import QObject, QRectF, QSize, Qt, Signal, Slot
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

from .display import DisplayVolume
from .document import ViewerDocument
from .generation import WorkerJobs, describe_engine_error, engine_lock
from .style import REGION_COLORS

logger = logging.getLogger("reg2rg.app.attention")

# Colour maps as (position, r, g, b) control points, positions in [0, 1].
COLORMAPS: dict[str, list[tuple[float, float, float, float]]] = {
    "Hot": [(0.0, 0.0, 0.0, 0.0), (0.35, 0.9, 0.0, 0.0), (0.7, 1.0, 0.85, 0.0), (1.0, 1.0, 1.0, 1.0)],
    "Jet": [(0.0, 0.0, 0.0, 0.6), (0.2, 0.0, 0.3, 1.0), (0.45, 0.0, 1.0, 1.0), (0.65, 1.0, 1.0, 0.0),
            (0.85, 1.0, 0.3, 0.0), (1.0, 0.6, 0.0, 0.0)],
    "Viridis": [(0.0, 0.27, 0.0, 0.33), (0.25, 0.23, 0.32, 0.55), (0.5, 0.13, 0.57, 0.55),
                (0.75, 0.37, 0.79, 0.38), (1.0, 0.99, 0.91, 0.14)],
}
HEAT_LEVELS = 256
TRANSPARENT_BELOW = 0.08          # the weakest attention is not drawn: the CT underneath stays visible

LAYER_CHOICES = ("All layers", "Last layer", "Chosen layers")
HEAD_CHOICES = ("Mean of heads", "Chosen heads")


class AttentionRequestError(ValueError):
    """An attention selection or aggregation that cannot be computed; the message says why."""


def colormap_table(name: str, levels: int = HEAT_LEVELS) -> np.ndarray:
    """RGBA (levels, 4) uint8 for heat values 0..levels-1: the colour map with an alpha ramp.

    Alpha is 0 below `TRANSPARENT_BELOW` and rises to 1 at the top, so weak attention fades out.
    """
    points = np.asarray(COLORMAPS[name], dtype=np.float64)
    x = np.linspace(0.0, 1.0, levels)
    rgb = np.stack([np.interp(x, points[:, 0], points[:, c]) for c in (1, 2, 3)], axis=1)
    alpha = np.clip((x - TRANSPARENT_BELOW) / (0.6 - TRANSPARENT_BELOW), 0.0, 1.0)
    out = np.zeros((levels, 4), dtype=np.uint8)
    out[:, :3] = np.round(rgb * 255)
    out[:, 3] = np.round(alpha * 255)
    return out


def heatmap_to_display(heatmap: np.ndarray, volume: DisplayVolume, levels: int = HEAT_LEVELS) -> np.ndarray:
    """A heatmap on the stored CT grid -> uint8 codes 0..levels-1 in display order (Fortran), max -> top.

    The same flips/transposes as the CT (`DisplayVolume.ornt`), so heat and anatomy line up voxel for voxel.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != tuple(volume.stored_shape):
        raise AttentionRequestError(f"the heatmap grid {heat.shape} is not the CT grid {tuple(volume.stored_shape)}")
    disp = nib.orientations.apply_orientation(heat, volume.ornt)          # (I, J, K) display order
    peak = float(disp.max()) if disp.size else 0.0
    codes = np.zeros(disp.shape, dtype=np.uint8, order="F")
    if peak > 0:
        codes[...] = np.rint(np.clip(disp, 0, None) * ((levels - 1) / peak))   # a new array: the map stays intact
    return codes


def parse_indices(text: str, count: int, what: str) -> list[int]:
    """``"0, 2-3"`` -> [0, 2, 3]; raises `AttentionRequestError` for anything outside 0..count-1."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if m is None:
            raise AttentionRequestError(f"{what}: {part!r} is not a number or a range like 2-5")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(min(a, b), max(a, b) + 1))
    if not out:
        raise AttentionRequestError(f"{what}: give at least one index (0..{count - 1})")
    bad = sorted({i for i in out if not 0 <= i < count})
    if bad:
        raise AttentionRequestError(f"{what}: {bad} outside 0..{count - 1}")
    return sorted(set(out))


def model_layout(engine) -> tuple[int, int]:
    """(layers, heads) of the engine's language model (for the aggregation choices)."""
    lm = engine.model.lang_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    cfg = base.config
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


class AttentionWorker(QObject):
    """One ``engine.attention_map`` call on a worker thread; ``finished`` or ``failed``, then ``done``."""

    finished = Signal(object)         # AttentionMap
    failed = Signal(str)
    done = Signal()

    def __init__(self, engine, result, token_indices, layers, heads) -> None:
        super().__init__()
        self.engine, self.result, self.token_indices = engine, result, list(token_indices)
        self.layers, self.heads = layers, heads

    @Slot()
    def run(self) -> None:
        try:
            with engine_lock(self.engine):
                amap = self.engine.attention_map(self.result, self.token_indices, layers=self.layers, heads=self.heads)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the draft stays
            logger.debug("attention map failed:\n%s", traceback.format_exc())
            self.failed.emit(describe_engine_error(exc))
        else:
            self.finished.emit(amap)
        finally:
            self.done.emit()


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
            p.drawText(self.rect(), Qt.AlignCenter, "Select words in the draft to see where the model looked")
            return
        label_w, pct_w = 150, 52
        bar_w = max(20, self.width() - label_w - pct_w - 12)
        peak = max(r[1] for r in self.rows) or 1.0
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
            p.drawRoundedRect(QRectF(label_w, y + pad, max(1.0, bar_w * share / peak), row - 2 * pad), 2, 2)
            p.setPen(QColor(216, 220, 226))
            p.drawText(QRectF(label_w + bar_w + 6, y, pct_w, row), Qt.AlignVCenter | Qt.AlignLeft, f"{share:.1%}")


class AttentionPanel(QWidget):
    """Computes and shows attention maps for selections in the draft (see the module docstring)."""

    heatmapChanged = Signal()          # a new map is shown (or the map was cleared)
    errorOccurred = Signal(str)

    def __init__(self, document: ViewerDocument, views, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("attention_panel")
        self.document = document
        self.views = list(views)
        self.current = None                     # AttentionMap shown now
        self.current_label = ""
        self._display_codes: np.ndarray | None = None
        self._worker: AttentionWorker | None = None
        self._jobs = WorkerJobs(self)
        self._pending = None                    # the latest request made while a map was computing
        self._running_label = ""
        self._last_request = None
        self._layout_info: tuple[int, int] | None = None
        self._build()
        document.studyChanged.connect(self.clear)

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.selection_label = QLabel("No selection")
        self.selection_label.setWordWrap(True)
        self.selection_label.setStyleSheet("color: #c8ccd4;")
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
        self.colormap.currentTextChanged.connect(lambda _t: self._show_heatmap())
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.opacity.valueChanged.connect(lambda _v: self._show_heatmap())
        self.opacity_label = QLabel("60%")
        self.opacity_label.setMinimumWidth(36)
        self.show_box = QPushButton("Hide")
        self.show_box.setCheckable(True)
        self.show_box.toggled.connect(self._set_hidden)
        self.save_button = QPushButton("Save NIfTI…")
        self.save_button.setToolTip("Save the heatmap as NIfTI on the CT grid (the CT's affine)")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self.save_dialog)
        self.peak_button = QPushButton("Go to peak")
        self.peak_button.setEnabled(False)
        self.peak_button.clicked.connect(self.go_to_peak)
        self.status = QLabel("")
        self.status.setStyleSheet("color: #9aa3ad;")
        self.chart = SharesChart()

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
        lay.addWidget(self.chart)
        lay.addLayout(buttons)
        lay.addStretch(1)

    # -- requests ----------------------------------------------------------------------------
    def aggregation(self, engine) -> tuple[str | list[int], str | list[int]]:
        """(layers, heads) for ``engine.attention_map`` from the aggregation choices."""
        n_layers, n_heads = model_layout(engine)
        choice = self.layers.currentText()
        if choice == "All layers":
            layers: str | list[int] = "all"
        elif choice == "Last layer":
            layers = [n_layers - 1]
        else:
            layers = parse_indices(self.layer_ids.text(), n_layers, "Layers")
        heads: str | list[int] = "mean"
        if self.heads.currentText() == "Chosen heads":
            heads = parse_indices(self.head_ids.text(), n_heads, "Heads")
        return layers, heads

    def request(self, engine, result, token_indices, label: str) -> None:
        """Compute (off the GUI thread) and show the attention of ``token_indices`` of ``result``."""
        self._last_request = (engine, result, list(token_indices), label)
        try:
            self._layout_info = model_layout(engine)
            layers, heads = self.aggregation(engine)
        except AttentionRequestError as exc:
            self.status.setText(str(exc))
            self.errorOccurred.emit(str(exc))
            return
        if not token_indices:
            self.status.setText("The selection holds no generated words")
            return
        if self._worker is not None:              # one map at a time; the latest selection wins
            self._pending = (engine, result, list(token_indices), label, layers, heads)
            return
        self._start(engine, result, list(token_indices), label, layers, heads)

    def recompute(self) -> None:
        """Aggregation changed: recompute the last selection."""
        if self._last_request is not None:
            self.request(*self._last_request)

    @staticmethod
    def _show_ids(edit: QLineEdit, on: bool) -> None:
        edit.setEnabled(on)
        edit.setVisible(on)

    def _set_hidden(self, hidden: bool) -> None:
        self.show_box.setText("Show" if hidden else "Hide")
        self._show_heatmap()

    def _start(self, engine, result, idx, label, layers, heads) -> None:
        worker = AttentionWorker(engine, result, idx, layers, heads)
        # Bound methods of this GUI-thread object: Qt queues the calls onto the GUI thread (a lambda
        # would run on the worker thread and render VTK from there).
        self._running_label = label
        worker.finished.connect(self._on_map)
        worker.failed.connect(self._on_failed)
        worker.done.connect(self._on_done)
        self._worker = worker
        self.status.setText(f"Computing attention of {len(idx)} token(s)…")
        self.selection_label.setText(f"<b>Selection:</b> {label}")
        self._jobs.start(worker)

    def is_busy(self) -> bool:
        return self._worker is not None

    def _on_done(self) -> None:
        self._worker = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._start(*pending)

    def _on_failed(self, message: str) -> None:
        self.status.setText("Attention map failed")
        self.errorOccurred.emit(message)

    def _on_map(self, amap) -> None:
        label = self._running_label
        vol = self.document.volume
        if vol is None:
            return
        try:
            codes = heatmap_to_display(amap.heatmap, vol)
        except AttentionRequestError as exc:
            self._on_failed(str(exc))
            return
        self.current, self.current_label = amap, label
        self._display_codes = codes
        self.chart.set_shares(amap.shares, amap.other_share)
        layers = "all layers" if len(amap.layers) == (self._layout_info or (0,))[0] else \
            "layer" + ("s " if len(amap.layers) > 1 else " ") + ", ".join(map(str, amap.layers))
        heads = "mean of heads" if amap.heads == "mean" else "heads " + ", ".join(map(str, amap.heads))
        self.status.setText(f"{len(amap.token_indices)} token(s) · {layers} · {heads}")
        self.save_button.setEnabled(True)
        self.peak_button.setEnabled(True)
        self._show_heatmap()

    # -- display -----------------------------------------------------------------------------
    def _show_heatmap(self) -> None:
        self.opacity_label.setText(f"{self.opacity.value()}%")
        hidden = self.show_box.isChecked() or self._display_codes is None
        table = colormap_table(self.colormap.currentText())
        for view in self.views:
            view.set_heatmap(None if hidden else self._display_codes, table, self.opacity.value() / 100.0)
        self.heatmapChanged.emit()

    def clear(self) -> None:
        """Hide the heatmap and forget the map (a new study, a new draft)."""
        self.current, self._display_codes, self._last_request = None, None, None
        self.chart.set_shares(None)
        self.selection_label.setText("No selection — select a word, a sentence (Ctrl+click) or use a "
                                     "section's “Attention” button in the draft")
        self.status.setText("")
        self.save_button.setEnabled(False)
        self.peak_button.setEnabled(False)
        self._show_heatmap()

    def go_to_peak(self) -> None:
        """Move the crosshair to the voxel with the most attention."""
        vol = self.document.volume
        if self.current is not None and vol is not None:
            self.document.set_cursor(vol.from_stored(self.current.peak_voxel))

    # -- saving ------------------------------------------------------------------------------
    def save_nifti(self, path: str | Path) -> Path:
        """Write the current heatmap as NIfTI on the CT grid (float32, the CT's affine)."""
        if self.current is None:
            raise AttentionRequestError("there is no attention map to save; select words in the draft first")
        return Path(self.current.save_nifti(path))

    def save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save heatmap as NIfTI", "attention.nii.gz",
                                              "NIfTI (*.nii.gz *.nii)")
        if path:
            try:
                self.save_nifti(path)
                self.status.setText(f"Saved {Path(path).name}")
            except (OSError, AttentionRequestError) as exc:
                self.errorOccurred.emit(f"{path}: could not save the heatmap ({exc})")
