"""Pre-processing of a study into the tensors Reg2RG was trained on (facts §3), with the geometry kept.

The published pipeline (MONAI, per study):

* volume: crop to the bounding box of ``HU > -1000``; ``Resize`` to 256x256x64 (mode ``area``);
  clamp to [-1000, 200]; ``(x + 400) / 600``; repeat to 3 channels;
* region: ``volume * mask`` with voxels outside the mask set to -1024, then the same crop (which
  becomes the region's own box), resize, clamp, scale, 3 channels; empty masks are skipped;
* region mask: cropped with the *volume's* box and resized the same way (so it is soft), 1 channel.

We compute the same numbers without building full-size float copies: the volume stays int16, boxes
are found from boolean projections, each region is masked inside its own box only, and MONAI's
``area`` resize is the very call it makes (`torch.nn.functional.interpolate(mode="area")`, an
adaptive average pool) applied to the same float32 crop, so results match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import StudyError, warn
from .regions import REGIONS
from .study import Study

#: The published model's input size (H, W, D) along stored axes 0, 1, 2.
PUBLISHED_INPUT_SIZE: tuple[int, int, int] = (256, 256, 64)
#: Foreground threshold of the reference crop (``select_fn = x > -1000``).
FOREGROUND_HU = -1000
#: Value the reference writes outside a region's mask before cropping it.
OUTSIDE_REGION_HU = -1024
HU_MIN, HU_MAX = -1000.0, 200.0

Box = tuple[tuple[int, int, int], tuple[int, int, int]]   # (start, stop), stop exclusive


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """How the model grid relates to the original CT: orientation change, crop boxes, resize.

    All boxes are in the voxel indices of the *oriented* volume (the stored one when
    ``orientation`` is None). Picklable (plain tuples and numpy arrays).
    """

    input_size: tuple[int, int, int]                 # (H, W, D) of the model grid
    original_shape: tuple[int, int, int]             # shape of the study as stored
    oriented_shape: tuple[int, int, int]             # shape after reorientation (== original when None)
    orientation: str | None                          # axis code the volume was reoriented to, None = as stored
    ornt: np.ndarray                                 # (3, 2) nibabel orientation transform stored -> oriented
    box: Box                                         # global foreground box (volume and masks)
    region_boxes: dict[str, Box] = field(default_factory=dict)   # region -> its own box

    @property
    def reorient(self) -> np.ndarray:
        """(4, 4) matrix mapping oriented voxel indices to stored voxel indices."""
        from nibabel.orientations import inv_ornt_aff

        return inv_ornt_aff(self.ornt, self.original_shape)

    def box_for(self, region: str | None = None) -> Box:
        """The crop box behind a model tensor: the region's own box, or the global box for None."""
        if region is None:
            return self.box
        if region not in self.region_boxes:
            raise KeyError(f"no region '{region}' in this geometry (have {sorted(self.region_boxes)})")
        return self.region_boxes[region]

    def _scale(self, region):
        start, stop = self.box_for(region)
        extent = np.subtract(stop, start).astype(np.float64)
        return np.asarray(start, dtype=np.float64), extent / np.asarray(self.input_size, dtype=np.float64)

    def to_original(self, points, region: str | None = None) -> np.ndarray:
        """Map (N, 3) model-grid voxel coordinates (continuous, voxel centres at integers) to
        continuous voxel coordinates of the original CT as stored."""
        p = np.atleast_2d(np.asarray(points, dtype=np.float64))
        start, scale = self._scale(region)
        # area resize: model voxel i covers crop voxels [i*s, (i+1)*s), centred at (i + 0.5)*s - 0.5
        oriented = start + (p + 0.5) * scale - 0.5                                   # (N, 3)
        r = self.reorient
        return oriented @ r[:3, :3].T + r[:3, 3]

    def to_model(self, points, region: str | None = None) -> np.ndarray:
        """Inverse of `to_original`: (N, 3) original voxel coordinates -> model-grid coordinates."""
        p = np.atleast_2d(np.asarray(points, dtype=np.float64))
        r = np.linalg.inv(self.reorient)
        oriented = p @ r[:3, :3].T + r[:3, 3]
        start, scale = self._scale(region)
        return (oriented - start + 0.5) / scale - 0.5

    def heatmap_to_original(self, heatmap, region: str | None = None) -> np.ndarray:
        """Map a (H, W, D) model-grid map onto the original CT grid (shape = study shape).

        Trilinear inside the crop box (same voxel-centre convention as `to_original`), zero outside.
        """
        from nibabel.orientations import apply_orientation

        hm = torch.as_tensor(np.asarray(heatmap), dtype=torch.float32)
        if tuple(hm.shape) != tuple(self.input_size):
            raise ValueError(f"heatmap shape {tuple(hm.shape)} != model input size {self.input_size}")
        start, stop = self.box_for(region)
        extent = tuple(int(b - a) for a, b in zip(start, stop))
        up = F.interpolate(hm[None, None], size=extent, mode="trilinear", align_corners=False)[0, 0]
        out = np.zeros(self.oriented_shape, dtype=np.float32)
        out[tuple(slice(a, b) for a, b in zip(start, stop))] = up.numpy()
        if self.orientation is None:
            return out
        return np.ascontiguousarray(apply_orientation(out, _inverse_ornt(self.ornt)))


def _identity_ornt() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``ornt`` (row i = [j, flip]: input axis i -> output axis j)."""
    inv = np.zeros_like(np.asarray(ornt, dtype=np.float64))
    for i, (j, flip) in enumerate(np.asarray(ornt)):
        inv[int(j)] = [i, flip]
    return inv


# --------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------

@dataclass
class ModelInputs:
    """The tensors of one study for Reg2RG, and the geometry to map model voxels back to the CT.

    ``image`` and ``regions`` are 3-channel views of one channel (``expand``, stride 0), as the
    reference repeats one channel; call ``.contiguous()`` before writing into them.
    """

    image: torch.Tensor                                          # (3, H, W, D) float32
    regions: dict[str, torch.Tensor] = field(default_factory=dict)   # region -> (3, H, W, D); REGIONS order
    masks: dict[str, torch.Tensor] = field(default_factory=dict)     # region -> (1, H, W, D) soft mask
    geometry: Geometry | None = None
    warnings: list[str] = field(default_factory=list)


def _bbox(mask: np.ndarray) -> Box | None:
    """Bounding box of a boolean volume (start, stop) like MONAI's generate_spatial_bounding_box; None if empty."""
    p01 = mask.any(axis=2)                        # (X, Y)
    xs = np.flatnonzero(p01.any(axis=1))
    if xs.size == 0:
        return None
    ys = np.flatnonzero(p01.any(axis=0))
    zs = np.flatnonzero(mask[xs[0]:xs[-1] + 1, ys[0]:ys[-1] + 1].any(axis=(0, 1)))
    return (int(xs[0]), int(ys[0]), int(zs[0])), (int(xs[-1]) + 1, int(ys[-1]) + 1, int(zs[-1]) + 1)


def _slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in zip(*box))  # type: ignore[return-value]


def _resize(crop: np.ndarray, size) -> torch.Tensor:
    """MONAI ``Resize(mode="area")`` of one channel: (X, Y, Z) -> (1, H, W, D) float32."""
    if crop.strides[0] < crop.strides[-1]:
        # NIfTI voxels are Fortran-ordered: copying them into C order is a cache-hostile transpose
        # (seconds per crop). Resize the transposed view instead and transpose the small result; the
        # window sums of integer HU / 0-1 masks are exact in float32, so the numbers are identical.
        t = torch.from_numpy(np.ascontiguousarray(crop.T, dtype=np.float32))  # (Z, Y, X)
        if tuple(t.shape) != tuple(size)[::-1]:
            t = F.interpolate(t[None, None], size=tuple(size)[::-1], mode="area")[0, 0]
        return t.permute(2, 1, 0).contiguous()[None]                          # (1, H, W, D)
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
    if tuple(t.shape) == tuple(size):
        return t[None]
    return F.interpolate(t[None, None], size=tuple(size), mode="area")[0]      # (1, H, W, D)


def _area_bounds(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Input window [start, end) of each of the m outputs of an n -> m adaptive average pool (PyTorch's rule)."""
    i = np.arange(m)
    return (i * n) // m, ((i + 1) * n + m - 1) // m


def _resize_mask(mask_crop: np.ndarray, size) -> torch.Tensor:
    """``area`` resize of a boolean mask, computed only where the mask is.

    Same numbers as `_resize` (adaptive average pooling), but the window sums come from cumulative
    sums over the mask's own bounding box: outside it every window sums to zero. Counts of 0/1 voxels
    are exact in float32, so only the final division can round, exactly as in the pooling kernel.
    """
    size = tuple(size)
    out = torch.zeros(size, dtype=torch.float32)
    box = _bbox(mask_crop)
    if box is None:
        return out[None]
    arr = mask_crop[_slices(box)]
    sel_ranges, counts = [], []
    for axis in range(3):
        start, end = _area_bounds(mask_crop.shape[axis], size[axis])
        b0, b1 = box[0][axis], box[1][axis]
        sel = np.flatnonzero((start < b1) & (end > b0))           # outputs whose window meets the box
        lo, hi = np.clip(start[sel] - b0, 0, b1 - b0), np.clip(end[sel] - b0, 0, b1 - b0)
        csum = np.cumsum(arr, axis=axis, dtype=np.float32)
        pad = [(0, 0)] * 3
        pad[axis] = (1, 0)
        csum = np.pad(csum, pad)                                   # leading zero: window sum = C[hi] - C[lo]
        arr = np.take(csum, hi, axis=axis) - np.take(csum, lo, axis=axis)
        sel_ranges.append(slice(int(sel[0]), int(sel[-1]) + 1))
        counts.append((end[sel] - start[sel]).astype(np.float32))
    mean = arr / counts[0][:, None, None] / counts[1][None, :, None] / counts[2][None, None, :]
    out[tuple(sel_ranges)] = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32))
    return out[None]                                               # (1, H, W, D)


def _intensity(t: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1000, 200] HU, map (x + 400) / 600, and repeat to 3 channels (as a view)."""
    t = (torch.clamp(t, HU_MIN, HU_MAX) + 400) / 600                          # (1, H, W, D)
    return t.expand(3, *t.shape[1:])                                           # (3, H, W, D)


def _orient(study: Study, orientation: str | None):
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    if orientation is None:
        return study.voxels, study.masks, _identity_ornt()
    code = tuple(orientation.upper())
    if len(code) != 3:
        raise ValueError(f"orientation must be a 3-letter axis code like 'LPS', got {orientation!r}")
    ornt = ornt_transform(io_orientation(study.affine), axcodes2ornt(code))
    vol = apply_orientation(study.voxels, ornt)            # a view: flips and transposes only
    masks = {r: apply_orientation(m, ornt) for r, m in study.masks.items()}
    return vol, masks, ornt


def preprocess(study: Study, input_size=PUBLISHED_INPUT_SIZE, orientation: str | None = None,
               regions=None) -> ModelInputs:
    """Turn a study into Reg2RG model inputs exactly as the published pipeline does (facts §3).

    ``input_size``: (H, W, D) of the model grid. ``orientation``: None keeps the stored voxel order
    (what the published weights expect), or an axis code such as ``"LPS"`` to reorient first.
    ``regions``: region names to prepare (default: every region with a non-empty mask).
    """
    input_size = tuple(int(s) for s in input_size)
    messages: list[str] = []
    vol, masks, ornt = _orient(study, orientation)
    foreground = vol > FOREGROUND_HU                                           # (X, Y, Z) bool
    box = _bbox(foreground)
    if box is None:
        raise StudyError(study.source or study.name, f"no voxel above {FOREGROUND_HU} HU: nothing to crop "
                         "(is the volume in Hounsfield units?)")
    crop = _slices(box)
    image = _intensity(_resize(vol[crop], input_size))

    wanted = REGIONS if regions is None else tuple(r for r in REGIONS if r in set(regions))
    out_regions: dict[str, torch.Tensor] = {}
    out_masks: dict[str, torch.Tensor] = {}
    region_boxes: dict[str, Box] = {}
    for region in wanted:
        mask = masks.get(region)
        if mask is None:
            continue
        mbox = _bbox(mask)
        if mbox is None:
            continue                                                           # empty masks are skipped
        # The reference crops volume*mask (outside = -1024) at > -1000: its box is that of
        # mask & foreground, which lies inside the mask's own box.
        msl = _slices(mbox)
        inner = _bbox(mask[msl] & foreground[msl])
        if inner is None:
            warn(messages, study.source or study.name, f"region '{region}': no voxel of its mask is above "
                 f"{FOREGROUND_HU} HU; region skipped")
            continue
        rbox: Box = (tuple(a + o for a, o in zip(inner[0], mbox[0])), tuple(b + o for b, o in zip(inner[1], mbox[0])))  # type: ignore[assignment]
        rsl = _slices(rbox)
        masked = np.where(mask[rsl], vol[rsl].astype(np.float32), np.float32(OUTSIDE_REGION_HU))
        out_regions[region] = _intensity(_resize(masked, input_size))
        out_masks[region] = _resize_mask(mask[crop], input_size)              # (1, H, W, D), soft
        region_boxes[region] = rbox

    geometry = Geometry(
        input_size=input_size, original_shape=study.shape, oriented_shape=tuple(int(s) for s in vol.shape),
        orientation=None if orientation is None else orientation.upper(), ornt=np.asarray(ornt, dtype=np.float64),
        box=box, region_boxes=region_boxes,
    )
    return ModelInputs(image=image, regions=out_regions, masks=out_masks, geometry=geometry, warnings=messages)
