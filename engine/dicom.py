"""Reading CT series from a folder of DICOM files (pydicom).

The voxel array follows the convention of nibabel / dcm2niix so that a DICOM series and the NIfTI
converted from it give the same `Study`: array axis 0 runs along the image columns (DICOM row
direction cosine), axis 1 along the image rows, axis 2 along the slice normal (slices sorted by their
position on it). The affine maps voxel indices to RAS+ millimetres (DICOM is LPS: x and y are negated).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StudyError, warn

# Relative tolerance on slice spacing before a gap or uneven spacing is reported.
_SPACING_TOLERANCE = 0.1


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
                 f"others: {listing}. Choose one with series=<number or uid>")
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
            ds = pydicom.dcmread(p)
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for broken pixel data
            raise StudyError(p, f"slice of {chosen} has unreadable pixel data ({type(exc).__name__}: {exc})") from exc
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
    dist = np.diff(positions @ normal)
    if len(slices) > 1:
        if np.any(np.abs(dist) < 1e-6):
            raise StudyError(folder, f"{chosen} has several slices at the same position (duplicates or several phases)")
        step = float(np.median(dist))
        if np.any(dist > step * (1.5)):
            n_missing = int(np.sum(np.round(dist / step) - 1))
            warn(messages, folder, f"{chosen}: about {n_missing} slice(s) missing (gap of {dist.max():.2f} mm "
                 f"where slices are {step:.2f} mm apart); volume built from the slices present")
        elif np.any(np.abs(dist - step) > _SPACING_TOLERANCE * step):
            warn(messages, folder, f"{chosen}: unevenly spaced slices ({dist.min():.2f}-{dist.max():.2f} mm); "
                 f"using the mean spacing")
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
