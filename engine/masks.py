"""Region masks: the RadGenome layout, label maps with a label table, and TotalSegmentator output.

All of them end up as one boolean array per Reg2RG region on the voxel grid of the CT (`Study.masks`).
Masks on another grid are resampled onto the CT grid through their affines (nearest neighbour).
Problems that leave the study usable (unknown names, non-binary or empty masks, masks outside the CT)
become warnings; the study opens with what is usable.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .errors import StudyError, warn
from .regions import REGIONS, canonical_region


# --------------------------------------------------------------------------------------------
# TotalSegmentator -> Reg2RG regions
# --------------------------------------------------------------------------------------------

#: TotalSegmentator v2 ``total`` task: label value -> structure name (the multi-label ``--ml`` file).
TOTALSEG_V2_CLASSES: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea", 17: "thyroid_gland", 18: "small_bowel",
    19: "duodenum", 20: "colon", 21: "urinary_bladder", 22: "prostate", 23: "kidney_cyst_left",
    24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
    **{27 + i: f"vertebrae_L{5 - i}" for i in range(5)},          # 27..31: L5..L1
    **{32 + i: f"vertebrae_T{12 - i}" for i in range(12)},        # 32..43: T12..T1
    **{44 + i: f"vertebrae_C{7 - i}" for i in range(7)},          # 44..50: C7..C1
    51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk",
    55: "subclavian_artery_right", 56: "subclavian_artery_left", 57: "common_carotid_artery_right",
    58: "common_carotid_artery_left", 59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left", 62: "superior_vena_cava", 63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 66: "iliac_artery_right",
    67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right",
    71: "scapula_left", 72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right",
    75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right", 79: "spinal_cord",
    80: "gluteus_maximus_left", 81: "gluteus_maximus_right", 82: "gluteus_medius_left",
    83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right",
    90: "brain", 91: "skull",
    **{92 + i: f"rib_left_{i + 1}" for i in range(12)},           # 92..103
    **{104 + i: f"rib_right_{i + 1}" for i in range(12)},         # 104..115
    116: "sternum", 117: "costal_cartilages",
}

_ABDOMEN = (
    "liver", "stomach", "spleen", "pancreas", "kidney_right", "kidney_left", "kidney_cyst_left",
    "kidney_cyst_right", "gallbladder", "adrenal_gland_right", "adrenal_gland_left", "duodenum",
    "small_bowel", "colon", "portal_vein_and_splenic_vein",
)
_BONE = (
    tuple(n for n in TOTALSEG_V2_CLASSES.values() if n.startswith(("rib_", "vertebrae_")))
    + ("sacrum", "sternum", "costal_cartilages", "clavicula_left", "clavicula_right", "scapula_left",
       "scapula_right", "humerus_left", "humerus_right", "hip_left", "hip_right", "femur_left", "femur_right")
)
_HEART = (
    "heart", "atrial_appendage_left",
    # heartchambers_highres task (and TotalSegmentator v1 total)
    "heart_myocardium", "heart_atrium_left", "heart_ventricle_left", "heart_atrium_right", "heart_ventricle_right",
)
_LUNG = (
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right", "lung_left", "lung_right",
)

#: TotalSegmentator structure name -> Reg2RG region. Structures not listed (vessels, muscles, spinal
#: cord, brain, pelvic organs) belong to no Reg2RG region and are ignored. Breast, mediastinum and
#: pleura have no TotalSegmentator class: they stay absent and are reported absent.
TOTALSEG_TO_REGION: dict[str, str] = {
    **{n: "abdomen" for n in _ABDOMEN},
    **{n: "bone" for n in _BONE},
    **{n: "heart" for n in _HEART},
    **{n: "lung" for n in _LUNG},
    "esophagus": "esophagus",
    "thyroid_gland": "thyroid",
    "trachea": "trachea and bronchie",
    "lung_trachea_bronchia": "trachea and bronchie",   # lung_vessels task
}

_TOTALSEG_LOWER: dict[str, str] = {k.lower(): v for k, v in TOTALSEG_TO_REGION.items()}
_TOTALSEG_NAMES_LOWER = {n.lower() for n in TOTALSEG_V2_CLASSES.values()} | set(_TOTALSEG_LOWER)

#: Reg2RG regions TotalSegmentator cannot provide.
TOTALSEG_ABSENT_REGIONS: tuple[str, ...] = tuple(r for r in REGIONS if r not in set(TOTALSEG_TO_REGION.values()))


def region_for_name(name: str) -> str | None:
    """The Reg2RG region a mask name stands for: a region name (any spelling) or a TotalSegmentator structure."""
    region = canonical_region(name)
    if region is not None:
        return region
    return _TOTALSEG_LOWER.get(name.strip().lower())


def is_totalsegmentator_name(name: str) -> bool:
    """True for any structure name TotalSegmentator writes (mapped to a region or not)."""
    return name.strip().lower() in _TOTALSEG_NAMES_LOWER


# --------------------------------------------------------------------------------------------
# Label tables
# --------------------------------------------------------------------------------------------

def load_label_table(table: dict | str | os.PathLike) -> dict[int, str]:
    """Read a label table: a dict ``{value: name}``, or a .json / .csv / .txt file.

    .json: ``{"1": "lung", ...}`` (or a list of ``{"value":…, "name":…}``). .csv/.txt: lines
    ``value,name`` / ``value name`` / ``value<TAB>name``; a header line and ``#`` comments are skipped.
    Names may be region names or TotalSegmentator structure names.
    """
    if isinstance(table, dict):
        try:
            return {int(k): str(v) for k, v in table.items()}
        except (TypeError, ValueError) as exc:
            raise StudyError(None, f"label table keys must be integer label values ({exc})") from exc
    path = Path(table)
    if not path.is_file():
        raise StudyError(path, "label table file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    out: dict[int, str] = {}
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, list):
                data = {d["value"]: d["name"] for d in data}
            return {int(k): str(v) for k, v in data.items()}
        dialect_delim = "," if path.suffix.lower() == ".csv" or ("," in text and "\t" not in text) else None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if dialect_delim:
                parts = next(csv.reader([line]))
            else:
                parts = line.replace("\t", " ").split(None, 1)
            if len(parts) < 2:
                raise ValueError(f"line '{line[:60]}' is not 'value name'")
            value, name = parts[0].strip(), parts[1].strip()
            if not value.lstrip("-").isdigit():
                continue  # header line
            out[int(value)] = name
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise StudyError(path, f"cannot read the label table ({exc})") from exc
    if not out:
        raise StudyError(path, "label table is empty")
    return out


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------

def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    """True when two images share the voxel grid (shape and affine up to ``atol`` mm)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label/mask array onto another voxel grid, through the affines.

    Voxels of the target grid outside ``data`` get 0.
    """
    from scipy.ndimage import affine_transform

    # target voxel -> world -> source voxel
    t = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    src = data.astype(np.uint8) if data.dtype == bool else data
    out = affine_transform(src, t[:3, :3], offset=t[:3, 3], output_shape=tuple(shape), order=0,
                           mode="constant", cval=0, prefilter=False)
    return out.astype(bool) if data.dtype == bool else out


# --------------------------------------------------------------------------------------------
# Reading mask files
# --------------------------------------------------------------------------------------------

def _load_mask_image(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types on a broken file
        raise StudyError(path, f"cannot read the mask file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(path, f"mask must be 3D, got shape {data.shape}")
    return data, img.affine


def _load_binary_mask(path: Path, messages: list[str]):
    """A mask file as a bool array and its affine; 0/1 files take the lean slab-by-slab path."""
    import nibabel as nib

    from .niftiread import read_binary_mask

    try:
        img = nib.load(str(path))
        mask = read_binary_mask(img, path)
    except Exception as exc:  # nibabel / the inflater raise many types on a broken file
        raise StudyError(path, f"cannot read the mask file ({type(exc).__name__}: {exc})") from exc
    if mask is not None:
        return mask, img.affine
    data, affine = _load_mask_image(path)
    return _to_binary(data, path, messages), affine


def _to_binary(data: np.ndarray, path: Path, messages: list[str]) -> np.ndarray:
    """A boolean mask from a mask array, with a warning when the values are not just 0 and 1."""
    if data.dtype == bool:
        return data
    if data.dtype == np.uint8 or data.dtype == np.int8:
        # Fast path for the common case: check the values without a float copy.
        mx = int(data.max()) if data.size else 0
        mn = int(data.min()) if data.size else 0
        if mn >= 0 and mx <= 1:
            return data.view(bool) if data.dtype == np.uint8 else data.astype(bool)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        warn(messages, path, "mask contains NaN/inf values; treated as outside")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    values = np.unique(data)
    if np.all(np.isin(values, (0, 1))):
        return data.astype(bool)
    if values.max() <= 1:
        warn(messages, path, f"mask is not binary (values in [{values.min():g}, {values.max():g}]); "
             "read as a probability map and thresholded at 0.5")
        return data >= 0.5
    warn(messages, path, f"mask is not binary ({len(values)} distinct values up to {values.max():g}); "
         "every non-zero voxel is taken as inside")
    return data > 0


def _onto_ct_grid(data: np.ndarray, affine, path: Path, ct_shape, ct_affine, messages: list[str]) -> np.ndarray:
    if same_grid(data.shape, affine, ct_shape, ct_affine):
        return data
    if data.shape == tuple(ct_shape) and np.allclose(affine[:3, :3], ct_affine[:3, :3], atol=1e-3) \
            and np.allclose(affine[:3, 3], ct_affine[:3, 3], atol=0.5):
        return data  # sub-millimetre origin rounding (e.g. from a converter): same grid in practice
    import nibabel as nib

    warn(messages, path, f"mask grid (shape {data.shape}, {''.join(nib.aff2axcodes(affine))}) differs from the CT "
         f"grid (shape {tuple(ct_shape)}, {''.join(nib.aff2axcodes(ct_affine))}); resampled onto the CT by the "
         "affines (nearest neighbour)")
    out = resample_to_grid(data, affine, ct_shape, ct_affine)
    if data.any() and not out.any():
        warn(messages, path, "mask does not overlap the CT volume (check that it belongs to this study)")
    return out


def _add(out: dict, sources: dict, region: str, mask: np.ndarray, source: str) -> None:
    if region in out:
        out[region] = out[region] | mask
        sources[region] = sources[region] + " + " + source
    else:
        out[region] = mask
        sources[region] = source


def _mask_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _read_mask_folder(folder: Path, ct_shape, ct_affine, messages: list[str]):
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
    if not files:
        raise StudyError(folder, "mask folder holds no .nii/.nii.gz files")
    masks: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    totalseg = False
    for path in files:
        name = _mask_name(path)
        region = canonical_region(name)
        if region is None:
            if is_totalsegmentator_name(name):
                totalseg = True
                region = _TOTALSEG_LOWER.get(name.strip().lower())
                if region is None:
                    continue  # a TotalSegmentator structure outside the 10 regions (vessel, muscle, ...)
            else:
                warn(messages, path, f"unknown region name '{name}'; ignored (expected one of {', '.join(REGIONS)} "
                     "or a TotalSegmentator structure)")
                continue
        mask, affine = _load_binary_mask(path, messages)
        mask = _onto_ct_grid(mask, affine, path, ct_shape, ct_affine, messages)
        _add(masks, sources, region, mask, str(path))
    return masks, sources, totalseg


def _read_label_map(path: Path, label_table, ct_shape, ct_affine, messages: list[str]):
    data, affine = _load_mask_image(path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise StudyError(path, "label map must hold integer labels (found fractional or NaN values)")
        data = data.astype(np.int32)
    totalseg = False
    if label_table is None:
        sidecar = next((path.with_name(_mask_name(path) + ext) for ext in (".json", ".csv", ".txt")
                        if path.with_name(_mask_name(path) + ext).is_file()), None)
        if sidecar is not None:
            table = load_label_table(sidecar)
        else:
            table = dict(TOTALSEG_V2_CLASSES)
            totalseg = True
            warn(messages, path, "label map without a label table: read as TotalSegmentator v2 'total' "
                 "multi-label output (pass label_table= otherwise)")
    else:
        table = load_label_table(label_table)
    data = _onto_ct_grid(data, affine, path, ct_shape, ct_affine, messages)
    present = set(int(v) for v in np.unique(data)) - {0}
    by_region: dict[str, list[int]] = {}
    for value, name in table.items():
        region = region_for_name(name)
        if region is None:
            if not is_totalsegmentator_name(name):
                warn(messages, path, f"label {value} '{name}' names no Reg2RG region; ignored")
            continue
        totalseg |= is_totalsegmentator_name(name) and canonical_region(name) is None
        by_region.setdefault(region, []).append(value)
    unlabeled = sorted(present - set(table))
    if unlabeled:
        warn(messages, path, f"label values {unlabeled[:10]} are not in the label table; ignored")
    masks: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for region, values in by_region.items():
        values = [v for v in values if v in present]
        if not values:
            continue
        masks[region] = np.isin(data, values)
        sources[region] = f"{path} (labels {', '.join(str(v) for v in values)})"
    return masks, sources, totalseg


def read_region_masks(source, ct_shape, ct_affine, label_table=None, messages: list[str] | None = None):
    """Read region masks from a folder or label-map file onto the CT grid.

    Returns ``(masks, sources, warnings)``: region -> bool (X, Y, Z) on the CT grid in REGIONS order,
    region -> provenance string, and the warning messages. Empty masks and masks that fall outside
    the CT are dropped with a warning; regions that the source cannot provide are reported absent.
    """
    messages = [] if messages is None else messages
    source = Path(source)
    if source.is_dir():
        masks, sources, totalseg = _read_mask_folder(source, ct_shape, ct_affine, messages)
    elif source.is_file():
        masks, sources, totalseg = _read_label_map(source, label_table, ct_shape, ct_affine, messages)
    else:
        raise StudyError(source, "mask source not found (expected a folder of <region>.nii.gz or a label-map file)")

    kept: dict[str, np.ndarray] = {}
    for region in REGIONS:
        if region not in masks:
            continue
        if not masks[region].any():
            warn(messages, sources[region], f"mask '{region}' is empty; region skipped")
            continue
        kept[region] = masks[region]
    absent = [r for r in REGIONS if r not in kept]
    if totalseg:
        missing = [r for r in TOTALSEG_ABSENT_REGIONS]
        if missing:
            warn(messages, source, f"TotalSegmentator has no class for {', '.join(missing)}: "
                 "these regions stay absent")
    if absent:
        messages_absent = [r for r in absent if not (totalseg and r in TOTALSEG_ABSENT_REGIONS)]
        if messages_absent:
            warn(messages, source, f"no usable mask for {', '.join(messages_absent)}")
    return kept, {r: sources[r] for r in kept}, messages
