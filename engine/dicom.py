"""Reading CT series from a folder of DICOM files (pydicom).

The voxel array follows the convention of nibabel / dcm2niix so that a DICOM series and the NIfTI
converted from it give the same `Study`: array axis 0 runs along the image columns (DICOM row
direction cosine), axis 1 along the image rows, axis 2 along the slice normal (slices sorted by their
position on it). The affine maps voxel indices to RAS+ millimetres (DICOM is LPS: x and y are negated).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StudyError, warn

# Relative tolerance on slice spacing before a gap or uneven spacing is reported.
_SPACING_TOLERANCE = 0.1
# A gap wider than this (mm, and more than _MAX_GAP_STEPS slice steps) is refused rather than filled:
# interpolation across it would invent anatomy (a nodule in the gap would simply not exist in the volume).
_MAX_GAP_MM = 10.0
_MAX_GAP_STEPS = 4


@contextlib.contextmanager
def _pydicom_quiet():
    """Keep pydicom's own error log (a traceback per failed decoder) off the screen: the failure reaches
    the reader once, as our `StudyError` naming the file."""
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _plan_regular_grid(folder, chosen, along: np.ndarray, step: float, messages: list[str]) -> np.ndarray:
    """Slice positions (mm along the normal) of a regular grid at the series' usual spacing, covering the
    slices present; warns what will be interpolated, refuses gaps too wide to fill honestly.

    Why resample rather than refuse every gap: a dropped file or a slightly uneven reconstruction is
    common in PACS exports, and stacking the slices present as if evenly spaced (what we did before)
    shifts every slice after the gap. Interpolating the odd missing slice keeps every real slice where
    it is (3D Slicer regularises such series the same way, with a warning); a wide gap is refused.
    """
    dist = np.diff(along)
    widest = float(dist.max())
    if widest > max(_MAX_GAP_MM, _MAX_GAP_STEPS * step):
        at = float(along[int(np.argmax(dist))] - along[0])
        raise StudyError(folder, f"{chosen}: a gap of {widest:.1f} mm between slices ({at:.1f} mm from the first "
                         f"slice) where slices are {step:.2f} mm apart; too wide to fill by interpolation without "
                         "inventing anatomy. Export the complete series")
    # never past the last slice (no extrapolation): the grid ends within tolerance of it or before
    n = int(np.floor((along[-1] - along[0]) / step + _SPACING_TOLERANCE)) + 1
    grid = along[0] + step * np.arange(n)
    present = np.abs(grid[:, None] - along[None, :]).min(axis=1) <= _SPACING_TOLERANCE * step
    filled = int(np.count_nonzero(~present))
    if np.any(dist > 1.5 * step):
        what = (f"about {int(np.sum(np.round(dist / step) - 1))} slice(s) missing (widest gap {widest:.2f} mm "
                f"where slices are {step:.2f} mm apart)")
    else:
        what = f"unevenly spaced slices ({dist.min():.2f}-{dist.max():.2f} mm)"
    warn(messages, folder, f"{chosen}: {what}; resampled onto a regular {step:.2f} mm grid, {filled} slice(s) "
         "interpolated from their neighbours (every slice present keeps its true position)")
    return grid


def _resample_slices(hu: np.ndarray, along: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of (X, Y, N) slices at positions ``along`` onto positions ``grid`` (float32);
    a grid position within tolerance of a real slice takes that slice unchanged."""
    out = np.empty(hu.shape[:2] + (len(grid),), dtype=np.float32)
    tol = _SPACING_TOLERANCE * float(np.median(np.diff(grid))) if len(grid) > 1 else 0.0
    for j, z in enumerate(grid):
        k = int(np.clip(np.searchsorted(along, z), 1, len(along) - 1))
        lo, hi = along[k - 1], along[k]
        if abs(z - lo) <= tol:
            out[:, :, j] = hu[:, :, k - 1]
        elif abs(z - hi) <= tol:
            out[:, :, j] = hu[:, :, k]
        else:
            w = (z - lo) / (hi - lo)
            out[:, :, j] = (1 - w) * hu[:, :, k - 1] + w * hu[:, :, k]
    if np.issubdtype(hu.dtype, np.integer):
        out = np.round(out)           # HU stay whole numbers (and int16 where they fit)
    return out


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder (header facts only, no pixel data, no patient fields)."""

    uid: str
    modality: str
    description: str
    number: int | None
    files: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        return f"series {self.number} '{self.description}' ({self.modality}, {self.n_slices} files, uid {self.uid})"


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding at least one file with a DICOM preamble."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    for p in _candidate_files(folder)[:64]:
        try:
            with open(p, "rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                return True
        except OSError:
            continue
    return False


def list_dicom_series(folder: str | os.PathLike, unreadable: list[str] | None = None) -> list[SeriesInfo]:
    """List the image series in a DICOM folder, largest CT series first.

    Files that are not readable DICOM are skipped; their names are appended to ``unreadable``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(folder, "is not a folder of DICOM files")
    series: dict[str, SeriesInfo] = {}
    for p in _candidate_files(folder):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
            if unreadable is not None:
                unreadable.append(str(p))
            continue
        if "ImagePositionPatient" not in ds and "PixelData" not in ds and "Rows" not in ds:
            continue  # not an image (structured report, presentation state, ...)
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        if uid not in series:
            number = ds.get("SeriesNumber", None)
            series[uid] = SeriesInfo(
                uid=uid,
                modality=str(ds.get("Modality", "")),
                description=str(ds.get("SeriesDescription", "")),
                number=int(number) if number not in (None, "") else None,
            )
        series[uid].files.append(str(p))
    return sorted(series.values(), key=lambda s: (s.modality != "CT", -s.n_slices))


def _choose_series(folder: Path, found: list[SeriesInfo], series: str | int | None, messages: list[str]) -> SeriesInfo:
    if not found:
        raise StudyError(folder, "contains no readable DICOM image series")
    if series is not None:
        for s in found:
            if str(series) in (s.uid, str(s.number), s.description):
                chosen = s
                break
        else:
            listing = "; ".join(str(s) for s in found)
            raise StudyError(folder, f"has no series '{series}'; found: {listing}")
    else:
        chosen = found[0]
        if len(found) > 1:
            listing = "; ".join(str(s) for s in found[1:])
            warn(messages, folder, f"holds {len(found)} series; opened the largest CT series ({chosen}); "
                 f"others: {listing}. Choose another with --series NUMBER_OR_UID (in the viewer: open the "
                 "folder again and pick it from the list)")
    if chosen.modality != "CT":
        raise StudyError(folder, f"{chosen} has modality '{chosen.modality}', not CT; Reg2RG reads CT only")
    return chosen


def read_dicom_series(folder: str | os.PathLike, series: str | int | None = None):
    """Read one CT series of a DICOM folder.

    Returns ``(voxels, affine, warnings, metadata)``: voxels (X, Y, Z) in HU (int16 when the rescale
    keeps integers in range, else float32), a 4x4 RAS+ affine, a list of warning messages and a dict of
    series facts; its ``identification`` entry holds the patient/study/series identification (for the
    report only: never logged).
    """
    import pydicom

    folder = Path(folder)
    messages: list[str] = []
    unreadable: list[str] = []
    found = list_dicom_series(folder, unreadable)
    for p in unreadable:
        warn(messages, p, "is not a readable DICOM file; skipped")
    chosen = _choose_series(folder, found, series, messages)

    slices = []
    for p in chosen.files:
        try:
            with _pydicom_quiet():
                ds = pydicom.dcmread(p)
                pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for broken pixel data
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())      # pydicom's message spans lines
            raise StudyError(p, f"slice of {chosen} has unreadable pixel data ({detail})") from exc
        if pixels.ndim != 2:
            raise StudyError(p, f"has {pixels.ndim}-D pixel data (multi-frame DICOM is not supported)")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise StudyError(p, f"has no {tag}; cannot place the slice in space")
        slices.append((ds, pixels))

    iop = np.asarray(slices[0][0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds, _ in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    shapes = {px.shape for _, px in slices}
    if len(shapes) != 1:
        raise StudyError(folder, f"{chosen} mixes slice sizes {sorted(shapes)}")
    for ds, _ in slices[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-3):
            raise StudyError(folder, f"{chosen} mixes slice orientations (tilted or localiser slices?)")

    # Slice geometry: distance between neighbours along the normal.
    along = positions @ normal
    dist = np.diff(along)
    regular_grid = None                      # slice positions to resample onto, when the series is irregular
    if len(slices) > 1:
        if np.any(np.abs(dist) < 1e-6):
            raise StudyError(folder, f"{chosen} has several slices at the same position (duplicates or several phases)")
        step = float(np.median(dist))
        if np.any(np.abs(dist - step) > _SPACING_TOLERANCE * step):
            regular_grid = _plan_regular_grid(folder, chosen, along, step, messages)
            slice_vec = normal * step
        else:
            slice_vec = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        thickness = float(slices[0][0].get("SliceThickness", 1.0) or 1.0)
        slice_vec = normal * thickness

    # Rescale to HU slice by slice (slope/intercept may differ between slices).
    rows, cols = slices[0][1].shape
    integral = True
    for ds, _ in slices:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and inter.is_integer()
    hu = np.empty((cols, rows, len(slices)), dtype=np.float32 if not integral else np.int32)
    for k, (ds, px) in enumerate(slices):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        if integral:
            hu[:, :, k] = px.T.astype(np.int32) * int(slope) + int(inter)
        else:
            hu[:, :, k] = px.T.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if regular_grid is not None:
        hu = _resample_slices(hu, along, regular_grid)
    if integral and hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max:
        hu = hu.astype(np.int16)
    elif integral:
        hu = hu.astype(np.float32)

    row_spacing, col_spacing = (float(v) for v in slices[0][0].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing      # array axis 0 = column index, moves along the row direction
    affine_lps[:3, 1] = col_dir * row_spacing      # array axis 1 = row index, moves along the column direction
    affine_lps[:3, 2] = slice_vec
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps   # LPS -> RAS
    first = slices[0][0]
    metadata = {
        "series_uid": chosen.uid,
        "series_number": chosen.number,
        "series_description": chosen.description,
        "modality": chosen.modality,
        "n_slices": len(slices),
    }
    if "KVP" in first:
        metadata["kvp"] = float(first.KVP)
    # The study's identity for drafts (Study.content_digest): the series and its instances, hashed (drafts
    # are keyed by this digest, not by the UIDs that `identification` keeps for the report's references).
    # Without UIDs on every slice the voxels identify the study instead.
    sops = [str(ds.get("SOPInstanceUID", "") or "") for ds, _ in slices]
    if chosen.uid != "unknown" and all(sops):
        metadata["instances_digest"] = hashlib.sha256("\0".join([chosen.uid, *sorted(sops)]).encode()).hexdigest()
    metadata["identification"] = _identification(first, [ds for ds, _ in slices])
    return hu, affine, messages, metadata


def _identification(first, datasets) -> dict:
    """Patient, study and series identification for the report and its DICOM SR / FHIR references.

    Patient data: it goes into the report the radiologist exports, never into logs or file names."""
    def text(tag: str) -> str:
        value = first.get(tag, "")
        return "" if value is None else str(value)

    number = first.get("SeriesNumber", None)
    return {
        "patient_name": text("PatientName"), "patient_id": text("PatientID"),
        "patient_birth_date": text("PatientBirthDate"), "patient_sex": text("PatientSex"),
        "accession_number": text("AccessionNumber"), "study_date": text("StudyDate"), "study_time": text("StudyTime"),
        "study_description": text("StudyDescription"), "study_instance_uid": text("StudyInstanceUID"),
        "study_id": text("StudyID"), "referring_physician": text("ReferringPhysicianName"),
        "series_instance_uid": text("SeriesInstanceUID"), "series_description": text("SeriesDescription"),
        "series_number": int(number) if number not in (None, "") else None, "modality": text("Modality") or "CT",
        "instances": [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets
                      if "SOPClassUID" in ds and "SOPInstanceUID" in ds],
    }
