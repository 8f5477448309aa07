"""Mask plausibility: do the region masks belong to this CT?

A label map from another patient, a mask flipped by a converter or drawn on another scan opens without
any reading error, and the model then describes the pelvis as "lung". `check_region_masks` compares each
loaded region with the CT it is drawn on and with the other regions, and says what looks wrong in a
radiologist's words. The checks are deliberately wide (partial scans, big effusions, cardiomegaly must
pass); a failure is a warning shown before drafting, never a refusal.

Checks, on a copy of the volume sub-sampled to at most about 1.5 million voxels (organs stay hundreds of
voxels; the volume of a tiny mask is counted at full resolution):

* inside the body: each region lies mostly inside the body outline (voxels above -500 HU with the holes of
  each axial slice filled, so the lungs count as inside);
* the tissue under the mask: lungs and airways are mostly air, bone is dense, the soft-tissue regions are
  not mostly air;
* positions in the patient (world coordinates of the CT's affine): lungs above the abdomen, the heart
  between the lungs and on the patient's left, thyroid and trachea above the heart;
* volumes within wide anatomical maxima, and no tiny fragments;
* regions that should not share voxels (lung, heart, abdomen, bone, breast) overlap little.
"""

from __future__ import annotations

import numpy as np

from .regions import REGIONS

#: Largest plausible volume of each region in mL (wide: whole-body scans, cardiomegaly, big effusions).
MAX_VOLUME_ML: dict[str, float] = {
    "abdomen": 25000.0, "bone": 25000.0, "breast": 8000.0, "esophagus": 400.0, "heart": 2500.0,
    "lung": 13000.0, "mediastinum": 4000.0, "pleura": 6000.0, "thyroid": 400.0, "trachea and bronchie": 500.0,
}
MIN_VOLUME_ML = 0.5
#: Mean HU under the mask that no real mask of the region has: (lowest, highest, what that tissue looks like).
_HU_RANGES: dict[str, tuple[float, float]] = {
    "lung": (-1000.0, -300.0),                # aerated lung about -850 HU; whole-lung means stay well below -300
    "trachea and bronchie": (-1000.0, -100.0),
    "bone": (100.0, 3000.0),
    "heart": (-200.0, 600.0),
    "esophagus": (-500.0, 600.0),
    "thyroid": (-500.0, 600.0),
    "abdomen": (-500.0, 600.0),
    "mediastinum": (-500.0, 600.0),
    "breast": (-500.0, 600.0),
}
_EXCLUSIVE = ("lung", "heart", "abdomen", "bone", "breast")
_MAX_OVERLAP = 0.25
_MIN_INSIDE_BODY = 0.6


def _body_outline(hu: np.ndarray, axial_axis: int) -> np.ndarray:
    """Voxels inside the patient: above -500 HU, holes filled slice by axial slice (lungs and airways inside)."""
    from scipy import ndimage

    dense = hu > -500
    structure = np.zeros((3, 3, 3), dtype=bool)
    plane = [slice(None)] * 3
    plane[axial_axis] = 1
    structure[tuple(plane)] = ndimage.generate_binary_structure(2, 1)
    # fill holes = everything but the outside air that reaches the slice's edge (one labelling pass,
    # much faster than scipy's iterative binary_fill_holes on a full CT)
    labels, _ = ndimage.label(~dense, structure=structure)
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        if axis != axial_axis:
            lo = [slice(None)] * 3
            lo[axis] = slice(0, 1)
            hi = [slice(None)] * 3
            hi[axis] = slice(-1, None)
            edge[tuple(lo)] = True
            edge[tuple(hi)] = True
    inside = np.ones(int(labels.max()) + 1, dtype=bool)
    inside[np.unique(labels[edge & (labels > 0)])] = False
    inside[0] = True
    body = inside[labels]
    return ndimage.binary_dilation(body, iterations=1)


def _tissue_words(mean_hu: float) -> str:
    if mean_hu < -700:
        return "air or aerated lung"
    if mean_hu < -300:
        return "mixed air and soft tissue"
    if mean_hu < 150:
        return "soft tissue or fat"
    return "bone or dense material"


def check_region_masks(voxels: np.ndarray, affine: np.ndarray, masks: dict[str, np.ndarray]) -> list[str]:
    """Sentences for what looks wrong with ``masks`` on this CT (empty list when nothing does).

    ``voxels`` in HU and ``masks`` (region -> bool) share the CT's voxel grid; ``affine`` maps voxel
    indices to RAS+ millimetres (x grows towards the patient's right, z towards the head).
    """
    problems: list[str] = []
    regions = [r for r in REGIONS if r in masks and masks[r] is not None and masks[r].any()]   # stops at the first voxel
    if not regions:
        return problems
    affine = np.asarray(affine, dtype=np.float64)
    step = max(1, int(np.ceil((voxels.size / 1.5e6) ** (1.0 / 3.0))))
    sub = (slice(None, None, step),) * 3
    hu = np.asarray(voxels[sub], dtype=np.float32)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    axial_axis = int(np.argmax(np.abs(affine[2, :3])))
    body = _body_outline(hu, axial_axis)

    stats: dict[str, dict] = {}
    small: dict[str, np.ndarray] = {}
    for region in regions:
        full = masks[region]
        m = small[region] = np.ascontiguousarray(full[sub])
        n = int(np.count_nonzero(m))
        # the volume from the sub-sampled mask, exact (full resolution) only where it decides "tiny"
        volume = n * step ** 3 * voxel_ml
        if volume < 10 * MIN_VOLUME_ML:
            volume = float(np.count_nonzero(full)) * voxel_ml
        st = {"volume": volume}
        if n:
            idx = np.argwhere(m).astype(np.float64) * step
            world = idx @ affine[:3, :3].T + affine[:3, 3]
            st.update(centre=world.mean(0), lo=world.min(0), hi=world.max(0),
                      mean_hu=float(hu[m].mean()), inside=float(body[m].mean()))
        stats[region] = st
        name = region.capitalize()

        if volume < MIN_VOLUME_ML:
            problems.append(f"{name}: the mask is tiny ({volume:.1f} mL) — probably a stray fragment.")
        elif volume > MAX_VOLUME_ML[region]:
            problems.append(f"{name}: the mask is implausibly large ({volume:.0f} mL; at most about "
                            f"{MAX_VOLUME_ML[region]:.0f} mL is expected) — it may belong to another scan.")
        if "inside" not in st:
            continue
        if st["inside"] < _MIN_INSIDE_BODY:
            problems.append(f"{name}: only {100 * st['inside']:.0f}% of the mask lies inside the patient's body "
                            "— it may belong to another scan.")
        elif region in _HU_RANGES:
            lo, hi = _HU_RANGES[region]
            if not lo <= st["mean_hu"] <= hi:
                problems.append(f"{name}: the mask covers mostly {_tissue_words(st['mean_hu'])} "
                                f"(mean {st['mean_hu']:.0f} HU), not {_expected_tissue(region)} — it may belong "
                                "to another scan or be misaligned.")

    def has(r):
        return r in stats and "centre" in stats[r]

    if has("lung") and has("abdomen") and stats["lung"]["centre"][2] < stats["abdomen"]["centre"][2]:
        problems.append("Lung: the lung mask lies below the abdomen (liver, stomach) — the masks may be "
                        "flipped head to foot or belong to another scan.")
    if has("heart") and has("lung"):
        h, lung = stats["heart"], stats["lung"]
        between_x = lung["lo"][0] - 10 <= h["centre"][0] <= lung["hi"][0] + 10
        between_z = lung["lo"][2] - 30 <= h["centre"][2] <= lung["hi"][2] + 10
        if not (between_x and between_z):
            problems.append("Heart: the heart mask does not lie between the lungs — it may belong to another scan.")
        elif h["centre"][0] > (lung["lo"][0] + lung["hi"][0]) / 2 + 15:
            problems.append("Heart: the heart mask lies on the patient's right — the masks may be mirrored "
                            "left to right (unless the patient has dextrocardia).")
    for upper in ("thyroid", "trachea and bronchie"):
        if has(upper) and has("heart") and stats[upper]["centre"][2] < stats["heart"]["centre"][2]:
            problems.append(f"{upper.capitalize()}: the mask lies below the heart — the masks may be flipped "
                            "head to foot or belong to another scan.")
    for i, a in enumerate(_EXCLUSIVE):
        for b in _EXCLUSIVE[i + 1:]:
            if a in stats and b in stats:
                # on the sub-sampled grid: a share of the smaller mask needs no full-resolution pass
                ma, mb = small[a], small[b]
                smaller = min(int(np.count_nonzero(ma)), int(np.count_nonzero(mb)))
                share = np.count_nonzero(ma & mb) / smaller if smaller else 0.0
                if share > _MAX_OVERLAP:
                    problems.append(f"{a.capitalize()} and {b}: the masks overlap by {100 * share:.0f}% of "
                                    f"the smaller one — they should not share tissue.")
    return problems


def _expected_tissue(region: str) -> str:
    return {"lung": "aerated lung (about -850 HU)", "trachea and bronchie": "the air of the airways",
            "bone": "bone", "heart": "heart muscle and blood"}.get(region, "soft tissue")
