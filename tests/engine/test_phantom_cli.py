"""`reg2rg-phantom`: RadGenome layout, reports CSV, manifest, byte-for-byte determinism, read-back; demo study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from reg2rg.engine.dataset import scan_volumes
from reg2rg.engine.masks import label_table_from_header
from reg2rg.engine.phantom import DEMO_SEED, make_study
from reg2rg.engine.phantom_cli import main, study_paths
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.studyio import read_study

ARGS = ["--n", "2", "--seed", "40", "--shape", "72", "72", "36"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert main(["--out", str(out)] + ARGS) == 0
    return out


def test_layout_csv_and_manifest(dataset: Path):
    names = ["phantom_000040_a_1", "phantom_000041_a_1"]
    for name in names:
        patient, accession = name.rsplit("_", 2)[0], name.rsplit("_", 1)[0]
        assert (dataset / patient / accession / f"{name}.nii.gz").is_file()
        assert sorted(p.name for p in (dataset / "masks" / f"seg_{name}").iterdir()) == sorted(
            f"{r}.nii.gz" for r in REGIONS)
    with open(dataset / "reports.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["Volumename", "Anatomy", "Sentence"]
    assert len(rows) == 2 * (1 + len(REGIONS))
    for name in names:
        mine = [r for r in rows if r["Volumename"] == f"{name}.nii.gz"]
        assert sorted(r["Anatomy"] for r in mine) == sorted([""] + list(REGIONS))
        whole = next(r["Sentence"] for r in mine if r["Anatomy"] == "")
        assert all(r["Sentence"] and r["Sentence"] in whole for r in mine if r["Anatomy"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [s["volume"] for s in manifest["studies"]] == [f"{n}.nii.gz" for n in names]
    for entry in manifest["studies"]:
        expected = make_study(entry["seed"], shape=(72, 72, 36)).metadata["findings"]
        assert [f["type"] for f in entry["findings"]] == [f["type"] for f in expected]
        assert all(len(f["centre_voxel"]) == 3 for f in entry["findings"])
        if entry["findings"]:       # where each finding is: a label map the bench reads (bench/explain.py)
            lesions = nib.load(dataset / entry["lesions"])
            assert entry["lesions"] == f"lesions/seg_{entry['volume'].removesuffix('.nii.gz')}/lesions.nii.gz"
            labels = np.asarray(lesions.dataobj)
            assert [int((labels == f["lesion_label"]).sum()) for f in entry["findings"]] == \
                [f["lesion_voxels"] for f in entry["findings"]]
            assert label_table_from_header(lesions) == {f["lesion_label"]: f["type"] for f in entry["findings"]}
        else:
            assert "lesions" not in entry
    # the lesion maps are never taken for volumes: the training index finds exactly the two studies
    assert sorted(scan_volumes(dataset)) == names


def test_written_study_reads_back(dataset: Path):
    name = "phantom_000041_a_1"
    study = read_study(dataset / "phantom_000041" / "phantom_000041_a" / f"{name}.nii.gz",
                       dataset / "masks" / f"seg_{name}")
    made = make_study(41, shape=(72, 72, 36))
    assert study.orientation == "LPS" and np.allclose(study.affine, made.affine)
    assert np.array_equal(study.voxels, made.voxels)
    assert set(study.regions_present) == set(REGIONS)
    assert all(np.array_equal(study.masks[r], made.masks[r]) for r in REGIONS)


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path):
    assert main(["--out", str(tmp_path)] + ARGS) == 0
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_bad_arguments(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "0"])
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--shape", "4", "4", "4"]) == 2
    assert "shape" in capsys.readouterr().err


def test_embedded_demo_study():
    root = Path(__file__).resolve().parents[2] / "resources" / "demo_study"
    volumes = sorted(root.glob("*.nii.gz"))
    assert len(volumes) == 1
    assert sorted(p.name for p in (root / "masks").iterdir()) == sorted(f"{r}.nii.gz" for r in REGIONS)
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 5_000_000
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == DEMO_SEED
    types = {f["type"]: f for f in manifest["findings"]}
    assert types["Lung nodule"]["side"] == "right" and types["Lung nodule"]["lobe"] == "upper"
    assert types["Pleural effusion"]["side"] == "left"
    study = read_study(volumes[0], root / "masks")
    nodule = tuple(types["Lung nodule"]["centre_voxel"])
    assert study.masks["lung"][nodule] and study.voxels[nodule] > -200
    assert "nodule" in (root / "report.txt").read_text()


def test_unshowable_finding_is_redrawn_not_fatal(tmp_path: Path):
    """Seed 1249's own draw (an enlarged node) cannot be painted on its grid: the study gets new findings
    (the same ones on every run) and the rest of the run, reports.csv included, is still written."""
    from reg2rg.engine.phantom import PhantomError
    from reg2rg.engine.phantom_cli import write_dataset

    with pytest.raises(PhantomError, match="too coarse"):
        make_study(1249)
    lines: list[str] = []
    manifest = write_dataset(tmp_path / "a", 1, 1249, log=lines.append)
    assert [s["seed"] for s in manifest["studies"]] == [1249]
    assert any("seed 1249" in line and "redrawing" in line for line in lines)
    with open(tmp_path / "a" / "reports.csv", newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 1 + len(REGIONS)
    again = write_dataset(tmp_path / "b", 1, 1249, log=lambda _: None)
    assert again["studies"][0]["findings"] == manifest["studies"][0]["findings"]


def test_abnormal_fraction_draw():
    from reg2rg.engine.phantom_cli import draw_findings

    assert draw_findings(7, None) is None                      # default: make_study's own draw
    draws = [draw_findings(s, 0.85) for s in range(300)]
    abnormal = [d for d in draws if d]
    assert 0.75 < len(abnormal) / len(draws) < 0.95
    assert all(2 <= len(d) <= 4 and len({f.type for f in d}) == len(d) for d in abnormal)
    assert [[f.type for f in d] for d in draws] == [[f.type for f in draw_findings(s, 0.85)] for s in range(300)]
    assert all(draw_findings(s, 0.0) == [] for s in range(50))
    assert all(draw_findings(s, 1.0) for s in range(50))


def test_abnormal_fraction_cli(tmp_path: Path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--n", "2", "--seed", "40", "--shape", "72", "72", "36",
                 "--abnormal-fraction", "1"]) == 0
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert all(len(s["findings"]) >= 2 for s in manifest["studies"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "y"), "--abnormal-fraction", "1.5"])
    assert "--abnormal-fraction must be between 0 and 1" in capsys.readouterr().err


def test_totalseg_output_reads_back_as_the_ten_regions(tmp_path: Path):
    """--totalseg: TotalSegmentator task files (its label values, its table in the header) beside the masks."""
    from reg2rg.engine.masks import TOTALSEG_TASK_CLASSES, label_table_from_header

    assert main(["--out", str(tmp_path), "--n", "1", "--seed", "4", "--shape", "64", "64", "32", "--totalseg"]) == 0
    folder = tmp_path / "totalseg" / "seg_phantom_000004_a_1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{t}.nii.gz" for t in TOTALSEG_TASK_CLASSES)
    total = nib.load(str(folder / "total.nii.gz"))
    assert label_table_from_header(total) == TOTALSEG_TASK_CLASSES["total"]
    assert {10, 11, 12, 13, 14, 51}.issubset(set(np.unique(np.asarray(total.dataobj)).tolist()))
    volume, masks = study_paths(tmp_path, "phantom_000004_a_1")
    assert read_study(volume, folder).regions_present == list(REGIONS)
