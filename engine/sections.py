"""Region sections of a generated report: "The region {i} is {area}: {report} ...".

Reg2RG writes one section per region slot and must name the anatomy of each slot itself (docs/reproduction.md §2).
This module is the one home of reading that structure back: generation streams it, evaluation
strips it or scores per region, the viewer highlights it. Model output is not always well formed,
so the parser tolerates a missing colon, an unknown area, a repeated slot and text before the first
section, and keeps character offsets so a caller can map every section back into the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reg2rg.engine.regions import REGIONS, canonical_region

# The published evaluation removes exactly this prefix before whole-report metrics.
REGION_PREFIX_RE = re.compile(r"The region \d+ is [^:]+: ")
# A section header; the area and its colon are read separately so that a missing colon is tolerated.
_HEADER_RE = re.compile(r"The region (\d+) is(?:\s+|$)")
# An area name runs to the colon, but never across a sentence end or a newline.
_AREA_WITH_COLON_RE = re.compile(r"([^:.\n]{1,60}?)\s*:\s*")
# Known spellings when the colon is missing, longest first so "trachea and bronchie" beats "trachea".
_KNOWN_AREAS = sorted(
    set(REGIONS) | {"trachea and bronchi", "trachea and bronchus", "trachea"}, key=len, reverse=True
)
_AREA_WITHOUT_COLON_RE = re.compile(
    r"(" + "|".join(re.escape(a) for a in _KNOWN_AREAS) + r")\b[\s,.;-]*", re.IGNORECASE
)


@dataclass(frozen=True)
class RegionSection:
    """One section of a report.

    ``slot`` is the region slot number the model wrote (None for text before the first section),
    ``area`` the canonical region name (None when the model named no known region), ``raw_area``
    the name as written, ``text`` the section's report with surrounding whitespace removed.
    ``start``/``end`` delimit the whole section (header included, trailing whitespace excluded) and
    ``body_start`` is where ``text`` begins, so ``report[body_start:body_start + len(text)] == text``.
    """

    slot: int | None
    area: str | None
    raw_area: str
    text: str
    start: int
    end: int
    body_start: int


def _read_area(report: str, pos: int, limit: int) -> tuple[str, int]:
    """Area name written at ``pos`` (before ``limit``) and the offset just after it."""
    m = _AREA_WITH_COLON_RE.match(report, pos, limit)
    if m:
        return m.group(1).strip(), m.end()
    m = _AREA_WITHOUT_COLON_RE.match(report, pos, limit)
    if m:
        return m.group(1), m.end()
    return "", pos


def _section(report: str, slot: int | None, raw_area: str, start: int, body_from: int, limit: int) -> RegionSection:
    chunk = report[body_from:limit]
    text = chunk.strip()
    if text:
        body_start = body_from + len(chunk) - len(chunk.lstrip())
        end = body_start + len(text)
    else:  # a header with no report: the section is the header itself
        body_start = body_from
        end = start + len(report[start:body_from].rstrip())
    area = canonical_region(raw_area) if raw_area else None
    return RegionSection(slot, area, raw_area, text, start, end, body_start)


def parse_sections(report: str) -> list[RegionSection]:
    """Split a generated report into its region sections, in the order written.

    Text before the first header becomes a section with ``slot=None`` (only if it is not blank).
    A repeated slot gives two sections; callers that need one section per slot take the first.
    """
    headers = list(_HEADER_RE.finditer(report))
    sections: list[RegionSection] = []
    first = headers[0].start() if headers else len(report)
    if report[:first].strip():
        sections.append(_section(report, None, "", 0, 0, first))
    for k, header in enumerate(headers):
        limit = headers[k + 1].start() if k + 1 < len(headers) else len(report)
        raw_area, body_from = _read_area(report, header.end(), limit)
        sections.append(_section(report, int(header.group(1)), raw_area, header.start(), body_from, limit))
    return sections


def strip_region_prefixes(report: str) -> str:
    """The whole report without "The region i is area: " prefixes, exactly as published.

    The published script removes ``The region \\d+ is [^:]+: `` and then collapses every run of
    whitespace to one space and strips the ends. Like it, a header missing its colon is removed
    up to the next ": " (which may swallow text); region-level evaluation uses
    :func:`parse_sections` instead.
    """
    text = REGION_PREFIX_RE.sub("", report)
    return re.sub(r"\s+", " ", text).strip()


def sections_by_area(sections: Iterable[RegionSection]) -> dict[str, str]:
    """Report text per canonical area, sections of the same area joined by one space.

    Sections with an unknown area or an empty body are left out (as the published per-region
    evaluation does).
    """
    out: dict[str, list[str]] = {}
    for s in sections:
        if s.area is not None and s.text:
            out.setdefault(s.area, []).append(s.text)
    return {area: " ".join(texts) for area, texts in out.items()}


def slot_areas(sections: Iterable[RegionSection]) -> dict[int, str | None]:
    """Area named for each slot (first section of a repeated slot wins)."""
    out: dict[int, str | None] = {}
    for s in sections:
        if s.slot is not None and s.slot not in out:
            out[s.slot] = s.area
    return out


def region_prediction_accuracy(sections: Iterable[RegionSection], slot_to_region: Mapping[int, str]) -> float:
    """Fraction of true slots whose area the model named correctly.

    ``slot_to_region`` maps each slot fed to the model to its true region (any spelling
    :func:`canonical_region` accepts). A slot the model never wrote counts as wrong. NaN when
    ``slot_to_region`` is empty (nothing to grade).
    """
    if not slot_to_region:
        return math.nan
    named = slot_areas(sections)
    correct = 0
    for slot, region in slot_to_region.items():
        truth = canonical_region(region)
        if truth is not None and named.get(int(slot)) == truth:
            correct += 1
    return correct / len(slot_to_region)
