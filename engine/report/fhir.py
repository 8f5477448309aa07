"""The report as a FHIR DiagnosticReport (R4 family: built and validated with ``fhir.resources``' R4B
models — R4B changed nothing in DiagnosticReport, Observation, Patient or Device).

One DiagnosticReport (status ``preliminary`` until every section is accepted or rejected and the
reviewer is known, then ``final``; ``conclusion`` = the impression; ``presentedForm`` = the text
rendering) with contained resources: the Patient (DICOM identification) when known, the model as a
Device, the reviewer as a Practitioner once reviewed, and one Observation per region in reading order
(``valueString`` = the narrative text, ``bodySite`` = SNOMED CT finding sites, the review state and
every flag as notes; status ``final`` when accepted, ``cancelled`` when rejected, ``registered`` when
not drafted, ``preliminary`` otherwise).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import uuid
from html import escape

from .document import ACCEPTED, NOT_DRAFTED, REJECTED, ReportDraft
from .sr import REGION_SITES
from .txt import render_text, state_label

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
TAG_SYSTEM = "urn:reg2rg:report"


def observation_status(state: str) -> str:
    return {ACCEPTED: "final", REJECTED: "cancelled", NOT_DRAFTED: "registered"}.get(state, "preliminary")


def _instant(iso: str) -> str:
    when = _dt.datetime.fromisoformat(iso) if iso else _dt.datetime.now().astimezone()
    if when.tzinfo is None:
        when = when.astimezone()
    return when.isoformat(timespec="seconds")


def report_resource(draft: ReportDraft) -> dict:
    """The DiagnosticReport as a JSON-ready dict (not yet validated: see `build_fhir`)."""
    p, ident = draft.provenance, draft.identification
    reviewed = draft.is_reviewed
    contained: list[dict] = []
    device = {"resourceType": "Device", "id": "model",
              "deviceName": [{"name": p.model_name or draft.model or "unknown", "type": "model-name"}],
              "version": [{"value": p.model_version or "unknown"}],
              "note": [{"text": f"model weights {p.model_digest or 'unknown'}; "
                                f"{'validated' if p.validated else 'not validated'}"
                                + (f" ({p.validation})" if p.validation else "")},
                       {"text": f"decoding {p.describe_settings() or 'unknown'}; settings {p.settings_digest}; "
                                f"engine {p.engine} {p.engine_version}"}]}
    contained.append(device)
    subject = {"display": ident.source_name or draft.study_name or "unknown study"}
    if ident.patient_id or ident.patient_name:
        patient: dict = {"resourceType": "Patient", "id": "patient"}
        if ident.patient_id:
            patient["identifier"] = [{"value": ident.patient_id}]
        if ident.patient_name:
            family, _, given = ident.patient_name.partition("^")
            name = {"family": family} if family else {}
            if given:
                name["given"] = [g for g in given.split("^") if g]
            patient["name"] = [name]
        contained.append(patient)
        subject = {"reference": "#patient"}
    interpreter = []
    if reviewed:
        contained.append({"resourceType": "Practitioner", "id": "reviewer", "name": [{"text": draft.reviewer}]})
        interpreter = [{"reference": "#reviewer"}]
    results = []
    for n, s in enumerate(draft.ordered_sections()):
        if s.slot is None and s.region is None and not s.text.strip():
            continue
        oid = f"finding-{n}"
        notes = [{"text": f"review state: {state_label(s)}"}] + \
                [{"text": f"{f.kind}: {f.message}"} for f in draft.flags_of(s)]
        obs = {"resourceType": "Observation", "id": oid, "status": observation_status(s.state),
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                         "code": "imaging", "display": "Imaging"}]}],
               "code": {"coding": [{"system": LOINC, "code": "59776-5", "display": "Procedure findings"}],
                        "text": f"Findings: {s.region or s.title}"},
               "subject": subject, "device": {"reference": "#model"}, "note": notes}
        sites = REGION_SITES.get(s.region or "", [])
        if sites:
            obs["bodySite"] = {"coding": [{"system": SNOMED, "code": code, "display": meaning} for code, meaning in sites],
                               "text": s.title}
        if s.state != REJECTED and s.text.strip():
            obs["valueString"] = s.text.strip()
        elif s.state == REJECTED:
            obs["dataAbsentReason"] = {"text": "rejected by the reader"}
        else:
            obs["dataAbsentReason"] = {"text": "not drafted"}
        contained.append(obs)
        results.append({"reference": f"#{oid}"})
    text = render_text(draft)
    div = (f"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p><b>{escape(draft.statement())}</b></p>"
           f"<p>{escape(draft.review_line())}</p><pre>{escape(text)}</pre></div>")
    report = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": "ai-draft", "display": draft.statement()}]},
        "text": {"status": "generated", "div": div},
        "contained": contained,
        "status": "final" if reviewed else "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "24627-2", "display": "CT Chest"}], "text": "CT chest report"},
        "subject": subject,
        "issued": _instant(draft.reviewed_at if reviewed else draft.modified),
        "result": results,
        "conclusion": draft.impression.strip() or None,
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "language": "en",
                           "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                           "title": "CT chest report (AI draft)"}],
    }
    if ident.accession_number:
        report["identifier"] = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                       "code": "ACSN"}]}, "value": ident.accession_number}]
    if ident.study_date and len(ident.study_date) == 8 and ident.study_date.isdigit():
        report["effectiveDateTime"] = ident.display_date()
    if ident.study_instance_uid:
        report["imagingStudy"] = [{"identifier": {"system": "urn:dicom:uid",
                                                  "value": f"urn:oid:{ident.study_instance_uid}"}}]
    if interpreter:
        report["resultsInterpreter"] = interpreter
    if report["conclusion"] is None:
        del report["conclusion"]
    return report


def build_fhir(draft: ReportDraft):
    """The validated ``fhir.resources`` DiagnosticReport (raises pydantic's ValidationError if invalid)."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    return DiagnosticReport.model_validate(report_resource(draft))


def render_fhir(draft: ReportDraft) -> str:
    report = build_fhir(draft)
    return json.dumps(json.loads(report.model_dump_json(exclude_none=True)), indent=1, ensure_ascii=False)
