"""Look of the viewer: window presets, region colours, 3D volume-rendering presets."""

from __future__ import annotations

from dataclasses import dataclass

from reg2rg.engine.regions import REGIONS


@dataclass(frozen=True)
class WindowPreset:
    name: str
    window: float
    level: float
    shortcut: str


# The four presets radiologists use on chest CT (width/level in HU).
WINDOW_PRESETS: tuple[WindowPreset, ...] = (
    WindowPreset("Lung", 1500.0, -600.0, "1"),
    WindowPreset("Mediastinum", 350.0, 50.0, "2"),
    WindowPreset("Soft tissue", 400.0, 40.0, "3"),
    WindowPreset("Bone", 2000.0, 500.0, "4"),
)
DEFAULT_PRESET = WINDOW_PRESETS[1]

# One distinct colour per region (RGB 0-255), chosen to stay apart on a grey CT background.
REGION_COLORS: dict[str, tuple[int, int, int]] = dict(
    zip(
        REGIONS,
        (
            (216, 132, 79),   # abdomen
            (241, 214, 145),  # bone
            (255, 150, 200),  # breast
            (110, 200, 90),   # esophagus
            (220, 50, 60),    # heart
            (70, 150, 235),   # lung
            (160, 110, 220),  # mediastinum
            (60, 215, 190),   # pleura
            (235, 225, 60),   # thyroid
            (175, 235, 255),  # trachea and bronchie
        ),
    )
)

# 3D volume rendering: (HU, opacity) and (HU, r, g, b) control points.
VOLUME_PRESETS: dict[str, dict[str, list[tuple[float, ...]]]] = {
    "Bone": {
        "opacity": [(-1000, 0.0), (150, 0.0), (300, 0.25), (1200, 0.7), (3000, 0.8)],
        "color": [(-1000, 0, 0, 0), (150, 0.55, 0.25, 0.15), (300, 0.95, 0.85, 0.7), (3000, 1, 1, 0.95)],
    },
    "Lung": {
        "opacity": [(-1000, 0.0), (-950, 0.0), (-800, 0.08), (-500, 0.02), (-300, 0.0), (3000, 0.0)],
        "color": [(-1000, 0.3, 0.5, 0.9), (-700, 0.6, 0.8, 1.0), (3000, 1, 1, 1)],
    },
    "Soft tissue": {
        "opacity": [(-1000, 0.0), (-150, 0.0), (0, 0.08), (150, 0.25), (400, 0.6), (3000, 0.8)],
        "color": [(-1000, 0, 0, 0), (-150, 0.6, 0.3, 0.2), (100, 0.9, 0.55, 0.45), (400, 1, 0.95, 0.85)],
    },
}
