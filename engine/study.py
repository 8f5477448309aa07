"""`Study`: one CT volume in Hounsfield units with its geometry and its region masks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Study:
    """A chest CT study as the engine sees it.

    ``voxels`` are kept in the order they are stored on disk (never silently flipped): axis i of the
    array is voxel axis i of ``affine``. Masks share the voxel grid of ``voxels``.
    """

    voxels: np.ndarray                      # (X, Y, Z) HU, int16 or float32, as stored
    affine: np.ndarray                      # (4, 4) voxel index -> world (RAS+, nibabel convention), mm
    masks: dict[str, np.ndarray] = field(default_factory=dict)   # region name -> bool (X, Y, Z)
    name: str = "study"                     # identifier (volume file name without extension)
    source: str = ""                        # where the voxels came from (path, "phantom seed=…")
    mask_sources: dict[str, str] = field(default_factory=dict)   # region name -> where it came from
    warnings: list[str] = field(default_factory=list)            # non-fatal problems found on reading
    metadata: dict[str, Any] = field(default_factory=dict)       # extra facts (phantom findings, reports…)
    mask_problems: list[str] = field(default_factory=list)       # masks that may not belong to this CT (maskcheck)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.voxels.ndim != 3:
            raise ValueError(f"{self.source or self.name}: a CT volume must be 3D, got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"{self.source or self.name}: affine must be 4x4, got {self.affine.shape}")
        for region, mask in self.masks.items():
            if mask.shape != self.voxels.shape:
                raise ValueError(
                    f"mask '{region}' has shape {mask.shape}, the CT has {self.voxels.shape}"
                )

    def content_digest(self) -> str:
        """SHA-256 (hex) identifying the study by its content, not by where it was opened from.

        A DICOM series: its series UID and the sorted SOP instance UIDs of its slices (recorded by the
        reader as ``metadata['instances_digest']``, so no UID itself is kept). Anything else (NIfTI,
        phantom): the file header (``metadata['header_digest']`` when read from NIfTI), the voxel grid
        (shape, dtype, affine) and every voxel. Two different patients saved at the same path therefore
        never share a digest, and the same study copied elsewhere keeps it. Computed once per `Study`
        (about 0.2 s for a 512×512×300 CT) and remembered.
        """
        cached = self.__dict__.get("_content_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        instances = self.metadata.get("instances_digest")
        if instances:
            h.update(b"dicom-instances\0" + str(instances).encode("ascii"))
        else:
            h.update(b"voxels\0" + str(self.metadata.get("header_digest", "")).encode("ascii"))
            voxels = np.ascontiguousarray(self.voxels)
            h.update(f"{voxels.shape}|{voxels.dtype.str}|".encode("ascii"))
            h.update(np.ascontiguousarray(self.affine, dtype=np.float64).tobytes())
            h.update(memoryview(voxels).cast("B"))
        digest = h.hexdigest()
        self.__dict__["_content_digest"] = digest
        return digest

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.voxels.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each stored axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis code of the stored voxel axes, e.g. ``'LPS'`` or ``'RAS'`` (nibabel's convention)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    @property
    def regions_present(self) -> list[str]:
        """Regions with a non-empty mask, in the published region order."""
        from .regions import REGIONS

        return [r for r in REGIONS if r in self.masks and bool(self.masks[r].any())]

    def region_volume_ml(self, region: str) -> float:
        """Volume of a region's mask in millilitres."""
        if region not in self.masks:
            return 0.0
        voxel_ml = float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        return float(np.count_nonzero(self.masks[region])) * voxel_ml
