"""The report document (`reg2rg.engine.report`) and its renderers, checked field by field: TXT, JSON, PDF
(text extracted with pypdf), DICOM SR (read back with pydicom and highdicom), FHIR (validated by
fhir.resources on load), and ``reg2rg-generate --export``."""

from __future__ import annotations

import json

import pytest

from reg2rg.engine.report import (ACCEPTED, AI_DRAFT_STATEMENT, DRAFTED, EDITED, FORMATS, NOT_DRAFTED,
                                  READING_ORDER, REJECTED, STOPPED, ExportError, ReportDraft, export_report,
                                  format_of, parse_formats)
from reg2rg.engine.report.document import VALIDATED_STATEMENT
from reg2rg.engine.report.txt import render_text, state_label

from report_fixtures import PATIENT, TEXT, dicom_study, fixed_draft, make_result, review_all


@pytest.fixture
def study(tmp_path):
    return dicom_study(tmp_path)


# ---- the document ------------------------------------------------------------------------------
def test_identification_comes_from_the_dicom_header(study):
    draft = fixed_draft(study)
    ident = draft.identification
    assert (ident.patient_name, ident.patient_id, ident.accession_number, ident.study_date) == \
        ("Doe^Jane", "PID-0042", "ACC-7781", "20260314")
    assert ident.study_description == "CT CHEST W/O" and ident.series_description == "Chest 2.5"
    assert ident.series_number == 3 and ident.from_dicom and len(ident.instances) == 4
    assert dict(ident.rows())["Study date"] == "2026-03-14" and dict(ident.rows())["Patient"] == "Doe Jane"
    assert draft.technique.startswith("CT of the chest: 8 \u00d7 8 \u00d7 4 voxels, 0.70 \u00d7 0.70 \u00d7 2.50 mm")


def test_nifti_study_is_identified_by_its_file_name():
    from types import SimpleNamespace

    st = SimpleNamespace(name="ct_001", source="/data/ct_001.nii.gz", metadata={"format": "nifti"})
    draft = ReportDraft.from_result(make_result(), st, study_key="k")
    assert draft.identification.rows() == [("Source", "ct_001.nii.gz")] and not draft.identification.from_dicom


def test_sections_are_in_reading_order_with_not_drafted_regions(study):
    draft = fixed_draft(study)
    assert [s.region for s in draft.ordered_sections()] == ["thyroid", "lung", "pleura", "heart", "bone"]
    assert [s.region for s in draft.ordered_sections()] == [r for r in READING_ORDER if draft.section_of_region(r)]
    pleura = draft.section_of_region("pleura")
    assert pleura.state == NOT_DRAFTED and pleura.slot == 4 and [f.kind for f in pleura.flags()] == ["not drafted"]
    assert draft.report_text().split("\n\n")[0] == "Thyroid: The thyroid is normal."
    assert "Bone is intact" not in draft.report_text()          # rejected: not part of the report


def test_review_state_machine(study):
    draft = ReportDraft.from_result(make_result(), study, study_key="k")
    heart = draft.section(0)
    assert heart.state == DRAFTED and not draft.is_reviewed
    draft.set_text(0, "The heart is mildly enlarged.")
    assert heart.state == EDITED
    draft.set_text(0, "The heart is enlarged.")                 # typed back to the generated text
    assert heart.state == DRAFTED
    draft.set_text(0, "Changed.")
    draft.accept(0, reviewer="Jane Smith")
    assert heart.state == ACCEPTED and state_label(heart) == "accepted (edited)" and draft.reviewer == "Jane Smith"
    draft.set_text(0, "Changed again.")                         # an accepted section edited: to be accepted again
    assert heart.state == EDITED
    draft.reset(0)
    assert heart.state == DRAFTED and heart.text == "The heart is enlarged."
    for s in draft.sections:
        draft.accept(s.key)
    assert draft.is_reviewed and draft.reviewed_at and draft.review_line().startswith("Reviewed by Jane Smith on ")
    draft.reject(2)
    assert draft.is_reviewed and draft.section(2).state == REJECTED
    draft.set_text(1, "Edited after the review.")
    assert not draft.is_reviewed and draft.reviewed_at == "" and draft.review_line().startswith("Not reviewed: 4 of 5")
    actions = [e.action for e in draft.edits]
    assert actions[:5] == ["edit", "edit", "edit", "accept", "edit"] and actions[-2:] == ["reject", "edit"]
    assert draft.edits[3].reviewer == "Jane Smith"


def test_a_stopped_draft_marks_the_cut_off_section_and_the_regions_never_reached(study):
    cut = TEXT[:TEXT.index("nodule") + 6]                        # Stop in the middle of the lung section
    draft = ReportDraft.from_result(make_result(cut, stop_reason="cancelled"), study, study_key="k")
    lung = draft.section(1)
    assert lung.state == STOPPED and lung.truncated and lung.text == "A 6 mm nodule"
    assert [f.kind for f in lung.flags()][:1] == ["stopped"]
    assert {s.region: s.state for s in draft.sections if s.state == NOT_DRAFTED} == \
        {"bone": NOT_DRAFTED, "thyroid": NOT_DRAFTED, "pleura": NOT_DRAFTED}
    assert "generation stopped before this region" in draft.section_of_region("bone").note
    draft.set_text(1, "A 6 mm nodule in the right upper lobe.")
    assert lung.state == EDITED
    draft.reset(1)
    assert lung.state == STOPPED                                 # Reset goes back to what the model left
    assert "[stopped]" in render_text(draft) and "! stopped:" in render_text(draft)


def test_flags_grounding_low_confidence_and_finding_checks(study):
    from reg2rg.engine.report import SectionFlag

    draft = fixed_draft(study)
    bone = draft.section(2)
    kinds = [f.kind for f in bone.flags(0.5)]
    assert kinds == ["grounding", "low confidence"]
    assert "\u201clung\u201d" in bone.flags()[0].message and "mask in this slot is bone" in bone.flags()[0].message
    low = bone.flags(0.5)[1].message
    assert low.startswith(f"{len(bone.low_confidence(0.5))} word(s) below 50%")
    bone.checks.append(SectionFlag("finding check", "nodule mentioned, finding head probability 0.08"))
    assert bone.flags()[-1].kind == "finding check"
    again = ReportDraft.from_dict(json.loads(json.dumps(draft.to_dict())))
    assert again == draft and again.section(2).checks[0].message.startswith("nodule")


def test_impression_seeded_from_the_sentences_that_report_something(study):
    draft = fixed_draft(study)
    assert draft.seed_impression() == "A 6 mm nodule in the right upper lobe. The heart is mildly enlarged."


def test_old_autosaves_still_load():
    old = {"study_key": "k", "study_name": "ct", "model": "demo", "settings": {"strategy": "greedy"},
           "stop_reason": "eos", "created": "2026-01-01T10:00:00", "modified": "2026-01-01T10:00:00", "format": 1,
           "edits": [{"slot": 0, "action": "accept", "before": "generated", "after": "accepted", "time": "t"}],
           "sections": [{"slot": 0, "region": "heart", "area": "heart", "generated_text": "Normal.", "text": "Normal.",
                         "state": "generated", "grounding_ok": True, "tokens": []}]}
    draft = ReportDraft.from_dict(old)
    assert draft.sections[0].state == DRAFTED and draft.provenance.model_name == "demo"
    assert draft.statement() == AI_DRAFT_STATEMENT


# ---- provenance --------------------------------------------------------------------------------
def test_provenance_of_a_model_folder_and_its_validation_record(tmp_path):
    from reg2rg.engine.generation import default_model_dir
    from reg2rg.engine.report.provenance import model_identity, weights_digest

    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": "chest", "version": "2.1"}))
    (folder / "vision.safetensors").write_bytes(b"weights")
    ident = model_identity(folder)
    assert ident["name"] == "Reg2RG chest (my_model)" and ident["version"] == "2.1" and not ident["validated"]
    assert ident["digest"].startswith("sha256:") and ident["digest"] == weights_digest(folder)
    (folder / "vision.safetensors").write_bytes(b"other weights")
    assert weights_digest(folder) != ident["digest"]
    (folder / "validation.json").write_text(json.dumps({"validated": True, "scope": "adult chest CT", "by": "QA",
                                                        "date": "2026-05-01"}))
    ident = model_identity(folder)
    assert ident["validated"] and ident["validation"] == "scope adult chest CT, by QA, date 2026-05-01"
    if (default_model_dir() / "config.json").is_file():
        demo = model_identity(default_model_dir())
        assert "embedded demo model" in demo["name"] and not demo["validated"]


def test_statement_depends_on_validation(study):
    draft = fixed_draft(study)
    assert draft.statement() == AI_DRAFT_STATEMENT == "AI-generated draft \u2014 not for clinical use."
    draft.provenance.validated = True
    assert draft.statement() == VALIDATED_STATEMENT and "AI-generated draft" in draft.statement()


# ---- renderers ------------------------------------------------------------------------------------
def test_text_export_field_by_field(study, tmp_path):
    draft = fixed_draft(study)
    text = export_report(draft, tmp_path, ["txt"])[0].read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == f"*** {AI_DRAFT_STATEMENT} ***"
    for label, value in draft.identification.rows():
        assert f"{label + ':':<12} {value}" in lines
    order = [ln for ln in lines if ln and not ln.startswith(" ") and "[" in ln]
    assert order == ["Thyroid [drafted]", "Lungs [drafted]", "Pleura [not drafted]", "Heart [accepted (edited)]",
                     "Bones [rejected]"]
    assert "  The heart is mildly enlarged." in lines and "Bone is intact" not in text
    assert "    ! grounding: the model named \u201clung\u201d; the mask in this slot is bone" in lines
    assert "  Mild cardiomegaly. 6 mm right upper lobe nodule." in lines
    assert "  Not reviewed: 2 of 5 section(s) accepted or rejected." in lines
    assert f"  Model weights: {draft.provenance.model_digest}" in lines
    assert any(ln.startswith("  Decoding: greedy, max 500 tokens; settings") for ln in lines)


def test_json_export_keeps_tokens_states_flags_and_provenance(study, tmp_path):
    draft = fixed_draft(study)
    data = json.loads(export_report(draft, tmp_path, ["json"], engine_result={"text": TEXT})[0].read_text())
    assert data["statement"] == AI_DRAFT_STATEMENT and data["ai_generated"] and data["reviewed"] is False
    assert [f["region"] for f in data["findings"]] == ["thyroid", "lung", "pleura", "heart", "bone"]
    heart = data["findings"][3]
    assert (heart["state"], heart["edited"], heart["text"]) == (ACCEPTED, True, "The heart is mildly enlarged.")
    assert [f["kind"] for f in data["findings"][4]["flags"]] == ["grounding", "low confidence"]
    assert data["identification"]["accession_number"] == "ACC-7781"
    assert data["provenance"]["model_digest"] == draft.provenance.model_digest
    assert data["provenance"]["settings_digest"].startswith("sha256:")
    tok = data["draft"]["sections"][1]["tokens"][0]
    assert tok["prob"] == pytest.approx(draft.section(1).tokens[0].prob) and tok["top"][1] == [" x", 0.01]
    assert data["engine_result"] == {"text": TEXT}
    assert ReportDraft.from_dict(data["draft"]) == draft


def _pdf_pages(path):
    from pypdf import PdfReader

    return [page.extract_text() for page in PdfReader(str(path)).pages]


def test_pdf_export_field_by_field(study, tmp_path):
    from pypdf import PdfReader

    draft = fixed_draft(study)
    path = export_report(draft, tmp_path, ["pdf"])[0]
    assert path.read_bytes()[:5] == b"%PDF-"
    pages = _pdf_pages(path)
    text = "\n".join(pages)
    flat = " ".join(text.split())
    assert f"{AI_DRAFT_STATEMENT} CT chest report" in flat           # the banner above the title
    for label, value in draft.identification.rows():
        assert value in flat
    heads = ["Thyroid [drafted]", "Lungs [drafted]", "Pleura [not drafted]", "Heart [accepted (edited)]",
             "Bones [rejected]"]
    positions = [flat.index(h) for h in heads]
    assert positions == sorted(positions)
    assert "The heart is mildly enlarged." in flat and "Bone is intact" not in flat
    assert "grounding: the model named \u201clung\u201d; the mask in this slot is bone" in flat
    assert "Mild cardiomegaly. 6 mm right upper lobe nodule." in flat
    assert "Not reviewed: 2 of 5 section(s) accepted or rejected." in flat
    assert "DRAFT \u2014 not reviewed" in flat                     # the watermark
    # the provenance footer on every page, the body text at 11 pt
    assert all("Model Reg2RG demo" in " ".join(p.split()) and "not reviewed" in p for p in pages)
    sizes = {}

    def visit(txt, cm, tm, font, size):
        if txt.strip():
            sizes[txt.strip()] = size * tm[0] if tm[0] else size
    PdfReader(str(path)).pages[0].extract_text(visitor_text=visit)
    assert sizes.get("The heart is mildly enlarged.") == pytest.approx(11.0)


def test_pdf_of_a_long_report_has_the_footer_on_every_page_and_no_watermark_once_reviewed(study, tmp_path):
    draft = fixed_draft(study)
    draft.set_text(1, " ".join(["The right upper lobe nodule measures 6 mm and is solid."] * 90))
    review_all(draft)
    assert draft.is_reviewed
    pages = _pdf_pages(export_report(draft, tmp_path, ["pdf"])[0])
    assert len(pages) >= 2
    for p in pages:
        flat = " ".join(p.split())
        assert "AI-generated draft" in flat and "reviewed by Jane Smith" in flat and "DRAFT \u2014 not reviewed" not in flat


def _sr_items(sr):
    """The root's content items as (relationship, value type, concept meaning, item)."""
    return [(it.RelationshipType, it.ValueType, it.ConceptNameCodeSequence[0].CodeMeaning, it) for it in sr.ContentSequence]


def _children(item):
    return {(c.ConceptNameCodeSequence[0].CodeMeaning): c for c in item.ContentSequence} if "ContentSequence" in item else {}


def test_dicom_sr_round_trip_field_by_field(study, tmp_path):
    import highdicom as hd
    import pydicom

    draft = fixed_draft(study)
    path = export_report(draft, tmp_path, ["sr"])[0]
    ds = pydicom.dcmread(path)
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)                 # highdicom's checks on reading
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"     # Comprehensive SR Storage
    assert ds.Modality == "SR" and ds.SpecificCharacterSet == "ISO_IR 192"
    for tag, value in PATIENT.items():
        if value:
            assert str(ds[tag].value) == value, tag
    assert ds.StudyInstanceUID == draft.identification.study_instance_uid      # joins the CT's study
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == draft.identification.series_instance_uid
    assert sorted(r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence) == \
        sorted(i for _, i in draft.identification.instances)
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    items = _sr_items(sr)
    root = ds.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    texts = {name: it.TextValue for rel, vt, name, it in items if vt == "TEXT"}
    assert texts["AI draft statement"] == AI_DRAFT_STATEMENT
    assert texts["Device Observer Model Name"] == draft.provenance.model_name
    procedure = next(it for _, _, n, it in items if n == "Current Procedure Descriptions")
    assert _children(procedure)["Procedure Description"].TextValue == draft.technique
    findings = [it for _, _, n, it in items if n == "Findings"]
    ordered = [s for s in draft.ordered_sections()]
    assert len(findings) == len(ordered)
    for box, section in zip(findings, ordered):
        kids = list(box.ContentSequence)
        named = {}
        for k in kids:
            named.setdefault(k.ConceptNameCodeSequence[0].CodeMeaning, []).append(k)
        assert named["Report region"][0].TextValue == section.region
        assert named["Review state"][0].TextValue == state_label(section)
        sites = [k.ConceptCodeSequence[0].CodeValue for k in named.get("Finding Site", [])]
        assert sites and all(s.isdigit() for s in sites)
        if section.in_report:
            assert named["Finding"][0].TextValue == section.text
        else:
            assert "Finding" not in named
        assert [k.TextValue for k in named.get("Report flag", [])] == [f"{f.kind}: {f.message}" for f in section.flags()]
        assert named["Algorithm Name"][0].TextValue == draft.provenance.model_name
        assert named["Algorithm Version"][0].TextValue == draft.provenance.model_version
        params = [k.TextValue for k in named["Algorithm Parameters"]]
        assert f"model weights {draft.provenance.model_digest}" in params
    assert [it for _, _, n, it in items if n == "Findings"][3].ContentSequence  # heart
    impressions = next(it for _, _, n, it in items if n == "Impressions")
    assert _children(impressions)["Impression"].TextValue == draft.impression
    # highdicom's own reader accepts it as a Comprehensive SR
    again = hd.sr.srread(path)
    assert isinstance(again, hd.sr.ComprehensiveSR)


def test_dicom_sr_of_a_reviewed_report_is_verified_by_the_reviewer(study, tmp_path):
    import pydicom

    draft = review_all(fixed_draft(study))
    ds = pydicom.dcmread(export_report(draft, tmp_path, ["sr"])[0])
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    obs = ds.VerifyingObserverSequence[0]
    assert str(obs.VerifyingObserverName) == "Smith^Jane"
    assert obs.VerificationDateTime.startswith(draft.reviewed_at[:10].replace("-", ""))
    persons = [str(it.PersonName) for it in ds.ContentSequence if it.ValueType == "PNAME"]
    assert persons == ["Smith^Jane"]                            # the reviewer as person observer


def test_dicom_sr_from_a_nifti_study_references_no_images(tmp_path):
    import pydicom
    from types import SimpleNamespace

    st = SimpleNamespace(name="ct_001", source="/data/ct_001.nii.gz", metadata={"format": "nifti"})
    draft = ReportDraft.from_result(make_result(), st, study_key="k")
    ds = pydicom.dcmread(export_report(draft, tmp_path, ["sr"])[0])
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds and ds.StudyInstanceUID


def test_fhir_export_validates_and_agrees_with_the_text(study, tmp_path):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from pydantic import ValidationError

    draft = fixed_draft(study)
    raw = export_report(draft, tmp_path, ["fhir"])[0].read_text(encoding="utf-8")
    report = DiagnosticReport.model_validate_json(raw)            # the library's model validates on load
    assert report.status == "preliminary" and report.conclusion == draft.impression
    assert report.meta.tag[0].display == AI_DRAFT_STATEMENT and AI_DRAFT_STATEMENT in report.text.div
    assert report.code.coding[0].code == "24627-2" and report.effectiveDateTime.isoformat() == "2026-03-14"
    assert report.identifier[0].value == "ACC-7781"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{draft.identification.study_instance_uid}"
    contained = {r.id: r for r in report.contained}
    patient = contained["patient"]
    assert patient.identifier[0].value == "PID-0042" and patient.name[0].family == "Doe" and patient.name[0].given == ["Jane"]
    assert contained["model"].deviceName[0].name == draft.provenance.model_name
    obs = [contained[r.reference[1:]] for r in report.result]
    ordered = draft.ordered_sections()
    assert [o.status for o in obs] == ["preliminary", "preliminary", "registered", "final", "cancelled"]
    for o, s in zip(obs, ordered):
        assert o.valueString == (s.text if s.in_report else None)
        assert o.note[0].text == f"review state: {state_label(s)}"
        assert [n.text for n in o.note[1:]] == [f"{f.kind}: {f.message}" for f in s.flags()]
        assert o.device.reference == "#model" and o.bodySite.coding[0].system == "http://snomed.info/sct"
    assert report.presentedForm[0].data.decode("utf-8") == render_text(draft)   # the model decodes base64
    bad = json.loads(raw)
    del bad["code"]                                               # a required element
    with pytest.raises(ValidationError):
        DiagnosticReport.model_validate(bad)
    final = DiagnosticReport.model_validate_json(export_report(review_all(draft), tmp_path, ["fhir"])[0].read_text())
    assert final.status == "final" and {r.id: r for r in final.contained}["reviewer"].name[0].text == "Jane Smith"


def test_all_formats_agree(study, tmp_path):
    import pydicom
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    draft = fixed_draft(study)
    paths = dict(zip(FORMATS, export_report(draft, tmp_path, list(FORMATS))))
    assert sorted(p.name for p in paths.values()) == sorted(FORMATS.values())
    expected = [(s.region, state_label(s), s.text if s.in_report else None) for s in draft.ordered_sections()]
    data = json.loads(paths["json"].read_text())
    assert [(f["region"], f["state_label"], f["text"] if f["in_report"] else None) for f in data["findings"]] == expected
    ds = pydicom.dcmread(paths["sr"])
    sr_rows = []
    for it in ds.ContentSequence:
        if it.ConceptNameCodeSequence[0].CodeMeaning != "Findings":
            continue
        kids = {k.ConceptNameCodeSequence[0].CodeMeaning: k for k in it.ContentSequence}
        sr_rows.append((kids["Report region"].TextValue, kids["Review state"].TextValue,
                        kids["Finding"].TextValue if "Finding" in kids else None))
    assert sr_rows == expected
    report = DiagnosticReport.model_validate_json(paths["fhir"].read_text())
    contained = {r.id: r for r in report.contained}
    fhir_rows = [(draft.ordered_sections()[n].region, contained[r.reference[1:]].note[0].text.split(": ", 1)[1],
                  contained[r.reference[1:]].valueString) for n, r in enumerate(report.result)]
    assert fhir_rows == expected
    flat = " ".join(" ".join(_pdf_pages(paths["pdf"])).split())
    txt = paths["txt"].read_text()
    for region, label, text in expected:
        title = draft.section_of_region(region).title
        assert f"{title} [{label}]" in flat and f"{title} [{label}]" in txt
        if text:
            assert text in flat and text in txt
    statement_sr = next(it.TextValue for it in ds.ContentSequence
                        if it.ConceptNameCodeSequence[0].CodeMeaning == "AI draft statement")
    for out in (flat, txt, data["statement"], statement_sr, report.meta.tag[0].display):
        assert AI_DRAFT_STATEMENT in out


def test_formats_parse_and_name(tmp_path):
    assert parse_formats("pdf, txt,json,sr,fhir,pdf") == ["pdf", "txt", "json", "sr", "fhir"]
    with pytest.raises(ExportError, match="unknown export format 'docx'"):
        parse_formats("pdf,docx")
    assert [format_of(n) for n in ("a.pdf", "a.TXT", "a.json", "a.sr.dcm", "a.fhir.json")] == \
        ["pdf", "txt", "json", "sr", "fhir"]
    with pytest.raises(ExportError, match="report.docx: unknown report format"):
        format_of(tmp_path / "report.docx")


@pytest.mark.parametrize("sentence, normal", [
    ("The thyroid is normal.", True), ("No pleural effusion was detected.", True),
    ("Trachea and both main bronchi are in the midline and open.", True),
    ("Bone structures within the sections have a normal appearance.", True),
    ("A 6 mm nodule in the right upper lobe.", False), ("The heart is mildly enlarged.", False),
    ("Heart size is normal but there is a small pericardial effusion.", False),
])
def test_normal_sentences_stay_out_of_the_seeded_impression(sentence, normal):
    from reg2rg.engine.report.document import is_normal_sentence

    assert is_normal_sentence(sentence) is normal


def test_the_engines_findings_check_becomes_section_flags_in_every_export(study, tmp_path):
    import pydicom

    from reg2rg.engine.explain.findings import FindingProbability, FindingsCheck, SectionFindings

    result = make_result()
    omission = FindingProbability("Pleural effusion", 0.81, None, "omission",
                                  "pleural effusion not reported, but the model rates it 81% likely here")
    result.findings_check = FindingsCheck(0.5, 0.1, [
        SectionFindings(1, "lung", (omission, FindingProbability("Nodule", 0.9, "affirmed"))),
        SectionFindings(0, "heart", (FindingProbability("Cardiomegaly", 0.7, "affirmed"),))])
    draft = ReportDraft.from_result(result, study, study_key="k")
    message = "omission: pleural effusion not reported, but the model rates it 81% likely here"
    assert [(c.kind, c.message) for c in draft.section(1).checks] == [("finding check", message)]
    assert draft.section(0).checks == [] and draft.flags_of(draft.section(1))[-1].message == message
    paths = dict(zip(FORMATS, export_report(draft, tmp_path, list(FORMATS))))
    assert f"! finding check: {message}" in " ".join(paths["txt"].read_text().split())     # wrapped at 96
    lung = next(f for f in json.loads(paths["json"].read_text())["findings"] if f["region"] == "lung")
    assert {"kind": "finding check", "message": message} in lung["flags"]
    ds = pydicom.dcmread(paths["sr"])
    flags = [k.TextValue for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeMeaning == "Findings"
             for k in it.ContentSequence if k.ConceptNameCodeSequence[0].CodeMeaning == "Report flag"]
    assert f"finding check: {message}" in flags
    assert f"finding check: {message}" in paths["fhir"].read_text()
    assert message in " ".join(" ".join(_pdf_pages(paths["pdf"])).split())
