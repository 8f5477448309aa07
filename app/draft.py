"""The report draft in the viewer: autosave and restore (`DraftStore`, keyed by study content), the strict
reader of saved drafts, and the export helpers. The draft itself — sections, review states, flags,
identification, provenance — is the engine's report document (`reg2rg.engine.report.ReportDraft`),
re-exported here under the viewer's names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reg2rg.engine.fileio import OutputError, atomic_write, ensure_folder
from reg2rg.engine.report import (  # noqa: F401 - re-exported: the viewer's names for the document model
    ACCEPTED,
    DRAFTED,
    EDITED,
    GENERATED,
    NOT_DRAFTED,
    REJECTED,
    STATES,
    STOPPED,
    DraftEdit,
    DraftSection,
    DraftToken,
    ReportDraft,
    section_from_result,
    write_report,
)

DRAFT_FORMAT = 2          # 1: before review states, identification and provenance


class DraftFileError(ValueError):
    """A saved draft cannot be read; the message names the file and the problem."""


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def study_key(study) -> str:
    """The key of a study's drafts: derived from the study's *content* (`Study.content_digest`: the DICOM
    series and instance UIDs, or the NIfTI header and voxels), never from its path, so a different
    patient's study saved at the same path never gets this study's draft. 128 bits of a SHA-256 (no
    patient data in file names)."""
    return hashlib.sha256(b"reg2rg-draft\0" + study.content_digest().encode("ascii")).hexdigest()[:32]


def user_data_dir() -> Path:
    """Per-user data folder: $REG2RG_DATA_DIR, else $XDG_DATA_HOME/reg2rg-viewer, else ~/.local/share/…"""
    if os.environ.get("REG2RG_DATA_DIR"):
        return Path(os.environ["REG2RG_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "reg2rg-viewer"


# ---- reading a saved draft strictly --------------------------------------------------------------
_TEXT, _OPT_TEXT, _INT, _OPT_INT, _NUMBER, _BOOL, _LIST, _DICT = (
    (str,), (str, type(None)), (int,), (int, type(None)), (int, float), (bool,), (list,), (dict,))
_FIELDS = {
    "draft": {"study_key": _TEXT, "study_name": _TEXT, "sections": _LIST, "edits": _LIST, "model": _TEXT,
              "settings": _DICT, "stop_reason": _TEXT, "created": _TEXT, "modified": _TEXT,
              "identification": _DICT, "technique": _TEXT, "impression": _TEXT, "provenance": _DICT,
              "reviewer": _TEXT, "reviewed_at": _TEXT, "input_warnings": _LIST, "orientation": _DICT,
              "confidence_threshold": _NUMBER},
    "section": {"slot": _OPT_INT, "region": _OPT_TEXT, "area": _OPT_TEXT, "generated_text": _TEXT, "text": _TEXT,
                "state": _TEXT, "grounding_ok": _BOOL, "tokens": _LIST, "truncated": _BOOL, "checks": _LIST,
                "note": _TEXT},
    "token": {"index": _INT, "text": _TEXT, "start": _INT, "end": _INT, "prob": _NUMBER, "entropy": _NUMBER,
              "top": _LIST},
    "edit": {"slot": _OPT_INT, "action": _TEXT, "before": _TEXT, "after": _TEXT, "time": _TEXT, "reviewer": _TEXT},
}
_REQUIRED = {"draft": ("study_key", "sections"), "section": ("generated_text", "text"),
             "token": ("index", "text", "start", "end", "prob"), "edit": ("action",)}
_TYPE_WORDS = {_TEXT: "text", _OPT_TEXT: "text or null", _INT: "a whole number", _OPT_INT: "a whole number or null",
               _NUMBER: "a number", _BOOL: "true or false", _LIST: "a list", _DICT: "an object"}


def _check_record(kind: str, data: Any, where: str) -> None:
    """Raise ValueError naming the field when a saved record has a missing or wrong-typed field (fields
    this version does not know are left to `ReportDraft.from_dict`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} is {type(data).__name__}, expected an object")
    spec = _FIELDS[kind]
    for name in _REQUIRED[kind]:
        if name not in data:
            raise ValueError(f"{where} has no '{name}'")
    for name, value in data.items():
        types = spec.get(name)
        if types is None:
            continue
        # bool is an int in Python: a true/false where a number belongs is still the wrong type
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}.{name} is {type(value).__name__} {json.dumps(value)[:40]}, "
                             f"expected {_TYPE_WORDS[types]}")
    if kind == "section" and data.get("state", DRAFTED) not in (*STATES, "generated"):
        raise ValueError(f"{where}.state is {data['state']!r}, expected one of {', '.join(STATES)}")
    if kind == "token":
        for j, alt in enumerate(data.get("top", [])):
            if not (isinstance(alt, list) and len(alt) == 2 and isinstance(alt[0], str)
                    and isinstance(alt[1], (int, float)) and not isinstance(alt[1], bool)):
                raise ValueError(f"{where}.top[{j}] is {json.dumps(alt)[:40]}, expected [text, probability]")


def check_draft_dict(data: Any) -> None:
    """Validate a serialised `ReportDraft` (autosave or JSON export) field by field; ValueError names the
    first bad field (``sections[2].text is int 5, expected text``) so a damaged file never reaches the view."""
    _check_record("draft", data, "draft")
    for i, s in enumerate(data["sections"]):
        _check_record("section", s, f"sections[{i}]")
        for j, t in enumerate(s.get("tokens", [])):
            _check_record("token", t, f"sections[{i}].tokens[{j}]")
    for i, e in enumerate(data["edits"] if "edits" in data else []):
        _check_record("edit", e, f"edits[{i}]")


def _when(saved_at: str) -> str:
    """An ISO time as a reader writes it (2026-12-02 14:05)."""
    try:
        return _dt.datetime.fromisoformat(saved_at).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return saved_at or "an unknown time"


@dataclass
class SavedDraft:
    draft: ReportDraft
    clean: bool                    # False: the viewer did not close this study normally (a crash)
    saved_at: str
    path: Path

    def describe(self, verb: str = "saved") -> str:
        """Which study and when, for the restore message: ``the draft of ct_001 saved 2026-12-02 14:05``."""
        return f"the draft of {self.draft.study_name or 'this study'} {verb} {_when(self.saved_at)}"


class DraftStore:
    """Autosave files, one per study: ``<data dir>/drafts/<study key>.json``.

    The key is the study's content (`study_key`), so a draft is restored only onto the very study it
    was written for. Each save is atomic under a unique temporary name (`fileio.atomic_write`), so two
    viewers autosaving the same study never write into one temporary file (the last save wins, whole).
    A file that cannot be read back is moved aside (``<key>.unreadable-<time>.json``, kept for the
    user) and never overwritten by the next autosave.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else user_data_dir() / "drafts"
        self._blocked: set[str] = set()     # keys whose unreadable file could not be moved aside

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def save(self, draft: ReportDraft, clean: bool = False) -> Path:
        """Write the draft; ``clean=True`` marks a normal close (no restore prompt next time).
        Raises `reg2rg.engine.fileio.OutputError` (an OSError) naming the file when it cannot be written."""
        path = self.path_for(draft.study_key)
        if draft.study_key in self._blocked and path.exists():
            raise OutputError(path, "an unreadable earlier autosave is there and could not be moved aside; "
                                    "it is not overwritten (move or delete it to autosave again)")
        ensure_folder(path.parent)
        payload = {"format": DRAFT_FORMAT, "clean": clean, "saved_at": _now(), "draft": draft.to_dict()}
        with atomic_write(path) as f:      # a crash mid-write leaves the previous autosave intact
            f.write(json.dumps(payload, indent=1))
        return path

    def load(self, key: str) -> SavedDraft | None:
        """The autosaved draft of the study with this key, or None.

        A file that is unreadable (not JSON, a wrong-typed or missing field) or that holds another
        study's draft is moved aside and `DraftFileError` says so, naming the file and the problem.
        """
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(payload, dict) or "draft" not in payload:
                raise ValueError("no 'draft' in the file")
            if not isinstance(payload.get("clean", False), bool) or not isinstance(payload.get("saved_at", ""), str):
                raise ValueError("'clean' must be true or false and 'saved_at' a time")
            check_draft_dict(payload["draft"])
            draft = ReportDraft.from_dict(payload["draft"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            raise DraftFileError(f"{path}: not a readable Reg2RG draft ({problem}); {self._set_aside(path)}") from exc
        if draft.study_key != key:           # copied or renamed from another study's file
            raise DraftFileError(f"{path}: holds the draft of another study ({draft.study_name or 'unnamed'}), "
                                 f"not restored; {self._set_aside(path)}")
        return SavedDraft(draft, bool(payload.get("clean", False)), str(payload.get("saved_at", "")), path)

    def _set_aside(self, path: Path) -> str:
        """Rename an unusable autosave so the next save does not overwrite it; returns what happened."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.stem}.unreadable-{stamp}-{os.getpid()}.json")
        try:
            os.replace(path, aside)
        except OSError as exc:
            self._blocked.add(path.stem)
            return f"it could not be moved aside ({exc}); autosave is off for this study until it is removed"
        return f"it was kept as {aside.name} and a new draft will be autosaved"

    def mark_clean(self, key: str) -> None:
        saved = self.load(key)
        if saved is not None and not saved.clean:
            self.save(saved.draft, clean=True)

    def discard(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)


def export_json(draft: ReportDraft, path: str | os.PathLike) -> None:
    """The report document as JSON (sections with tokens, confidences and alternatives, states, flags,
    edits, identification, provenance), written atomically."""
    write_report(draft, path, "json")


def export_text(draft: ReportDraft, path: str | os.PathLike) -> None:
    """The report document as text (written atomically)."""
    write_report(draft, path, "txt")
