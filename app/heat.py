"""The attention heat layer as data (no widgets): colour maps, the heatmap in display order, the
aggregation choices, and the worker that asks the engine for an attention map off the GUI thread.

The drafting session (`session.DraftingSession`) owns the heat layer; the slice and 3D views draw it and
the attention panel shows and changes its settings.
"""

from __future__ import annotations

import logging
import re
import traceback

import nibabel as nib
import numpy as np
from PySide6.QtCore import QObject, Signal, Slot

from .display import DisplayVolume
from .generation import describe_engine_error, engine_lock

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
    """(layers, heads) of the engine's language model (for the aggregation choices). An engine that
    knows it (``attention_layout()``, e.g. a remote one) is asked; else its model's config is read."""
    if hasattr(engine, "attention_layout"):
        layers, heads = engine.attention_layout()
        return int(layers), int(heads)
    lm = engine.model.lang_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    cfg = base.config
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


class AttentionWorker(QObject):
    """One explanation on a worker thread: the heatmap — ``engine.relevance_map`` (``method``
    ``"relevance"``, the default) or ``engine.attention_map`` (``"raw"``) — and, when the engine offers it,
    ``engine.region_dependence`` of the same selection; ``finished(map, dependence)`` or ``failed``, then
    ``done``. An engine without relevance maps (e.g. an older remote one) gets raw attention."""

    finished = Signal(object, object)   # RelevanceMap | AttentionMap, RegionDependence | None
    failed = Signal(str)
    done = Signal()

    def __init__(self, engine, result, token_indices, layers, heads, method: str = "relevance") -> None:
        super().__init__()
        self.engine, self.result, self.token_indices = engine, result, list(token_indices)
        self.layers, self.heads, self.method = layers, heads, method

    @Slot()
    def run(self) -> None:
        try:
            with engine_lock(self.engine):
                if self.method == "relevance" and hasattr(self.engine, "relevance_map"):
                    amap = self.engine.relevance_map(self.result, self.token_indices)
                else:
                    amap = self.engine.attention_map(self.result, self.token_indices, layers=self.layers,
                                                     heads=self.heads)
                dependence = None
                if hasattr(self.engine, "region_dependence"):
                    dependence = self.engine.region_dependence(self.result, self.token_indices)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the draft stays
            logger.debug("explanation failed:\n%s", traceback.format_exc())
            self.failed.emit(describe_engine_error(exc))
        else:
            self.finished.emit(amap, dependence)
        finally:
            self.done.emit()
