"""Opening and saving studies: a CT volume (NIfTI file or DICOM folder) plus its region masks.

`read_study` is the one entry point the viewer, the CLI and training use. Voxels are kept as stored
(never reoriented, int16 when the file holds integers) so the published pre-processing sees exactly
what the reference fed the model; the affine keeps the orientation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .dicom import is_dicom_folder, list_dicom_series, read_dicom_series, SeriesInfo  # noqa: F401 (re-export)
from .errors import StudyError, warn
from .masks import read_region_masks
from .niftiread import read_raw_voxels
from .study import Study

__all__ = ["read_study", "read_volume", "read_masks", "with_masks", "write_study", "list_dicom_series", "SeriesInfo"]

# Air is -1000 HU; CT scanners pad outside the field of view with about -1024..-3024. A volume
# without any clearly negative value was very likely not rescaled to HU, or is not a CT at all.
_AIR_HU = -500


def _study_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _scaled_voxels(img, path: Path) -> np.ndarray:
    """Voxels with the NIfTI scaling applied, kept int16 whenever the values allow (never float64)."""
    proxy = img.dataobj
    raw = read_raw_voxels(img, path)   # fast path: ISA-L inflate straight into the array
    if raw is None:
        raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    slope = float(getattr(proxy, "slope", 1.0) or 1.0)
    inter = float(getattr(proxy, "inter", 0.0) or 0.0)
    if slope == 1.0 and inter == 0.0:
        data = raw
    elif np.issubdtype(raw.dtype, np.integer) and slope.is_integer() and inter.is_integer():
        data = raw.astype(np.int32) * int(slope) + int(inter)
    else:
        data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if np.issubdtype(data.dtype, np.integer) and data.dtype != np.int16:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
            data = data.astype(np.int16)
        else:
            data = data.astype(np.float32)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)
    elif data.dtype not in (np.int16, np.float32):
        data = data.astype(np.float32)
    return data


def _read_nifti_volume(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise StudyError(path, f"is not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 4:
        raise StudyError(path, f"is a 4D image with {shape[3]} volumes (shape {shape}); "
                         "Reg2RG needs one 3D CT volume: save the volume you want as its own file")
    if len(shape) != 3 or min(shape) < 2:
        raise StudyError(path, f"is not a 3D volume (shape {img.shape}); Reg2RG needs a 3D chest CT")
    try:
        data = _scaled_voxels(img, path)
    except StudyError:
        raise
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError, ValueError...
        raise StudyError(path, f"cannot read the voxel data; the file is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    header = hashlib.sha256(bytes(img.header.binaryblock)).hexdigest()   # part of Study.content_digest
    return data.reshape(shape), img.affine, header, _orientation_known(img)


def _orientation_known(img) -> bool:
    """False when a NIfTI header says nothing about orientation (qform and sform codes both 0): its
    affine is then nibabel's default from the voxel sizes, not the patient's axes."""
    try:
        return bool(int(img.header["qform_code"]) or int(img.header["sform_code"]))
    except (KeyError, TypeError, ValueError):       # not a NIfTI-1/2 header (Analyze): no orientation
        return False


#: Axes further than this from perpendicular (degrees) are reported: a sheared grid (gantry tilt, a bad
#: converter) is read by the model as if it were orthogonal, so anatomy is slightly slanted.
SHEAR_WARN_DEGREES = 0.5


def _check_shear(affine: np.ndarray, path, messages: list[str]) -> None:
    """Warn when the voxel axes are not perpendicular (a sheared affine), naming the angle."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    worst = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        cos = float(np.clip(abs(axes[:, i] @ axes[:, j]), 0.0, 1.0))
        worst = max(worst, 90.0 - float(np.degrees(np.arccos(cos))))
    if worst > SHEAR_WARN_DEGREES:
        warn(messages, path, f"the voxel grid is sheared: its axes are {worst:.1f}\u00b0 off perpendicular (gantry "
             "tilt or a converter's error); the model reads it as an orthogonal grid, so anatomy is slightly "
             "slanted for it; resample to an orthogonal grid for a faithful draft")


def _check_intensities(voxels: np.ndarray, path, messages: list[str]) -> np.ndarray:
    if np.issubdtype(voxels.dtype, np.floating):
        bad = ~np.isfinite(voxels)
        n_bad = int(bad.sum())
        if n_bad == voxels.size:
            raise StudyError(path, "every voxel is NaN or infinite")
        if n_bad:
            voxels = voxels.copy() if not voxels.flags.writeable else voxels
            voxels[bad] = -1024.0
            warn(messages, path, f"{n_bad} voxel(s) are NaN or infinite; set to air (-1024 HU)")
    lo, hi = float(voxels.min()), float(voxels.max())
    if lo > _AIR_HU:
        warn(messages, path, f"intensities range from {lo:g} to {hi:g}, with no air (about -1000 HU): this looks "
             "like an MR image or a CT not rescaled to Hounsfield units; the report would be meaningless")
    elif hi - lo < 200:
        warn(messages, path, f"intensities span only {lo:g}..{hi:g}; expected CT Hounsfield units")
    return voxels


def read_volume(path: str | os.PathLike, series: str | int | None = None) -> Study:
    """Read a CT volume (a NIfTI file, or a DICOM series folder) into a `Study` without masks.

    ``series`` chooses a series in a DICOM folder holding several (number, description or UID);
    by default the largest CT series is opened, with a warning listing the others.
    """
    path = Path(path)
    messages: list[str] = []
    metadata: dict = {}
    if path.is_dir():
        if not is_dicom_folder(path):
            raise StudyError(path, "is a folder without DICOM files (expected a NIfTI file or a DICOM series folder)")
        voxels, affine, dicom_warnings, metadata = read_dicom_series(path, series)
        messages.extend(dicom_warnings)
        metadata = {**metadata, "format": "dicom"}
    elif path.is_file():
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            raise StudyError(path, "unsupported file type (expected .nii, .nii.gz or a DICOM folder)")
        voxels, affine, header, known = _read_nifti_volume(path)
        metadata = {"format": "nifti", "header_digest": header, "orientation_known": known}
        if not known:
            warn(messages, path, "the header does not say how the voxel axes lie in the patient (qform and sform "
                 "codes are 0); the volume is used as stored and assumed to be in the model's orientation")
    else:
        raise StudyError(path, "not found")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError(path, f"has a degenerate voxel-to-world affine {np.round(affine, 3).tolist()}")
    _check_shear(affine, path, messages)
    voxels = _check_intensities(voxels, path, messages)
    return Study(voxels=voxels, affine=affine, name=_study_name(path), source=str(path),
                 warnings=messages, metadata=metadata)


def read_masks(source: str | os.PathLike, study: Study, label_table=None):
    """Read region masks for ``study`` onto its voxel grid.

    ``source``: a RadGenome-style folder of ``<region>.nii.gz``, a TotalSegmentator per-structure
    folder, a label-map NIfTI (+ ``label_table``: dict value->name or a .json/.csv/.txt file), or a
    TotalSegmentator multi-label file. Returns ``(masks, sources, warnings)``.
    """
    return read_region_masks(source, study.shape, study.affine, label_table=label_table)


def with_masks(study: Study, source: str | os.PathLike, label_table=None) -> Study:
    """``study`` with the region masks from ``source`` (replacing any it had), their warnings, and the
    plausibility problems (`maskcheck`: masks that may belong to another scan) in ``mask_problems``."""
    from .maskcheck import check_region_masks

    problems: list[str] = []
    masks, sources, messages = read_region_masks(source, study.shape, study.affine, label_table=label_table,
                                                 problems=problems)
    problems += check_region_masks(study.voxels, study.affine, masks)
    # the warnings about the masks being replaced go with them; the volume's own stay
    previous = set(study.metadata.get("mask_warnings", ())) | set(study.mask_problems)
    mask_warnings = list(messages) + list(problems)
    return Study(voxels=study.voxels, affine=study.affine, masks=masks, name=study.name, source=study.source,
                 mask_sources=sources, warnings=[w for w in study.warnings if w not in previous] + mask_warnings,
                 metadata={**study.metadata, "mask_warnings": mask_warnings}, mask_problems=problems)


def read_study(volume: str | os.PathLike, masks: str | os.PathLike | None = None, *,
               series: str | int | None = None, label_table=None) -> Study:
    """Open a study: a CT volume (NIfTI file or DICOM folder) and optionally its region masks.

    Raises `StudyError` (naming the file and the problem) when the volume cannot be used; problems
    that leave it usable (odd intensities, missing slices, unknown/empty/non-binary masks) go to
    ``Study.warnings``; masks that may belong to another scan are also listed in ``Study.mask_problems``.
    """
    study = read_volume(volume, series=series)
    if masks is not None:
        study = with_masks(study, masks, label_table=label_table)
    return study


def write_study(study: Study, volume_path: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> None:
    """Save a study in the RadGenome layout: the volume as NIfTI and ``<mask_dir>/<region>.nii.gz`` (uint8 0/1).

    Voxels keep their dtype (int16 HU stays int16) and the affine is written as both qform and sform.
    """
    import nibabel as nib

    from .fileio import atomic_path, ensure_folder

    volume_path = Path(volume_path)
    ensure_folder(volume_path.parent)
    img = nib.Nifti1Image(study.voxels, study.affine)
    img.set_qform(study.affine, code=1)
    img.set_sform(study.affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(volume_path) as tmp:
        nib.save(img, tmp)
    if mask_dir is None:
        return
    mask_dir = ensure_folder(mask_dir)
    for region, mask in study.masks.items():
        m = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), study.affine)
        m.set_qform(study.affine, code=1)
        m.set_sform(study.affine, code=1)
        with atomic_path(mask_dir / f"{region}.nii.gz") as tmp:
            nib.save(m, tmp)
