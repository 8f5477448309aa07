"""The report as plain text: statement, identification, technique, findings in reading order with their
review state and flags, impression, review and provenance."""

from __future__ import annotations

import textwrap

from .document import NOT_DRAFTED, REJECTED, ReportDraft

WIDTH = 96


def state_label(section) -> str:
    """"accepted (edited)", "drafted", "rejected", … — the state as a reader says it."""
    label = section.state
    if section.state in ("accepted",) and section.is_edited:
        label += " (edited)"
    return label


def render_text(draft: ReportDraft) -> str:
    """The whole document as text (what ``report.txt`` holds)."""
    out = [f"*** {draft.statement()} ***"]
    if draft.input_warnings:           # one header line: the reader sees the input's problems first
        out.append(input_warnings_line(draft.input_warnings))
    out += ["", "CT CHEST REPORT", ""]
    out += [f"{k + ':':<12} {v}" for k, v in draft.identification.rows()]
    out += ["", "TECHNIQUE", _wrap(draft.technique or "CT of the chest."), "", "FINDINGS"]
    for s in draft.ordered_sections():
        if s.slot is None and s.region is None and not s.text.strip():
            continue
        out.append(f"{s.title} [{state_label(s)}]")
        if s.state == REJECTED:
            out.append(_wrap("(rejected by the reader: not part of the report)"))
        elif s.state == NOT_DRAFTED and not s.text.strip():
            out.append(_wrap("(not drafted)"))
        else:
            out.append(_wrap(s.text.strip()))
        for f in draft.flags_of(s):
            out.append(_wrap(f"! {f.kind}: {f.message}", indent="    "))
        out.append("")
    out += ["IMPRESSION", _wrap(draft.impression.strip() or "(none written)"), "", "REVIEW", _wrap(draft.review_line()),
            "", "PROVENANCE"]
    out += [_wrap(line) for line in provenance_lines(draft)]
    return "\n".join(out).rstrip() + "\n"


def input_warnings_line(warnings) -> str:
    """``INPUT WARNINGS (2): a; b`` — the problems found in the input, on one line (``report.txt`` header)."""
    items = [" ".join(str(w).split()) for w in dict.fromkeys(warnings)]
    return f"INPUT WARNINGS ({len(items)}): " + "; ".join(items)


def provenance_lines(draft: ReportDraft) -> list[str]:
    """The provenance facts, one per line (shared by the text and PDF renderers)."""
    p = draft.provenance
    validation = "validated" + (f" ({p.validation})" if p.validation else "") if p.validated else \
        "not validated" + (f" ({p.validation})" if p.validation else "")
    lines = [f"Model: {p.model_name or draft.model or 'unknown'}; version {p.model_version or 'unknown'}; {validation}",
             f"Model weights: {p.model_digest or 'digest unknown'}",
             f"Decoding: {p.describe_settings() or 'unknown'}; settings {p.settings_digest or 'digest unknown'}",
             f"Engine: {p.engine or 'Reg2RG'} {p.engine_version}".rstrip(),
             f"Drafted: {p.drafted_at or draft.created}; generation ended: {p.stop_reason or draft.stop_reason or 'unknown'}"]
    return lines


def _wrap(text: str, indent: str = "  ") -> str:
    return "\n".join(textwrap.fill(par, WIDTH, initial_indent=indent, subsequent_indent=indent) if par else ""
                     for par in text.split("\n"))
