"""The report as PDF (reportlab): 11 pt text, one section per region with its review state and flags, the
AI-draft statement at the top, a provenance footer on every page, and a "DRAFT — not reviewed" watermark
until every section is accepted or rejected and the reviewer is known."""

from __future__ import annotations

import io
from html import escape
from pathlib import Path

from .document import NOT_DRAFTED, REJECTED, ReportDraft
from .txt import provenance_lines, state_label

BODY_PT = 11
WATERMARK = "DRAFT \u2014 not reviewed"
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")
_FONTS: tuple[str, str] | None = None


def _fonts() -> tuple[str, str]:
    """(regular, bold) font names: DejaVu Sans when installed (every character of a report), else Helvetica."""
    global _FONTS
    if _FONTS is None:
        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.ttfonts import TTFont

        _FONTS = ("Helvetica", "Helvetica-Bold")
        for d in _FONT_DIRS:
            reg, bold = Path(d) / "DejaVuSans.ttf", Path(d) / "DejaVuSans-Bold.ttf"
            if reg.is_file() and bold.is_file():
                pdfmetrics.registerFont(TTFont("DejaVuSans", str(reg)))
                pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
                _FONTS = ("DejaVuSans", "DejaVuSans-Bold")
                break
    return _FONTS


def render_pdf(draft: ReportDraft) -> bytes:
    """The PDF document as bytes."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    regular, bold = _fonts()
    body = ParagraphStyle("body", fontName=regular, fontSize=BODY_PT, leading=BODY_PT * 1.35, spaceAfter=2)
    small = ParagraphStyle("small", parent=body, fontSize=9, leading=11.5, textColor=colors.HexColor("#444444"))
    flag = ParagraphStyle("flag", parent=body, fontSize=10, leading=13, leftIndent=10,
                          textColor=colors.HexColor("#8a5a00"))
    h1 = ParagraphStyle("h1", parent=body, fontName=bold, fontSize=16, leading=20, spaceAfter=6)
    h2 = ParagraphStyle("h2", parent=body, fontName=bold, fontSize=12.5, leading=16, spaceBefore=8, spaceAfter=3)
    h3 = ParagraphStyle("h3", parent=body, fontName=bold, fontSize=BODY_PT, spaceBefore=6, spaceAfter=1)
    banner = ParagraphStyle("banner", parent=body, fontName=bold, textColor=colors.white, fontSize=11.5)

    story = []
    box = Table([[Paragraph(escape(draft.statement()), banner)]], colWidths=[174 * mm])
    box.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#b3261e")),
                             ("LEFTPADDING", (0, 0), (-1, -1), 8), ("TOPPADDING", (0, 0), (-1, -1), 5),
                             ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    story += [box, Spacer(1, 8), Paragraph("CT chest report", h1)]
    rows = [[Paragraph(f"<b>{escape(k)}</b>", small), Paragraph(escape(v), body)] for k, v in draft.identification.rows()]
    if rows:
        t = Table(rows, colWidths=[32 * mm, 142 * mm])
        t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                               ("TOPPADDING", (0, 0), (-1, -1), 1)]))
        story.append(t)
    story += [Paragraph("Technique", h2), Paragraph(escape(draft.technique or "CT of the chest."), body),
              Paragraph("Findings", h2)]
    for s in draft.ordered_sections():
        if s.slot is None and s.region is None and not s.text.strip():
            continue
        colour = {"accepted": "#1e7b34", "rejected": "#8b1a1a", "edited": "#1f4e9b", "stopped": "#8a5a00",
                  "not drafted": "#666666"}.get(s.state, "#555555")
        part = [Paragraph(f"{escape(s.title)} <font color='{colour}' size='9.5'>[{escape(state_label(s))}]</font>", h3)]
        if s.state == REJECTED:
            part.append(Paragraph("<i>Rejected by the reader: not part of the report.</i>", small))
        elif s.state == NOT_DRAFTED and not s.text.strip():
            part.append(Paragraph("<i>Not drafted.</i>", small))
        else:
            part.append(Paragraph(escape(s.text.strip()), body))
        for f in draft.flags_of(s):
            part.append(Paragraph(f"\u25b8 {escape(f.kind)}: {escape(f.message)}", flag))
        story.append(KeepTogether(part))
    story += [Paragraph("Impression", h2), Paragraph(escape(draft.impression.strip() or "(none written)"), body),
              Paragraph("Review", h2), Paragraph(escape(draft.review_line()), body),
              Paragraph("Provenance", h2)]
    story += [Paragraph(escape(line), small) for line in provenance_lines(draft)]

    p = draft.provenance
    footer = (f"{draft.statement()}  Model {p.describe_model()}; settings {p.settings_digest[:15]}\u2026; "
              f"engine {p.engine_version}; drafted {p.drafted_at or draft.created}; "
              + (f"reviewed by {draft.reviewer} {draft.reviewed_at}" if draft.is_reviewed else "not reviewed"))
    watermark = not draft.is_reviewed

    def decorate(canvas, doc):
        canvas.saveState()
        if watermark:
            canvas.setFillColor(colors.Color(0.85, 0.1, 0.1, alpha=0.13))
            canvas.setFont(bold, 64)
            canvas.translate(A4[0] / 2, A4[1] / 2)
            canvas.rotate(50)
            canvas.drawCentredString(0, 0, WATERMARK)
            canvas.rotate(-50)
            canvas.translate(-A4[0] / 2, -A4[1] / 2)
        canvas.setFillColor(colors.HexColor("#333333"))
        canvas.setFont(regular, 7.5)
        y = 12 * mm
        for line in _split(footer, regular, 7.5, A4[0] - 36 * mm):
            canvas.drawString(18 * mm, y, line)
            y -= 9
        canvas.drawRightString(A4[0] - 18 * mm, 6 * mm, f"page {doc.page}")
        canvas.restoreState()

    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
                            bottomMargin=24 * mm, title="CT chest report (AI draft)",
                            author=p.model_name or "Reg2RG", subject=draft.statement(), creator="Reg2RG Viewer")
    doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return buf.getvalue()


def _split(text: str, font: str, size: float, width: float) -> list[str]:
    """Greedy word wrap of a footer line to ``width`` points (at most two lines)."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if stringWidth(trial, font, size) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    lines.append(cur)
    return lines[:2]
