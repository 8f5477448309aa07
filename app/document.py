"""The viewer's document: the open study, the cursor, window/level and how each region is drawn.

Views and panels only observe this object (its signals) and request changes through its methods,
like a napari layer list or a 3D Slicer MRML scene: nothing in a view owns state another view needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PySide6.QtCore import QObject, Signal

from reg2rg.engine.regions import REGIONS
from reg2rg.engine.study import Study

from .display import DisplayVolume
from .style import DEFAULT_PRESET, REGION_COLORS


@dataclass(frozen=True)
class RegionStyle:
    """How one region's mask is drawn in the slice views and in 3D."""

    color: tuple[int, int, int]
    visible: bool = True
    fill_opacity: float = 0.25
    outline_opacity: float = 0.9


def default_region_styles() -> dict[str, RegionStyle]:
    return {r: RegionStyle(REGION_COLORS[r]) for r in REGIONS}


class ViewerDocument(QObject):
    """State shared by every view: study, display volume, cursor voxel, window/level, region styles."""

    studyChanged = Signal()                 # a new study (or none) is open
    cursorChanged = Signal(tuple)           # display voxel index (i, j, k)
    windowLevelChanged = Signal(float, float)
    regionStylesChanged = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.study: Study | None = None
        self.volume: DisplayVolume | None = None
        self.surfaces: dict = {}            # region -> SurfaceMesh (arrays, no VTK), built off the GUI thread
        self.cursor: tuple[int, int, int] = (0, 0, 0)
        self.window = DEFAULT_PRESET.window
        self.level = DEFAULT_PRESET.level
        self.region_styles = default_region_styles()

    # -- study -------------------------------------------------------------------------------
    def set_study(self, study: Study | None, volume: DisplayVolume | None, surfaces: dict | None = None) -> None:
        """Replace the open study; the cursor goes to the volume centre."""
        self.study, self.volume, self.surfaces = study, volume, dict(surfaces or {})
        if volume is not None:
            self.cursor = tuple(n // 2 for n in volume.shape)  # type: ignore[assignment]
        self.studyChanged.emit()
        self.cursorChanged.emit(self.cursor)

    # -- cursor ------------------------------------------------------------------------------
    def set_cursor(self, ijk) -> None:
        """Move the linked crosshair to a display voxel (clamped to the volume)."""
        if self.volume is None:
            return
        new = self.volume.clamp(ijk)
        if new != self.cursor:
            self.cursor = new
            self.cursorChanged.emit(new)

    def step_slice(self, axis: int, delta: int) -> None:
        ijk = list(self.cursor)
        ijk[axis] += delta
        self.set_cursor(ijk)

    def centre_on_region(self, region: str) -> bool:
        """Move the cursor into a region (near its centre); False when the region has no mask."""
        if self.volume is None:
            return False
        centre = self.volume.region_centre(region)
        if centre is None:
            return False
        self.set_cursor(centre)
        return True

    # -- window / level ----------------------------------------------------------------------
    def set_window_level(self, window: float, level: float) -> None:
        window = max(1.0, float(window))
        if (window, level) != (self.window, self.level):
            self.window, self.level = window, float(level)
            self.windowLevelChanged.emit(self.window, self.level)

    # -- regions -----------------------------------------------------------------------------
    def set_region_style(self, region: str, **changes) -> None:
        """Change how a region is drawn (color, visible, fill_opacity, outline_opacity)."""
        style = replace(self.region_styles[region], **changes)
        if style != self.region_styles[region]:
            self.region_styles[region] = style
            self.regionStylesChanged.emit()
