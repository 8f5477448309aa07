"""The report document (`document.ReportDraft`) and its renderers, one module per format.

``export_report(draft, out_dir, formats)`` writes ``report.pdf``, ``report.txt``, ``report.json``,
``report.sr.dcm`` and ``report.fhir.json``; the viewer and ``reg2rg-generate --export`` both use it.
"""

from __future__ import annotations

from pathlib import Path

from .document import (ACCEPTED, AI_DRAFT_STATEMENT, DRAFTED, EDITED, GENERATED, NOT_DRAFTED, READING_ORDER,
                       REJECTED, STATES, STOPPED, DraftEdit, DraftSection, DraftToken, Provenance, ReportDraft,
                       SectionFlag, StudyIdentification, section_from_result)

#: format -> file name written into the output folder
FORMATS: dict[str, str] = {"pdf": "report.pdf", "txt": "report.txt", "json": "report.json", "sr": "report.sr.dcm",
                           "fhir": "report.fhir.json"}


class ExportError(ValueError):
    """An export that cannot be made; the message names the file or the format and the problem."""


def parse_formats(text: str) -> list[str]:
    """``"pdf,txt"`` -> ["pdf", "txt"]; raises `ExportError` naming an unknown format."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part not in FORMATS:
            raise ExportError(f"unknown export format {part!r}; choose from {', '.join(FORMATS)}")
        if part not in out:
            out.append(part)
    if not out:
        raise ExportError(f"no export format given; choose from {', '.join(FORMATS)}")
    return out


def format_of(path) -> str:
    """The format a file name asks for (``.sr.dcm``/``.dcm`` -> sr, ``.fhir.json`` -> fhir, …)."""
    name = Path(path).name.lower()
    if name.endswith(".fhir.json"):
        return "fhir"
    if name.endswith(".dcm"):
        return "sr"
    suffix = Path(name).suffix.lstrip(".")
    if suffix in ("pdf", "txt", "json"):
        return suffix
    raise ExportError(f"{Path(path).name}: unknown report format (use .pdf, .txt, .json, .sr.dcm or .fhir.json)")


def render_report(draft: ReportDraft, fmt: str, engine_result: dict | None = None) -> bytes:
    """The file contents of ``draft`` in format ``fmt`` (`FORMATS`)."""
    try:
        if fmt == "txt":
            from .txt import render_text
            return render_text(draft).encode("utf-8")
        if fmt == "json":
            from .jsonfile import render_json
            return render_json(draft, engine_result).encode("utf-8")
        if fmt == "pdf":
            from .pdf import render_pdf
            return render_pdf(draft)
        if fmt == "sr":
            from .sr import render_sr
            return render_sr(draft)
        if fmt == "fhir":
            from .fhir import render_fhir
            return render_fhir(draft).encode("utf-8")
    except ImportError as exc:
        raise ExportError(f"the {fmt} export needs the package {exc.name!r} "
                          "(pip install 'reg2rg-viewer[report]')") from exc
    raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")


def write_report(draft: ReportDraft, path, fmt: str | None = None, engine_result: dict | None = None) -> Path:
    """Render ``draft`` as ``fmt`` (default: from the file name) into ``path``, written atomically (a
    failure leaves the previous file or none; `reg2rg.engine.fileio.OutputError` names the file)."""
    from reg2rg.engine.fileio import atomic_write

    fmt = fmt or format_of(path)
    path = Path(path)
    try:
        payload = render_report(draft, fmt, engine_result)
    except ExportError as exc:
        raise ExportError(f"{path.name}: {exc}") from exc
    with atomic_write(path, "wb") as f:
        f.write(payload)
    return path


def export_report(draft: ReportDraft, out_dir, formats, engine_result: dict | None = None) -> list[Path]:
    """Write each format's file (`FORMATS`) into ``out_dir``; returns the paths written."""
    from reg2rg.engine.fileio import ensure_folder

    out_dir = ensure_folder(out_dir)
    return [write_report(draft, out_dir / FORMATS[f], f, engine_result) for f in formats]


__all__ = ["ACCEPTED", "AI_DRAFT_STATEMENT", "DRAFTED", "EDITED", "GENERATED", "NOT_DRAFTED", "READING_ORDER",
           "REJECTED", "STATES", "STOPPED", "DraftEdit", "DraftSection", "DraftToken", "Provenance", "ReportDraft",
           "SectionFlag", "StudyIdentification", "section_from_result", "FORMATS", "ExportError", "parse_formats",
           "format_of", "render_report", "write_report", "export_report"]
