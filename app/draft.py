"""The report draft as the radiologist works on it: region sections, their state, edits, autosave.

Plain Python (no Qt): `ReportDraft` is built from the engine's `DraftResult`, edited section by
section, serialised to JSON (export and autosave) and restored after a crash by `DraftStore`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reg2rg.engine.fileio import atomic_write
from reg2rg.engine.regions import REGIONS

GENERATED, ACCEPTED, EDITED = "generated", "accepted", "edited"
DRAFT_FORMAT = 1


class DraftFileError(ValueError):
    """A saved draft cannot be read; the message names the file and the problem."""


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


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
class DraftSection:
    """One region section: what the model wrote, what the radiologist made of it."""

    slot: int | None               # prompt slot; None: text before the first "The region i is" marker
    region: str | None             # the region whose mask was in that slot
    area: str | None               # the area the model named
    generated_text: str            # the section body as generated
    text: str                      # the body as it stands now
    state: str = GENERATED         # generated | accepted | edited
    grounding_ok: bool = True      # the named area is the slot's region
    tokens: list[DraftToken] = field(default_factory=list)

    @property
    def title(self) -> str:
        name = self.region or self.area or "General"
        return name[:1].upper() + name[1:]

    @property
    def is_edited(self) -> bool:
        return self.text != self.generated_text

    def low_confidence(self, threshold: float) -> list[DraftToken]:
        """Words the model was less sure of than ``threshold``, least sure first (visible tokens only)."""
        picked = [t for t in self.tokens if t.prob < threshold and t.text.strip()]
        return sorted(picked, key=lambda t: t.prob)


@dataclass
class DraftEdit:
    slot: int | None
    action: str                    # edit | accept | reset | regenerate
    before: str
    after: str
    time: str = field(default_factory=_now)


@dataclass
class ReportDraft:
    """A whole report draft for one study."""

    study_key: str
    study_name: str
    sections: list[DraftSection] = field(default_factory=list)
    edits: list[DraftEdit] = field(default_factory=list)
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""
    created: str = field(default_factory=_now)
    modified: str = field(default_factory=_now)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result, study, model: str = "") -> "ReportDraft":
        """Build a draft from the engine's `DraftResult` (sections with grounding, token confidences)."""
        draft = cls(study_key=study_key(study), study_name=getattr(study, "name", ""), model=model,
                    settings=_settings_dict(getattr(result, "settings", None)),
                    stop_reason=getattr(result, "stop_reason", ""))
        draft.sections = [section_from_result(result, s) for s in result.sections]
        return draft

    def section(self, slot: int | None) -> DraftSection:
        for s in self.sections:
            if s.slot == slot:
                return s
        raise KeyError(f"no section for slot {slot}")

    def section_of_region(self, region: str) -> DraftSection | None:
        return next((s for s in self.sections if s.region == region), None)

    # -- editing -----------------------------------------------------------------------------
    def set_text(self, slot: int | None, text: str) -> bool:
        """The radiologist typed in a section; returns False when nothing changed."""
        s = self.section(slot)
        if text == s.text:
            return False
        self.edits.append(DraftEdit(slot, "edit", s.text, text))
        s.text = text
        s.state = EDITED if s.is_edited else GENERATED
        self._touch()
        return True

    def accept(self, slot: int | None) -> None:
        s = self.section(slot)
        self.edits.append(DraftEdit(slot, "accept", s.state, ACCEPTED))
        s.state = ACCEPTED
        self._touch()

    def reset(self, slot: int | None) -> None:
        """Back to the generated text."""
        s = self.section(slot)
        self.edits.append(DraftEdit(slot, "reset", s.text, s.generated_text))
        s.text, s.state = s.generated_text, GENERATED
        self._touch()

    def replace_section(self, new: DraftSection) -> None:
        """A regenerated section replaces the one for the same region (or is added in region order)."""
        old = self.section_of_region(new.region) if new.region else None
        if old is not None:
            new.slot = old.slot   # keep the report's numbering; the one-region prompt used slot 0
            self.edits.append(DraftEdit(old.slot, "regenerate", old.text, new.text))
            self.sections[self.sections.index(old)] = new
        else:
            self.edits.append(DraftEdit(new.slot, "regenerate", "", new.text))
            self.sections.append(new)
        self._touch()

    def _touch(self) -> None:
        self.modified = _now()

    # -- output ------------------------------------------------------------------------------
    def report_text(self) -> str:
        """The final report: one paragraph per section, headed by its region."""
        parts = []
        for s in self.sections:
            body = s.text.strip()
            if body:
                parts.append(f"{s.title}: {body}" if s.slot is not None else body)
        return "\n\n".join(parts) + ("\n" if parts else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = DRAFT_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReportDraft":
        d = dict(d)
        d.pop("format", None)
        sections = []
        for s in d.pop("sections", []):
            s = dict(s)
            s["tokens"] = [DraftToken(**{**t, "top": [tuple(x) for x in t.get("top", [])]}) for t in s.get("tokens", [])]
            sections.append(DraftSection(**s))
        edits = [DraftEdit(**e) for e in d.pop("edits", [])]
        return cls(sections=sections, edits=edits, **d)


def _settings_dict(settings) -> dict:
    if settings is None:
        return {}
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


def study_key(study) -> str:
    """A stable key for a study's drafts: a hash of where it came from (no patient data in file names)."""
    ident = getattr(study, "source", "") or getattr(study, "name", "") or "study"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:20]


def user_data_dir() -> Path:
    """Per-user data folder: $REG2RG_DATA_DIR, else $XDG_DATA_HOME/reg2rg-viewer, else ~/.local/share/…"""
    if os.environ.get("REG2RG_DATA_DIR"):
        return Path(os.environ["REG2RG_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "reg2rg-viewer"


@dataclass
class SavedDraft:
    draft: ReportDraft
    clean: bool                    # False: the viewer did not close this study normally (a crash)
    saved_at: str
    path: Path


class DraftStore:
    """Autosave files, one per study: ``<data dir>/drafts/<study key>.json``, written atomically."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else user_data_dir() / "drafts"

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def save(self, draft: ReportDraft, clean: bool = False) -> Path:
        """Write the draft; ``clean=True`` marks a normal close (no restore prompt next time)."""
        path = self.path_for(draft.study_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"clean": clean, "saved_at": _now(), "draft": draft.to_dict()}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, path)     # a crash mid-write leaves the previous autosave intact
        return path

    def load(self, key: str) -> SavedDraft | None:
        """The autosaved draft of a study, or None. Raises `DraftFileError` for an unreadable file."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            draft = ReportDraft.from_dict(payload["draft"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DraftFileError(f"{path}: not a readable Reg2RG draft ({type(exc).__name__}: {exc})") from exc
        return SavedDraft(draft, bool(payload.get("clean", False)), str(payload.get("saved_at", "")), path)

    def mark_clean(self, key: str) -> None:
        saved = self.load(key)
        if saved is not None and not saved.clean:
            self.save(saved.draft, clean=True)

    def discard(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)


def export_json(draft: ReportDraft, path: str | os.PathLike) -> None:
    """Sections, tokens with confidences and alternatives, and every edit (written atomically)."""
    with atomic_write(path) as f:
        f.write(json.dumps(draft.to_dict(), indent=1))


def export_text(draft: ReportDraft, path: str | os.PathLike) -> None:
    """The report text (written atomically)."""
    with atomic_write(path) as f:
        f.write(draft.report_text())


def region_order(region: str | None) -> int:
    return REGIONS.index(region) if region in REGIONS else len(REGIONS)
