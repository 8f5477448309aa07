"""Display geometry: a study's voxels brought to RAS+ axis order (flips/transposes only) and back.

Nothing here resamples. The stored voxels are permuted and flipped with nibabel's orientation
utilities so that display axis 0 points to the patient's Right, axis 1 Anterior and axis 2 Superior;
every display index maps back exactly to one stored voxel (and through the stored affine to mm).
The views then place their cameras so that the patient's left is on the screen's right
(radiological convention). No Qt and no VTK in this module: it is plain numpy and easy to test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from reg2rg.engine.regions import REGION_INDEX, REGIONS
from reg2rg.engine.study import Study

# Display axis i is fixed in the view that shows slices perpendicular to it.
AXIS_SAGITTAL, AXIS_CORONAL, AXIS_AXIAL = 0, 1, 2
VIEW_NAMES = {AXIS_AXIAL: "Axial", AXIS_CORONAL: "Coronal", AXIS_SAGITTAL: "Sagittal"}


@dataclass(frozen=True)
class SurfaceMesh:
    """A triangle surface in display-world mm (a region's outline in 3D): plain arrays, no VTK objects,
    so the document holds data and each view builds its own graphics from it."""

    points: np.ndarray                      # (N, 3) float32 mm
    triangles: np.ndarray                   # (M, 3) int64 indices into points
    normals: np.ndarray | None = None       # (N, 3) float32 unit normals

    @property
    def n_triangles(self) -> int:
        return int(len(self.triangles))


@dataclass
class DisplayVolume:
    """The study in display (RAS+) axis order, ready for VTK (Fortran order: axis 0 varies fastest)."""

    ct: np.ndarray                          # (I, J, K) HU, Fortran-contiguous, axes -> R, A, S
    labels: np.ndarray                      # (I, J, K) uint16, bit r set where region REGIONS[r] is
    spacing: tuple[float, float, float]     # mm per display axis
    ornt: np.ndarray                        # (3, 2) nibabel ornt: stored axis -> (display axis, flip)
    stored_shape: tuple[int, int, int]
    affine: np.ndarray                      # stored voxel -> world (RAS+ mm)
    hu_range: tuple[float, float] = (-1024.0, 3071.0)
    region_bounds: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.ct.shape)  # type: ignore[return-value]

    def to_stored(self, ijk) -> tuple[int, int, int]:
        """Display voxel index -> stored voxel index (exact: the mapping is a permutation with flips)."""
        stored = [0, 0, 0]
        for s_axis, (d_axis, flip) in enumerate(self.ornt):
            d = int(ijk[int(d_axis)])
            stored[s_axis] = self.stored_shape[s_axis] - 1 - d if flip < 0 else d
        return tuple(stored)  # type: ignore[return-value]

    def from_stored(self, idx) -> tuple[int, int, int]:
        """Stored voxel index -> display voxel index."""
        disp = [0, 0, 0]
        for s_axis, (d_axis, flip) in enumerate(self.ornt):
            s = int(idx[s_axis])
            disp[int(d_axis)] = self.stored_shape[s_axis] - 1 - s if flip < 0 else s
        return tuple(disp)  # type: ignore[return-value]

    def world_mm(self, ijk) -> np.ndarray:
        """Patient position (RAS+ mm, the study affine) of a display voxel."""
        stored = np.array(self.to_stored(ijk) + (1,), dtype=np.float64)
        return (self.affine @ stored)[:3]

    def contains(self, ijk) -> bool:
        return all(0 <= int(v) < n for v, n in zip(ijk, self.shape))

    def clamp(self, ijk) -> tuple[int, int, int]:
        return tuple(int(min(max(round(float(v)), 0), n - 1)) for v, n in zip(ijk, self.shape))  # type: ignore

    def hu_at(self, ijk) -> float:
        return float(self.ct[tuple(int(v) for v in ijk)])

    def regions_at(self, ijk) -> list[str]:
        """Region names whose mask covers a display voxel, in the published order."""
        bits = int(self.labels[tuple(int(v) for v in ijk)])
        return [r for i, r in enumerate(REGIONS) if bits & (1 << i)]

    def region_centre(self, region: str) -> tuple[int, int, int] | None:
        """A display voxel inside the region near its centre of mass (None when the mask is empty).

        The centroid of a curved organ (pleura, bone) may fall outside it; clicking a region must land
        on the region, so the nearest mask voxel to the centroid is returned.
        """
        bit = np.uint16(1 << REGION_INDEX[region])
        lo_hi = self.region_bounds.get(region)
        if lo_hi is None:
            return None
        lo, hi = lo_hi
        box = self.labels[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
        pts = np.argwhere(box & bit)                            # (N, 3) in box coordinates
        if len(pts) == 0:
            return None
        if len(pts) > 200_000:                                  # a subsample keeps clicks instant
            pts = pts[:: len(pts) // 200_000 + 1]
        centroid = pts.mean(axis=0)
        nearest = pts[np.argmin(((pts - centroid) ** 2).sum(axis=1))]
        return tuple(int(v) for v in nearest + lo)  # type: ignore[return-value]


def orientation_letters(axis: int) -> dict[str, str]:
    """Letters on the left/right/top/bottom screen edges of a view (radiological convention)."""
    if axis == AXIS_AXIAL:
        return {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    if axis == AXIS_CORONAL:
        return {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    return {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def build_display_volume(study: Study) -> DisplayVolume:
    """Reorient a study's voxels and masks to RAS+ display axis order without resampling."""
    ornt = nib.orientations.io_orientation(study.affine)       # stored axis -> (RAS axis, ±1)
    ct = nib.orientations.apply_orientation(study.voxels, ornt)
    ct = np.asfortranarray(ct)                                 # one copy: VTK wants axis 0 fastest
    labels = np.zeros(ct.shape, dtype=np.uint16, order="F")
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for region, mask in study.masks.items():
        if region not in REGION_INDEX:
            continue
        m = nib.orientations.apply_orientation(np.asarray(mask, dtype=bool), ornt)
        if not m.any():
            continue
        labels[m] |= np.uint16(1 << REGION_INDEX[region])
        nz = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        bounds[region] = (np.array([n[0] for n in nz]), np.array([n[-1] for n in nz]))
    spacing = [0.0, 0.0, 0.0]
    for s_axis, (d_axis, _flip) in enumerate(ornt):
        spacing[int(d_axis)] = study.spacing[s_axis]
    lo, hi = float(ct.min()), float(ct.max())
    return DisplayVolume(
        ct=ct,
        labels=labels,
        spacing=tuple(spacing),  # type: ignore[arg-type]
        ornt=ornt,
        stored_shape=study.shape,
        affine=study.affine,
        hu_range=(lo, hi),
        region_bounds=bounds,
    )


def slice_of(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice of a display array perpendicular to ``axis`` (a view, no copy)."""
    return array[(slice(None),) * axis + (index,)]


def outline_bits(label_slice: np.ndarray) -> np.ndarray:
    """Bits of each region that lie on its in-plane boundary (4-neighbourhood) in a 2D label slice."""
    b = label_slice
    inner = b.copy()
    inner[1:, :] &= b[:-1, :]
    inner[:-1, :] &= b[1:, :]
    inner[:, 1:] &= b[:, :-1]
    inner[:, :-1] &= b[:, 1:]
    inner[0, :] = 0
    inner[-1, :] = 0
    inner[:, 0] = 0
    inner[:, -1] = 0
    return b & ~inner


# ------------------------------------------------------------------------------------------------
# slice compositing: the picture of one slice as RGB, built in numpy with precomputed tables
# ------------------------------------------------------------------------------------------------
_INT16_OFFSET = 32768


def window_table(window: float, level: float) -> np.ndarray:
    """(65536,) uint8 grey of every int16 HU value (index = HU + 32768) for a window/level."""
    hu = np.arange(-_INT16_OFFSET, _INT16_OFFSET, dtype=np.float32)
    lo = level - window / 2.0
    return np.clip((hu - lo) * (255.0 / max(window, 1.0)) + 0.5, 0, 255).astype(np.uint8)


def window_slice(ct_slice: np.ndarray, window: float, level: float, table: np.ndarray | None = None) -> np.ndarray:
    """Grey uint8 of a 2D HU slice; int16 slices go through ``table`` (one gather, no arithmetic)."""
    if ct_slice.dtype == np.int16 and table is not None:
        # int16 -> offset binary as uint16 (x ^ 0x8000) = HU + 32768, the table index
        return table[ct_slice.view(np.uint16) ^ np.uint16(0x8000)]
    lo = level - window / 2.0
    return np.clip((ct_slice.astype(np.float32) - lo) * (255.0 / max(window, 1.0)) + 0.5, 0, 255).astype(np.uint8)


def blend_over(rgb: np.ndarray, rgba: np.ndarray, opacity: float = 1.0) -> None:
    """``rgb`` (..., 3) uint8 <- ``rgba`` over ``rgb`` (straight alpha, times ``opacity``), in place."""
    a = rgba[..., 3:4].astype(np.uint16)
    if opacity < 1.0:
        a = (a * np.uint16(round(opacity * 256))) >> 8
    inv = np.uint16(255) - a
    rgb[...] = ((rgb * inv + rgba[..., :3] * a + np.uint16(127)) // np.uint16(255)).astype(np.uint8)


def compose_slice(grey: np.ndarray, labels: np.ndarray | None = None, fill_table: np.ndarray | None = None,
                  outline_table: np.ndarray | None = None, heat: np.ndarray | None = None,
                  heat_table: np.ndarray | None = None, heat_opacity: float = 0.0,
                  out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: the grey CT, region fills, region outlines, then the heatmap on top.

    ``labels``: region bits of the slice; ``fill_table``/``outline_table``: RGBA (1024, 4) per bit
    combination (see `slice_view.region_lookup_table`), None to skip; ``heat``: uint8 codes into
    ``heat_table`` (256, 4). Only the pixels a layer touches are blended (outlines are sparse).
    """
    rgb = out if out is not None else np.empty(grey.shape + (3,), dtype=np.uint8)
    rgb[...] = grey[..., None]
    if labels is not None and fill_table is not None:
        inside = labels != 0
        if inside.any():
            sub = rgb[inside]                                    # (N, 3) only the labelled pixels
            blend_over(sub, fill_table[labels[inside]])
            rgb[inside] = sub
    if labels is not None and outline_table is not None:
        bits = outline_bits(labels)
        edge = bits != 0
        if edge.any():
            sub = rgb[edge]
            blend_over(sub, outline_table[bits[edge]])
            rgb[edge] = sub
    if heat is not None and heat_table is not None and heat_opacity > 0:
        hot = heat_table[heat, 3] != 0
        if hot.any():
            sub = rgb[hot]
            blend_over(sub, heat_table[heat[hot]], heat_opacity)
            rgb[hot] = sub
    return rgb
