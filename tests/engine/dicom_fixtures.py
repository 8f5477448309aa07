"""Writes real DICOM CT series with pydicom for the tests (no fixtures files checked in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(folder, hu: np.ndarray, affine_ras: np.ndarray, *, modality: str = "CT", series_number: int = 1,
                 slope: float = 1.0, intercept: float = -1024.0, signed: bool = False, shuffle_seed: int | None = 0,
                 description: str = "test series", skip_slices=(), header: dict | None = None) -> list[Path]:
    """Write ``hu`` (X, Y, Z) as one DICOM file per slice k, placed by the RAS affine of the volume.

    Stored value = (HU - intercept) / slope. Files are named randomly so that the reader must sort.
    ``header``: more attributes for every slice (patient name, accession number…).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    col_step, row_step = lps[:3, 0], lps[:3, 1]        # array axis 0 = columns, axis 1 = rows
    row_dir, col_dir = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    series_uid, study_uid = generate_uid(), generate_uid()
    stored = np.round((hu.astype(np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    assert stored.min() >= np.iinfo(dtype).min and stored.max() <= np.iinfo(dtype).max
    stored = stored.astype(dtype)
    order = np.arange(hu.shape[2])
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    for n, k in enumerate(order):
        if k in skip_slices:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.InstanceNumber = int(n) + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        for key, value in (header or {}).items():
            setattr(ds, key, value)
        path = folder / f"IM{generate_uid()[-12:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
