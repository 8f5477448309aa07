"""The report as a clinical document: one model from which every export (TXT, JSON, PDF, DICOM SR, FHIR)
is rendered, and which the viewer's drafting session edits.

A `ReportDraft` holds

- the study identification (`StudyIdentification`: patient/study/series from DICOM, the file name for
  NIfTI) and a technique line,
- the findings, one `DraftSection` per region, each with its review state (drafted, edited, accepted,
  rejected, not drafted, stopped), its flags (grounding mismatch, low confidence, cut off by Stop, and
  the per-finding checks once the engine provides them) and its tokens with their probabilities,
- the impression (written by the reader; it can be seeded from the sentences that report something),
- the provenance (`Provenance`: model name, version, weight digest, validation status, decoding
  settings and their digest, engine version, draft time) and the review (reviewer, review time).

Sections are rendered in an anatomical reading order (`READING_ORDER`), not in the RadGenome region
order: from the neck down and from the airways outwards, as a structured chest CT report reads —
thyroid, trachea and bronchi, lungs, pleura, mediastinum, heart, esophagus, breast (chest wall), bone,
upper abdomen.

Plain Python, no Qt: the viewer and ``reg2rg-generate`` share it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from reg2rg.engine.regions import REGIONS

# Review states of a section.
DRAFTED = "drafted"            # as the model wrote it, not yet looked at
EDITED = "edited"              # the reader changed the text (not yet accepted)
ACCEPTED = "accepted"          # the reader accepted the section (edited or not)
REJECTED = "rejected"          # the reader rejected it: it is not part of the report
NOT_DRAFTED = "not drafted"    # a region asked for that the model did not write (or could not: no mask)
STOPPED = "stopped"            # the model was stopped (Stop, token limit) while writing this section
GENERATED = DRAFTED            # the name used before review states existed (old autosaves, old imports)
STATES = (DRAFTED, EDITED, ACCEPTED, REJECTED, NOT_DRAFTED, STOPPED)
REVIEWED_STATES = (ACCEPTED, REJECTED)

DOCUMENT_FORMAT = 2            # 1: the viewer's first drafts (states generated/edited/accepted)

#: the anatomical reading order of the findings (see the module docstring)
READING_ORDER: tuple[str, ...] = (
    "thyroid", "trachea and bronchie", "lung", "pleura", "mediastinum", "heart", "esophagus", "breast", "bone",
    "abdomen",
)
assert sorted(READING_ORDER) == sorted(REGIONS)

#: how each region is named in a report heading
REGION_TITLES = {
    "thyroid": "Thyroid", "trachea and bronchie": "Trachea and bronchi", "lung": "Lungs", "pleura": "Pleura",
    "mediastinum": "Mediastinum", "heart": "Heart", "esophagus": "Esophagus", "breast": "Breast and chest wall",
    "bone": "Bones", "abdomen": "Upper abdomen",
}

AI_DRAFT_STATEMENT = "AI-generated draft \u2014 not for clinical use."
VALIDATED_STATEMENT = "AI-generated draft (validated model) \u2014 to be checked by a radiologist."
LOW_CONFIDENCE_THRESHOLD = 0.5

# Sentences that only say something is normal (for seeding the impression with what is not): a negation
# at the start, or a word of normality, without a "but" that brings a finding back in.
_NORMAL_START_RE = re.compile(r"^\s*(no|there is no|there are no|without|negative for)\b", re.IGNORECASE)
_NORMAL_WORD_RE = re.compile(
    r"\b(normal|unremarkable|intact|clear|patent|open|midline|within normal limits|not enlarged|no evidence|"
    r"no significant|was not (observed|detected|seen))\b", re.IGNORECASE)
_BUT_RE = re.compile(r"\b(but|however|except|although)\b", re.IGNORECASE)


def is_normal_sentence(sentence: str) -> bool:
    """True when a report sentence only says that something is normal or absent."""
    if _BUT_RE.search(sentence):
        return False
    return bool(_NORMAL_START_RE.search(sentence) or _NORMAL_WORD_RE.search(sentence))


def now_iso() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _from_fields(cls, d: dict):
    """``cls(**d)`` ignoring keys that are not fields (files written by a newer version)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# identification, provenance
# ----------------------------------------------------------------------------------------------
@dataclass
class StudyIdentification:
    """Who and what the report is about. From the DICOM header when the CT came from DICOM; for a NIfTI
    volume only the file name is known. ``instances``: (SOP Class UID, SOP Instance UID) of each slice of
    the source series, for the DICOM SR's references."""

    source_name: str = ""                  # file or folder name of the CT
    source_format: str = ""                # dicom | nifti | memory
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""           # DICOM DA (YYYYMMDD)
    patient_sex: str = ""
    accession_number: str = ""
    study_date: str = ""                   # DICOM DA (YYYYMMDD)
    study_time: str = ""
    study_description: str = ""
    study_instance_uid: str = ""
    study_id: str = ""
    referring_physician: str = ""
    series_instance_uid: str = ""
    series_number: int | None = None
    series_description: str = ""
    modality: str = "CT"
    instances: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_study(cls, study) -> "StudyIdentification":
        """What the study says about itself: DICOM header facts (``metadata["identification"]``) or the
        file name."""
        from pathlib import Path

        meta = dict(getattr(study, "metadata", {}) or {})
        source = str(getattr(study, "source", "") or "")
        ident = cls(source_name=Path(source).name if source and "://" not in source and ":" not in source[:2]
                    else (getattr(study, "name", "") or source),
                    source_format=str(meta.get("format", "memory" if not source else "")))
        if not ident.source_name:
            ident.source_name = getattr(study, "name", "") or "study"
        dic = meta.get("identification") or {}
        for f in fields(cls):
            if f.name in dic and dic[f.name] not in (None, ""):
                setattr(ident, f.name, dic[f.name])
        ident.instances = [tuple(x) for x in dic.get("instances", [])]
        if meta.get("series_uid") and not ident.series_instance_uid:
            ident.series_instance_uid = str(meta["series_uid"])
        if meta.get("series_description") and not ident.series_description:
            ident.series_description = str(meta["series_description"])
        if meta.get("series_number") is not None and ident.series_number is None:
            ident.series_number = meta["series_number"]
        return ident

    @property
    def from_dicom(self) -> bool:
        return bool(self.study_instance_uid and self.series_instance_uid)

    def display_date(self) -> str:
        """The study date as YYYY-MM-DD (or as stored when not a DICOM date)."""
        d = self.study_date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a report header; unknown values are left out."""
        name = self.patient_name.replace("^", " ").strip()
        series = " ".join(x for x in (f"#{self.series_number}" if self.series_number is not None else "",
                                      self.series_description) if x)
        rows = [("Patient", name), ("Patient ID", self.patient_id), ("Accession", self.accession_number),
                ("Study date", self.display_date()), ("Study", self.study_description), ("Series", series),
                ("Source", self.source_name)]
        return [(k, v) for k, v in rows if v]


def settings_digest(settings: dict) -> str:
    """sha256 of the settings as canonical JSON (what a reader needs to reproduce the draft)."""
    blob = json.dumps(settings or {}, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Provenance:
    """Where the draft came from (see `reg2rg.engine.report.provenance.provenance_for`)."""

    model_name: str = ""
    model_version: str = ""
    model_digest: str = ""                 # sha256 over the model's weight files
    model_path: str = ""                   # the folder's name (not the full path: it may name a person)
    validated: bool = False                # True only with a validation record in the model folder
    validation: str = ""                   # what the record says (scope, by, date)
    settings: dict[str, Any] = field(default_factory=dict)
    settings_digest: str = ""
    engine: str = ""                       # the program and its version
    engine_version: str = ""
    drafted_at: str = ""
    stop_reason: str = ""

    def describe_model(self) -> str:
        """"demo 0.1 (sha256:1234abcd…)" — name, version and a short digest."""
        digest = f" ({self.model_digest[:15]}\u2026)" if self.model_digest else ""
        version = f" {self.model_version}" if self.model_version else ""
        return f"{self.model_name or 'unknown model'}{version}{digest}"

    def describe_settings(self) -> str:
        s = self.settings or {}
        strategy = s.get("strategy", "")
        if not strategy:
            return ""
        parts = [strategy, f"max {s.get('max_new_tokens')} tokens"]
        if strategy == "sample":
            parts += [f"T {s.get('temperature')}", f"top-k {s.get('top_k')}", f"top-p {s.get('top_p')}",
                      f"seed {s.get('seed')}"]
        elif strategy == "beam":
            parts.append(f"{s.get('num_beams')} beams")
        return ", ".join(str(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
@dataclass
class DraftToken:
    """A generated token inside a section's generated text (offsets relative to that text)."""

    index: int                     # position among the generated tokens of the whole report
    text: str
    start: int
    end: int
    prob: float
    entropy: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class SectionFlag:
    """Something the reader should look at in a section: ``kind`` is ``grounding``, ``low confidence``,
    ``stopped`` or ``finding check`` (the engine's per-finding checks, when it provides them)."""

    kind: str
    message: str


@dataclass
class DraftSection:
    """One region section: what the model wrote, what the radiologist made of it."""

    slot: int | None               # prompt slot; None: text before the first "The region i is" marker
    region: str | None             # the region whose mask was in that slot
    area: str | None               # the area the model named
    generated_text: str            # the section body as generated
    text: str                      # the body as it stands now
    state: str = DRAFTED
    grounding_ok: bool = True      # the named area is the slot's region
    tokens: list[DraftToken] = field(default_factory=list)
    truncated: bool = False        # generation stopped inside this section: the text is cut off
    checks: list[SectionFlag] = field(default_factory=list)   # per-finding checks (filled by the engine's checks)
    note: str = ""                 # why a region was not drafted

    @property
    def key(self) -> int | str | None:
        """How the draft finds this section: its prompt slot, else its region (a region with no slot),
        else None (text before the first region marker)."""
        return self.slot if self.slot is not None else self.region

    @property
    def title(self) -> str:
        if self.region in REGION_TITLES:
            return REGION_TITLES[self.region]
        name = self.region or self.area or "General"
        return name[:1].upper() + name[1:]

    @property
    def is_edited(self) -> bool:
        return self.text != self.generated_text

    @property
    def base_state(self) -> str:
        """The state of the section as the model left it (what Reset goes back to)."""
        if not self.generated_text.strip() and not self.tokens:
            return NOT_DRAFTED
        return STOPPED if self.truncated else DRAFTED

    @property
    def in_report(self) -> bool:
        """Its text belongs to the report (it is not rejected and says something)."""
        return self.state != REJECTED and bool(self.text.strip())

    def low_confidence(self, threshold: float) -> list[DraftToken]:
        """Words the model was less sure of than ``threshold``, least sure first (visible tokens only)."""
        picked = [t for t in self.tokens if t.prob < threshold and t.text.strip()]
        return sorted(picked, key=lambda t: t.prob)

    def flags(self, threshold: float = LOW_CONFIDENCE_THRESHOLD) -> list[SectionFlag]:
        """Everything to check in this section: grounding, cut-off text, low confidence, finding checks."""
        out = []
        if self.slot is not None and not self.grounding_ok and self.state != NOT_DRAFTED:
            out.append(SectionFlag("grounding", f"the model named \u201c{self.area or 'no area'}\u201d; "
                                                f"the mask in this slot is {self.region or 'missing'}"))
        if self.truncated:
            out.append(SectionFlag("stopped", "generation was stopped while writing this section: the text is cut off"))
        if self.state == NOT_DRAFTED:
            out.append(SectionFlag("not drafted", self.note or "the model wrote nothing for this region"))
        low = self.low_confidence(threshold) if not self.is_edited else []
        if low:
            words = ", ".join(f"{t.text.strip()} ({t.prob:.0%})" for t in low[:5])
            out.append(SectionFlag("low confidence", f"{len(low)} word(s) below {threshold:.0%}: {words}"))
        out.extend(self.checks)
        return out

    def sort_key(self) -> tuple:
        order = READING_ORDER.index(self.region) if self.region in READING_ORDER else len(READING_ORDER)
        return (order, self.slot if self.slot is not None else -1)


@dataclass
class DraftEdit:
    slot: int | None
    action: str                    # edit | accept | reject | reset | regenerate | impression | review
    before: str
    after: str
    time: str = field(default_factory=now_iso)
    reviewer: str = ""


# ----------------------------------------------------------------------------------------------
# the document
# ----------------------------------------------------------------------------------------------
@dataclass
class ReportDraft:
    """A whole report for one study: identification, findings by region, impression, provenance, review."""

    study_key: str
    study_name: str
    sections: list[DraftSection] = field(default_factory=list)
    edits: list[DraftEdit] = field(default_factory=list)
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""
    created: str = field(default_factory=now_iso)
    modified: str = field(default_factory=now_iso)
    identification: StudyIdentification = field(default_factory=StudyIdentification)
    technique: str = ""
    impression: str = ""
    provenance: Provenance = field(default_factory=Provenance)
    reviewer: str = ""
    reviewed_at: str = ""          # set when the last section is accepted or rejected; cleared by any change
    # problems found in the input (the CT, its masks, its geometry), each once: a reader must see them
    input_warnings: list[str] = field(default_factory=list)
    # the model's training orientation, the study's stored one, and whether the study was reoriented
    orientation: dict[str, Any] = field(default_factory=dict)
    confidence_threshold: float = LOW_CONFIDENCE_THRESHOLD    # words below this probability are flagged

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result, study, model: str = "", *, study_key: str = "",
                    provenance: Provenance | None = None,
                    not_drafted: dict[str, str] | None = None) -> "ReportDraft":
        """Build a draft from the engine's `DraftResult` (sections with grounding, token confidences).

        A region that had a prompt slot but no section in the text becomes a "not drafted" section, and
        so does each region of ``not_drafted`` (region -> why); the section being written when
        generation stopped early is marked "stopped"."""
        settings = _settings_dict(getattr(result, "settings", None))
        if getattr(result, "seed", None) is not None and settings.get("strategy") == "sample":
            settings["seed"] = result.seed
        prov = provenance or Provenance(model_name=model)
        if settings or not prov.settings:     # the result's settings hold the seed actually drawn
            prov.settings = settings
            prov.settings_digest = settings_digest(settings)
        prov.stop_reason = getattr(result, "stop_reason", "")
        prov.drafted_at = prov.drafted_at or now_iso()
        draft = cls(study_key=study_key, study_name=getattr(study, "name", ""), model=model or prov.model_name,
                    settings=settings, stop_reason=getattr(result, "stop_reason", ""),
                    identification=StudyIdentification.from_study(study), technique=technique_line(study),
                    provenance=prov)
        facts = getattr(result, "input", None) or {}
        draft.input_warnings = [str(w) for w in dict.fromkeys(facts.get("warnings", []))]
        draft.orientation = dict(facts.get("orientation", {}))
        draft.sections = [section_from_result(result, s) for s in result.sections]
        check = getattr(result, "findings_check", None)      # the engine's findings check, when it ran
        if check is not None:
            for sec in draft.sections:
                found = check.for_slot(sec.slot) if sec.slot is not None else None
                if found is not None and found.region == sec.region:
                    sec.checks = [SectionFlag("finding check", f"{f.flag}: {f.reason}") for f in found.flags]
        if draft.stop_reason in ("cancelled", "max_new_tokens") and draft.sections:
            last = draft.sections[-1]
            last.truncated = True
            last.state = STOPPED
        # why each region asked for has no section: the caller's reasons, else the engine's, else ours
        not_drafted = {**(getattr(result, "not_drafted", None) or {}), **(not_drafted or {})}
        written = {s.slot for s in draft.sections if s.slot is not None}
        for slot, region in sorted((getattr(result, "slot_regions", None) or {}).items()):
            if int(slot) not in written:
                why = not_drafted.get(region) or (
                    "generation stopped before this region" if draft.stop_reason in ("cancelled", "max_new_tokens")
                    else "the model wrote no section for this region")
                draft.sections.append(DraftSection(slot=int(slot), region=region, area=None, generated_text="",
                                                   text="", state=NOT_DRAFTED, note=why))
        for region, why in not_drafted.items():
            if draft.section_of_region(region) is None:
                draft.sections.append(DraftSection(slot=None, region=region, area=None, generated_text="", text="",
                                                   state=NOT_DRAFTED, note=why))
        return draft

    def section(self, key: int | str | None) -> DraftSection:
        """The section with this `DraftSection.key` (a slot number, or the region of a slot-less section)."""
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section for {key!r}")

    def section_of_region(self, region: str) -> DraftSection | None:
        return next((s for s in self.sections if s.region == region), None)

    def ordered_sections(self) -> list[DraftSection]:
        """The sections in the reading order (`READING_ORDER`); text outside any region first."""
        return sorted(self.sections, key=DraftSection.sort_key)

    # -- review state --------------------------------------------------------------------------
    def _reviewable(self) -> list[DraftSection]:
        return [s for s in self.sections if s.slot is not None or s.region is not None or s.text.strip()]

    @property
    def reviewed_count(self) -> int:
        return sum(1 for s in self._reviewable() if s.state in REVIEWED_STATES)

    @property
    def is_reviewed(self) -> bool:
        """Every section accepted or rejected, and the reviewer known."""
        sections = self._reviewable()
        return bool(sections) and all(s.state in REVIEWED_STATES for s in sections) and bool(self.reviewer)

    def review_line(self) -> str:
        """"Reviewed by … on …" or "Not reviewed: 3 of 10 sections accepted or rejected"."""
        if self.is_reviewed and self.reviewed_at:
            return f"Reviewed by {self.reviewer} on {self.reviewed_at}: every section accepted or rejected."
        n, total = self.reviewed_count, len(self._reviewable())
        return f"Not reviewed: {n} of {total} section(s) accepted or rejected."

    def flags_of(self, section: DraftSection) -> list[SectionFlag]:
        """A section's flags at this draft's confidence threshold (what every export lists)."""
        return section.flags(self.confidence_threshold)

    def statement(self) -> str:
        """The AI-draft statement every export carries."""
        return VALIDATED_STATEMENT if self.provenance.validated else AI_DRAFT_STATEMENT

    # -- editing -----------------------------------------------------------------------------
    def set_text(self, slot: int | None, text: str) -> bool:
        """The radiologist typed in a section; returns False when nothing changed."""
        s = self.section(slot)
        if text == s.text:
            return False
        self.edits.append(DraftEdit(s.slot, "edit", s.text, text))
        s.text = text
        s.state = EDITED if s.is_edited else s.base_state
        self._touch()
        return True

    def accept(self, slot: int | None, reviewer: str = "") -> None:
        self._review(slot, ACCEPTED, reviewer)

    def reject(self, slot: int | None, reviewer: str = "") -> None:
        self._review(slot, REJECTED, reviewer)

    def _review(self, slot, state: str, reviewer: str) -> None:
        s = self.section(slot)
        if reviewer:
            self.reviewer = reviewer
        self.edits.append(DraftEdit(s.slot, "accept" if state == ACCEPTED else "reject", s.state, state,
                                    reviewer=reviewer or self.reviewer))
        s.state = state
        self._touch()

    def reset(self, slot: int | None) -> None:
        """Back to the generated text (and to the state the model left it in)."""
        s = self.section(slot)
        self.edits.append(DraftEdit(s.slot, "reset", s.text, s.generated_text))
        s.text, s.state = s.generated_text, s.base_state
        self._touch()

    def set_impression(self, text: str) -> bool:
        if text == self.impression:
            return False
        self.edits.append(DraftEdit(None, "impression", self.impression, text))
        self.impression = text
        self._touch()
        return True

    def seed_impression(self) -> str:
        """The sentences of the report that describe something (not only "normal"), in reading order."""
        picked = []
        for s in self.ordered_sections():
            if not s.in_report:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", s.text.strip()):
                if sentence and not is_normal_sentence(sentence):
                    picked.append(sentence.strip())
        return " ".join(picked)

    def replace_section(self, new: DraftSection) -> None:
        """A regenerated section replaces the one for the same region (or is added)."""
        old = self.section_of_region(new.region) if new.region else None
        if old is not None:
            new.slot = old.slot if old.slot is not None else new.slot   # keep the report's numbering
            self.edits.append(DraftEdit(old.slot, "regenerate", old.text, new.text))
            self.sections[self.sections.index(old)] = new
        else:
            self.edits.append(DraftEdit(new.slot, "regenerate", "", new.text))
            self.sections.append(new)
        self._touch()

    def _touch(self) -> None:
        self.modified = now_iso()
        sections = self._reviewable()
        done = bool(sections) and all(s.state in REVIEWED_STATES for s in sections)
        if done and not self.reviewed_at:
            self.reviewed_at = self.modified
        elif not done:
            self.reviewed_at = ""

    # -- output ------------------------------------------------------------------------------
    def report_text(self) -> str:
        """The findings: one paragraph per section in reading order, headed by its region (rejected and
        empty sections left out)."""
        parts = []
        for s in self.ordered_sections():
            if s.in_report:
                body = s.text.strip()
                parts.append(f"{s.title}: {body}" if s.region or s.slot is not None else body)
        return "\n\n".join(parts) + ("\n" if parts else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = DOCUMENT_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReportDraft":
        d = dict(d)
        fmt = d.pop("format", 1)
        sections = []
        for s in d.pop("sections", []):
            s = dict(s)
            s["tokens"] = [DraftToken(**{**t, "top": [tuple(x) for x in t.get("top", [])]}) for t in s.get("tokens", [])]
            s["checks"] = [_from_fields(SectionFlag, c) for c in s.get("checks", [])]
            if fmt < 2 and s.get("state") == "generated":
                s["state"] = DRAFTED
            sections.append(_from_fields(DraftSection, s))
        edits = [_from_fields(DraftEdit, e) for e in d.pop("edits", [])]
        ident = d.pop("identification", None) or {}
        ident = _from_fields(StudyIdentification, {**ident, "instances": [tuple(x) for x in ident.get("instances", [])]})
        prov = _from_fields(Provenance, d.pop("provenance", None) or {})
        if fmt < 2 and not prov.model_name:
            prov.model_name = d.get("model", "")
            prov.settings = dict(d.get("settings", {}))
            prov.settings_digest = settings_digest(prov.settings)
        known = {f.name for f in fields(cls)}
        return cls(sections=sections, edits=edits, identification=ident, provenance=prov,
                   **{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def technique_line(study) -> str:
    """"CT of the chest: 512 × 512 × 300 voxels, 0.70 × 0.70 × 1.25 mm (series 3 'Chest 1.25'), 120 kVp."."""
    try:
        shape = " \u00d7 ".join(str(int(n)) for n in study.shape)
        spacing = " \u00d7 ".join(f"{s:.2f}" for s in study.spacing)
    except (AttributeError, TypeError, ValueError):
        return "CT of the chest."
    meta = getattr(study, "metadata", {}) or {}
    extra = ""
    if meta.get("series_description") or meta.get("series_number") is not None:
        extra = f" (series {meta.get('series_number', '')} \u2018{meta.get('series_description', '')}\u2019)"
    kvp = f", {meta['kvp']:g} kVp" if meta.get("kvp") else ""
    return f"CT of the chest: {shape} voxels, {spacing} mm{extra}{kvp}."


def _settings_dict(settings) -> dict:
    if settings is None:
        return {}
    if isinstance(settings, dict):
        return dict(settings)
    try:
        return asdict(settings)
    except TypeError:
        return dict(getattr(settings, "__dict__", {}))


def section_from_result(result, section) -> DraftSection:
    """One `GroundedSection` of a `DraftResult` as a draft section (tokens re-based on its body)."""
    body_start, end = section.body_start, section.end
    raw_body = result.text[body_start:end]
    lead = len(raw_body) - len(raw_body.lstrip())
    body = raw_body.strip()
    base = body_start + lead
    tokens = []
    for t in result.tokens:
        if t.end <= base or t.start >= base + len(body) or t.start == t.end:
            continue
        tokens.append(DraftToken(index=t.index, text=t.text, start=max(t.start - base, 0),
                                 end=min(t.end - base, len(body)), prob=float(t.prob),
                                 entropy=float(t.entropy), top=[(a, float(p)) for a, p in t.top]))
    return DraftSection(slot=section.slot, region=section.region, area=section.area, generated_text=body,
                        text=body, grounding_ok=bool(section.grounding_ok), tokens=tokens)


def region_order(region: str | None) -> int:
    """Position of a region in the reading order (unknown regions last)."""
    return READING_ORDER.index(region) if region in READING_ORDER else len(READING_ORDER)
