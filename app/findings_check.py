"""The Findings check of a drafted section: the model's own probability of each CT-RATE abnormality of the
region, with omission and contradiction alerts (`reg2rg.engine.explain.findings`), computed off the GUI
thread by the drafting session (`session.DraftingSession.check_findings`) and shown under each section of
the draft."""

from __future__ import annotations

import logging
import traceback
from html import escape

from PySide6.QtCore import QObject, Signal, Slot

from .generation import describe_engine_error, engine_lock

logger = logging.getLogger("reg2rg.app.findings")

FLAG_TEXT = {"omission": "⚠ possibly omitted", "contradiction": "⚠ model doubts it"}


class FindingsWorker(QObject):
    """One ``engine.finding_check`` call on a worker thread; ``finished(result, check)`` or ``failed``."""

    finished = Signal(object, object)      # DraftResult, FindingsCheck
    failed = Signal(str)
    done = Signal()

    def __init__(self, engine, result, threshold: float) -> None:
        super().__init__()
        self.engine, self.result, self.threshold = engine, result, threshold

    @Slot()
    def run(self) -> None:
        try:
            with engine_lock(self.engine):
                check = self.engine.finding_check(self.result, self.threshold)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the draft stays
            logger.debug("findings check failed:\n%s", traceback.format_exc())
            self.failed.emit(describe_engine_error(exc))
        else:
            self.finished.emit(self.result, check)
        finally:
            self.done.emit()


def findings_html(section_findings) -> tuple[str, str]:
    """(one-line rich text, tooltip) of a section's Findings check: flagged findings first, with their
    one-line reason in the tooltip; the other findings' probabilities after them."""
    flagged = [f for f in section_findings.findings if f.flag]
    rest = sorted((f for f in section_findings.findings if not f.flag and f.assessed), key=lambda f: -f.probability)
    unseen = [f for f in section_findings.findings if not f.assessed]
    parts = []
    for f in flagged:
        colour = "#ff7a5c" if f.flag == "omission" else "#e0a050"
        parts.append(f"<span style='color:{colour}'>{FLAG_TEXT[f.flag]}: {escape(f.finding.lower())} "
                     f"{f.probability:.0%}</span>")
    parts += [f"{escape(f.finding.lower())} {f.probability:.0%}" for f in rest]
    if unseen:
        parts.append("<span style='color:#9a9a9a'>not assessed: "
                     + ", ".join(escape(f.finding.lower()) for f in unseen) + "</span>")
    html = "<b>Findings check</b> · " + " · ".join(parts) if parts else ""
    sources = {f.source for f in section_findings.findings}
    how = ("The model's own probability of each finding in this region, from its finding detector (which reads "
           "the image)" if "detector" in sources else
           "The model's own probability of each finding in this region, from its sentences stating vs denying it")
    notes = [how + "."]
    if unseen:
        notes.append("Not assessed: this model's detector cannot see "
                     + ", ".join(f.finding.lower() for f in unseen)
                     + " — it never reports them, whatever the image shows. Check them yourself.")
    return html, "\n".join([f.reason for f in flagged] + notes)
