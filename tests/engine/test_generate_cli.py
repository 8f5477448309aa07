"""``reg2rg-generate`` on one study and on a RadGenome-style dataset folder (resumable), with a tiny
random model saved in the project's checkpoint format."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from reg2rg.engine.checkpoint import save_pretrained
from reg2rg.engine.cli import main
from reg2rg.engine.generation import GenerationSettings, ReportEngine
from reg2rg.engine.studyio import write_study

from generation_fixtures import box_study, tiny_engine

ARGS = ["--max-new-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    engine = tiny_engine()
    return save_pretrained(engine.model, engine.tokenizer, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    names = ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    rows = []
    for i, name in enumerate(names):
        patient = name.rsplit("_", 2)[0]
        write_study(box_study(flip_axis=0 if i == 1 else None, name=name),
                    root / "ct" / patient / f"{patient}_a" / f"{name}.nii.gz", root / "masks" / f"seg_{name}")
        rows += [(f"{name}.nii.gz", "heart", f"Heart normal {i}."), (f"{name}.nii.gz", "lung", "Lungs clear."),
                 (f"{name}.nii.gz", "", "Whole report.")]
    with open(root / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Volumename", "Anatomy", "Sentence"])
        w.writerows(rows)
    return root, names


def test_one_study_writes_report_json_and_attention(model_dir, tmp_path):
    study = box_study()
    write_study(study, tmp_path / "ct.nii.gz", tmp_path / "masks")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--model", str(model_dir),
                 "--out", str(out), "--attention", "--regions", "heart", "lung", *ARGS]) == 0
    data = json.loads((out / "report.json").read_text())
    # the same engine on the same weights gives the same draft
    expected = ReportEngine.load(model_dir).draft(study, ["heart", "lung"], GenerationSettings(max_new_tokens=6))
    txt = (out / "report.txt").read_text()
    if txt.startswith("INPUT WARNINGS ("):       # the input's problems head the file (issue 17)
        header, _, txt = txt.partition("\n\n")
        assert all(w in header for w in data["input"]["warnings"])
    assert data["text"] == expected.text and txt.startswith(expected.text.strip() + "\n")
    assert data["slot_regions"] == {"0": "heart", "1": "lung"}
    assert len(data["tokens"]) == 6 and len(data["tokens"][0]["top"]) == 5
    # the default heatmap is the relevance map, with the region dependence of the same selection
    img = nib.load(out / "relevance_report.nii.gz")
    np.testing.assert_allclose(img.affine, study.affine, atol=1e-5)
    assert img.shape == study.shape
    entry = data["attention"]["relevance_report.nii.gz"]
    assert entry["method"] == "relevance"
    assert set(entry["region_dependence"]["drops_nats"]) == {"global", "heart", "lung"}
    # the findings check is in report.json: one entry per checked region section (the tiny model may
    # name none), each with the threshold it was flagged at
    from reg2rg.engine.explain.findings import DEFAULT_OMISSION_THRESHOLD

    assert data["findings_check"]["threshold"] == pytest.approx(DEFAULT_OMISSION_THRESHOLD)
    # raw attention stays an option, clearly named
    raw = tmp_path / "raw"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--model", str(model_dir),
                 "--out", str(raw), "--attention", "--attention-method", "raw", "--omission-threshold", "0.7",
                 "--regions", "heart", "lung", *ARGS]) == 0
    data = json.loads((raw / "report.json").read_text())
    assert nib.load(raw / "attention_report.nii.gz").shape == study.shape
    assert set(data["attention"]["attention_report.nii.gz"]["shares"]) == {"global", "heart", "lung"}
    assert data["findings_check"]["threshold"] == pytest.approx(0.7)


def test_dataset_run_is_resumable(model_dir, dataset, tmp_path):
    root, names = dataset
    out = tmp_path / "preds"
    base = ["--dataset", str(root / "ct"), "--masks", str(root / "masks"), "--reports", str(root / "reports.csv"),
            "--model", str(model_dir), "--out", str(out), *ARGS]
    assert main(base + ["--limit", "1"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        first = list(csv.DictReader(f))
    assert [r["AccNum"] for r in first] == names[:1]
    assert main(base) == 0
    assert main(base) == 0                  # nothing left: no duplicate rows
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["AccNum", "GT_combined_report", "Pred_combined_report", "Region_slots"]
    assert [r["AccNum"] for r in rows] == names
    row = rows[2]
    slots = json.loads(row["Region_slots"])
    assert slots == {"0": "bone", "1": "heart", "2": "lung"}
    # the reference in the model's slot order, regions without a reference sentence left out
    assert row["GT_combined_report"] == "The region 1 is heart: Heart normal 2. The region 2 is lung: Lungs clear."
    report = json.loads((out / names[2] / "report.json").read_text())
    assert report["text"].strip() == row["Pred_combined_report"]


def test_clear_errors(model_dir, dataset, tmp_path, capsys):
    root, _ = dataset
    assert main(["--demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "missing: model folder not found" in capsys.readouterr().err
    assert main(["--dataset", str(root / "ct"), "--model", str(model_dir), "--out", str(tmp_path)]) == 2
    assert "--reports" in capsys.readouterr().err
    assert main(["--volume", str(tmp_path / "nope.nii.gz"), "--model", str(model_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz" in err and "Traceback" not in err
    assert main(["--demo", "--volume", "x"]) == 2
    # strictness can only be relaxed for the published checkpoint, and only explicitly
    assert main(["--demo", "--model", str(model_dir), "--non-strict", "--out", str(tmp_path)]) == 2
    assert "--non-strict applies to --published only" in capsys.readouterr().err


def test_export_writes_every_report_format_marked_as_an_unreviewed_ai_draft(model_dir, tmp_path):
    import pydicom
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    study = box_study()
    write_study(study, tmp_path / "ct.nii.gz", tmp_path / "masks")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--model", str(model_dir),
                 "--out", str(out), "--export", "pdf,txt,json,sr,fhir", *ARGS]) == 0
    names = {"report.pdf", "report.txt", "report.json", "report.sr.dcm", "report.fhir.json"}
    assert names <= {p.name for p in out.iterdir()}
    data = json.loads((out / "report.json").read_text())
    assert data["statement"] == "AI-generated draft \u2014 not for clinical use." and data["reviewed"] is False
    assert data["provenance"]["model_path"] == "tiny" and data["provenance"]["model_digest"].startswith("sha256:")
    assert data["identification"]["source_name"] == "ct.nii.gz"
    assert len(data["engine_result"]["tokens"]) == 6                 # the engine's own JSON is kept
    assert {f["region"] for f in data["findings"]} >= set(data["engine_result"]["slot_regions"].values())
    assert (out / "report.txt").read_text().startswith("*** AI-generated draft")
    assert pydicom.dcmread(out / "report.sr.dcm").VerificationFlag == "UNVERIFIED"
    assert DiagnosticReport.model_validate_json((out / "report.fhir.json").read_text()).status == "preliminary"


def test_export_rejects_an_unknown_format_in_one_line(model_dir, tmp_path, capsys):
    assert main(["--demo", "--model", str(model_dir), "--out", str(tmp_path), "--export", "pdf,docx", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "reg2rg-generate: --export: unknown export format 'docx'; choose from pdf, txt, json, sr, fhir"


# ---- masks: none, made on demand, regions not drafted ------------------------------------------------

def test_volume_without_masks_stops_with_the_two_ways_out(model_dir, tmp_path, capsys):
    write_study(box_study(), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--model", str(model_dir), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ct.nii.gz: no region masks" in err[0]
    assert "--masks" in err[0] and "--segment" in err[0] and "--allow-no-masks" in err[0]
    assert not out.exists()                                   # nothing drafted, nothing written
    # an empty mask folder is no better than none
    (tmp_path / "empty").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(tmp_path / "empty" / "heart.nii.gz"))
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "empty"), "--model", str(model_dir),
                 "--out", str(out), *ARGS]) == 2
    assert "no region masks" in capsys.readouterr().err


def test_allow_no_masks_marks_the_draft(model_dir, tmp_path):
    write_study(box_study(), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--allow-no-masks", "--model", str(model_dir),
                 "--out", str(out), *ARGS]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["outside_training_distribution"] is True and data["slot_regions"] == {}
    assert "outside the model's training distribution" in (out / "report.txt").read_text().splitlines()[-1]


def test_regions_asked_for_but_not_written_are_listed(model_dir, tmp_path):
    study = box_study()
    write_study(study, tmp_path / "ct.nii.gz", tmp_path / "masks")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--model", str(model_dir),
                 "--out", str(out), "--regions", "heart", "lung", *ARGS]) == 0
    data = json.loads((out / "report.json").read_text())
    written = {s["region"] for s in data["sections"] if s["region"] and s["text"].strip()}
    assert set(data["not_drafted"]) == {"heart", "lung"} - written
    assert data["not_drafted"]                                # 6 random tokens cannot hold both sections
    text = (out / "report.txt").read_text()
    for region, why in data["not_drafted"].items():
        assert f"{region}: not drafted ({why})" in text
    assert not data["outside_training_distribution"]


def test_segment_makes_the_masks_first(model_dir, tmp_path, monkeypatch):
    """--segment runs the same code as reg2rg-segment (TotalSegmentator replaced by the stated stand-in
    package of tests/engine/stand_ins, which writes a phantom's label maps)."""
    from pathlib import Path

    from reg2rg.engine.phantom import make_study
    from reg2rg.engine.phantom_cli import write_totalseg
    from reg2rg.engine.segment import TASK_WEIGHTS

    study = make_study(9, shape=(64, 64, 32), totalseg=True)
    write_study(study, tmp_path / "ct.nii.gz")
    write_totalseg(study, tmp_path / "labels")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent / "stand_ins"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.setenv("REG2RG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_TOTALSEG_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TOTALSEG_LABELS", str(tmp_path / "labels"))
    for ids in TASK_WEIGHTS.values():
        for i in ids:
            (tmp_path / "tshome" / "nnunet" / "results" / f"Dataset{i}_w").mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--segment", "--model", str(model_dir), "--out", str(out),
                 "--regions", "pleura", "breast", *ARGS]) == 0
    assert json.loads((out / "report.json").read_text())["slot_regions"] == {"0": "breast", "1": "pleura"}
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 4
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--segment", "--masks", str(tmp_path)]) == 2


def test_decoding_presets_and_precision_are_selectable_and_recorded(model_dir, tmp_path, capsys):
    """--decoding published follows the model's LLaMA folder (generation_config.json + top-k 30 + seed 20),
    single options override it, and report.json records the preset and the precision."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "bos_token_id": 1, "eos_token_id": 2}
    (model / "llm" / "generation_config.json").write_text(json.dumps(config))
    study = box_study()
    write_study(study, tmp_path / "ct.nii.gz", tmp_path / "masks")
    base = ["--volume", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "masks"), "--model", str(model), "--quiet"]

    def run(name, *extra):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "report.json").read_text())

    published = run("published", "--decoding", "published")
    s = published["settings"]
    assert (s["preset"], s["strategy"], s["temperature"], s["top_p"], s["top_k"], s["seed"]) == \
        ("published", "sample", 0.7, 0.9, 30, 20)
    assert published["precision"] == "fp32 (all fp32)"
    assert s["max_new_tokens"] == 500 and len(published["tokens"]) <= 500
    again = run("again", "--decoding", "published", "--max-new-tokens", "6")
    assert again["text"] == published["text"][:len(again["text"])]       # the same draws, cut at 6 tokens
    modified = run("modified", "--decoding", "published", "--seed", "5", "--max-new-tokens", "6")["settings"]
    assert modified["preset"] == "published, modified" and modified["seed"] == 5 and modified["temperature"] == 0.7
    greedy = run("greedy", "--max-new-tokens", "6")["settings"]
    assert greedy["preset"] == "greedy, modified" and greedy["strategy"] == "greedy" and greedy["seed"] is None
    # the reference split runs on the CPU too (slowly): LLM fp16, vision fp32
    assert run("reference", "--precision", "reference", "--max-new-tokens", "6")["precision"] == "reference (LLM fp16, vision fp32)"
    # a generation config the decoder cannot follow is one clear line, rc 2
    (model / "llm" / "generation_config.json").write_text(json.dumps({**config, "no_repeat_ngram_size": 3}))
    assert main([*base, "--out", str(tmp_path / "bad"), "--decoding", "published"]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json: sets no_repeat_ngram_size=3" in err and "Traceback" not in err


def test_dataset_resume_repairs_a_torn_predictions_csv(model_dir, dataset, tmp_path, caplog):
    """A predictions.csv cut in the middle of a row (a kill while writing) is repaired before appending:
    the torn row is removed with a message and its study drafted again."""
    root, names = dataset
    out = tmp_path / "preds"
    base = ["--dataset", str(root / "ct"), "--masks", str(root / "masks"), "--reports", str(root / "reports.csv"),
            "--model", str(model_dir), "--out", str(out), *ARGS]
    assert main(base + ["--limit", "2"]) == 0
    path = out / "predictions.csv"
    data = path.read_bytes()
    cut = data.rindex(names[1].encode()) + 40            # inside the second study's reference report
    path.write_bytes(data[:cut])
    with caplog.at_level("WARNING"):
        assert main(base) == 0
    assert f"{path}: line 3: " in caplog.text and "removed it before appending" in caplog.text
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["AccNum"] for r in rows] == names            # the torn study drafted again, once
    assert all(r["Region_slots"].startswith("{") for r in rows)


def test_malformed_predictions_csv_and_non_utf8_reports_are_one_line(model_dir, dataset, tmp_path, capsys):
    import bad_inputs

    root, names = dataset
    out = tmp_path / "preds"
    base = ["--dataset", str(root / "ct"), "--masks", str(root / "masks"), "--model", str(model_dir),
            "--out", str(out), *ARGS]
    assert main(base + ["--reports", str(root / "reports.csv"), "--limit", "1"]) == 0
    path = out / "predictions.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + 'x_1_a_1,"unclosed,report\n' + "".join(lines[1:]), encoding="utf-8")
    before = path.read_bytes()
    capsys.readouterr()
    assert main(base + ["--reports", str(root / "reports.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reg2rg-generate: {path}: 1 malformed row(s): line 2: a quote opened on line 2 is not "
                          "closed") and err.endswith("fix or move the file to resume (appending to it could mix rows)")
    assert path.read_bytes() == before                 # nothing appended to a damaged file
    latin1 = bad_inputs.reports_latin1(tmp_path)
    assert main(base + ["--reports", str(latin1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reg2rg-generate: {latin1}: not UTF-8 text (line 3 has the byte 0xf6); save it as UTF-8 " \
                  "(in a spreadsheet: CSV UTF-8)"


def test_a_region_the_model_cannot_read_is_not_dropped_silently(model_dir, tmp_path):
    """A mask lying on air only (as a mask of another scan can): the pre-processing cannot crop it; the
    region is listed as not drafted with the reason, not left out of the draft without a word."""
    study = box_study()
    air = np.zeros(study.shape, bool)
    air[0, 0, :] = True                                  # the air border of the box study
    assert (study.voxels[air] < -900).all()
    study.masks["abdomen"] = air
    engine = ReportEngine.load(model_dir)
    result = engine.draft(study, ["abdomen", "heart"], GenerationSettings(max_new_tokens=4))
    assert "abdomen" not in result.slot_regions.values()
    assert result.not_drafted["abdomen"].startswith("its mask could not be prepared for the model")


def test_allow_no_masks_note_reaches_the_report_document(model_dir, tmp_path):
    """With --export the report document carries the note too (its technique line, printed by every format)."""
    write_study(box_study(), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert main(["--volume", str(tmp_path / "ct.nii.gz"), "--allow-no-masks", "--model", str(model_dir),
                 "--out", str(out), "--export", "txt,json", *ARGS]) == 0
    assert "outside the model's training distribution" in (out / "report.txt").read_text()
    data = json.loads((out / "report.json").read_text())
    assert "outside the model's training distribution" in json.dumps(data["technique"])
    assert data["engine_result"]["outside_training_distribution"] is True
