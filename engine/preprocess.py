"""Pre-processing of a study into the tensors Reg2RG was trained on (docs/reproduction.md §3), with the geometry kept.

The published pipeline (MONAI, per study):

* volume: crop to the bounding box of ``HU > -1000``; ``Resize`` to 256x256x64 (mode ``area``);
  clamp to [-1000, 200]; ``(x + 400) / 600``; repeat to 3 channels;
* region: ``volume * mask`` with voxels outside the mask set to -1024, then the same crop (which
  becomes the region's own box), resize, clamp, scale, 3 channels; empty masks are skipped;
* region mask: cropped with the *volume's* box and resized the same way (so it is soft), 1 channel.

We compute the same numbers without building full-size float copies: the volume stays int16, boxes
are found slab by slab, and each region is masked inside its own box only. MONAI's ``area`` resize
is an adaptive average pool (`torch.nn.functional.interpolate(mode="area")`): a float32 sum over
each window divided by the window's lengths. For integer voxels those sums are integers below 2**24,
exact in float32 in any order, so we form them exactly from int16 slabs (`_window_sums`, the
slowest-varying axis first, never a float copy of the crop) and divide like the kernel: the floats
match bit for bit. Float volumes, or windows whose sums could be inexact, use the pooling call itself.
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


#: float32 holds every integer below 2**24 exactly: window sums below it are exact in the pooling
#: kernel whatever its summation order, so an exact integer sum reproduces them bit for bit.
_EXACT_F32 = 1 << 24


def _slowest_axis(arr: np.ndarray) -> int:
    """The axis along which ``arr`` is laid out slowest: slabs across it are contiguous in memory."""
    return int(np.argmax(np.abs(arr.strides)))


def _window_sums(arr: np.ndarray, windows, fill_mask: np.ndarray | None = None, fill_value: int = 0) -> np.ndarray:
    """Exact integer sums of ``arr`` over every box windows[0] x windows[1] x windows[2].

    ``windows[a] = (lo, hi)``: start/stop index arrays along axis a. Voxels where ``fill_mask`` is
    False count as ``fill_value``. The slowest axis is summed first, one output slab at a time, so
    the input is read once in memory order and no full-size temporary is made; the two other axes
    are then summed the same way on the much smaller result.
    """
    first = _slowest_axis(arr)
    out = _sum_along(arr, first, *windows[first], fill_mask=fill_mask, fill_value=fill_value)
    for axis in sorted((a for a in range(3) if a != first), key=lambda a: -abs(out.strides[a])):
        out = _sum_along(out, axis, *windows[axis])
    return out


def _sum_along(arr: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray,
               fill_mask: np.ndarray | None = None, fill_value: int = 0) -> np.ndarray:
    """int32 sums of ``arr`` over the windows [lo[j], hi[j]) along ``axis``, one output slab per window.

    Summing slabs across an axis adds whole contiguous rows; summing along the fastest-varying axis
    would run one tiny reduction per window and row, so such an (already reduced, small) array is
    first laid out with that axis slowest.
    """
    if fill_mask is None and arr.shape[axis] > 1 and abs(arr.strides[axis]) == min(abs(st) for st in arr.strides):
        arr = np.moveaxis(np.ascontiguousarray(np.moveaxis(arr, axis, 0)), 0, axis)
    shape = list(arr.shape)
    shape[axis] = len(lo)
    # output slabs laid out like the input slabs they sum (F order for NIfTI voxels)
    out = np.empty(shape, dtype=np.int32, order="F" if abs(arr.strides[0]) < abs(arr.strides[-1]) else "C")
    index: list = [slice(None)] * 3
    for j, (a, b) in enumerate(zip(lo, hi)):
        index[axis] = slice(int(a), int(b))
        slab = arr[tuple(index)]
        m = None if fill_mask is None else fill_mask[tuple(index)]
        index[axis] = j
        part = out[tuple(index)]
        if m is None:
            np.sum(slab, axis=axis, dtype=np.int32, out=part)
        else:
            # sum of where(m, x, fill) = sum(x * m) + fill * (voxels - sum(m)): integer-exact, and far
            # faster than materialising the where (a data-dependent select per voxel)
            np.sum(slab * m, axis=axis, dtype=np.int32, out=part)
            part += fill_value * (int(b - a) - np.sum(m, axis=axis, dtype=np.int32))
    return out


def _mean_of_sums(sums: np.ndarray, counts, order) -> np.ndarray:
    """``sums / k_a / k_b / k_c`` in float32, dividing along the axes in ``order`` like the pooling kernel."""
    mean = sums.astype(np.float32)
    for axis in order:
        shape = [1, 1, 1]
        shape[axis] = -1
        mean /= np.asarray(counts[axis], dtype=np.float32).reshape(shape)
    return mean


def _max_abs(dtype: np.dtype) -> int:
    if dtype == np.bool_:
        return 1
    info = np.iinfo(dtype)
    return max(abs(int(info.min)), int(info.max))


def _division_order(crop: np.ndarray) -> tuple[int, int, int]:
    """Axis order in which the pooling kernel divides by the window lengths for `_resize` of ``crop``.

    `_resize` hands the kernel a (Z, Y, X) view of Fortran-like crops (it divides by Z, Y, X window
    lengths in turn), a (X, Y, Z) one otherwise. Division is not associative in floats, so the exact
    path divides in the same order to give the same last bit.
    """
    return (2, 1, 0) if crop.strides[0] < crop.strides[-1] else (0, 1, 2)


def _resize_exact(arr: np.ndarray, size, fill_mask: np.ndarray | None = None,
                  fill_value: int = 0, order: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """`_resize` of an integer crop (optionally ``where(fill_mask, arr, fill_value)``) by exact window sums.

    Returns the very float32 numbers of MONAI's ``area`` resize (`_resize`) without a float copy of the
    crop, or None when they may not be exact (non-integer voxels, or windows whose sums could pass
    2**24) and the caller must use `_resize`.
    """
    if arr.dtype.kind not in "biu":
        return None
    size = tuple(int(s) for s in size)
    bounds = [_area_bounds(n, m) for n, m in zip(arr.shape, size)]
    window = int(np.prod([int((end - start).max()) for start, end in bounds]))
    if window * max(_max_abs(arr.dtype), abs(fill_value)) >= _EXACT_F32:
        return None
    sums = _window_sums(arr, bounds, fill_mask, fill_value)                 # (H, W, D) int
    order = _division_order(arr) if order is None else order
    mean = _mean_of_sums(sums, [end - start for start, end in bounds], order)
    return torch.from_numpy(np.ascontiguousarray(mean))[None]              # (1, H, W, D)


def _resize_mask(mask: np.ndarray, crop: Box, size, mask_box: Box | None = None) -> torch.Tensor:
    """``area`` resize of ``mask[crop]`` (a boolean mask), computed only where the mask is.

    Same numbers as `_resize` of the float mask, but the window sums come only from the part of the
    crop inside the mask's bounding box ``mask_box`` (found when not given): outside it every window
    sums to zero. Counts of 0/1 voxels are exact, so only the divisions round, as in the pooling kernel.
    """
    size = tuple(int(s) for s in size)
    out = torch.zeros(size, dtype=torch.float32)
    if mask_box is None:
        mask_box = _bbox(mask)
        if mask_box is None:
            return out[None]
    # the mask's box inside the crop, in crop coordinates
    b0 = [max(m0, c0) - c0 for m0, c0 in zip(mask_box[0], crop[0])]
    b1 = [min(m1, c1) - c0 for m1, c1, c0 in zip(mask_box[1], crop[1], crop[0])]
    if any(a >= b for a, b in zip(b0, b1)):
        return out[None]
    windows, sel_ranges, counts = [], [], []
    for axis in range(3):
        start, end = _area_bounds(crop[1][axis] - crop[0][axis], size[axis])
        sel = np.flatnonzero((start < b1[axis]) & (end > b0[axis]))         # outputs whose window meets the box
        lo = np.clip(start[sel] - b0[axis], 0, b1[axis] - b0[axis])
        hi = np.clip(end[sel] - b0[axis], 0, b1[axis] - b0[axis])
        windows.append((lo, hi))
        sel_ranges.append(slice(int(sel[0]), int(sel[-1]) + 1))
        counts.append(end[sel] - start[sel])
    inner = tuple(slice(c0 + a, c0 + b) for c0, a, b in zip(crop[0], b0, b1))
    sums = _window_sums(mask[inner], windows)                               # (h, w, d) counts
    out[tuple(sel_ranges)] = torch.from_numpy(np.ascontiguousarray(_mean_of_sums(sums, counts, (0, 1, 2))))
    return out[None]                                                        # (1, H, W, D)


def _bbox_by_slabs(predicate, shape, axis: int, step: int = 16) -> Box | None:
    """Bounding box of ``predicate(index)`` (a bool slab for the index tuple), evaluated ``step``
    slices at a time across ``axis``: only slab-sized temporaries, never a full-size boolean volume."""
    other = tuple(a for a in range(3) if a != axis)
    plane = np.zeros([shape[a] for a in other], dtype=bool)                 # projection onto the other axes
    hits: list[int] = []
    index: list = [slice(None)] * 3
    for s in range(0, shape[axis], step):
        index[axis] = slice(s, min(shape[axis], s + step))
        slab = predicate(tuple(index))
        along = slab.any(axis=other)                                         # (k,) slices holding a voxel
        if along.any():
            hits.extend((s + np.flatnonzero(along)).tolist())
            plane |= slab.any(axis=axis)
    if not hits:
        return None
    start, stop = [0, 0, 0], [0, 0, 0]
    start[axis], stop[axis] = hits[0], hits[-1] + 1
    for a, proj_axis in zip(other, (1, 0)):
        idx = np.flatnonzero(plane.any(axis=proj_axis))
        start[a], stop[a] = int(idx[0]), int(idx[-1]) + 1
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def _intensity(t: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1000, 200] HU, map (x + 400) / 600, and repeat to 3 channels (as a view)."""
    t = torch.clamp(t, HU_MIN, HU_MAX).add_(400).div_(600)                    # (1, H, W, D); in place on the clamped copy
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
    """Turn a study into Reg2RG model inputs exactly as the published pipeline does (docs/reproduction.md §3).

    ``input_size``: (H, W, D) of the model grid. ``orientation``: None keeps the stored voxel order
    (what the published weights expect), or an axis code such as ``"LPS"`` to reorient first.
    ``regions``: region names to prepare (default: every region with a non-empty mask).
    """
    input_size = tuple(int(s) for s in input_size)
    messages: list[str] = []
    vol, masks, ornt = _orient(study, orientation)
    # no full-size boolean volume: the foreground is evaluated slab by slab where needed
    box = _bbox_by_slabs(lambda ix: vol[ix] > FOREGROUND_HU, vol.shape, _slowest_axis(vol))
    if box is None:
        raise StudyError(study.source or study.name, f"no voxel above {FOREGROUND_HU} HU: nothing to crop "
                         "(is the volume in Hounsfield units?)")
    crop = _slices(box)
    resized = _resize_exact(vol[crop], input_size)
    image = _intensity(resized if resized is not None else _resize(vol[crop], input_size))

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
        mvol, mmask = vol[msl], mask[msl]
        inner = _bbox_by_slabs(lambda ix: mmask[ix] & (mvol[ix] > FOREGROUND_HU), mmask.shape, _slowest_axis(mvol))
        if inner is None:
            warn(messages, study.source or study.name, f"region '{region}': no voxel of its mask is above "
                 f"{FOREGROUND_HU} HU; region skipped")
            continue
        rbox: Box = (tuple(a + o for a, o in zip(inner[0], mbox[0])), tuple(b + o for b, o in zip(inner[1], mbox[0])))  # type: ignore[assignment]
        rsl = _slices(rbox)
        # volume * mask with -1024 outside, masked slab by slab inside the region's own box
        # the float path resizes np.where(...), whose memory layout (hence division order) numpy
        # derives from both inputs' strides: read it off the same call on a 2x2x2 corner
        corner = tuple(slice(0, 2) for _ in range(3))
        layout = np.where(mask[rsl][corner], vol[rsl][corner].astype(np.float32), np.float32(OUTSIDE_REGION_HU))
        resized = _resize_exact(vol[rsl], input_size, fill_mask=mask[rsl], fill_value=OUTSIDE_REGION_HU,
                                order=_division_order(layout))
        if resized is None:
            masked = np.where(mask[rsl], vol[rsl].astype(np.float32), np.float32(OUTSIDE_REGION_HU))
            resized = _resize(masked, input_size)
        out_regions[region] = _intensity(resized)
        out_masks[region] = _resize_mask(mask, box, input_size, mbox)          # (1, H, W, D), soft
        region_boxes[region] = rbox

    geometry = Geometry(
        input_size=input_size, original_shape=study.shape, oriented_shape=tuple(int(s) for s in vol.shape),
        orientation=None if orientation is None else orientation.upper(), ornt=np.asarray(ornt, dtype=np.float64),
        box=box, region_boxes=region_boxes,
    )
    return ModelInputs(image=image, regions=out_regions, masks=out_masks, geometry=geometry, warnings=messages)
