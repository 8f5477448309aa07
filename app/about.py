"""Help → About: the viewer's version, the engine (where and how the model runs), and the model card of
the model in use, with its validation status and the AI-draft statement."""

from __future__ import annotations

import platform
from html import escape

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QTextBrowser, QVBoxLayout

from reg2rg.engine.report.document import AI_DRAFT_STATEMENT
from reg2rg.engine.report.provenance import model_card


def about_facts(session) -> list[tuple[str, str]]:
    """(label, value) rows: version, engine, model, validation."""
    from reg2rg import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:        # pragma: no cover - the engine needs torch
        torch_version = "not installed"
    engine = session.engine
    if engine is None:
        where = f"not loaded yet (loads on Generate; device {session.device})"
    else:
        device, dtype = getattr(engine, "device", "?"), getattr(engine, "dtype", "?")
        where = f"{type(engine).__name__} on {device}, {str(dtype).replace('torch.', '')}"
    ok, status = session.validation_status()
    folder = session.model_dir()
    return [("Reg2RG Viewer", __version__), ("Engine", where),
            ("Runtime", f"Python {platform.python_version()}, PyTorch {torch_version}"),
            ("Model", session.model_name()), ("Model folder", str(folder) if folder is not None else "in memory"),
            ("Validation", status)]


class AboutDialog(QDialog):
    """Version, engine and the model card (MODEL_CARD.md of the model folder, shown as Markdown)."""

    def __init__(self, session, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("about_dialog")
        self.setWindowTitle("About Reg2RG Viewer")
        self.resize(760, 640)
        ok, _status = session.validation_status()
        rows = "".join(f"<tr><td style='color:#9aa3ad;padding-right:10px'>{escape(k)}</td><td>{escape(v)}</td></tr>"
                       for k, v in about_facts(session))
        warning = "" if ok else f"<p style='color:#ff8a80'><b>{escape(AI_DRAFT_STATEMENT)}</b> Every report this " \
                                "model drafts is marked as such in the viewer and in every export.</p>"
        self.facts = QLabel(f"<h3>Reg2RG Viewer</h3>{warning}<table>{rows}</table>")
        self.facts.setWordWrap(True)
        self.card = QTextBrowser()
        self.card.setObjectName("model_card")
        self.card.setOpenExternalLinks(False)
        folder = session.model_dir()
        text = model_card(folder)
        self.card_text = text
        if text:
            self.card.setMarkdown(text)
        else:
            self.card.setPlainText("This model folder has no MODEL_CARD.md: nothing is known about how it was "
                                   "trained or evaluated.")
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.facts)
        lay.addWidget(QLabel("<b>Model card</b>"))
        lay.addWidget(self.card, 1)
        lay.addWidget(buttons)
