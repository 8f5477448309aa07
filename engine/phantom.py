"""A synthetic chest CT phantom with the ten Reg2RG region masks and planted findings.

No machine of this project can download RadGenome-ChestCT, so tests, benchmarks and the demo model use
studies made here: `make_study(seed)` returns a `Study` that looks like a non-contrast chest CT (body wall,
lungs with texture and vessel trees, airways, heart with chambers and pericardium, great vessels,
mediastinal fat and nodes, esophagus, thyroid, breasts, spine, ribs, sternum, clavicles, scapulae, liver,
stomach, spleen), with masks for all ten regions painted together with the voxels and a ground-truth
report per region (`phantom_reports`).

Stored orientation (documented because the reference never reorients): the array is indexed (i, j, k) =
(patient right -> left, anterior -> posterior, foot -> head), i.e. LPS voxel axes, exactly how an axial
DICOM series converted by ITK/SimpleITK lands in NIfTI. The affine is diag(-sx, -sy, +sz) in nibabel's
RAS+ world, so ``Study.orientation == "LPS"`` and slice k = 0 is the most caudal (upper abdomen).

Construction is a painter's algorithm on three volumes of the same grid: HU (float32), a tissue code and a
region code. Every structure is an analytic shape (superellipse, ellipsoid, capsule) evaluated only inside
its own bounding box, so a 160x160x80 study builds in well under a second and 512x512x300 stays vectorised.
Later paints win; the region volume is therefore exclusive and each mask is exactly the voxels painted
for that region. All randomness comes from one `SeedSequence(seed)`, split per purpose, so the same seed
gives the same anatomy whatever findings are planted.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .regions import REGIONS
from .study import Study
from .studyio import read_study

# ---------------------------------------------------------------------------------------------------------
# Vocabulary: CT-RATE abnormality names (docs/reproduction.md §6) where one applies, and where each finding is reported.

LUNG_NODULE = "Lung nodule"
LUNG_OPACITY = "Lung opacity"
CONSOLIDATION = "Consolidation"
EMPHYSEMA = "Emphysema"
ATELECTASIS = "Atelectasis"
PLEURAL_EFFUSION = "Pleural effusion"
PERICARDIAL_EFFUSION = "Pericardial effusion"
CARDIOMEGALY = "Cardiomegaly"
ARTERIAL_CALCIFICATION = "Arterial wall calcification"
CORONARY_CALCIFICATION = "Coronary artery wall calcification"
LYMPHADENOPATHY = "Lymphadenopathy"
HIATAL_HERNIA = "Hiatal hernia"
MEDICAL_MATERIAL = "Medical material"
BONE_LESION = "Bone lesion"  # not one of the 18 CT-RATE labels

FINDING_TYPES: tuple[str, ...] = (
    LUNG_NODULE, LUNG_OPACITY, CONSOLIDATION, EMPHYSEMA, ATELECTASIS, PLEURAL_EFFUSION,
    PERICARDIAL_EFFUSION, CARDIOMEGALY, ARTERIAL_CALCIFICATION, CORONARY_CALCIFICATION,
    LYMPHADENOPATHY, HIATAL_HERNIA, MEDICAL_MATERIAL, BONE_LESION,
)

# The region whose mask holds the finding and whose report states it.
FINDING_REGION: dict[str, str] = {
    LUNG_NODULE: "lung", LUNG_OPACITY: "lung", CONSOLIDATION: "lung", EMPHYSEMA: "lung",
    ATELECTASIS: "lung", PLEURAL_EFFUSION: "pleura", PERICARDIAL_EFFUSION: "heart",
    CARDIOMEGALY: "heart", ARTERIAL_CALCIFICATION: "mediastinum", CORONARY_CALCIFICATION: "heart",
    LYMPHADENOPATHY: "mediastinum", HIATAL_HERNIA: "esophagus", MEDICAL_MATERIAL: "heart",
    BONE_LESION: "bone",
}

LYMPH_STATIONS = ("right paratracheal", "subcarinal", "prevascular", "aortopulmonary window")


class PhantomError(ValueError):
    """An impossible phantom request (unknown finding, bad shape or spacing)."""


@dataclass
class Finding:
    """One abnormality to plant. Fields left as None are drawn from the study's seed.

    side: "right" | "left" | "bilateral"; lobe: "upper" | "middle" | "lower"; amount: "small" |
    "moderate" | "large" (effusions) or "mild" | "moderate" | "severe"; kind: "lytic" | "sclerotic" (bone),
    "pacemaker" | "port" (medical material); location: lymph node station, vertebra ("T7"), arteries.
    """

    type: str
    side: str | None = None
    lobe: str | None = None
    size_mm: float | None = None
    amount: str | None = None
    kind: str | None = None
    location: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Tissues (codes only matter inside this module) and their non-contrast HU.

AIR, FAT, SKIN, MUSCLE, LUNG, PLEURA, BLOOD, MYOCARDIUM, PERICARDIUM, FLUID, BONE_CORTEX, BONE_MARROW, \
    CARTILAGE, DISC, CSF, LIVER, SPLEEN, KIDNEY, STOMACH_WALL, THYROID, GLAND, NODE, LESION, CALCIUM, METAL, \
    TABLE, AIRWAY_WALL, GAS = range(28)

HU = {
    "air": -1000.0, "fat": -100.0, "mediastinal_fat": -90.0, "skin": 30.0, "muscle": 45.0, "lung": -860.0,
    "pleura": -60.0, "blood": 38.0, "myocardium": 52.0, "pericardium": 30.0, "fluid": 12.0,
    "cortex": 750.0, "marrow": 230.0, "cartilage": 120.0, "disc": 85.0, "csf": 10.0, "cord": 35.0,
    "liver": 58.0, "spleen": 48.0, "kidney": 32.0, "stomach_wall": 42.0, "thyroid": 105.0,
    "gland": 28.0, "node": 40.0, "soft_lesion": 35.0, "calcium": 750.0, "metal": 3000.0,
}

_REGION_CODE = {name: i + 1 for i, name in enumerate(REGIONS)}
R_ABD, R_BONE, R_BREAST, R_ESO, R_HEART, R_LUNG, R_MED, R_PLEURA, R_THY, R_TRACHEA = range(1, 11)


# ---------------------------------------------------------------------------------------------------------
# Patient: the seed-drawn parameters every structure is placed from (all lengths mm).

@dataclass
class Patient:
    cavity_half_width: float      # inner rib cage, lateral
    cavity_ant: float             # inner rib cage, anterior depth from the body centre line
    cavity_post: float            # inner rib cage, posterior depth
    fat: float                    # subcutaneous fat thickness
    muscle: float                 # chest wall muscle thickness
    length: float                 # cranio-caudal extent of the scanned anatomy
    heart_scale: float
    dome_right: float             # diaphragm dome heights (z)
    dome_left: float
    apex: float                   # lung apex height (z)
    female: bool
    breast_size: float
    noise_sd: float

    @property
    def scale_z(self) -> float:
        return self.length / 320.0

    def z(self, template_mm: float) -> float:
        """A landmark height given for a 320 mm torso, scaled to this patient."""
        return template_mm * self.scale_z

    # Wall thickness outside the cavity: (lateral, anterior, posterior) for each named layer boundary.
    def wall(self, depth: str) -> tuple[float, float, float]:
        f, m = self.fat, self.muscle
        rib = 10.0
        total = (rib + m + f + 2, rib + m + f + 2, rib + m + 6 + 0.7 * f + 2)
        inner = {
            "skin": (0.0, 0.0, 0.0),
            "fat": (2.0, 2.0, 2.0),
            "muscle": (2 + f, 2 + f, 2 + 0.7 * f),
            "ribs": (2 + f + m, 2 + f + m, 2 + 0.7 * f + m + 6),
        }[depth]
        return tuple(t - d for t, d in zip(total, inner))  # type: ignore[return-value]

    @property
    def body_half_width(self) -> float:
        return self.cavity_half_width + self.wall("skin")[0]

    @property
    def body_ant(self) -> float:
        return self.cavity_ant + self.wall("skin")[1]

    @property
    def body_post(self) -> float:
        return self.cavity_post + self.wall("skin")[2]

    @property
    def carina(self) -> float:
        return self.z(200.0)

    @property
    def inlet(self) -> float:
        """Thoracic inlet: above it the central column is neck, not mediastinum."""
        return self.apex - self.z(25.0)


def _draw_patient(rng: np.random.Generator) -> Patient:
    size = rng.uniform(0.88, 1.12)
    depth = size * rng.uniform(0.9, 1.1)
    length = 320.0 * rng.uniform(0.92, 1.08)
    sz = length / 320.0
    dome_r = (95.0 + rng.uniform(-12, 12)) * sz
    return Patient(
        cavity_half_width=128.0 * size, cavity_ant=68.0 * depth, cavity_post=82.0 * depth,
        fat=float(rng.uniform(6, 30)), muscle=float(rng.uniform(6, 12)), length=length,
        heart_scale=float(rng.uniform(0.9, 1.08)) * (0.5 + 0.5 * size),
        dome_right=dome_r, dome_left=dome_r - rng.uniform(5, 18) * sz,
        apex=(292.0 + rng.uniform(-8, 8)) * sz, female=bool(rng.random() < 0.5),
        breast_size=float(rng.uniform(0.75, 1.25)), noise_sd=float(rng.uniform(9, 16)) * size,
    )


# ---------------------------------------------------------------------------------------------------------
# The canvas: three volumes and the mm coordinates of every voxel centre.

class _Canvas:
    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 y_centre: float, z_centre: float):
        X, Y, Z = shape
        self.shape, self.spacing = shape, spacing
        # patient-centred mm: x + towards patient left, y + posterior, z + cranial (LPS voxel axes)
        self.xs = ((np.arange(X) - (X - 1) / 2) * spacing[0]).astype(np.float32)
        self.ys = ((np.arange(Y) - (Y - 1) / 2) * spacing[1] + y_centre).astype(np.float32)
        self.zs = ((np.arange(Z) - (Z - 1) / 2) * spacing[2] + z_centre).astype(np.float32)
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.region = np.zeros(shape, dtype=np.uint8)
        # which planted finding each voxel shows (its 1-based index in the study's findings; 0: none): every
        # paint writes the code of the finding being planted (`marking`), so a later paint over a lesion
        # voxel (a vessel, the heart inside its effusion) takes the voxel back out of the lesion
        self.lesion = np.zeros(shape, dtype=np.uint8)
        self._marking = 0

    @contextlib.contextmanager
    def marking(self, code: int):
        """Paints inside this block belong to planted finding ``code`` (`lesion`; 0: to none)."""
        previous, self._marking = self._marking, int(code)
        try:
            yield
        finally:
            self._marking = previous

    def to_voxel(self, p: Sequence[float]) -> list[int]:
        out = []
        for axis, (v, coords) in enumerate(zip(p, (self.xs, self.ys, self.zs))):
            s = self.spacing[axis]
            out.append(int(np.clip(round((v - coords[0]) / s), 0, len(coords) - 1)))
        return out

    def window(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices and broadcast coordinates of the voxels inside the mm box [lo, hi], or None."""
        sl = []
        for axis, coords in enumerate((self.xs, self.ys, self.zs)):
            s = self.spacing[axis]
            a = max(0, int(math.floor((lo[axis] - coords[0]) / s)))
            b = min(len(coords), int(math.ceil((hi[axis] - coords[0]) / s)) + 1)
            if b <= a:
                return None
            sl.append(slice(a, b))
        x = self.xs[sl[0], None, None]
        y = self.ys[None, sl[1], None]
        z = self.zs[None, None, sl[2]]
        return tuple(sl), x, y, z

    def paint(self, sl, sel, hu, tissue: int, region: int | None = None,
              only_tissue: Iterable[int] | None = None, only_region: Iterable[int] | None = None,
              not_tissue: Iterable[int] | None = None) -> np.ndarray:
        """Write ``hu``/tissue/region where ``sel`` (restricted by the ``only_``/``not_`` guards)."""
        sel = np.broadcast_to(sel, self.hu[sl].shape)
        if only_tissue is not None:
            sel = sel & _lookup(only_tissue)[self.tissue[sl]]
        if not_tissue is not None:
            sel = sel & ~_lookup(not_tissue)[self.tissue[sl]]
        if only_region is not None:
            sel = sel & _lookup(only_region)[self.region[sl]]
        h = self.hu[sl]
        if np.ndim(hu) == 0:
            h[sel] = hu
        else:
            h[sel] = np.broadcast_to(hu, h.shape)[sel]
        self.tissue[sl][sel] = tissue
        self.lesion[sl][sel] = self._marking
        if region is not None:
            self.region[sl][sel] = region
        return sel

    # Shapes: each returns (slices, distance-like field, coordinates) inside its bounding box, or None.

    def ellipsoid(self, c, r, axes=None, pad=0.0):
        """Normalised level sum((q/r)^2) (inside <= 1); ``axes`` columns are the local axes in mm space."""
        c = np.asarray(c, float)
        r = np.asarray(r, float) + pad
        ext = r if axes is None else np.full(3, r.max())
        w = self.window(c - ext, c + ext)
        if w is None:
            return None
        sl, x, y, z = w
        return sl, _ellipsoid_level(x, y, z, c, r, axes), (x, y, z)

    def capsule(self, p0, p1, r):
        """Distance (mm) to the segment p0-p1, inside the box of the capsule of radius r."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        w = self.window(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        if w is None:
            return None
        sl, x, y, z = w
        d = p1 - p0
        dd = max(float(d @ d), 1e-9)
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0.0, 1.0)
        dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
        return sl, dist, (x, y, z)

    def tube(self, points, r, hu, tissue, region=None, **guards) -> None:
        """Paint a poly-line tube of radius r (mm) through ``points``."""
        for p0, p1 in zip(points[:-1], points[1:]):
            got = self.capsule(p0, p1, r)
            if got is not None:
                sl, dist, _ = got
                self.paint(sl, dist <= r, hu, tissue, region, **guards)


def _lookup(codes: Iterable[int]) -> np.ndarray:
    """Boolean table over uint8 codes (much faster than np.isin on small boxes)."""
    table = np.zeros(256, dtype=bool)
    table[list(codes)] = True
    return table


def _ellipsoid_level(x, y, z, c, r, axes=None):
    """sum((q/r)^2) of the points in the ellipsoid's local frame (``axes`` columns = local axes)."""
    d = (x - c[0], y - c[1], z - c[2])
    if axes is None:
        return (d[0] / r[0]) ** 2 + (d[1] / r[1]) ** 2 + (d[2] / r[2]) ** 2
    lev = 0.0
    for k in range(3):
        q = axes[0, k] * d[0] + axes[1, k] * d[1] + axes[2, k] * d[2]
        lev = lev + (q / r[k]) ** 2
    return lev


def _smooth_field(rng: np.random.Generator, shape, spacing, scale_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ~scale_mm (made coarse, upsampled)."""
    if scale_mm < 2.0 * max(spacing):
        g = rng.standard_normal(shape, dtype=np.float32)
        g = ndimage.gaussian_filter(g, [scale_mm / s / 2.0 for s in spacing], mode="wrap")
        g -= g.mean()
        g /= max(float(g.std()), 1e-6)
        return g
    coarse = tuple(max(4, int(math.ceil(n * s / scale_mm)) + 2) for n, s in zip(shape, spacing))
    g = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 1.0, mode="wrap")
    up = ndimage.zoom(g, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=False)
    up = up[: shape[0], : shape[1], : shape[2]]
    if up.shape != tuple(shape):  # zoom rounds; pad the rare missing edge plane
        up = np.pad(up, [(0, n - u) for n, u in zip(shape, up.shape)], mode="edge")
    up -= up.mean()
    up /= max(float(up.std()), 1e-6)
    return up


# ---------------------------------------------------------------------------------------------------------
# Geometry of the torso (vectorised over broadcast coordinate arrays).

def _superellipse(x, y, a, b_ant, b_post, p=2.4):
    b = np.where(y < 0, b_ant, b_post)
    return (np.abs(x) / a) ** p + (np.abs(y) / b) ** p


def _body_level(pt: Patient, x, y, z, depth: str):
    """Level (<= 1 inside) of the surface at the given depth of the body wall ('skin' = outline)."""
    lat, ant, post = pt.wall(depth)
    t = _taper(pt, z)
    a = pt.cavity_half_width * (0.5 + 0.5 * t) + lat              # shoulders keep the body wider than the cage
    return _superellipse(x, y, a, pt.cavity_ant * (0.5 + 0.5 * t) + ant, pt.cavity_post * (0.5 + 0.5 * t) + post)


def _taper(pt: Patient, z):
    """The rib cage narrows from the lung bases to the apices (1 below mid-chest, ~0.8 at the apex)."""
    mid = pt.carina - pt.z(70.0)
    return 1.0 - 0.2 * np.clip((z - mid) / (pt.apex - mid), 0.0, 1.2) ** 1.5


def _cavity_level(pt: Patient, x, y, z, grow: float = 0.0):
    t = _taper(pt, z)
    return _superellipse(x, y, pt.cavity_half_width * t + grow, pt.cavity_ant * (0.5 + 0.5 * t) + grow,
                         pt.cavity_post * (0.5 + 0.5 * t) + grow)


def _diaphragm(pt: Patient, x, y):
    """Height (z) of the diaphragm surface: two domes, lower laterally, posteriorly and anteriorly."""
    a = pt.cavity_half_width
    right = 1.0 / (1.0 + np.exp(x / 15.0))  # 1 on the patient's right (x < 0)
    dome = pt.dome_left + (pt.dome_right - pt.dome_left) * right
    lat = ((np.abs(x) - 0.42 * a) / (0.6 * a)) ** 2
    post = np.clip((y + 10.0) / pt.cavity_post, 0.0, 1.0) ** 2
    ant = np.clip(-y / pt.cavity_ant, 0.0, 1.0) ** 2
    return dome - pt.z(60.0) * lat - pt.z(58.0) * post - pt.z(22.0) * ant


def _apex_ok(pt: Patient, x, y, z, grow: float = 0.0):
    """The lung apices: above apex-60 mm each lung narrows to a dome centred postero-laterally."""
    start = pt.apex - pt.z(60.0)
    t = np.clip((z - start) / (pt.apex - start), 0.0, 1.5)
    s = np.sqrt(np.clip(1.0 - t ** 2, 0.0, 1.0))
    a = pt.cavity_half_width
    cx, ax = 0.52 * a, 0.5 * a * s + grow
    cy, ay = 0.12 * pt.cavity_post, 0.85 * pt.cavity_post * s + grow
    inside = ((np.abs(x) - cx) / np.maximum(ax, 1e-3)) ** 2 + ((y - cy) / np.maximum(ay, 1e-3)) ** 2 <= 1.0
    return (z <= start) | inside


def _column_half_width(pt: Patient, y):
    """Half-width of the mediastinal column between the lungs (narrow in front, wide at the spine)."""
    return 4.0 + 26.0 * np.clip((y + 45.0) / 80.0, 0.0, 1.0) ** 0.7


def lung_lobe(pt: Patient, x, y, z) -> str:
    """Lobe of a lung point: the oblique fissure runs from posterior-superior to anterior-inferior."""
    y_ant, y_post = -pt.cavity_ant, pt.cavity_post
    z_post, z_ant = pt.carina - pt.z(15.0), min(pt.dome_left, pt.dome_right) - pt.z(5.0)
    z_fissure = z_ant + (z_post - z_ant) * (y - y_ant) / (y_post - y_ant)
    if z < z_fissure:
        return "lower"
    if x < 0 and z < pt.carina - pt.z(45.0) and y < 0.3 * pt.cavity_post:
        return "middle"
    return "upper"


# ---------------------------------------------------------------------------------------------------------
# Anatomy painters. Each takes the canvas, the patient and (where it needs one) a random generator.

@dataclass
class _Landmarks:
    """Centre lines shared by several painters and by the findings."""

    heart_centre: np.ndarray
    heart_radii: np.ndarray
    heart_axes: np.ndarray
    aorta: list
    svc: list
    trachea: list
    bronchi: dict
    esophagus: list
    hilum: dict
    coronaries: dict
    vertebrae: list = field(default_factory=list)   # (name, centre z, body centre (x, y), radii)
    spine_y: float = 0.0


def _spine_y(pt: Patient, z):
    mid = pt.length / 2
    return pt.cavity_post - 22.0 + 8.0 * (1 - ((z - mid) / mid) ** 2)


def _paint_torso(cv: _Canvas, pt: Patient, texture: np.ndarray) -> None:
    """Body wall layers, lungs, pleura, mediastinal column, neck and abdominal cavity, slab by slab."""
    X, Y, Z = cv.shape
    x = cv.xs[:, None, None]
    y = cv.ys[None, :, None]
    step = 24
    for k0 in range(0, Z, step):
        ks = slice(k0, min(Z, k0 + step))
        z = cv.zs[None, None, ks]
        hu = cv.hu[:, :, ks]
        ti = cv.tissue[:, :, ks]
        rg = cv.region[:, :, ks]
        body = _body_level(pt, x, y, z, "skin") <= 1
        fat = _body_level(pt, x, y, z, "fat") <= 1
        muscle = _body_level(pt, x, y, z, "muscle") <= 1
        ribs = _body_level(pt, x, y, z, "ribs") <= 1
        cavity = _cavity_level(pt, x, y, z) <= 1
        for sel, value, code in ((body, HU["skin"], SKIN), (fat, HU["fat"], FAT), (muscle, HU["muscle"], MUSCLE),
                                 (ribs, HU["muscle"], MUSCLE)):
            hu[sel], ti[sel] = value, code
        zd = _diaphragm(pt, x, y)
        above = z > zd
        # lungs: cavity above the diaphragm, under the apical domes, outside the mediastinal column
        column = np.abs(x) < _column_half_width(pt, y)
        lung_space = cavity & above & _apex_ok(pt, x, y, z)
        lung = lung_space & ~column
        inner = (_cavity_level(pt, x, y, z, grow=-3.0) <= 1) & (z > zd + 3.0) & _apex_ok(pt, x, y, z, grow=-3.0)
        pleura = lung & ~inner
        neck = cavity & above & (z > pt.inlet) & ~lung
        med = cavity & above & column & (z <= pt.inlet)
        abdomen = cavity & (z < zd - 4.0)
        diaphragm = cavity & ~above & ~abdomen
        # dependent (posterior) lung is denser; texture gives the mottled parenchyma
        dep = np.clip((y + pt.cavity_ant) / (pt.cavity_ant + pt.cavity_post), 0.0, 1.0)
        lung_hu = HU["lung"] + 45.0 * dep ** 2 + 14.0 * texture[:, :, ks]
        hu[lung] = np.broadcast_to(lung_hu, hu.shape)[lung]
        ti[lung], rg[lung] = LUNG, R_LUNG
        hu[pleura], ti[pleura], rg[pleura] = HU["pleura"], PLEURA, R_PLEURA
        visceral = neck & ((x / 34.0) ** 2 + ((y - 12.0) / 30.0) ** 2 <= 1)
        hu[neck], ti[neck], rg[neck] = HU["muscle"], MUSCLE, 0
        hu[visceral], ti[visceral] = HU["fat"] + 15, FAT
        hu[med], ti[med], rg[med] = HU["mediastinal_fat"], FAT, R_MED
        hu[abdomen], ti[abdomen], rg[abdomen] = HU["fat"] + 5, FAT, R_ABD
        hu[diaphragm], ti[diaphragm] = HU["muscle"], MUSCLE


def _paint_table(cv: _Canvas, pt: Patient) -> None:
    """The scanner table: a curved carbon shell under the patient's back."""
    y0 = pt.body_post + 6.0
    w = cv.window((-220, y0 - 40, -1e4), (220, y0 + 30, 1e4))
    if w is None:
        return
    sl, x, y, _ = w
    curve = y0 + 20.0 - 20.0 * np.sqrt(np.clip(1 - (x / 230.0) ** 2, 0, 1))   # sags in the middle
    shell = (np.abs(y - curve) < 2.5) & (np.abs(x) < 210)
    core = (y > curve + 2.5) & (y < curve + 14) & (np.abs(x) < 190)
    cv.paint(sl, core, -400.0, TABLE, only_tissue=[AIR])
    cv.paint(sl, shell, 250.0, TABLE, only_tissue=[AIR])


def _paint_chest_wall_muscles(cv: _Canvas, pt: Patient) -> None:
    """Pectorals in front, paraspinal and scapular muscles behind (inside the muscle layer's room)."""
    lat, ant, post = pt.wall("muscle")
    for side in (-1, 1):
        # pectoralis major: a flat slab over the upper anterior ribs
        got = cv.ellipsoid((side * 0.45 * pt.cavity_half_width, -(pt.cavity_ant + 10.0), pt.carina - pt.z(10)),
                           (0.5 * pt.cavity_half_width, 16.0, pt.z(70.0)))
        if got:
            sl, lev, _ = got
            cv.paint(sl, lev <= 1, HU["muscle"], MUSCLE, only_tissue=[FAT])
        # erector spinae beside the spinous processes
        got = cv.ellipsoid((side * 32.0, pt.cavity_post + 18.0, pt.length / 2), (24.0, 20.0, pt.length))
        if got:
            sl, lev, _ = got
            cv.paint(sl, lev <= 1, HU["muscle"], MUSCLE, only_tissue=[FAT, MUSCLE, SKIN], not_tissue=[SKIN])


def _heart_geometry(pt: Patient, scale: float):
    hs = pt.heart_scale * scale
    radii = np.array([72.0, 52.0, 56.0]) * hs
    dome = 0.5 * (pt.dome_left + pt.dome_right)
    centre = np.array([20.0 * hs, -pt.cavity_ant + 6.0 + 0.95 * radii[1], dome - pt.z(20.0) + 0.75 * radii[2]])
    # long axis: base (right, posterior, cranial) -> apex (left, anterior, caudal)
    d1 = np.array([0.72, -0.45, -0.52])
    d1 /= np.linalg.norm(d1)
    d2 = np.cross(d1, [0.0, 0.0, 1.0])
    d2 /= np.linalg.norm(d2)
    d3 = np.cross(d1, d2)
    return centre, radii, np.stack([d1, d2, d3], axis=1)


def _paint_heart(cv: _Canvas, pt: Patient, lm: _Landmarks, effusion_mm: float, coronary_plaques: list,
                 effusion_code: int = 0, plaque_code: int = 0) -> None:
    """Pericardium, optional pericardial fluid, epicardial fat in the grooves, myocardium and chambers
    (``*_code``: the planted findings' codes for `_Canvas.lesion`)."""
    c, r, axes = lm.heart_centre, lm.heart_radii, lm.heart_axes
    d1 = axes[:, 0]

    def on_diaphragm(sl, x, y, z):
        return (z > _diaphragm(pt, x, y) - 1.0) & (_cavity_level(pt, x, y, z) <= 1)

    sac = cv.ellipsoid(c, r + 2.0 + effusion_mm, axes)
    sl, lev, (x, y, z) = sac
    ok = on_diaphragm(sl, x, y, z)
    cv.paint(sl, (lev <= 1) & ok, HU["pericardium"], PERICARDIUM, R_HEART)
    if effusion_mm > 0:
        sl, lev, (x, y, z) = cv.ellipsoid(c, r + effusion_mm, axes)
        with cv.marking(effusion_code):
            cv.paint(sl, (lev <= 1) & on_diaphragm(sl, x, y, z), HU["fluid"], FLUID, R_HEART)
    sl, lev, (x, y, z) = cv.ellipsoid(c, r, axes)
    ok = on_diaphragm(sl, x, y, z)
    cv.paint(sl, (lev <= 1) & ok, HU["mediastinal_fat"], FAT, R_HEART)
    # myocardium everywhere except a deeper fat band in the atrioventricular groove
    along = (x - c[0]) * d1[0] + (y - c[1]) * d1[1] + (z - c[2]) * d1[2]
    groove = np.abs(along + 0.18 * r[0]) < 5.0
    inner = _ellipsoid_level(x, y, z, c, r - 1.5, axes) <= 1
    deep = _ellipsoid_level(x, y, z, c, r - 7.0, axes) <= 1
    cv.paint(sl, inner & ok & (~groove | deep), HU["myocardium"], MYOCARDIUM, R_HEART)
    hs = r / np.array([62.0, 46.0, 50.0])  # chamber offsets are given for the 62/46/50 mm template
    for offset, radii in (((22, 8, -10), (26, 20, 26)),     # left ventricle
                          ((-10, -24, -8), (28, 13, 26)),   # right ventricle
                          ((4, 27, 20), (24, 13, 16)),      # left atrium
                          ((-34, 0, 6), (17, 19, 24))):     # right atrium
        got = cv.ellipsoid(c + np.array(offset) * hs, np.array(radii) * hs)
        sl2, lev2, _ = got
        cv.paint(sl2, lev2 <= 1, HU["blood"], BLOOD, R_HEART, only_tissue=[MYOCARDIUM])
    # coronary arteries run in the epicardial fat; calcified plaques sit on them
    for name, pts in lm.coronaries.items():
        cv.tube(pts, 1.8, HU["blood"], BLOOD, R_HEART, only_region=[R_HEART], only_tissue=[FAT])
    for p, rad in coronary_plaques:
        got = cv.ellipsoid(p, (rad, rad, rad))
        if got:
            sl2, lev2, _ = got
            with cv.marking(plaque_code):
                cv.paint(sl2, lev2 <= 1, HU["calcium"] + 150, CALCIUM, R_HEART)


def _coronaries(c, r, axes) -> dict:
    d1, d2, d3 = axes[:, 0], axes[:, 1], axes[:, 2]
    out = {}
    base = c - 0.18 * r[0] * d1
    ring = []
    for th in np.linspace(-2.6, 2.6, 14):
        ring.append(base + 0.93 * (r[1] * math.cos(th) * d2 + r[2] * math.sin(th) * d3) * 0.98)
    # d2 points to the patient's front-left; split the groove ring into right (RCA) and left (LCx)
    right = [p for p in ring if p[0] < c[0]]
    left = [p for p in ring if p[0] >= c[0]]
    out["RCA"], out["LCx"] = right, left
    anterior = -d3 if (-d3)[1] < 0 else d3
    out["LAD"] = [c + t * r[0] * d1 + 0.97 * r[2] * anterior * math.sqrt(max(0.0, 1 - t * t)) for t in
                  np.linspace(-0.1, 0.85, 8)]
    return out


def _paint_vessels(cv: _Canvas, pt: Patient, lm: _Landmarks) -> None:
    """Aorta, pulmonary trunk and arteries, SVC, arch branches, IVC: blood in a collar of mediastinal fat."""
    c = lm.heart_centre
    pa = [c + np.array([18.0, -28.0, 38.0]) * pt.heart_scale,
          np.array([14.0, -18.0, pt.carina - pt.z(12)]),
          np.array([18.0, -8.0, pt.carina - pt.z(8)])]
    lpa = [pa[-1], np.array([40.0, 6.0, pt.carina - pt.z(6)]), lm.hilum["left"]]
    rpa = [pa[-1], np.array([-16.0, -6.0, pt.carina - pt.z(14)]), lm.hilum["right"]]
    branches = [
        ([lm.aorta[3], lm.aorta[3] + np.array([-14.0, 8.0, 60.0])], 6.5),
        ([lm.aorta[4], lm.aorta[4] + np.array([2.0, 10.0, 60.0])], 5.0),
        ([lm.aorta[5], lm.aorta[5] + np.array([8.0, 12.0, 60.0])], 5.5),
        ([np.array([45.0, -20.0, pt.inlet + 5]), np.array([-10.0, -30.0, lm.svc[0][2]]), lm.svc[0]], 6.0),
    ]
    tubes = [(lm.aorta, 14.0), (pa, 13.0), (lpa, 9.5), (rpa, 9.5), (lm.svc, 9.0)] + branches
    for pts, r in tubes:   # fat collar first, so the vessels widen the mediastinum into the lungs
        cv.tube(pts, r + 3.0, HU["mediastinal_fat"], FAT, R_MED, only_region=[R_LUNG, R_PLEURA, R_MED, 0],
                only_tissue=[LUNG, PLEURA, FAT, MUSCLE])
    for pts, r in tubes:
        cv.tube(pts, r, HU["blood"], BLOOD, R_MED, not_tissue=[AIR, SKIN])
    # aortic wall: a faintly denser rim
    ivc = [np.array([-22.0, 12.0, 0.0]), np.array([-22.0, 8.0, pt.dome_right]), c + np.array([-38.0, 4.0, -20.0])]
    cv.tube(ivc, 11.0, HU["blood"], BLOOD, R_ABD, only_region=[R_ABD])


def _paint_airways(cv: _Canvas, pt: Patient, lm: _Landmarks) -> None:
    """Trachea and main bronchi (their own region), lobar bronchi inside the lungs."""
    main = [lm.trachea, lm.bronchi["right"], lm.bronchi["left"]]
    radii = [9.0, 6.5, 5.8]
    for pts, r in zip(main, radii):
        cv.tube(pts, r + 2.0, HU["muscle"] + 20, AIRWAY_WALL, R_TRACHEA, not_tissue=[SKIN])
    for pts, r in zip(main, radii):
        cv.tube(pts, r, HU["air"], AIR, R_TRACHEA)
    for pts, r in lm.bronchi["lobar"]:
        cv.tube(pts, r + 1.5, HU["muscle"], AIRWAY_WALL, R_LUNG, only_region=[R_LUNG, R_MED])
        cv.tube(pts, r, HU["air"] + 20, AIR, R_LUNG, only_region=[R_LUNG, R_MED])


def _paint_esophagus(cv: _Canvas, pt: Patient, lm: _Landmarks, rng: np.random.Generator) -> None:
    cv.tube(lm.esophagus, 9.0, HU["muscle"] - 5, MUSCLE, R_ESO, not_tissue=[SKIN])
    if rng.random() < 0.6:  # a little swallowed air in the collapsed lumen
        cv.tube(lm.esophagus[:3], 2.2, HU["air"], AIR, R_ESO, only_region=[R_ESO])


def _vessel_tree(rng, root, direction, radius, min_radius, out, inside, depth=0):
    """Recursive bifurcating tree of (p0, p1, r) segments: children turn ~30 degrees and thin by ~0.75.

    ``inside(p)`` says whether a point is in the lung; branches that leave it stop growing.
    """
    direction = direction / np.linalg.norm(direction)
    length = 6.0 + 3.2 * radius * rng.uniform(0.7, 1.3)
    end = root + direction * length
    out.append((root, end, radius))
    if radius < min_radius or depth > 11 or (depth >= 2 and not inside(end)):
        return
    for sign in (-1.0, 1.0):
        turn = rng.standard_normal(3)
        turn -= turn @ direction * direction
        turn /= max(np.linalg.norm(turn), 1e-6)
        child = direction + sign * rng.uniform(0.35, 0.7) * turn
        _vessel_tree(rng, end, child, radius * rng.uniform(0.72, 0.86), min_radius, out, inside, depth + 1)


def _paint_lung_vessels(cv: _Canvas, pt: Patient, lm: _Landmarks, rng: np.random.Generator) -> None:
    """Pulmonary arterial and venous trees from each hilum; thin vessels fade with partial volume."""
    vox = float(min(cv.spacing[:2]))
    segments = []

    origin = (float(cv.xs[0]), float(cv.ys[0]), float(cv.zs[0]))

    def inside(p):
        ijk = [int(round((p[a] - origin[a]) / cv.spacing[a])) for a in range(3)]
        if any(v < 0 or v >= n for v, n in zip(ijk, cv.shape)):
            return False
        return cv.region[ijk[0], ijk[1], ijk[2]] == R_LUNG

    min_r = max(0.6, 0.26 * vox)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        h = lm.hilum[side]
        for d in ([sgn * 0.6, 0.1, 0.9], [sgn * 0.5, -0.5, 0.8], [sgn * 0.4, 0.6, 0.8], [sgn * 1.0, 0.0, 0.1],
                  [sgn * 0.7, -0.7, -0.3], [sgn * 0.8, 0.5, 0.0], [sgn * 0.6, 0.5, -0.7], [sgn * 0.5, 0.1, -1.0],
                  [sgn * 0.4, -0.5, -0.8]):
            _vessel_tree(rng, h, np.array(d), 5.5, min_r, segments, inside)
        vein_root = lm.heart_centre + np.array([sgn * 30.0 + 6.0, 32.0, 12.0]) * pt.heart_scale
        for d in ([sgn * 1.0, 0.3, 0.5], [sgn * 1.0, 0.4, -0.5]):
            _vessel_tree(rng, vein_root + np.array([sgn * 18.0, 0, 0]), np.array(d), 5.0, min_r, segments, inside)
    # sub-voxel vessels: one vectorised pass of points sampled along every segment
    thin = [(p0, p1, r) for p0, p1, r in segments if r < 0.5 * vox]
    if thin:
        pts, val = [], []
        for p0, p1, r in thin:
            n = max(2, int(np.linalg.norm(p1 - p0) / (0.5 * vox)) + 1)
            t = np.linspace(0.0, 1.0, n)[:, None]
            pts.append(p0 + t * (p1 - p0))
            val.append(np.full(n, HU["lung"] + (HU["blood"] - HU["lung"]) * min(1.0, 1.6 * r / vox), np.float32))
        pts, val = np.concatenate(pts), np.concatenate(val)
        ijk = np.rint((pts - np.array(origin)) / np.array(cv.spacing)).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.array(cv.shape)), axis=1)
        ijk, val = ijk[ok], val[ok]
        i, j, k = ijk.T
        ok = (cv.region[i, j, k] == R_LUNG) & ((cv.tissue[i, j, k] == LUNG) | (cv.tissue[i, j, k] == BLOOD))
        i, j, k, val = i[ok], j[ok], k[ok], val[ok]
        np.maximum.at(cv.hu, (i, j, k), val)
        cv.tissue[i, j, k] = BLOOD
    for p0, p1, r in segments:
        if r < 0.5 * vox:
            continue
        paint_r = r
        contrast = min(1.0, 1.6 * r / vox)      # sub-voxel vessels still show, fainter (partial volume)
        got = cv.capsule(p0, p1, paint_r)
        if got is None:
            continue
        sl, dist, _ = got
        value = HU["lung"] + (HU["blood"] - HU["lung"]) * contrast
        cv.paint(sl, dist <= paint_r, value, BLOOD, R_LUNG, only_region=[R_LUNG], only_tissue=[LUNG])


def _paint_nodes(cv: _Canvas, pt: Patient, rng: np.random.Generator, big: dict | None) -> None:
    """Small normal mediastinal nodes, and the enlarged one of lymphadenopathy when planted."""
    for station, p in _node_stations(pt).items():
        size = rng.uniform(3.0, 4.5)
        got = cv.ellipsoid(p, (size, size * 0.8, size * 1.2))
        if got:
            sl, lev, _ = got
            cv.paint(sl, lev <= 1, HU["node"], NODE, R_MED, only_region=[R_MED], only_tissue=[FAT])
    if big:
        r = big["size_mm"] / 2
        got = cv.ellipsoid(big["centre_mm"], (r * 1.1, r, r * 1.4))
        sl, lev, (x, y, z) = got
        with cv.marking(big.get("code", 0)):
            sel = cv.paint(sl, lev <= 1, HU["node"], NODE, R_MED, only_region=[R_MED, R_LUNG, R_PLEURA],
                           not_tissue=[BLOOD, AIR, AIRWAY_WALL])
        if not sel.any():
            raise PhantomError("the grid is too coarse to show the enlarged lymph node")
        # report the painted voxel nearest the station centre (neighbours may have taken the exact centre)
        ii, jj, kk = np.nonzero(sel)
        d = (x.ravel()[ii] - big["centre_mm"][0]) ** 2 + (y.ravel()[jj] - big["centre_mm"][1]) ** 2 \
            + (z.ravel()[kk] - big["centre_mm"][2]) ** 2
        m = int(np.argmin(d))
        big["centre_mm"] = np.array([x.ravel()[ii[m]], y.ravel()[jj[m]], z.ravel()[kk[m]]])


def _node_stations(pt: Patient) -> dict:
    return {
        "right paratracheal": np.array([-17.0, 0.0, pt.carina + pt.z(22)]),
        "subcarinal": np.array([0.0, 12.0, pt.carina - pt.z(24)]),
        "prevascular": np.array([4.0, -pt.cavity_ant + 22.0, pt.carina + pt.z(12)]),
        "aortopulmonary window": np.array([22.0, 2.0, pt.carina + pt.z(5)]),
    }


def _paint_thyroid(cv: _Canvas, pt: Patient, lm: _Landmarks) -> None:
    zt = pt.apex + pt.z(8)
    ty = lm.trachea[0][1]
    for side in (-1, 1):
        got = cv.ellipsoid((side * 20.0, ty - 2.0, zt), (9.0, 13.0, pt.z(26)))
        if got:
            sl, lev, _ = got
            cv.paint(sl, lev <= 1, HU["thyroid"], THYROID, R_THY, not_tissue=[AIR, AIRWAY_WALL, SKIN])
    got = cv.ellipsoid((0.0, ty - 13.0, zt - pt.z(8)), (16.0, 4.5, pt.z(8)))
    if got:
        sl, lev, _ = got
        cv.paint(sl, lev <= 1, HU["thyroid"], THYROID, R_THY, not_tissue=[AIR, AIRWAY_WALL, SKIN])


def _paint_abdomen(cv: _Canvas, pt: Patient, texture: np.ndarray, hernia: bool) -> None:
    """Liver (right, left lobe across the front), stomach with gas and fluid, spleen, kidney tops."""
    a = pt.cavity_half_width
    w = cv.window((-a, -pt.cavity_ant, -1e4), (a, pt.cavity_post, max(pt.dome_left, pt.dome_right) + 5))
    if w is None:
        return
    sl, x, y, z = w
    zd = _diaphragm(pt, x, y)
    below = z < zd - 4.0
    inside = _cavity_level(pt, x, y, z, grow=-2.0) <= 1
    reach = -8.0 + 70.0 * np.clip(-y / pt.cavity_ant, 0.0, 1.0)        # left lobe crosses anteriorly
    bottom = pt.dome_right - pt.z(160.0) + pt.z(90.0) * np.clip((x + 20.0) / 70.0, 0.0, 1.0)
    liver = below & inside & (x < reach) & (z > bottom)
    liver_hu = HU["liver"] + 4.0 * texture[sl]
    cv.paint(sl, liver, liver_hu, LIVER, R_ABD)
    # spleen: postero-lateral left, under the left dome
    got = cv.ellipsoid((0.62 * a, 0.55 * pt.cavity_post, pt.dome_left - pt.z(45)), (28.0, 42.0, pt.z(50)))
    if got:
        sl2, lev, (x2, y2, z2) = got
        cv.paint(sl2, (lev <= 1) & (z2 < _diaphragm(pt, x2, y2) - 4.0), HU["spleen"], SPLEEN, R_ABD,
                 only_region=[R_ABD])
    # stomach: gas rises to the front in a supine patient, fluid lies behind
    sc = np.array([0.42 * a, -0.15 * pt.cavity_ant, pt.dome_left - pt.z(40)])
    for scale, part in ((1.0, "wall"), (0.88, "content")):
        got = cv.ellipsoid(sc, np.array([36.0, 40.0, pt.z(36)]) * scale)
        if not got:
            continue
        sl2, lev, (x2, y2, z2) = got
        ok = (lev <= 1) & (z2 < _diaphragm(pt, x2, y2) - 4.0)
        if part == "wall":
            cv.paint(sl2, ok, HU["stomach_wall"], STOMACH_WALL, R_ABD, only_region=[R_ABD])
        else:
            gas = y2 < sc[1] - 8.0
            cv.paint(sl2, ok & gas, HU["air"], GAS, R_ABD, only_tissue=[STOMACH_WALL])
            cv.paint(sl2, ok & ~gas, HU["fluid"] + 5, FLUID, R_ABD, only_tissue=[STOMACH_WALL])
    for side in (-1, 1):   # kidney upper poles in perirenal fat at the bottom of the scan
        got = cv.ellipsoid((side * 62.0, 0.72 * pt.cavity_post, pt.z(12)), (26.0, 24.0, pt.z(50)))
        if got:
            sl2, lev, _ = got
            cv.paint(sl2, lev <= 1, HU["kidney"], KIDNEY, R_ABD, only_region=[R_ABD], only_tissue=[FAT])


def _paint_breasts(cv: _Canvas, pt: Patient, gland_field: np.ndarray) -> None:
    """Breast mounds in front of the pectorals: fat with fibroglandular tissue, skin over them."""
    ant = pt.body_ant
    if pt.female:
        radii = np.array([62.0, 48.0, 55.0]) * pt.breast_size
    else:
        radii = np.array([42.0, 10.0 + 0.3 * pt.fat, 32.0])
    for side in (-1, 1):
        c = np.array([side * 0.55 * pt.cavity_half_width, -ant + 6.0, pt.carina - pt.z(70)])
        got = cv.ellipsoid(c, radii)
        if not got:
            continue
        sl, lev, (x, y, z) = got
        front = y < -(pt.cavity_ant + pt.wall("muscle")[1] - 2.0)    # anterior to the pectoral muscle
        mound = (lev <= 1) & front
        cv.paint(sl, mound, HU["skin"], SKIN, only_tissue=[AIR, SKIN, FAT])
        core = (lev <= (1 - 2.5 / radii.min()) ** 2) & front
        gland = (gland_field[sl] > 0.35 + 0.9 * lev) & (lev < 0.7)
        hu = np.where(gland, HU["gland"], HU["fat"])
        cv.paint(sl, core, hu, FAT, R_BREAST, only_tissue=[AIR, SKIN, FAT])


def _paint_bone(cv: _Canvas, pt: Patient, sl, dist, r, cortex: float = 1.6, **guards) -> None:
    cv.paint(sl, dist <= r, HU["cortex"], BONE_CORTEX, R_BONE, **guards)
    cv.paint(sl, dist <= r - cortex, HU["marrow"], BONE_MARROW, R_BONE, **guards)


def _paint_spine(cv: _Canvas, pt: Patient, lm: _Landmarks) -> None:
    """Vertebral bodies with discs, neural arches around the canal, spinous and transverse processes."""
    height = pt.z(24.5)
    names = ["C7"] + [f"T{i}" for i in range(1, 13)] + ["L1", "L2"]
    top = pt.apex + pt.z(20)
    for n, name in enumerate(names):
        zc = top - n * height
        if zc < -height:
            break
        yc = float(_spine_y(pt, zc))
        rx, ry = 17.0 + 0.5 * n, 13.0 + 0.45 * n
        half = (height - 6.0) / 2
        lm.vertebrae.append((name, zc, (0.0, yc), (rx, ry, half)))
        got = cv.window((-rx, yc - ry, zc - height / 2), (rx, yc + ry, zc + height / 2))
        if got:
            sl, x, y, z = got
            lev = (x / rx) ** 2 + ((y - yc) / ry) ** 2
            disc = (lev <= 1) & (np.abs(z - zc) > half)
            cv.paint(sl, disc, HU["disc"], DISC, 0)
            body = (lev <= 1) & (np.abs(z - zc) <= half)
            shell = (lev > (1 - 2.0 / rx) ** 2) | (np.abs(z - zc) > half - 1.5)
            cv.paint(sl, body, np.where(shell, HU["cortex"] - 150, HU["marrow"]), BONE_MARROW, R_BONE)
        canal_y = yc + ry + 8.0
        got = cv.window((-16, canal_y - 14, zc - height / 2), (16, canal_y + 14, zc + height / 2))
        if got:
            sl, x, y, z = got
            rr = np.sqrt(x ** 2 + (y - canal_y) ** 2)
            arch = (rr <= 13.0) & (np.abs(z - zc) <= half + 1) & (y > canal_y - 9.5)
            _paint_bone(cv, pt, sl, np.where(arch, rr - 13.0 + 5.0, 99.0), 5.0, cortex=1.5)
            cv.paint(sl, rr <= 7.5, HU["csf"], CSF, 0)
            cv.paint(sl, rr <= 4.5, HU["cord"], CSF, 0)
        p0 = np.array([0.0, canal_y + 10.0, zc])
        got = cv.capsule(p0, p0 + np.array([0.0, 22.0, -pt.z(14)]), 4.5)
        if got:
            _paint_bone(cv, pt, got[0], got[1], 4.5)
        for side in (-1, 1):
            got = cv.capsule(np.array([side * 10.0, canal_y - 2, zc]),
                             np.array([side * 30.0, canal_y + 6, zc + 2]), 4.8)
            if got:
                _paint_bone(cv, pt, got[0], got[1], 4.8)


def _cavity_point(pt: Patient, z: float, phi: float, side: float, grow: float) -> np.ndarray:
    """Point on the rib-cage outline at height z, angle phi (0 = posterior, pi = anterior)."""
    start = pt.apex - pt.z(60.0)
    t = min(1.0, max(0.0, (z - start) / (pt.apex - start)))
    s = math.sqrt(max(0.0, 1 - t * t)) * 0.6 + 0.4 if z > start else 1.0
    tp = float(_taper(pt, z))
    a = (pt.cavity_half_width * tp * s + grow)
    b = (pt.cavity_post if math.cos(phi) > 0 else pt.cavity_ant) * (0.5 + 0.5 * tp) * (0.75 + 0.25 * s) + grow
    # invert the superellipse (p = 2.4) along the ray
    c, sn = math.cos(phi), math.sin(phi)
    p = 2.4
    x = side * a * abs(sn) ** (2 / p)
    y = b * math.copysign(abs(c) ** (2 / p), c)
    return np.array([x, y, z])


def _paint_ribs(cv: _Canvas, pt: Patient, lm: _Landmarks) -> list:
    """Twelve rib pairs sweeping down and forward from the spine; costal cartilage to the sternum."""
    ribs = []
    for name, zc, (_, yc), _ in lm.vertebrae:
        if not name.startswith("T"):
            continue
        i = int(name[1:])
        drop = pt.z(80.0 + 5.0 * min(i, 7))
        end = 0.92 * math.pi if i <= 7 else (0.82 * math.pi if i <= 10 else 0.55 * math.pi)
        cart = 0.78 * math.pi if i <= 7 else 0.72 * math.pi
        for side in (-1.0, 1.0):
            pts = []
            for phi in np.linspace(0.1 * math.pi, end, 14):
                frac = (phi - 0.1 * math.pi) / (0.9 * math.pi)
                z = zc + pt.z(6) - drop * frac ** 1.15
                pts.append((_cavity_point(pt, z, phi, side, 7.0), phi))
            pts[0] = (np.array([side * 24.0, yc + 10.0, zc + pt.z(6)]), 0.0)
            for (p0, f0), (p1, _) in zip(pts[:-1], pts[1:]):
                got = cv.capsule(p0, p1, 4.3)
                if not got:
                    continue
                sl, dist, _ = got
                if f0 >= cart:
                    cv.paint(sl, dist <= 3.8, HU["cartilage"], CARTILAGE, 0, not_tissue=[LUNG, BLOOD])
                else:
                    _paint_bone(cv, pt, sl, dist, 4.3, cortex=1.4, not_tissue=[LUNG, PLEURA, BLOOD])
            ribs.append((f"{'right' if side < 0 else 'left'} {i}", [p for p, _ in pts]))
    return ribs


def _paint_sternum_clavicles_scapulae(cv: _Canvas, pt: Patient) -> None:
    y_st = -(pt.cavity_ant + 7.0)
    z_top, z_bottom = pt.inlet - pt.z(8), pt.dome_right - pt.z(5)
    w = cv.window((-40, y_st - 12, z_bottom), (40, y_st + 12, z_top))
    if w:
        sl, x, y, z = w
        half = 13.0 + 12.0 * np.clip((z - (z_top - pt.z(45))) / pt.z(45), 0, 1)   # the wide manubrium
        lev = (x / half) ** 2 + ((y - y_st) / 6.5) ** 2
        cv.paint(sl, lev <= 1, np.where(lev > 0.7, HU["cortex"] - 150, HU["marrow"] - 30), BONE_MARROW, R_BONE)
    for side in (-1.0, 1.0):
        pts = [np.array([side * 22.0, y_st - 6.0, z_top - 2.0]),
               np.array([side * 70.0, y_st - 14.0, z_top + pt.z(8)]),
               np.array([side * (pt.cavity_half_width + 5.0), -10.0, z_top + pt.z(18)])]
        for p0, p1 in zip(pts[:-1], pts[1:]):
            got = cv.capsule(p0, p1, 7.0)
            if got:
                _paint_bone(cv, pt, got[0], got[1], 7.0, not_tissue=[LUNG, PLEURA])
        # scapula: a thin curved plate behind the posterolateral ribs, triangular in height
        z1, z0 = pt.apex - pt.z(5), pt.carina - pt.z(75)
        w = cv.window((min(side * 40, side * (pt.cavity_half_width + 40)), 0, z0),
                      (max(side * 40, side * (pt.cavity_half_width + 40)), pt.body_post, z1))
        if not w:
            continue
        sl, x, y, z = w
        t = np.clip((z1 - z) / (z1 - z0), 0, 1)
        lev_in = _cavity_level(pt, x, y, z, grow=22.0)
        lev_out = _cavity_level(pt, x, y, z, grow=28.0)
        xs = side * x
        plate = (lev_in > 1) & (lev_out <= 1) & (xs > 48 + 22 * t) & (xs < pt.cavity_half_width * (0.95 - 0.35 * t)) \
            & (y > 10.0)
        muscle = (_cavity_level(pt, x, y, z, grow=14.0) > 1) & (_cavity_level(pt, x, y, z, grow=38.0) <= 1) \
            & (xs > 40 + 20 * t) & (xs < pt.cavity_half_width * (1.02 - 0.3 * t)) & (y > 0.0)
        cv.paint(sl, muscle, HU["muscle"], MUSCLE, 0, only_tissue=[FAT, MUSCLE])
        cv.paint(sl, plate, HU["cortex"] - 100, BONE_CORTEX, R_BONE, only_tissue=[FAT, MUSCLE])


# ---------------------------------------------------------------------------------------------------------
# Landmarks.

def _landmarks(pt: Patient, heart_scale: float) -> _Landmarks:
    c, r, axes = _heart_geometry(pt, heart_scale)
    car = pt.carina
    top = pt.apex + pt.z(40)
    ty = 6.0
    trachea = [np.array([0.0, ty - 4.0, top]), np.array([0.0, ty, car + pt.z(40)]), np.array([-1.0, ty + 4.0, car])]
    right = [trachea[-1], np.array([-24.0, ty + 8.0, car - pt.z(14)]), np.array([-42.0, ty + 12.0, car - pt.z(26)])]
    left = [trachea[-1], np.array([26.0, ty + 10.0, car - pt.z(20)]), np.array([50.0, ty + 16.0, car - pt.z(38)])]
    lobar = [
        ([right[1], np.array([-58.0, 12.0, car - pt.z(2)]), np.array([-75.0, 8.0, car + pt.z(20)])], 3.6),
        ([right[-1], np.array([-54.0, 22.0, car - pt.z(60)]), np.array([-62.0, 35.0, car - pt.z(95)])], 4.0),
        ([right[-1], np.array([-60.0, -10.0, car - pt.z(45)])], 3.0),
        ([left[-1], np.array([62.0, 4.0, car - pt.z(18)]), np.array([72.0, -4.0, car + pt.z(8)])], 3.6),
        ([left[-1], np.array([60.0, 30.0, car - pt.z(70)]), np.array([66.0, 40.0, car - pt.z(100)])], 4.0),
    ]
    arch_z = car + pt.z(28)
    asc = np.array([-6.0, c[1] - 2.0, c[2] + 0.55 * r[2]])
    aorta = [asc, np.array([-10.0, -24.0, car - pt.z(5)]), np.array([-8.0, -22.0, arch_z - pt.z(6)]),
             np.array([-4.0, -14.0, arch_z + pt.z(6)]), np.array([8.0, 0.0, arch_z + pt.z(9)]),
             np.array([22.0, 14.0, arch_z + pt.z(3)]), np.array([26.0, 26.0, arch_z - pt.z(15)]),
             np.array([24.0, float(_spine_y(pt, car - 40)) - 30.0, car - pt.z(60)]),
             np.array([14.0, float(_spine_y(pt, pt.dome_left)) - 28.0, pt.dome_left - pt.z(30)]),
             np.array([6.0, float(_spine_y(pt, 0)) - 26.0, -pt.z(20)])]
    svc = [np.array([-30.0, -22.0, arch_z + pt.z(8)]), np.array([-32.0, -16.0, car - pt.z(20)]),
           c + np.array([-40.0, -2.0, 0.45 * r[2]])]
    hiatus = pt.dome_left - pt.z(8)
    esophagus = [np.array([-2.0, ty + 19.0, top]), np.array([4.0, ty + 22.0, car]),
                 np.array([8.0, float(_spine_y(pt, c[2])) - 24.0, c[2] + pt.z(10)]),
                 np.array([16.0, float(_spine_y(pt, hiatus)) - 30.0, hiatus]),
                 np.array([40.0, 0.0, pt.dome_left - pt.z(32)])]
    hilum = {"right": np.array([-52.0, 14.0, car - pt.z(22)]), "left": np.array([56.0, 18.0, car - pt.z(16)])}
    return _Landmarks(heart_centre=c, heart_radii=r, heart_axes=axes, aorta=aorta, svc=svc, trachea=trachea,
                      bronchi={"right": right, "left": left, "lobar": lobar}, esophagus=esophagus, hilum=hilum,
                      coronaries=_coronaries(c, r, axes), spine_y=float(_spine_y(pt, pt.length / 2)))


# ---------------------------------------------------------------------------------------------------------
# Findings: choose the missing details, then plant.

_SIDES = ("right", "left")
_LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}
_DRAW_WEIGHTS = {
    LUNG_NODULE: 3.0, LUNG_OPACITY: 1.5, CONSOLIDATION: 1.2, EMPHYSEMA: 1.2, ATELECTASIS: 1.2,
    PLEURAL_EFFUSION: 1.5, PERICARDIAL_EFFUSION: 0.8, CARDIOMEGALY: 1.2, ARTERIAL_CALCIFICATION: 1.5,
    CORONARY_CALCIFICATION: 1.5, LYMPHADENOPATHY: 1.2, HIATAL_HERNIA: 0.8, MEDICAL_MATERIAL: 0.7,
    BONE_LESION: 0.8,
}


def random_findings(rng: np.random.Generator) -> list[Finding]:
    """About a third of studies normal; the others 1-4 distinct findings with details left to fill."""
    if rng.random() < 1 / 3:
        return []
    n = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    types = list(_DRAW_WEIGHTS)
    p = np.array([_DRAW_WEIGHTS[t] for t in types])
    chosen = rng.choice(len(types), size=n, replace=False, p=p / p.sum())
    return [Finding(types[i]) for i in sorted(chosen)]


def _complete(f: Finding, rng: np.random.Generator) -> Finding:
    """Fill the details of a finding that the caller left open."""
    if f.type not in FINDING_TYPES:
        raise PhantomError(f"unknown finding type {f.type!r}; known: {', '.join(FINDING_TYPES)}")
    t = f.type
    g = replace(f)
    if t in (LUNG_NODULE, LUNG_OPACITY, CONSOLIDATION, ATELECTASIS):
        g.side = g.side or str(rng.choice(_SIDES))
        if g.side not in _SIDES:
            raise PhantomError(f"{t}: side must be 'right' or 'left', got {g.side!r}")
        lobes = _LOBES[g.side] if t != ATELECTASIS else tuple(lo for lo in _LOBES[g.side] if lo != "upper")
        g.lobe = g.lobe or str(rng.choice(lobes))
        if g.lobe not in _LOBES[g.side]:
            raise PhantomError(f"{t}: the {g.side} lung has no {g.lobe!r} lobe")
        lo, hi = {LUNG_NODULE: (6, 30), LUNG_OPACITY: (20, 50), CONSOLIDATION: (25, 55), ATELECTASIS: (25, 50)}[t]
        g.size_mm = g.size_mm or float(rng.integers(lo, hi + 1))
        if t == LUNG_OPACITY:
            g.kind = g.kind or "ground-glass"
    elif t == EMPHYSEMA:
        g.side = g.side or str(rng.choice(["bilateral", "bilateral", "right", "left"]))
        g.amount = g.amount or str(rng.choice(["mild", "moderate", "severe"]))
        g.kind = g.kind or "centrilobular"
    elif t == PLEURAL_EFFUSION:
        g.side = g.side or str(rng.choice(["right", "left", "bilateral"]))
        g.size_mm = g.size_mm or float(rng.integers(10, 61))
        g.amount = g.amount or ("small" if g.size_mm < 20 else "moderate" if g.size_mm < 40 else "large")
    elif t == PERICARDIAL_EFFUSION:
        g.size_mm = g.size_mm or float(rng.integers(6, 21))
    elif t == CARDIOMEGALY:
        g.amount = g.amount or str(rng.choice(["mild", "moderate"]))
    elif t == ARTERIAL_CALCIFICATION:
        g.amount = g.amount or str(rng.choice(["mild", "moderate", "severe"]))
        g.location = g.location or str(rng.choice(["aortic arch", "descending aorta", "aortic arch and descending aorta"]))
    elif t == CORONARY_CALCIFICATION:
        g.amount = g.amount or str(rng.choice(["mild", "moderate", "severe"]))
        g.location = g.location or str(rng.choice(["LAD", "LAD and RCA", "LAD, LCx and RCA"]))
    elif t == LYMPHADENOPATHY:
        g.location = g.location or str(rng.choice(LYMPH_STATIONS))
        if g.location not in LYMPH_STATIONS:
            raise PhantomError(f"{t}: station must be one of {', '.join(LYMPH_STATIONS)}, got {g.location!r}")
        g.size_mm = g.size_mm or float(rng.integers(12, 26))
    elif t == HIATAL_HERNIA:
        g.size_mm = g.size_mm or float(rng.integers(25, 51))
    elif t == MEDICAL_MATERIAL:
        g.kind = g.kind or str(rng.choice(["pacemaker", "port"]))
        if g.kind not in ("pacemaker", "port"):
            raise PhantomError(f"{t}: kind must be 'pacemaker' or 'port', got {g.kind!r}")
        g.side = g.side or ("left" if g.kind == "pacemaker" else "right")
    elif t == BONE_LESION:
        g.kind = g.kind or str(rng.choice(["lytic", "sclerotic"]))
        g.location = g.location or f"T{int(rng.integers(4, 11))}"
        g.size_mm = g.size_mm or float(rng.integers(8, 17))
    if g.size_mm is not None and not (0 < g.size_mm < 200):
        raise PhantomError(f"{t}: size_mm must be between 0 and 200 mm, got {g.size_mm}")
    return g


def _pick_lung_point(cv: _Canvas, pt: Patient, rng, side: str, lobe: str | None, radius: float,
                     near_wall: bool = False) -> np.ndarray:
    """A lung point on the given side (and lobe) whose sphere of ``radius`` lies in the lung."""
    lung = (cv.region == R_LUNG) & (cv.tissue == LUNG)
    idx = np.flatnonzero(lung)
    if idx.size == 0:
        raise PhantomError("the grid is too small or too coarse to hold a lung")
    order = rng.choice(idx, size=min(3000, idx.size), replace=False)
    ii, jj, kk = np.unravel_index(order, cv.shape)
    best = None
    for relax in (1.0, 0.6, 0.0):
        for i, j, k in zip(ii, jj, kk):
            p = np.array([cv.xs[i], cv.ys[j], cv.zs[k]], float)
            if (p[0] < 0) != (side == "right"):
                continue
            if lobe is not None and lung_lobe(pt, *p) != lobe:
                continue
            if near_wall and _cavity_level(pt, p[0], p[1], p[2], grow=-(radius + 12.0)) <= 1:
                continue
            if relax > 0:
                got = cv.ellipsoid(p, (radius * relax + 2.0,) * 3)
                sl, lev, _ = got
                if not np.all(cv.region[sl][lev <= 1] == R_LUNG):
                    continue
            best = p
            break
        if best is not None:
            return best
    raise PhantomError(f"no room for a {radius * 2:.0f} mm lesion in the {lobe or ''} {side} lung at this grid")


def _plant_lung(cv: _Canvas, pt: Patient, f: Finding, rng, fine: np.ndarray) -> dict:
    """Nodule, ground-glass opacity, consolidation or plate atelectasis inside the lung mask."""
    r = f.size_mm / 2
    if f.type == LUNG_NODULE:
        p = _pick_lung_point(cv, pt, rng, f.side, f.lobe, r)
        sl, lev, _ = cv.ellipsoid(p, (r, r, r))
        lobulated = lev * (1 + 0.12 * fine[sl])       # a slightly lobulated solid nodule
        cv.paint(sl, lobulated <= 1, HU["soft_lesion"] + 5, LESION, R_LUNG, only_region=[R_LUNG])
        return {"centre_mm": p}
    if f.type == ATELECTASIS:
        p = _pick_lung_point(cv, pt, rng, f.side, f.lobe, 6.0, near_wall=True)
        # a plate: long in the transverse plane, thin antero-posteriorly, tilted
        axes = np.array([[1.0, 0.0, 0.0], [0.0, 0.9, 0.44], [0.0, -0.44, 0.9]])
        sl, lev, _ = cv.ellipsoid(p, (r, 3.5, 7.0), axes)
        cv.paint(sl, lev <= 1, HU["soft_lesion"] - 10, LESION, R_LUNG, only_region=[R_LUNG])
        return {"centre_mm": p}
    p = _pick_lung_point(cv, pt, rng, f.side, f.lobe, min(r, 15.0))
    sl, lev, _ = cv.ellipsoid(p, (r, r * 0.85, r * 0.9))
    patchy = lev * (1 + 0.35 * fine[sl])
    if f.type == LUNG_OPACITY:
        # ground glass: parenchyma denser, vessels still visible through it
        cv.paint(sl, patchy <= 1, HU["lung"] + 330 + 25 * fine[sl], LESION, R_LUNG, only_region=[R_LUNG],
                 only_tissue=[LUNG])
    else:
        cv.paint(sl, patchy <= 1, HU["soft_lesion"] + 5 * fine[sl], LESION, R_LUNG, only_region=[R_LUNG],
                 only_tissue=[LUNG, BLOOD])
        # air bronchograms: branching air lines left inside the consolidation
        for _ in range(2):   # off the centre line, so the reported centre stays consolidated
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            e = np.cross(d, rng.standard_normal(3))
            e /= np.linalg.norm(e)
            q = p + 0.4 * r * e
            got = cv.capsule(q - d * r * 0.6, q + d * r * 0.5, 1.6)
            if got:
                cv.paint(got[0], got[1] <= 1.6, HU["air"] + 100, AIR, R_LUNG, only_tissue=[LESION])
    return {"centre_mm": p}


def _plant_emphysema(cv: _Canvas, pt: Patient, f: Finding, fine: np.ndarray) -> dict:
    """Centrilobular low-attenuation holes in the upper zones, more of them the worse it is."""
    thresh = {"mild": 1.3, "moderate": 0.95, "severe": 0.6}[f.amount]
    z_low = pt.carina - pt.z({"mild": 20, "moderate": 50, "severe": 90}[f.amount])
    z = cv.zs[None, None, :]
    x = cv.xs[:, None, None]
    side = np.ones_like(x, dtype=bool) if f.side == "bilateral" else ((x < 0) if f.side == "right" else (x > 0))
    holes = (fine > thresh) & (z > z_low) & side
    sel = cv.paint((slice(None),) * 3, holes, -985.0, LUNG, R_LUNG, only_region=[R_LUNG], only_tissue=[LUNG])
    ii, jj, kk = np.nonzero(sel)
    if ii.size == 0:
        raise PhantomError("the grid is too small to show emphysema")
    m = len(ii) // 2
    return {"centre_mm": np.array([cv.xs[ii[m]], cv.ys[jj[m]], cv.zs[kk[m]]]),
            "volume_ml": round(float(ii.size * np.prod(cv.spacing)) / 1000.0, 1)}


def _plant_pleural_effusion(cv: _Canvas, pt: Patient, f: Finding) -> dict:
    """Free fluid layering posteriorly (supine): everything of the hemithorax behind a coronal level."""
    sides = ("right", "left") if f.side == "bilateral" else (f.side,)
    centres = []
    for side in sides:
        y_level = pt.cavity_post - f.size_mm
        x0, x1 = (-pt.cavity_half_width, 0.0) if side == "right" else (0.0, pt.cavity_half_width)
        w = cv.window((x0, y_level, -1e4), (x1, pt.cavity_post, 1e4))
        if w is None:
            raise PhantomError("the grid does not reach the posterior chest wall")
        sl, x, y, z = w
        fluid = (y >= y_level)
        sel = cv.paint(sl, fluid, HU["fluid"], FLUID, R_PLEURA, only_region=[R_LUNG, R_PLEURA])
        if not sel.any():
            raise PhantomError(f"pleural effusion of {f.size_mm} mm is below the resolution of this grid")
        ii, jj, kk = np.nonzero(sel)
        deepest = int(np.argmax(jj * 0 + (kk == kk.min())))      # any voxel at the lowest slice
        m = np.lexsort((-jj, np.abs(ii - np.median(ii)), kk))[len(ii) // 4]
        centres.append(np.array([x.ravel()[ii[m]], y.ravel()[jj[m]], z.ravel()[kk[m]]]))
        del deepest
    return {"centre_mm": centres[0]}


def _plant_hiatal_hernia(cv: _Canvas, pt: Patient, f: Finding, lm: _Landmarks) -> dict:
    """A stomach pouch above the hiatus, behind the heart: wall, fluid and an air cap."""
    r = f.size_mm / 2
    h = lm.esophagus[3]
    c = np.array([h[0], h[1] - 4.0, max(h[2], float(_diaphragm(pt, h[0], h[1]))) + 0.7 * r])
    got = cv.ellipsoid(c, (r * 1.1, r, r))
    sl, lev, (x, y, z) = got
    cv.paint(sl, lev <= 1, HU["stomach_wall"], STOMACH_WALL, R_ESO, not_tissue=[BONE_CORTEX, BONE_MARROW, SKIN])
    inner = _ellipsoid_level(x, y, z, c, (r * 1.1 - 3.5, r - 3.5, r - 3.5)) <= 1
    gas = y < c[1] - 0.3 * r
    cv.paint(sl, inner & gas, HU["air"], GAS, R_ESO, only_tissue=[STOMACH_WALL])
    cv.paint(sl, inner & ~gas, HU["fluid"] + 5, FLUID, R_ESO, only_tissue=[STOMACH_WALL])
    return {"centre_mm": c}


def _plant_arterial_calcification(cv: _Canvas, pt: Patient, f: Finding, lm: _Landmarks, rng) -> dict:
    n = {"mild": 3, "moderate": 6, "severe": 10}[f.amount]
    segs = []
    if "arch" in f.location:
        segs += list(zip(lm.aorta[2:6], lm.aorta[3:7]))
    if "descending" in f.location:
        segs += list(zip(lm.aorta[6:8], lm.aorta[7:9]))
    centres = []
    for _ in range(n):
        p0, p1 = segs[int(rng.integers(len(segs)))]
        p = p0 + rng.uniform(0.1, 0.9) * (p1 - p0)
        d = rng.standard_normal(3)
        t = p1 - p0
        d -= d @ t / (t @ t) * t
        p = p + d / np.linalg.norm(d) * 13.0        # on the wall of the 14 mm-radius aorta
        rad = rng.uniform(1.8, 3.2)
        got = cv.ellipsoid(p, (rad, rad, rad * 1.5))
        if got:
            cv.paint(got[0], got[1] <= 1, HU["calcium"] + rng.uniform(0, 250), CALCIUM, R_MED,
                     only_region=[R_MED])
        centres.append(p)
    return {"centre_mm": centres[0], "plaques": len(centres)}


def _coronary_plaques(f: Finding, lm: _Landmarks, rng) -> list:
    n = {"mild": 2, "moderate": 4, "severe": 7}[f.amount]
    arteries = [a.strip() for a in f.location.replace(" and ", ",").split(",") if a.strip()]
    out = []
    for i in range(n):
        pts = lm.coronaries[arteries[i % len(arteries)]]
        j = int(rng.integers(0, max(1, len(pts) - 1)))
        p = pts[j] + rng.uniform(0, 1) * (pts[min(j + 1, len(pts) - 1)] - pts[j])
        out.append((p, float(rng.uniform(1.6, 2.8))))
    return out


def _plant_medical_material(cv: _Canvas, pt: Patient, f: Finding, lm: _Landmarks) -> dict:
    """A pacemaker (lead to the right ventricle) or a port (catheter tip in the SVC), both metal."""
    sgn = -1.0 if f.side == "right" else 1.0
    zc = pt.carina + pt.z(35)
    box = np.array([sgn * 0.55 * pt.cavity_half_width, -(pt.body_ant - 0.5 * pt.fat - 5.0), zc])
    size = (22.0, 4.5, 20.0) if f.kind == "pacemaker" else (13.0, 7.0, 13.0)
    got = cv.ellipsoid(box, size)
    cv.paint(got[0], got[1] <= 1, HU["metal"], METAL, None)
    c = lm.heart_centre
    vein = [box, np.array([sgn * 45.0, -30.0, zc + pt.z(15)]), np.array([sgn * 20.0, -25.0, zc + pt.z(5)])]
    if f.kind == "pacemaker":
        tip = c + np.array([10.0, -22.0, -25.0]) * pt.heart_scale   # right ventricular apex
        lead = vein + [lm.svc[0], lm.svc[1], lm.svc[2], c + np.array([-25.0, -10.0, -5.0]), tip]
    else:
        tip = lm.svc[1] + 0.6 * (lm.svc[2] - lm.svc[1])
        lead = vein + [lm.svc[0], tip]
    for p0, p1 in zip(lead[:-1], lead[1:]):
        got = cv.capsule(p0, p1, 1.4)
        if got:
            vox = min(cv.spacing)
            cv.paint(got[0], got[1] <= max(1.4, 0.5 * vox), HU["metal"] * min(1.0, 2.8 / vox), METAL, None,
                     not_tissue=[AIR])
    return {"centre_mm": tip}


def _plant_bone_lesion(cv: _Canvas, f: Finding, lm: _Landmarks) -> dict:
    match = [v for v in lm.vertebrae if v[0] == f.location]
    if not match:
        raise PhantomError(f"{f.type}: vertebra {f.location!r} is not in the scanned range")
    name, zc, (x0, y0), (rx, ry, half) = match[0]
    r = min(f.size_mm / 2, ry - 2.0, half)
    c = np.array([x0 + 0.25 * rx, y0, zc])
    sl, lev, _ = cv.ellipsoid(c, (r, r, r))
    hu = HU["soft_lesion"] if f.kind == "lytic" else HU["cortex"] + 200
    cv.paint(sl, lev <= 1, hu, LESION, R_BONE, only_region=[R_BONE])
    return {"centre_mm": c}


# ---------------------------------------------------------------------------------------------------------
# Geometry of the grid and the public entry point.

def _grid(pt: Patient, rng, shape, spacing):
    """Choose the grid: default ~160x160x(64-96) at ~2.2-2.6 x 3.3-5 mm covering the whole chest."""
    fov = 1.12 * max(2 * pt.body_half_width, pt.body_ant + pt.body_post + 40.0)
    fov = max(fov, 330.0)
    slices = int(rng.integers(64, 97))
    if shape is None:
        if spacing is None:
            shape = (160, 160, slices)
        else:
            shape = (int(round(fov / spacing[0])), int(round(fov / spacing[1])), int(round(pt.length / spacing[2])))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise PhantomError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    if spacing is None:
        spacing = (round(fov / shape[0], 4), round(fov / shape[1], 4), round(pt.length / shape[2], 4))
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise PhantomError(f"spacing must be three positive sizes in mm, got {spacing}")
    return shape, spacing


def _affine(cv: _Canvas) -> np.ndarray:
    """Voxel index -> RAS+ mm for LPS voxel axes; world origin at the centre of the patient's torso."""
    sx, sy, sz = cv.spacing
    aff = np.diag([-sx, -sy, sz, 1.0])
    aff[:3, 3] = [-float(cv.xs[0]), -float(cv.ys[0]), float(cv.zs[0])]
    return aff


def make_study(seed: int, findings: Sequence[Finding] | None = None, shape: Sequence[int] | None = None,
               spacing: Sequence[float] | None = None, totalseg: bool = False) -> Study:
    """Build one synthetic chest CT study.

    ``findings=None`` draws a random set from the seed (about a third normal, others 1-4 findings);
    ``[]`` gives a normal study; a list of `Finding` plants exactly those (details left None are drawn).
    ``shape`` (X, Y, Z) and ``spacing`` (mm) override the seed's grid. Returns a `Study` with int16 HU
    voxels in LPS voxel order (slice 0 caudal), masks for all ten regions, and ``metadata`` holding
    ``findings`` (planted, with region, side, size, centre voxel, ``lesion_label`` and ``lesion_voxels``),
    ``region_reports``, ``report`` and, when a finding is planted, ``lesions``: a uint8 array on the CT grid,
    ``findings[i]``'s voxels labelled ``i + 1`` (what it painted and nothing painted later took back; an
    enlarged heart's lesion is the heart). ``totalseg=True`` also puts the same anatomy as TotalSegmentator label maps in
    ``metadata["totalseg"]`` (task -> uint8 array on the CT grid, see `totalseg_label_maps`).
    """
    from .phantom_reports import region_reports, study_report

    seed = int(seed)
    streams = np.random.SeedSequence(seed).spawn(6)
    anat_rng, find_rng, tex_rng, tree_rng, noise_rng, text_rng = (np.random.default_rng(s) for s in streams)
    pt = _draw_patient(anat_rng)
    shape, spacing = _grid(pt, anat_rng, shape, spacing)
    wanted = random_findings(find_rng) if findings is None else list(findings)
    for f in wanted:
        if not isinstance(f, Finding):
            raise PhantomError(f"findings must be Finding values, got {type(f).__name__}")
    done = [_complete(f, find_rng) for f in wanted]
    by_type = {f.type: f for f in done}
    code = {f.type: i + 1 for i, f in enumerate(done)}      # `_Canvas.lesion`'s value of each planted finding

    heart_scale = 1.0
    if CARDIOMEGALY in by_type:
        heart_scale = {"mild": 1.22, "moderate": 1.36}.get(by_type[CARDIOMEGALY].amount, 1.3)
    y_centre = 0.5 * (pt.body_post - pt.body_ant) + 8.0
    cv = _Canvas(shape, spacing, y_centre=y_centre, z_centre=pt.length / 2)
    lm = _landmarks(pt, heart_scale)
    coarse = _smooth_field(tex_rng, shape, spacing, 9.0)
    fine = _smooth_field(tex_rng, shape, spacing, 2.6)

    _paint_table(cv, pt)
    _paint_torso(cv, pt, coarse)
    _paint_chest_wall_muscles(cv, pt)
    _paint_breasts(cv, pt, fine)
    _paint_abdomen(cv, pt, coarse, HIATAL_HERNIA in by_type)
    planted: dict[str, dict] = {}
    if HIATAL_HERNIA in by_type:
        with cv.marking(code[HIATAL_HERNIA]):
            planted[HIATAL_HERNIA] = _plant_hiatal_hernia(cv, pt, by_type[HIATAL_HERNIA], lm)
    pe = by_type.get(PERICARDIAL_EFFUSION)
    plaques = _coronary_plaques(by_type[CORONARY_CALCIFICATION], lm, find_rng) \
        if CORONARY_CALCIFICATION in by_type else []
    _paint_heart(cv, pt, lm, pe.size_mm if pe else 0.0, plaques, code.get(PERICARDIAL_EFFUSION, 0),
                 code.get(CORONARY_CALCIFICATION, 0))
    if pe:
        planted[PERICARDIAL_EFFUSION] = {"centre_mm": lm.heart_centre + lm.heart_axes[:, 1] * (lm.heart_radii[1] + pe.size_mm / 2)}
    if CARDIOMEGALY in by_type:
        planted[CARDIOMEGALY] = {"centre_mm": lm.heart_centre}
    if plaques:
        planted[CORONARY_CALCIFICATION] = {"centre_mm": plaques[0][0], "plaques": len(plaques)}
    _paint_vessels(cv, pt, lm)
    _paint_airways(cv, pt, lm)
    _paint_esophagus(cv, pt, lm, tree_rng)
    _paint_lung_vessels(cv, pt, lm, tree_rng)
    big_node = None
    if LYMPHADENOPATHY in by_type:
        f = by_type[LYMPHADENOPATHY]
        big_node = {"size_mm": f.size_mm, "centre_mm": _node_stations(pt)[f.location], "code": code[LYMPHADENOPATHY]}
    _paint_nodes(cv, pt, tree_rng, big_node)
    if big_node:
        planted[LYMPHADENOPATHY] = {"centre_mm": big_node["centre_mm"]}
    _paint_thyroid(cv, pt, lm)
    if ARTERIAL_CALCIFICATION in by_type:
        with cv.marking(code[ARTERIAL_CALCIFICATION]):
            planted[ARTERIAL_CALCIFICATION] = _plant_arterial_calcification(
                cv, pt, by_type[ARTERIAL_CALCIFICATION], lm, find_rng)
    _paint_spine(cv, pt, lm)
    _paint_ribs(cv, pt, lm)
    _paint_sternum_clavicles_scapulae(cv, pt)
    if PLEURAL_EFFUSION in by_type:
        with cv.marking(code[PLEURAL_EFFUSION]):
            planted[PLEURAL_EFFUSION] = _plant_pleural_effusion(cv, pt, by_type[PLEURAL_EFFUSION])
    if EMPHYSEMA in by_type:
        with cv.marking(code[EMPHYSEMA]):
            planted[EMPHYSEMA] = _plant_emphysema(cv, pt, by_type[EMPHYSEMA], fine)
    for t in (LUNG_NODULE, LUNG_OPACITY, CONSOLIDATION, ATELECTASIS):
        if t in by_type:
            with cv.marking(code[t]):
                planted[t] = _plant_lung(cv, pt, by_type[t], find_rng, fine)
    if BONE_LESION in by_type:
        with cv.marking(code[BONE_LESION]):
            planted[BONE_LESION] = _plant_bone_lesion(cv, by_type[BONE_LESION], lm)
    if MEDICAL_MATERIAL in by_type:
        with cv.marking(code[MEDICAL_MATERIAL]):
            planted[MEDICAL_MATERIAL] = _plant_medical_material(cv, pt, by_type[MEDICAL_MATERIAL], lm)
    del fine
    if CARDIOMEGALY in by_type:     # the lesion of an enlarged heart is the heart (what its effusion leaves)
        cv.lesion[(cv.region == _REGION_CODE["heart"]) & (cv.lesion == 0)] = code[CARDIOMEGALY]

    voxels = _scan(cv, pt, noise_rng, coarse)
    masks = {name: cv.region == code for name, code in _REGION_CODE.items()}
    label_maps = totalseg_label_maps(cv, pt) if totalseg else None
    affine = _affine(cv)

    records = []
    for f in done:
        rec = {k: v for k, v in asdict(f).items()}
        rec["region"] = FINDING_REGION[f.type]
        if f.type == MEDICAL_MATERIAL and f.kind == "port":
            rec["region"] = "mediastinum"
        extra = planted.get(f.type, {})
        c = extra.get("centre_mm")
        if c is not None:
            rec["centre_voxel"] = cv.to_voxel(c)
            rec["centre_mm"] = [round(float(v), 1) for v in c]
        for k, v in extra.items():
            if k != "centre_mm":
                rec[k] = v
        if f.type == CARDIOMEGALY:
            rec["cardiothoracic_ratio"] = round(float(2 * lm.heart_radii[0] * 0.93 / (2 * pt.cavity_half_width)), 2)
        records.append(rec)
    reports = region_reports(records, text_rng)
    counts = np.bincount(cv.lesion.ravel(), minlength=len(done) + 1)
    for i, rec in enumerate(records):       # where each finding is in `lesions` (after the reports: text unchanged)
        rec["lesion_label"], rec["lesion_voxels"] = i + 1, int(counts[i + 1])
    study = Study(
        voxels=voxels, affine=affine, masks=masks, name=f"phantom_{seed:06d}_a_1", source=f"phantom seed={seed}",
        mask_sources={r: "phantom" for r in REGIONS},
        metadata={"seed": seed, "findings": records, "region_reports": reports, "report": study_report(reports),
                  "patient": {"sex": "F" if pt.female else "M", "body_width_mm": round(2 * pt.body_half_width, 1),
                              "heart_scale": round(pt.heart_scale * heart_scale, 3)},
                  "orientation": "LPS voxel axes, slice 0 caudal"},
    )
    if done:
        study.metadata["lesions"] = cv.lesion    # (X, Y, Z) uint8: findings[i] is label i + 1
    if label_maps is not None:
        study.metadata["totalseg"] = label_maps
    return study


def _scan(cv: _Canvas, pt: Patient, rng: np.random.Generator, coarse: np.ndarray) -> np.ndarray:
    """Turn the ideal HU map into a scan: partial-volume blur, correlated noise, reconstruction circle."""
    sx, sy, sz = cv.spacing
    hu = ndimage.gaussian_filter(cv.hu, sigma=(0.55, 0.55 * sx / sy, 0.35), mode="nearest")
    noise = rng.standard_normal(cv.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.8, 0.8, 0.3), mode="wrap")
    noise *= pt.noise_sd / max(float(noise.std()), 1e-6)
    hu += noise
    del noise
    # outside the reconstruction circle the scanner writes its padding value
    r = 0.5 * min(cv.shape[0] * sx, cv.shape[1] * sy)
    yc = float(cv.ys.mean())
    outside = (cv.xs[:, None] ** 2 + (cv.ys[None, :] - yc) ** 2) > r * r
    hu[outside] = -1024.0
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    return hu.astype(np.int16)


# ---------------------------------------------------------------------------------------------------------
# The embedded demo study.

DEMO_SEED = 20251
DEMO_FINDINGS = (
    Finding(LUNG_NODULE, side="right", lobe="upper", size_mm=14.0),
    Finding(PLEURAL_EFFUSION, side="left", size_mm=28.0),
    Finding(CARDIOMEGALY, amount="moderate"),
)


def demo_study() -> Study:
    """The embedded demo study (resources/demo_study), read from disk; built from DEMO_SEED if absent."""
    root = Path(__file__).resolve().parents[1] / "resources" / "demo_study"
    volumes = sorted(root.glob("*.nii.gz")) if root.is_dir() else []
    if not volumes:
        return make_study(DEMO_SEED, list(DEMO_FINDINGS))
    study = read_study(volumes[0], root / "masks")
    manifest = root / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        study.metadata.update({k: meta[k] for k in ("seed", "findings", "region_reports", "report") if k in meta})
    return study


# ---------------------------------------------------------------------------------------------------------
# The same anatomy as TotalSegmentator would write it (tests of the region mapping, reg2rg-phantom --totalseg).

def totalseg_label_maps(cv: _Canvas, pt: Patient) -> dict[str, np.ndarray]:
    """TotalSegmentator multi-label maps of the painted anatomy, task -> uint8 labels (values as its tasks'
    tables in `reg2rg.engine.masks.TOTALSEG_TASK_CLASSES`).

    The structures are cut from the painted regions and tissues: lung lobes by the phantom's fissures,
    vertebrae and ribs numbered by height (the phantom paints no separate clavicle/scapula labels: they are
    written as ribs, still bone), liver/spleen/stomach/kidneys from the abdominal tissues, the heart without
    its pericardial effusion (which goes to ``pleural_pericard_effusion``), the cavities of ``trunk_cavities``
    such that the mapping rules give back each phantom region.
    """
    from .masks import TOTALSEG_TASK_CLASSES

    ids = {task: {n: v for v, n in table.items()} for task, table in TOTALSEG_TASK_CLASSES.items()}
    T = ids["total"]
    region, tissue = cv.region, cv.tissue
    x = cv.xs[:, None, None]
    y = cv.ys[None, :, None]
    z = cv.zs[None, None, :]
    total = np.zeros(cv.shape, dtype=np.uint8)

    # lungs: left/right by the side of the midline, lobes by the phantom's own fissures (see lung_lobe)
    lung = region == R_LUNG
    y_ant, y_post = -pt.cavity_ant, pt.cavity_post
    z_post, z_ant = pt.carina - pt.z(15.0), min(pt.dome_left, pt.dome_right) - pt.z(5.0)
    lower = z < z_ant + (z_post - z_ant) * (y - y_ant) / (y_post - y_ant)
    middle = ~lower & (x < 0) & (z < pt.carina - pt.z(45.0)) & (y < 0.3 * pt.cavity_post)
    right = np.broadcast_to(x < 0, cv.shape)
    for name, sel in (("lung_lower_lobe_right", right & lower), ("lung_middle_lobe_right", right & middle),
                      ("lung_upper_lobe_right", right & ~lower & ~middle), ("lung_lower_lobe_left", ~right & lower),
                      ("lung_upper_lobe_left", ~right & ~lower)):
        total[lung & sel] = T[name]

    effusion_in_heart = (region == R_HEART) & (tissue == FLUID)
    total[(region == R_HEART) & ~effusion_in_heart] = T["heart"]
    total[region == R_ESO] = T["esophagus"]
    total[region == R_TRACHEA] = T["trachea"]
    total[region == R_THY] = T["thyroid_gland"]

    # bone: spine and sternum near the midline, ribs (and shoulder girdle) lateral, numbered by height
    bone = region == R_BONE
    if bone.any():
        zs = np.broadcast_to(z, cv.shape)[bone]
        z_lo, z_hi = float(zs.min()), float(zs.max())
        band = np.clip(((z_hi - z) / max(z_hi - z_lo, 1e-6) * 12).astype(int), 0, 11)   # 0 = top
        mid = np.abs(x) < 24.0
        spine = bone & mid & (y > 0)
        total[spine] = np.broadcast_to(T["vertebrae_T1"] - band, cv.shape)[spine]   # T1 at the top
        total[bone & mid & (y <= 0)] = T["sternum"]
        lateral = bone & ~mid
        rib_right = np.broadcast_to(T["rib_right_1"] + band, cv.shape)
        rib_left = np.broadcast_to(T["rib_left_1"] + band, cv.shape)
        total[lateral & right] = rib_right[lateral & right]
        total[lateral & ~right] = rib_left[lateral & ~right]

    abd = region == R_ABD
    total[abd & (tissue == LIVER)] = T["liver"]
    total[abd & (tissue == SPLEEN)] = T["spleen"]
    total[abd & np.isin(tissue, [STOMACH_WALL, GAS])] = T["stomach"]
    total[abd & (tissue == FLUID)] = T["stomach"]
    total[abd & (tissue == KIDNEY) & right] = T["kidney_right"]
    total[abd & (tissue == KIDNEY) & ~right] = T["kidney_left"]

    breasts = (region == R_BREAST).astype(np.uint8) * ids["breasts"]["breast"]

    C = ids["trunk_cavities"]
    cavities = np.zeros(cv.shape, dtype=np.uint8)
    cavities[abd] = C["abdominal_cavity"]
    cavities[(region == R_LUNG) | (region == R_PLEURA)] = C["thoracic_cavity"]
    cavities[region == R_HEART] = C["pericardium"]
    # TotalSegmentator's mediastinum holds the esophagus and the trachea inside the chest
    in_chest = np.broadcast_to(z <= pt.inlet, cv.shape)
    cavities[(region == R_MED) | (((region == R_ESO) | (region == R_TRACHEA)) & in_chest)] = C["mediastinum"]

    E = ids["pleural_pericard_effusion"]
    effusion = np.zeros(cv.shape, dtype=np.uint8)
    effusion[(region == R_PLEURA) & (tissue == FLUID)] = E["pleural_effusion"]
    effusion[effusion_in_heart] = E["pericardial_effusion"]

    V = ids["lung_vessels"]
    vessels = np.zeros(cv.shape, dtype=np.uint8)
    vessels[lung & (tissue == BLOOD)] = V["lung_arteries"]
    vessels[lung & (tissue == AIRWAY_WALL)] = V["lung_airways_wall"]
    vessels[lung & (tissue == AIR)] = V["lung_airways"]
    return {"total": total, "breasts": breasts, "trunk_cavities": cavities, "pleural_pericard_effusion": effusion,
            "lung_vessels": vessels}
