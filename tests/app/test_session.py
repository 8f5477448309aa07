"""The drafting session model (app/session.py) with its views in the real window: the session's signals
drive the draft panel, the attention panel and the views; review states (stop mid-stream included);
the reviewer asked once and remembered; autosave/restore keeps states and provenance; exports agree with
the screen; Help → About; File → Export without a draft."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PySide6.QtWidgets import QApplication, QMessageBox

from reg2rg.app.draft import DraftStore, ReportDraft, study_key
from reg2rg.engine.report import ACCEPTED, AI_DRAFT_STATEMENT, DRAFTED, EDITED, NOT_DRAFTED, REJECTED, STOPPED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def engine():
    import torch

    torch.set_num_threads(1)
    from generation_fixtures import tiny_engine

    return tiny_engine()


@pytest.fixture
def win(main_window, qtbot):
    from generation_fixtures import box_study

    w = main_window(1600, 1000)
    with qtbot.waitSignal(w.studyLoaded, timeout=30000):
        w.open_study(box_study())
    return w


def fixed_draft(study):
    """The known draft of the report-document tests, for this study."""
    from report_fixtures import PROVENANCE, make_result

    from reg2rg.engine.report import Provenance

    return ReportDraft.from_result(make_result(), study, study_key=study_key(study),
                                   provenance=Provenance(**PROVENANCE))


def answer_reviewer(qtbot, panel, name: str) -> None:
    """Type a name into the reviewer dialog the panel opened and press OK."""
    qtbot.waitUntil(lambda: panel.reviewer_dialog is not None and panel.reviewer_dialog.isVisible(), timeout=5000)
    panel.reviewer_dialog.setTextValue(name)
    panel.reviewer_dialog.accept()


def test_session_signals_drive_every_view(qtbot, win, engine):
    from reg2rg.app.attention_panel import AttentionPanel
    from reg2rg.app.draft_panel import DraftPanel
    from reg2rg.app.main_window import MainWindow

    session, panel, att = win.session, win.draft_panel, win.attention_panel
    # the panels hold the session, never each other or the window
    for view in (panel, att):
        held = [v for v in vars(view).values() if isinstance(v, (DraftPanel, AttentionPanel, MainWindow))]
        assert held == [] and view.session is session
    session.set_engine(engine)
    assert panel.model_label.text().startswith("Model: in memory") and "not validated" in panel.model_label.text()
    assert not panel.banner.isVisible()
    panel.max_tokens.setValue(20)                   # the panel's settings reach the session
    assert session.settings.max_new_tokens == 20
    with qtbot.waitSignal(session.generationFinished, timeout=60000):
        session.generate()
    draft = session.draft
    # a second view of the same session: it is built from, and follows, the session alone
    second = DraftPanel(session)
    qtbot.addWidget(second)
    second.show()
    second._rebuild_sections()
    assert [e.section.key for e in second._editors] == [s.key for s in draft.ordered_sections()]
    assert panel.banner.isVisible() and panel.banner.text().startswith(AI_DRAFT_STATEMENT)
    key = next(s.key for s in draft.ordered_sections() if s.tokens)
    assert session.results[key].findings_check is not None      # the engine's check ran on the worker thread
    session.set_reviewer("Jane Smith")
    session.accept(key)                             # a request straight to the session…
    for view in (panel, second):                     # …redraws both panels
        assert "accepted" in view.section_editor(key).header.text()
        assert "1 of" in view.banner.text()
    second.section_editor(key).editor.setPlainText("Edited in the second panel.")
    assert draft.section(key).state == EDITED
    assert panel.section_editor(key).editor.toPlainText() == "Edited in the second panel."
    # the heat layer: the session computes it, the attention panel and every view draw it
    session.reset(key)
    with qtbot.waitSignal(session.heatLayerChanged, timeout=60000):
        idx = session.request_attention(key)
    assert idx and list(att.current.token_indices) == idx and att.save_button.isEnabled()
    assert session.heat.shown and all(v._heat_codes is not None for v in win.views.values())
    att.show_box.setChecked(True)                   # the panel asks the session to hide it
    assert not session.heat.visible and all(v._heat_codes is None for v in win.views.values())
    att.show_box.setChecked(False)
    session.clear_heat()
    assert att.current is None and not att.save_button.isEnabled()


def test_stop_mid_stream_marks_the_cut_off_section_and_the_regions_not_reached(qtbot, win, engine):
    session, panel = win.session, win.draft_panel
    session.set_engine(engine)
    panel.max_tokens.setValue(2000)
    session.tokenStreamed.connect(lambda ev: session.stop() if ev.index == 3 else None)
    with qtbot.waitSignal(session.generationFinished, timeout=60000):
        session.generate()
    draft = session.draft
    assert draft.stop_reason == "cancelled"
    states = {s.key: s.state for s in draft.sections}
    assert STOPPED in states.values() or NOT_DRAFTED in states.values()
    regions = set(win.document.study.regions_present)
    assert {s.region for s in draft.sections if s.region} == regions    # no region silently dropped
    for s in draft.sections:
        if s.state == STOPPED:
            assert s.truncated and "cut off" in panel.section_editor(s.key).header.text()
        if s.state == NOT_DRAFTED:
            assert "not drafted" in panel.section_editor(s.key).header.text()


def test_review_asks_the_reviewer_once_and_remembers(qtbot, win, tmp_path):
    from reg2rg.app.session import DraftingSession, ReviewerSettings

    session, panel = win.session, win.draft_panel
    assert session.reviewer == ""
    session.restore(fixed_draft(win.document.study), "")
    panel.section_editor(0).accept_button.click()
    answer_reviewer(qtbot, panel, "  Jane   Smith ")
    draft = session.draft
    assert draft.section(0).state == ACCEPTED and draft.reviewer == "Jane Smith"
    panel.reviewer_dialog = None
    panel.section_editor(2).reject_button.click()                        # not asked again
    assert panel.reviewer_dialog is None and draft.section(2).state == REJECTED
    assert draft.edits[-1].reviewer == "Jane Smith"
    assert ReviewerSettings().load() == "Jane Smith"                    # remembered for the next session
    assert DraftingSession(win.document, store=DraftStore(tmp_path)).reviewer == "Jane Smith"
    # "Reviewed" only once every section is accepted or rejected
    assert not draft.is_reviewed and "Not reviewed" in panel.banner.text()
    for s in draft.sections:
        if s.state not in (ACCEPTED, REJECTED):
            session.accept(s.key)
    assert draft.is_reviewed and "Reviewed by Jane Smith" in panel.banner.text()
    panel.section_editor(1).editor.setPlainText("Changed after the review.")
    assert not draft.is_reviewed and "Not reviewed" in panel.banner.text()


def test_cancelled_reviewer_question_leaves_the_section_as_it_was(qtbot, win):
    session, panel = win.session, win.draft_panel
    session.restore(fixed_draft(win.document.study), "")
    panel.section_editor(0).accept_button.click()
    qtbot.waitUntil(lambda: panel.reviewer_dialog is not None and panel.reviewer_dialog.isVisible(), timeout=5000)
    panel.reviewer_dialog.reject()
    assert session.draft.section(0).state == DRAFTED and session.reviewer == ""


def test_autosave_and_restore_keep_states_impression_and_provenance(qtbot, win, tmp_path):
    from reg2rg.app.draft_panel import DraftPanel
    from reg2rg.app.session import DraftingSession

    session = win.session
    session.set_reviewer("Jane Smith")
    session.restore(fixed_draft(win.document.study), "")
    session.edit_section(0, "The heart is mildly enlarged.")
    session.accept(0)
    session.reject(2)
    win.draft_panel.impression.setPlainText("Mild cardiomegaly.")
    win.draft_panel.threshold.setValue(70)
    session.autosave_now()                                            # what the timer does after a change
    before = session.draft.to_dict()
    # the viewer dies; a new one opens the same study from the same store
    other = DraftingSession(win.document, store=session.store)
    view = DraftPanel(other)
    qtbot.addWidget(view)
    win.document.set_study(win.document.study, win.document.volume)
    assert view.restore_box is not None
    view.restore_box.done(QMessageBox.Yes)
    again = other.draft
    assert again.to_dict() == before
    assert {s.key: s.state for s in again.sections} == {0: ACCEPTED, 1: DRAFTED, 2: REJECTED, 3: DRAFTED,
                                                        4: NOT_DRAFTED}
    assert again.provenance.model_digest == "sha256:" + "ab" * 32 and again.confidence_threshold == 0.7
    assert view.impression.toPlainText() == "Mild cardiomegaly." and "accepted" in view.section_editor(0).header.text()


def test_exports_agree_with_the_screen(qtbot, win, tmp_path):
    import pydicom
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from pypdf import PdfReader

    session, panel = win.session, win.draft_panel
    session.set_reviewer("Jane Smith")
    session.restore(fixed_draft(win.document.study), "")
    session.edit_section(0, "The heart is mildly enlarged.")
    session.accept(0)
    session.reject(2)
    session.set_impression("Mild cardiomegaly.")
    screen = [(ed.section.title, ed.editor.toPlainText(), ed.section.state) for ed in panel._editors]
    paths = {fmt: session.export(tmp_path / name) for fmt, name in
             (("pdf", "r.pdf"), ("txt", "r.txt"), ("json", "r.json"), ("sr", "r.sr.dcm"), ("fhir", "r.fhir.json"))}
    txt = paths["txt"].read_text()
    pdf = " ".join(" ".join(p.extract_text() for p in PdfReader(str(paths["pdf"])).pages).split())
    data = json.loads(paths["json"].read_text())
    sr = pydicom.dcmread(paths["sr"])
    fhir = DiagnosticReport.model_validate_json(paths["fhir"].read_text())
    sr_findings = [{k.ConceptNameCodeSequence[0].CodeMeaning: k for k in it.ContentSequence}
                   for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeMeaning == "Findings"]
    obs = {r.id: r for r in fhir.contained}
    fhir_findings = [obs[r.reference[1:]] for r in fhir.result]
    assert [f["title"] for f in data["findings"]] == [t for t, _, _ in screen]     # the screen's order
    for n, (title, text, state) in enumerate(screen):
        in_report = state != REJECTED and text.strip()
        assert data["findings"][n]["state"] == state and (data["findings"][n]["text"] == text)
        assert sr_findings[n]["Review state"].TextValue.startswith(state)
        assert fhir_findings[n].note[0].text.startswith(f"review state: {state}")
        if in_report:
            assert text in txt and text in pdf
            assert sr_findings[n]["Finding"].TextValue == text and fhir_findings[n].valueString == text
        else:
            assert "Finding" not in sr_findings[n] and fhir_findings[n].valueString is None
    for out in (txt, pdf, data["statement"], fhir.meta.tag[0].display):
        assert AI_DRAFT_STATEMENT in out
    assert fhir.conclusion == "Mild cardiomegaly." and fhir.status == "preliminary"
    assert sr.VerificationFlag == "UNVERIFIED" and "Not reviewed: 2 of 5" in txt


def test_export_without_a_draft_says_so(qtbot, win):
    win.export_dialog()
    box = win.last_message_box
    assert box is not None and box.isVisible() and "no report draft to export" in box.text()
    assert box.windowTitle() == "Export report"


def test_help_about_shows_version_engine_and_the_model_card(qtbot, win, engine):
    from reg2rg import __version__
    from reg2rg.engine.generation import default_model_dir

    dialog = win.about_dialog()
    assert dialog.isVisible() and __version__ in dialog.facts.text() and "not loaded yet" in dialog.facts.text()
    assert "not validated (demonstration model)" in dialog.facts.text()
    card = default_model_dir() / "MODEL_CARD.md"
    if card.is_file():
        assert dialog.card_text == card.read_text(encoding="utf-8")
        first_heading = next(ln for ln in dialog.card_text.splitlines() if ln.startswith("# ")).lstrip("# ").strip()
        assert first_heading.split(" ")[0] in dialog.card.toPlainText()
    dialog.close()
    win.session.set_engine(engine)
    dialog = win.about_dialog()
    assert "ReportEngine on cpu, float32" in dialog.facts.text() and "in memory" in dialog.facts.text()
    assert "no MODEL_CARD.md" in dialog.card.toPlainText()
    dialog.close()


def test_validation_status_next_to_the_model_name(qtbot, win, tmp_path):
    folder = tmp_path / "validated_model"
    folder.mkdir()
    (folder / "validation.json").write_text(json.dumps({"validated": True, "scope": "adult chest CT", "by": "QA"}))
    win.session.set_model_dir(str(folder))
    text = win.draft_panel.model_label.text()
    assert "validated_model" in text and "validated (scope adult chest CT, by QA)" in text
    win.session.set_model_dir(None)
    assert "embedded demo" in win.draft_panel.model_label.text()
    assert "not validated (demonstration model)" in win.draft_panel.model_label.text()


def test_the_document_holds_surface_arrays_not_vtk_objects(win):
    import numpy as np

    from reg2rg.app.display import SurfaceMesh
    from reg2rg.app.view3d import mesh_from_polydata, polydata_from_mesh

    meshes = win.document.surfaces
    assert meshes and all(isinstance(m, SurfaceMesh) for m in meshes.values())
    mesh = meshes["heart"]
    assert mesh.points.dtype == np.float32 and mesh.triangles.shape[1] == 3 and mesh.n_triangles > 10
    back = mesh_from_polydata(polydata_from_mesh(mesh))
    np.testing.assert_array_equal(back.points, mesh.points)
    np.testing.assert_array_equal(back.triangles, mesh.triangles)
    assert set(win.view3d._actors) == set(meshes)


def test_viewer_screenshot_with_a_reviewed_draft(qtbot, win, screenshot_dir):
    session = win.session
    session.set_reviewer("Jane Smith")
    session.restore(fixed_draft(win.document.study), "")
    session.edit_section(0, "The heart is mildly enlarged.")
    session.accept(0)
    session.reject(2)
    session.set_impression("Mild cardiomegaly. 6 mm right upper lobe nodule.")
    win.draft_dock.raise_()
    QApplication.processEvents()
    qtbot.wait(100)
    assert win.save_screenshot(screenshot_dir / "draft_review_states.png")


def test_file_export_writes_the_chosen_format(qtbot, win, tmp_path, monkeypatch):
    """File → Export… with a draft: the file dialog (Qt's modal dialog, answered here by a stand-in for
    its static call) names the file; the filter's format is added when the name lacks it."""
    import pydicom
    from PySide6.QtWidgets import QFileDialog

    win.session.restore(fixed_draft(win.document.study), "")
    answer = {}
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: answer["value"])
    answer["value"] = (str(tmp_path / "report"), "DICOM SR (*.sr.dcm)")
    win.act_export.trigger()
    ds = pydicom.dcmread(tmp_path / "report.sr.dcm")
    assert ds.Modality == "SR" and "Exported report.sr.dcm" in win.statusBar().currentMessage()
    answer["value"] = (str(tmp_path / "no_such_folder" / "sub" / "r.docx"), "PDF (*.pdf)")
    win.act_export.trigger()
    box = win.last_message_box
    assert box is not None and "Could not export the report" in box.text() and "r.docx" in box.text()
