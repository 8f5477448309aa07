"""The report as a DICOM Comprehensive SR (highdicom), what a PACS, OHIF or 3D Slicer can store and show.

Content tree (after TID 2000 "Basic Diagnostic Imaging Report"):

- root container (LN 18748-4 "Diagnostic imaging report"), with the observer contexts: the algorithm as
  a device observer, and the reviewer as a person observer once the report is reviewed;
- the AI-draft statement (TEXT, private code ``99REG2RG RS003``);
- "Current Procedure Descriptions" (DCM 121064) holding the technique line;
- one "Findings" container (DCM 121070) per region, in reading order: finding site(s) (SCT 363698007),
  the region name, the narrative text ("Finding", DCM 121071; left out when the reader rejected it),
  the review state, each flag, and the algorithm identification (TID 4019: model name, version; its
  parameters carry the weight and settings digests and the decoding settings);
- "Impressions" (DCM 121072) holding the impression.

Completion and verification flags follow the review: PARTIAL/UNVERIFIED until every section is
accepted or rejected, then COMPLETE/VERIFIED with the reviewer as verifying observer. When the CT came
from DICOM the SR joins its study and references every source instance in the evidence sequence; for a
NIfTI volume it starts a study of its own and references nothing.
"""

from __future__ import annotations

import datetime as _dt
import io

from .document import REJECTED, ReportDraft
from .txt import state_label

PRIVATE_SCHEME = "99REG2RG"
#: SNOMED CT codes of the regions (finding sites); trachea and bronchi are two sites
REGION_SITES: dict[str, list[tuple[str, str]]] = {
    "thyroid": [("69748006", "Thyroid structure")],
    "trachea and bronchie": [("44567001", "Tracheal structure"), ("955009", "Bronchial structure")],
    "lung": [("39607008", "Lung structure")],
    "pleura": [("3120008", "Pleural membrane structure")],
    "mediastinum": [("72410000", "Mediastinal structure")],
    "heart": [("80891009", "Heart structure")],
    "esophagus": [("32849002", "Esophageal structure")],
    "breast": [("76752008", "Breast structure")],
    "bone": [("272673000", "Bone structure")],
    "abdomen": [("818981001", "Abdomen")],
}
SERIES_DESCRIPTION = "AI draft report (Reg2RG)"


def codes():
    """The coded concepts of the content tree (built lazily: highdicom is an optional dependency)."""
    from highdicom.sr import CodedConcept as C

    return {
        "report": C("18748-4", "LN", "Diagnostic imaging report"),
        "procedure": C("121064", "DCM", "Current Procedure Descriptions"),
        "procedure_text": C("121065", "DCM", "Procedure Description"),
        "findings": C("121070", "DCM", "Findings"),
        "finding": C("121071", "DCM", "Finding"),
        "impressions": C("121072", "DCM", "Impressions"),
        "impression": C("121073", "DCM", "Impression"),
        "site": C("363698007", "SCT", "Finding Site"),
        "review_state": C("RS001", PRIVATE_SCHEME, "Review state"),
        "flag": C("RS002", PRIVATE_SCHEME, "Report flag"),
        "statement": C("RS003", PRIVATE_SCHEME, "AI draft statement"),
        "region": C("RS005", PRIVATE_SCHEME, "Report region"),
    }


def _evidence(draft: ReportDraft):
    """Header-only datasets of the source instances (DICOM CT), or one stand-in carrying the study facts."""
    from highdicom import UID
    from pydicom.dataset import Dataset

    ident = draft.identification

    def base() -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"     # UTF-8: report text holds dashes, quotes, accents
        ds.PatientName = ident.patient_name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.patient_birth_date
        ds.PatientSex = ident.patient_sex
        ds.AccessionNumber = ident.accession_number
        ds.StudyID = ident.study_id
        ds.StudyDate = ident.study_date
        ds.StudyTime = ident.study_time
        ds.ReferringPhysicianName = ident.referring_physician
        ds.StudyInstanceUID = ident.study_instance_uid or study_uid
        ds.SeriesInstanceUID = ident.series_instance_uid or UID()
        ds.Modality = ident.modality or "CT"
        return ds

    study_uid = ident.study_instance_uid or UID()
    if ident.from_dicom and ident.instances:
        out = []
        for sop_class, sop_instance in ident.instances:
            ds = base()
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
            out.append(ds)
        return out, True
    ds = base()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"      # CT Image Storage: a stand-in, not recorded
    ds.SOPInstanceUID = UID()
    return [ds], False


def build_sr(draft: ReportDraft):
    """The `highdicom.sr.ComprehensiveSR` of the report (validated by highdicom on construction)."""
    import highdicom as hd
    from highdicom.sr import (AlgorithmIdentification, CodeContentItem, CodedConcept, ContainerContentItem,
                              DeviceObserverIdentifyingAttributes, ObserverContext,
                              PersonObserverIdentifyingAttributes, TextContentItem)
    from pydicom.sr.codedict import codes as dcm_codes

    c = codes()
    p = draft.provenance
    contains, concept_mod = "CONTAINS", "HAS CONCEPT MOD"
    items = []
    device = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="Reg2RG", manufacturer_name="Reg2RG Viewer",
            model_name=(p.model_name or draft.model or "unknown")[:64]))
    items.extend(device)
    reviewed = draft.is_reviewed
    if reviewed:
        person = ObserverContext(observer_type=dcm_codes.cid270.Person,
                                 observer_identifying_attributes=PersonObserverIdentifyingAttributes(name=_pn(draft.reviewer)))
        items.extend(person)
    items.append(TextContentItem(c["statement"], draft.statement(), contains))
    procedure = ContainerContentItem(c["procedure"], relationship_type=contains)
    procedure.ContentSequence = [TextContentItem(c["procedure_text"], draft.technique or "CT of the chest.", contains)]
    items.append(procedure)
    params = [f"model weights {p.model_digest or 'unknown'}", f"settings {p.settings_digest or 'unknown'}",
              f"decoding {p.describe_settings() or 'unknown'}"]
    for s in draft.ordered_sections():
        if s.slot is None and s.region is None and not s.text.strip():
            continue
        box = ContainerContentItem(c["findings"], relationship_type=contains)
        children = []
        for code, meaning in REGION_SITES.get(s.region or "", []):
            children.append(CodeContentItem(c["site"], CodedConcept(code, "SCT", meaning), concept_mod))
        children.append(TextContentItem(c["region"], s.region or s.title, concept_mod))
        if s.state != REJECTED and s.text.strip():
            children.append(TextContentItem(c["finding"], s.text.strip(), contains))
        children.append(TextContentItem(c["review_state"], state_label(s), contains))
        for f in draft.flags_of(s):
            children.append(TextContentItem(c["flag"], f"{f.kind}: {f.message}", contains))
        children.extend(AlgorithmIdentification(name=(p.model_name or draft.model or "unknown")[:64],
                                                version=(p.model_version or "unknown")[:64], parameters=params))
        box.ContentSequence = children
        items.append(box)
    impressions = ContainerContentItem(c["impressions"], relationship_type=contains)
    impressions.ContentSequence = [TextContentItem(c["impression"], draft.impression.strip() or "(none written)", contains)]
    items.append(impressions)
    root = ContainerContentItem(c["report"], template_id="2000")
    root.ContentSequence = items

    evidence, record = _evidence(draft)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=root, series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Reg2RG Viewer",
        is_complete=reviewed, is_final=reviewed, is_verified=reviewed,
        verifying_observer_name=_pn(draft.reviewer) if reviewed else None,
        verifying_organization="Reg2RG Viewer reader" if reviewed else None,
        record_evidence=record, series_description=SERIES_DESCRIPTION)
    if not record and "CurrentRequestedProcedureEvidenceSequence" in sr:
        del sr.CurrentRequestedProcedureEvidenceSequence   # the stand-in is no image anyone can retrieve
    if draft.identification.study_description:          # highdicom copies the other study attributes
        sr.StudyDescription = draft.identification.study_description
    if reviewed:
        when = _dt.datetime.fromisoformat(draft.reviewed_at)
        sr.VerifyingObserverSequence[0].VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    return sr


def _pn(name: str) -> str:
    """A person name as DICOM PN: "Jane Doe" -> "Doe^Jane" (a name already holding ^ is kept)."""
    name = " ".join(name.split())
    if "^" in name or " " not in name:
        return name
    first, last = name.rsplit(" ", 1)
    return f"{last}^{first}"


def render_sr(draft: ReportDraft) -> bytes:
    sr = build_sr(draft)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
