"""The report as JSON: the whole document (sections with tokens, probabilities and alternatives, states,
flags, edits, identification, provenance, review), the statement, and optionally the engine's own result
(sentences, per-region confidence, timings) under ``engine_result``."""

from __future__ import annotations

import json

from .document import ReportDraft
from .txt import state_label

JSON_FORMAT = "reg2rg-report"


def report_dict(draft: ReportDraft, engine_result: dict | None = None) -> dict:
    """The JSON document. ``draft`` round-trips through ``ReportDraft.from_dict(d["draft"])``."""
    d = {
        "format": JSON_FORMAT,
        "statement": draft.statement(),
        "ai_generated": True,
        "reviewed": draft.is_reviewed,
        "review": draft.review_line(),
        "reviewer": draft.reviewer,
        "reviewed_at": draft.reviewed_at if draft.is_reviewed else "",
        "identification": draft.to_dict()["identification"],
        "technique": draft.technique,
        "input_warnings": list(draft.input_warnings),
        "orientation": dict(draft.orientation),
        "findings": [
            {"region": s.region, "slot": s.slot, "title": s.title, "state": s.state, "state_label": state_label(s),
             "in_report": s.in_report, "text": s.text, "generated_text": s.generated_text, "edited": s.is_edited,
             "grounding_ok": s.grounding_ok, "area_named": s.area,
             "flags": [{"kind": f.kind, "message": f.message} for f in draft.flags_of(s)]}
            for s in draft.ordered_sections()
        ],
        "impression": draft.impression,
        "confidence_threshold": draft.confidence_threshold,
        "provenance": draft.to_dict()["provenance"],
        "draft": draft.to_dict(),
    }
    if engine_result is not None:
        d["engine_result"] = engine_result
    return d


def render_json(draft: ReportDraft, engine_result: dict | None = None) -> str:
    return json.dumps(report_dict(draft, engine_result), indent=1, ensure_ascii=False)
