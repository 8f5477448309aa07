"""Generates the bad inputs of issue 2 in a temporary folder (nothing is checked in).

Each function writes one bad case and returns its path; `make_all` writes them all.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dicom_fixtures import write_series

SHAPE = (32, 28, 10)


def _affine():
    a = np.diag([-0.8, -0.8, 2.5, 1.0])
    a[:3, 3] = [5.0, 5.0, -20.0]
    return a


def _ct(rng=None):
    rng = rng or np.random.default_rng(0)
    vol = np.full(SHAPE, -1024, dtype=np.int16)
    vol[3:29, 3:25, 1:9] = rng.integers(-900, 300, size=(26, 22, 8))
    return vol


def _save(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), _affine() if affine is None else affine), str(path))
    return path


def truncated_nifti(folder: Path) -> Path:
    good = _save(folder / "full.nii.gz", _ct())
    raw = good.read_bytes()
    path = folder / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    good.unlink()
    return path


def image_2d(folder: Path) -> Path:
    return _save(folder / "slice2d.nii.gz", _ct()[:, :, 4])


def image_4d(folder: Path) -> Path:
    return _save(folder / "timeseries.nii.gz", np.stack([_ct()] * 3, axis=-1))


def with_nans(folder: Path) -> Path:
    vol = _ct().astype(np.float32)
    vol[5:8, 5:8, 2:4] = np.nan
    return _save(folder / "nans.nii.gz", vol)


def mr_like(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 1800, size=SHAPE).astype(np.int16)   # MR: no negative values, no air at -1000
    return _save(folder / "mr_like.nii.gz", vol)


def mask_other_shape(folder: Path) -> tuple[Path, Path]:
    """A CT and a mask folder whose lung mask has another shape (and the CT's affine)."""
    ct = _save(folder / "ct.nii.gz", _ct())
    seg = folder / "seg_ct"
    seg.mkdir(exist_ok=True)
    lung = np.zeros((20, 20, 10), np.uint8)
    lung[4:12, 4:12, 2:8] = 1
    _save(seg / "lung.nii.gz", lung)
    heart = np.zeros(SHAPE, np.uint8)
    heart[10:15, 10:15, 3:6] = 1
    _save(seg / "heart.nii.gz", heart)
    return ct, seg


def dicom_two_series(folder: Path) -> Path:
    path = folder / "dicom_two_series"
    write_series(path, _ct(), _affine(), series_number=3, description="chest")
    write_series(path, _ct(np.random.default_rng(5))[:, :, :4], _affine(), series_number=8, description="localizer")
    return path


# ---- damaged model folders (issue 17, defect 3): each takes a good folder and returns a damaged copy ----
def _copy_model(good: Path, folder: Path, name: str) -> Path:
    import shutil

    out = folder / name
    shutil.copytree(good, out)
    return out


def truncated_vision_weights(good: Path, folder: Path) -> Path:
    out = _copy_model(good, folder, "truncated_vision")
    raw = (out / "vision.safetensors").read_bytes()
    (out / "vision.safetensors").write_bytes(raw[: len(raw) // 2])
    return out


def corrupt_llm_weights(good: Path, folder: Path) -> Path:
    out = _copy_model(good, folder, "corrupt_llm")
    raw = (out / "llm" / "model.safetensors").read_bytes()
    (out / "llm" / "model.safetensors").write_bytes(raw[: len(raw) - 4096])        # cut short, as by a full disk
    return out


def missing_tokenizer_json(good: Path, folder: Path) -> Path:
    out = _copy_model(good, folder, "no_tokenizer_json")
    (out / "tokenizer" / "tokenizer.json").unlink()
    return out


def config_with_wrong_dims(good: Path, folder: Path) -> Path:
    import json

    out = _copy_model(good, folder, "wrong_dims")
    config = json.loads((out / "config.json").read_text())
    config["vision"]["mlp_dim"] = config["vision"]["mlp_dim"] * 2       # not what the weights were saved with
    (out / "config.json").write_text(json.dumps(config))
    return out


def make_all(folder) -> dict[str, object]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "truncated": truncated_nifti(folder),
        "2d": image_2d(folder),
        "4d": image_4d(folder),
        "nans": with_nans(folder),
        "mr_like": mr_like(folder),
        "mask_other_shape": mask_other_shape(folder),
        "dicom_two_series": dicom_two_series(folder),
    }


def sheared_affine(folder: Path) -> Path:
    """A CT whose slice axis leans 10 degrees off the perpendicular (a gantry-tilt volume kept sheared)."""
    a = _affine()
    a[1, 2] = 2.5 * np.tan(np.radians(10.0))          # each slice moves along y as it moves along z
    return _save(folder / "sheared.nii.gz", _ct(), a)


# ---- CSV inputs (issue 17, defect 5) ---------------------------------------------------------------------
REPORT_HEADER = "Volumename,Anatomy,Sentence\n"


def reports_unterminated_quote(folder: Path) -> Path:
    """Line 3 opens a quote it never closes: a lenient reader swallows lines 4-6 into its sentence."""
    path = Path(folder) / "reports_unterminated.csv"
    path.write_text(REPORT_HEADER
                    + "v_1_a_1.nii.gz,lung,Lungs clear.\n"
                    + 'v_1_a_1.nii.gz,heart,"Heart normal in size.\n'
                    + "v_2_a_1.nii.gz,lung,Small nodule in the right upper lobe.\n"
                    + "v_2_a_1.nii.gz,heart,Cardiomegaly.\n"
                    + 'v_3_a_1.nii.gz,lung,"Emphysema, moderate."\n', encoding="utf-8")
    return path


def reports_extra_fields(folder: Path) -> Path:
    """Line 2 has an unquoted comma in its sentence: four fields under a three-column header."""
    path = Path(folder) / "reports_extra_fields.csv"
    path.write_text(REPORT_HEADER
                    + "v_1_a_1.nii.gz,lung,Lungs clear, no effusion.\n"
                    + "v_1_a_1.nii.gz,heart,Heart normal.\n", encoding="utf-8")
    return path


def reports_latin1(folder: Path) -> Path:
    """A spreadsheet export in Windows-1252: 'ü' is the single byte 0xfc on line 3."""
    path = Path(folder) / "reports_latin1.csv"
    path.write_bytes((REPORT_HEADER + "v_1_a_1.nii.gz,lung,Lungs clear.\n"
                      + "v_1_a_1.nii.gz,heart,Herzgr\u00f6\u00dfe normal, gepr\u00fcft.\n").encode("cp1252"))
    return path


def predictions_torn(folder: Path) -> Path:
    """A predictions.csv whose writer was killed in the middle of its second row (inside a quote)."""
    import csv

    path = Path(folder) / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["AccNum", "GT_combined_report", "Pred_combined_report", "Region_slots"])
        w.writerow(["v_1_a_1", "The region 0 is lung: Lungs clear.", "The region 0 is lung: Clear.",
                    '{"0": "lung"}'])
    with open(path, "a", encoding="utf-8") as f:
        f.write('v_2_a_1,"The region 0 is lung: Small nodule, right upper lobe.","The region 0 is lu')
    return path


def predictions_huge_field(folder: Path, chars: int = 200_000) -> Path:
    """A well-formed predictions.csv with one predicted report longer than the csv module's field limit."""
    import csv

    path = Path(folder) / "predictions_long.csv"
    long_report = "The region 0 is lung: " + " ".join(["no nodule"] * (chars // 10))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["AccNum", "GT_combined_report", "Pred_combined_report"])
        w.writerow(["v_1_a_1", "The region 0 is lung: Lungs clear.", long_report])
        w.writerow(["v_2_a_1", "The region 0 is lung: Nodule.", "The region 0 is lung: Nodule."])
    return path
