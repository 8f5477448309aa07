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

#: The other TotalSegmentator tasks that give Reg2RG regions (open licence, CT), label value -> structure,
#: as TotalSegmentator 2.x writes them (its ``map_to_binary.class_map``). A multi-label file written by
#: TotalSegmentator carries its own table in the NIfTI header, which wins over these.
TOTALSEG_TASK_CLASSES: dict[str, dict[int, str]] = {
    "total": TOTALSEG_V2_CLASSES,
    "breasts": {1: "breast"},
    "trunk_cavities": {1: "abdominal_cavity", 2: "thoracic_cavity", 3: "pericardium", 4: "mediastinum"},
    "pleural_pericard_effusion": {1: "lung_pleural", 2: "pleural_effusion", 3: "pericardial_effusion"},
    "lung_vessels": {1: "lung_airways", 2: "lung_airways_wall", 3: "lung_arteries", 4: "lung_veins"},
}
# older spellings of the same tasks' classes (TotalSegmentator 2.0-2.4 lung_vessels)
_TOTALSEG_OLDER_NAMES = ("lung_vessels", "lung_trachea_bronchia")

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

# How TotalSegmentator's structures become the ten RadGenome regions. RadGenome-ChestCT's masks come
# from SAT (not installable here); each rule says where it differs from SAT's region.
#
# * abdomen  = total's abdominal organs (liver, spleen, stomach, pancreas, kidneys, adrenals, gallbladder,
#              bowel, portal/splenic vein) + trunk_cavities' abdominal_cavity where present. SAT's abdomen is
#              the whole abdominal cavity in the scan; without trunk_cavities the fat between organs is missing.
# * bone     = total's ribs, vertebrae, sternum, costal cartilages, clavicles, scapulae, humeri, pelvis, femora.
# * breast   = breasts' breast (glandular and fatty breast tissue; SAT's breast is similar, both sides).
# * esophagus, thyroid = total's esophagus / thyroid_gland (the same organs as SAT).
# * heart    = total's heart (+ atrial appendage) + pleural_pericard_effusion's pericardial_effusion: the
#              effusion is a heart finding in RadGenome's reports. The pericardial fat SAT may include is not.
# * lung     = total's five lobes (SAT: both lungs, the same parenchyma).
# * mediastinum = trunk_cavities' mediastinum minus heart, esophagus and trachea, which have their own
#              regions (SAT's mediastinum may overlap them; RadGenome's reports name them separately).
# * pleura   = trunk_cavities' thoracic_cavity minus lungs, mediastinum, pericardium, heart, esophagus and
#              trachea (the pleural space, so a pleural effusion falls inside it), plus pleural_pericard_effusion's
#              pleural_effusion. SAT segments the pleura as a thin layer; this space is wider where fluid is.
# * trachea and bronchie = total's trachea + lung_vessels' airways (lung_airways, airway wall; older
#              versions: lung_trachea_bronchia) where that optional task was run. SAT includes the main bronchi.
#
# Structures not listed (vessels, muscles, spinal cord, brain, pelvic organs) belong to no region.

#: TotalSegmentator structure name -> Reg2RG region, for the structures that map one to one.
TOTALSEG_TO_REGION: dict[str, str] = {
    **{n: "abdomen" for n in _ABDOMEN},
    "abdominal_cavity": "abdomen",
    **{n: "bone" for n in _BONE},
    "breast": "breast",
    **{n: "heart" for n in _HEART},
    "pericardial_effusion": "heart",
    **{n: "lung" for n in _LUNG},
    "esophagus": "esophagus",
    "thyroid_gland": "thyroid",
    "trachea": "trachea and bronchie",
    "lung_airways": "trachea and bronchie",
    "lung_airways_wall": "trachea and bronchie",
    "lung_trachea_bronchia": "trachea and bronchie",   # lung_vessels task before TotalSegmentator 2.5
}

#: Structures that feed the derived regions (mediastinum, pleura); see the rules above.
TOTALSEG_DERIVED_INPUTS: tuple[str, ...] = ("mediastinum", "thoracic_cavity", "pericardium", "pleural_effusion")

#: The TotalSegmentator task that provides each region.
REGION_TOTALSEG_TASK: dict[str, str] = {
    **{r: "total" for r in REGIONS}, "breast": "breasts", "mediastinum": "trunk_cavities", "pleura": "trunk_cavities",
}

_TOTALSEG_LOWER: dict[str, str] = {k.lower(): v for k, v in TOTALSEG_TO_REGION.items()}
_TOTALSEG_NAMES_LOWER = (
    {n.lower() for classes in TOTALSEG_TASK_CLASSES.values() for n in classes.values()}
    | set(_TOTALSEG_LOWER) | set(_TOTALSEG_OLDER_NAMES)
)

#: Reg2RG regions TotalSegmentator's ``total`` task alone cannot provide (they need the other tasks).
TOTALSEG_ABSENT_REGIONS: tuple[str, ...] = tuple(r for r in REGIONS if REGION_TOTALSEG_TASK[r] != "total")


def region_for_name(name: str) -> str | None:
    """The Reg2RG region a mask name stands for: a region name (any spelling) or a TotalSegmentator structure
    that maps one to one (the derived regions' inputs, such as ``thoracic_cavity``, give None)."""
    region = canonical_region(name)
    if region is not None:
        return region
    return _TOTALSEG_LOWER.get(name.strip().lower())


def is_totalsegmentator_name(name: str) -> bool:
    """True for any structure name TotalSegmentator writes (mapped to a region or not)."""
    return name.strip().lower() in _TOTALSEG_NAMES_LOWER


def label_table_from_header(img) -> dict[int, str] | None:
    """The label table TotalSegmentator writes into a multi-label NIfTI's header (a CaretExtension XML), or None."""
    import re

    for ext in getattr(img.header, "extensions", []) or []:
        try:
            content = ext.get_content()
        except Exception:  # noqa: BLE001 - an extension nibabel cannot decode is just not ours
            continue
        if isinstance(content, bytes):
            content = content.decode("utf-8", errors="replace")
        if not isinstance(content, str) or "<LabelTable>" not in content:
            continue
        labels = re.findall(r'<Label\s+Key="(-?\d+)"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>\s*</Label>', content, re.S)
        if labels:
            return {int(k): v.strip() for k, v in labels}
    return None


def totalseg_label_header(label_table: dict[int, str]):
    """A NIfTI header extension holding ``label_table`` as TotalSegmentator writes it (for files we write)."""
    import nibabel as nib
    from xml.sax.saxutils import escape

    body = "".join(f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{escape(v)}]]></Label>\n'
                   for k, v in sorted(label_table.items()))
    xml = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>\n'
           f"{body}</LabelTable> <VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation></CaretExtension>\n")
    return nib.nifti1.Nifti1Extension(0, xml.encode("utf-8"))


def save_label_map(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, label_table: dict[int, str]) -> None:
    """Write a multi-label NIfTI as TotalSegmentator's ``--ml`` does: uint8 labels, the table in the header
    (atomically: a reader never sees half a file)."""
    import nibabel as nib

    from .fileio import atomic_path

    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.extensions.append(totalseg_label_header(label_table))
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


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


def _grid_mismatch(shape, affine, ct_shape, ct_affine) -> str | None:
    """Why a mask grid differs from the CT's by more than a small resampling (None when it does not).

    A mask made on this CT (TotalSegmentator, SAT, an editor) shares its grid or differs by rounding and a
    different voxel size over the same field of view. Fields of view whose centres lie more than 20 mm apart,
    or which cover less than 80% of each other, mean the mask was drawn on another scan.
    """
    def box(sh, aff):
        corners = np.array([[i, j, k, 1.0] for i in (-0.5, sh[0] - 0.5) for j in (-0.5, sh[1] - 0.5)
                            for k in (-0.5, sh[2] - 0.5)])
        world = corners @ np.asarray(aff, dtype=np.float64).T
        return world[:, :3].min(0), world[:, :3].max(0)

    (alo, ahi), (blo, bhi) = box(shape, affine), box(ct_shape, ct_affine)
    shift = float(np.linalg.norm((alo + ahi) / 2 - (blo + bhi) / 2))
    inter = np.prod(np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None))
    cover = inter / max(min(np.prod(ahi - alo), np.prod(bhi - blo)), 1e-9)
    if shift > 20.0:
        return f"its field of view is centred {shift:.0f} mm away from the CT's"
    if cover < 0.8:
        return f"its field of view covers only {100 * cover:.0f}% of the CT's"
    return None


def _onto_ct_grid(data: np.ndarray, affine, path: Path, ct_shape, ct_affine, messages: list[str],
                  problems: list[str] | None = None, what: str | None = None) -> np.ndarray:
    if same_grid(data.shape, affine, ct_shape, ct_affine):
        return data
    if data.shape == tuple(ct_shape) and np.allclose(affine[:3, :3], ct_affine[:3, :3], atol=1e-3) \
            and np.allclose(affine[:3, 3], ct_affine[:3, 3], atol=0.5):
        return data  # sub-millimetre origin rounding (e.g. from a converter): same grid in practice
    import nibabel as nib

    warn(messages, path, f"mask grid (shape {data.shape}, {''.join(nib.aff2axcodes(affine))}) differs from the CT "
         f"grid (shape {tuple(ct_shape)}, {''.join(nib.aff2axcodes(ct_affine))}); resampled onto the CT grid by "
         "position in the patient (nearest neighbour)")
    why = _grid_mismatch(data.shape, affine, ct_shape, ct_affine)
    if why is not None and problems is not None:
        problems.append(f"The {what or _mask_name(path)} mask was drawn on a different scan grid ({why}); "
                        "it may belong to another scan — check that it lines up with the anatomy.")
    out = resample_to_grid(data, affine, ct_shape, ct_affine)
    if data.any() and not out.any():
        warn(messages, path, "mask does not overlap the CT volume (check that it belongs to this study)")
    return out


def _mask_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


class _RegionAssembly:
    """Region masks gathered from one or more files, then the derived regions (mediastinum, pleura)."""

    def __init__(self) -> None:
        self.masks: dict[str, np.ndarray] = {}
        self.sources: dict[str, str] = {}
        self.inputs: dict[str, np.ndarray] = {}       # structures feeding derived regions
        self.totalseg = False

    def add(self, region: str, mask: np.ndarray, source: str) -> None:
        if region in self.masks:
            self.masks[region] = self.masks[region] | mask
            self.sources[region] = self.sources[region] + " + " + source
        else:
            self.masks[region] = mask
            self.sources[region] = source

    def add_input(self, name: str, mask: np.ndarray) -> None:
        self.inputs[name] = self.inputs[name] | mask if name in self.inputs else mask

    def add_structure(self, name: str, mask: np.ndarray, source: str) -> bool:
        """A TotalSegmentator structure: into its region, or kept as an input of a derived region."""
        key = name.strip().lower()
        if key in TOTALSEG_DERIVED_INPUTS:
            self.add_input(key, mask)
            return True
        region = _TOTALSEG_LOWER.get(key)
        if region is None:
            return False
        self.add(region, mask, source)
        return True

    def derive(self, messages: list[str], where) -> None:
        """Apply the mediastinum and pleura rules (see the table at the top of this module)."""
        def union(names):
            out = None
            for n in names:
                m = self.masks.get(n) if n in REGIONS else self.inputs.get(n)
                if m is not None:
                    if out is None:
                        out = m.copy()
                    else:
                        np.logical_or(out, m, out=out)      # in place: these are whole-CT masks
            return out

        own = union(("heart", "esophagus", "trachea and bronchie"))
        med = self.inputs.get("mediastinum")
        if med is not None and "mediastinum" not in self.masks:
            if own is not None:                              # own is a fresh union: reuse it in place
                med = np.logical_and(med, np.logical_not(own, out=own), out=own)
            self.add("mediastinum", med,
                     f"{where}: TotalSegmentator trunk_cavities mediastinum minus heart, esophagus, trachea")
        cavity = self.inputs.get("thoracic_cavity")
        if cavity is not None and "pleura" not in self.masks:
            taken = union(("lung", "heart", "esophagus", "trachea and bronchie", "mediastinum", "pericardium"))
            if taken is not None:
                pleura = np.logical_not(taken, out=taken)
                np.logical_and(pleura, cavity, out=pleura)
            else:
                pleura = cavity.copy()
            how = f"{where}: TotalSegmentator trunk_cavities thoracic cavity minus lungs, mediastinum, heart, airways"
            if "pleural_effusion" in self.inputs:
                np.logical_or(pleura, self.inputs["pleural_effusion"], out=pleura)
                how += " + pleural_pericard_effusion: pleural effusion"
            self.add("pleura", pleura, how)
        elif "pleural_effusion" in self.inputs and "pleura" not in self.masks and self.inputs["pleural_effusion"].any():
            warn(messages, where, "a pleural effusion mask was found but no thoracic cavity: the pleura needs "
                 "TotalSegmentator's 'trunk_cavities' task")
        self.inputs.clear()


def _is_totalseg_table(names) -> bool:
    """A table (or folder) written by TotalSegmentator: it names a structure that is not a region name."""
    return any(canonical_region(n) is None and is_totalsegmentator_name(n) for n in names)


def _read_mask_folder(folder: Path, ct_shape, ct_affine, messages: list[str], problems: list[str],
                      asm: _RegionAssembly) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
    if not files:
        raise StudyError(folder, "mask folder holds no .nii/.nii.gz files")
    totalseg_folder = _is_totalseg_table(_mask_name(p) for p in files)
    asm.totalseg |= totalseg_folder
    for path in files:
        name = _mask_name(path)
        if name.strip().lower() in TOTALSEG_TASK_CLASSES or _has_label_header(path):
            _read_label_map(path, None, ct_shape, ct_affine, messages, problems, asm)
            continue
        region = canonical_region(name)
        if totalseg_folder and is_totalsegmentator_name(name):
            region = None                       # a TotalSegmentator structure, even when named like a region
        if region is None and not is_totalsegmentator_name(name):
            warn(messages, path, f"unknown region name '{name}'; ignored (expected one of {', '.join(REGIONS)} "
                 "or a TotalSegmentator structure)")
            continue
        key = name.strip().lower()
        if region is None and key not in _TOTALSEG_LOWER and key not in TOTALSEG_DERIVED_INPUTS:
            continue  # a TotalSegmentator structure outside the 10 regions (vessel, muscle, ...)
        mask, affine = _load_binary_mask(path, messages)
        mask = _onto_ct_grid(mask, affine, path, ct_shape, ct_affine, messages, problems,
                             what=region or name.replace("_", " "))
        if region is not None:
            asm.add(region, mask, str(path))
        else:
            asm.add_structure(name, mask, str(path))


def _has_label_header(path: Path) -> bool:
    import nibabel as nib

    try:
        return label_table_from_header(nib.load(str(path))) is not None
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are read as masks
        return False


def _read_label_map(path: Path, label_table, ct_shape, ct_affine, messages: list[str], problems: list[str],
                    asm: _RegionAssembly) -> None:
    import nibabel as nib

    data, affine = _load_mask_image(path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise StudyError(path, "label map must hold integer labels (found fractional or NaN values)")
        data = data.astype(np.int32)
    if label_table is not None:
        table = load_label_table(label_table)
    else:
        sidecar = next((path.with_name(_mask_name(path) + ext) for ext in (".json", ".csv", ".txt")
                        if path.with_name(_mask_name(path) + ext).is_file()), None)
        task = _mask_name(path).strip().lower()
        if sidecar is not None:
            table = load_label_table(sidecar)
        elif (header := label_table_from_header(nib.load(str(path)))) is not None:
            table = header                              # TotalSegmentator's own table, in the file
        elif task in TOTALSEG_TASK_CLASSES:
            table = dict(TOTALSEG_TASK_CLASSES[task])   # a TotalSegmentator --ml file named after its task
        else:
            table = dict(TOTALSEG_V2_CLASSES)
            warn(messages, path, "label map without a label table: read as TotalSegmentator's 'total' output "
                 f"(if it is not, put its table beside it as {_mask_name(path)}.json or .csv)")
    totalseg = _is_totalseg_table(table.values()) or table == TOTALSEG_V2_CLASSES
    asm.totalseg |= totalseg
    data = _onto_ct_grid(data, affine, path, ct_shape, ct_affine, messages, problems, what="label-map")
    if np.issubdtype(data.dtype, np.integer) and data.size and 0 <= int(data.min()) and int(data.max()) < 65536:
        counts = np.bincount(data.ravel())               # one O(n) pass; np.unique sorts the whole volume
        present = set(int(v) for v in np.flatnonzero(counts)) - {0}
    else:
        present = set(int(v) for v in np.unique(data)) - {0}
    targets: dict[str, list[int]] = {}            # region, or "input:<structure>"
    for value, name in table.items():
        key = name.strip().lower()
        if totalseg and key in TOTALSEG_DERIVED_INPUTS:
            targets.setdefault("input:" + key, []).append(value)
            continue
        region = canonical_region(name) if not (totalseg and is_totalsegmentator_name(name)) else None
        region = region or _TOTALSEG_LOWER.get(key)
        if region is None:
            if not is_totalsegmentator_name(name):
                warn(messages, path, f"label {value} '{name}' names no Reg2RG region; ignored")
            continue
        targets.setdefault(region, []).append(value)
    unlabeled = sorted(present - set(table))
    if unlabeled:
        warn(messages, path, f"label values {unlabeled[:10]} are not in the label table; ignored")
    # one gather through a lookup table instead of one pass over the volume per label value
    lut = np.zeros(max(max(present, default=0), max(table, default=0)) + 1, dtype=np.uint8)
    order = list(targets)
    for i, target in enumerate(order, start=1):
        for v in targets[target]:
            if v >= 0:
                lut[v] = i
    codes = lut[np.clip(data, 0, len(lut) - 1)] if len(order) else None
    for i, target in enumerate(order, start=1):
        values = [v for v in targets[target] if v in present]
        if not values:
            continue
        mask = codes == i
        if target.startswith("input:"):
            asm.add_input(target[len("input:"):], mask)
        else:
            asm.add(target, mask, f"{path} (labels {', '.join(str(v) for v in values)})")


def read_region_masks(source, ct_shape, ct_affine, label_table=None, messages: list[str] | None = None,
                      problems: list[str] | None = None):
    """Read region masks from a folder or label-map file onto the CT grid.

    ``source``: a RadGenome folder of ``<region>.nii.gz``; a TotalSegmentator per-structure folder (any of
    its tasks, mixed); a folder of TotalSegmentator multi-label files (``total.nii.gz``, ``breasts.nii.gz``
    …, or any file carrying TotalSegmentator's label table in its header); or one label-map file.
    Returns ``(masks, sources, warnings)``: region -> bool (X, Y, Z) on the CT grid in REGIONS order,
    region -> provenance string, and the warning messages. Empty masks and masks that fall outside
    the CT are dropped with a warning; regions that the source cannot provide are reported absent, naming
    the TotalSegmentator task that would provide them. ``problems`` (if given) receives the sentences
    for masks drawn on another scan's grid (see `maskcheck` for the anatomical checks).
    """
    messages = [] if messages is None else messages
    problems = [] if problems is None else problems
    source = Path(source)
    asm = _RegionAssembly()
    if source.is_dir():
        _read_mask_folder(source, ct_shape, ct_affine, messages, problems, asm)
    elif source.is_file():
        _read_label_map(source, label_table, ct_shape, ct_affine, messages, problems, asm)
    else:
        raise StudyError(source, "mask source not found (expected a folder of <region>.nii.gz or a label-map file)")
    asm.derive(messages, source)
    masks, sources = asm.masks, asm.sources

    kept: dict[str, np.ndarray] = {}
    for region in REGIONS:
        if region not in masks:
            continue
        if not masks[region].any():
            warn(messages, sources[region], f"the '{region}' mask is empty: the {region} section will not be drafted")
            problems.append(f"{region.capitalize()}: the mask is empty — the {region} section will not be drafted.")
            continue
        kept[region] = masks[region]
    absent = [r for r in REGIONS if r not in kept and r not in masks]
    if asm.totalseg and absent:
        by_task: dict[str, list[str]] = {}
        for r in absent:
            by_task.setdefault(REGION_TOTALSEG_TASK[r], []).append(r)
        for task, regions in by_task.items():
            if task == "total":
                warn(messages, source, f"no usable mask for {', '.join(regions)} (not in this scan or not found "
                     "by TotalSegmentator)")
            else:
                warn(messages, source, f"TotalSegmentator output without its '{task}' task: no mask for "
                     f"{', '.join(regions)}; these regions stay absent (Segment regions… in the viewer or "
                     "reg2rg-segment runs it)")
    elif absent:
        warn(messages, source, f"no usable mask for {', '.join(absent)}")
    return kept, {r: sources[r] for r in kept}, messages
