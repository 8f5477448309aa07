"""The first README command's path with the embedded demo model: open the demo study, draft with the
demo model (``ReportEngine.load(None)``, loaded by the panel off the GUI thread), see the confidence
colours, select a sentence and see its attention heatmap over the CT (slice views and 3D). Skipped
only where the demo model (resources/demo_model, trained by reg2rg-train) is not built."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication

from reg2rg.app.display import AXIS_AXIAL
from reg2rg.app.draft_panel import sentence_span
from reg2rg.app.loader import LoadRequest
from reg2rg.app.main_window import MainWindow, frame_pixels
from reg2rg.engine.generation import default_model_dir
from reg2rg.engine.regions import REGIONS
from conftest import assert_peak_marked_at

pytestmark = [
    pytest.mark.gui,
    pytest.mark.slow,
    pytest.mark.skipif(not (default_model_dir() / "config.json").is_file(),
                       reason="the embedded demo model (resources/demo_model) is not built yet"),
]


def test_demo_generate_colours_the_draft_and_a_sentence_shows_its_heatmap(qtbot, screenshot_dir):
    win = MainWindow()
    win.resize(1600, 1000)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    try:
        with qtbot.waitSignal(win.studyLoaded, timeout=120000):
            win.open_request(LoadRequest(demo=True))
        panel, att = win.draft_panel, win.attention_panel
        panel.max_tokens.setValue(120)            # enough for a few region sections, quick on a CPU
        with qtbot.waitSignal(win.session.generationFinished, timeout=300000):
            win.session.generate()                      # the engine is None: the demo model loads first
        assert win.session.engine is not None and win.session.engine.model_dir == default_model_dir()
        assert win.session.draft is not None and any(s.text.strip() for s in win.session.draft.sections)
        # the draft records which model wrote it: name, version, the digest of its weights, not validated
        prov = win.session.draft.provenance
        assert "embedded demo model" in prov.model_name and prov.model_digest.startswith("sha256:")
        assert not prov.validated and win.session.draft.statement().startswith("AI-generated draft")
        assert panel.banner.isVisible() and "not for clinical use" in panel.banner.text()
        assert panel.stream.toPlainText().strip()
        assert panel.colour_box.isChecked()
        panel.threshold.setValue(95)
        # exactly the sections holding a word below 95 % are coloured, one mark per such word (computed
        # from the tokens, so a better demo model that is surer of itself still checks the colouring)
        coloured = {ed.section.slot: len(ed.editor.extraSelections()) for ed in panel._editors if ed.editor.extraSelections()}
        expected = {s.slot: sum(1 for t in s.tokens if t.prob < 0.95 and t.text.strip()) for s in win.session.draft.sections}
        assert coloured == {k: v for k, v in expected.items() if v}
        assert coloured, "the demo model was sure of every word above 95 %: nothing to colour"
        # a sentence of the first region section (Ctrl+click picks the same span)
        with_tokens = [s for s in win.session.draft.sections if any(t.text.strip() for t in s.tokens)]
        section = next((s for s in with_tokens if s.slot is not None), with_tokens[0])
        a, b = sentence_span(section.text, 1)
        axial = win.views[AXIS_AXIAL]
        with qtbot.waitSignal(win.session.heatLayerChanged, timeout=120000):
            idx = win.session.request_attention(section.key, a, b)
        assert idx and list(att.current.token_indices) == idx
        win.document.set_cursor(win.document.volume.from_stored(att.current.peak_voxel))
        QApplication.processEvents()
        shown = frame_pixels(axial).astype(int)
        shown3d = frame_pixels(win.view3d).astype(int)
        att.show_box.setChecked(True)
        hidden = frame_pixels(axial).astype(int)
        hidden3d = frame_pixels(win.view3d).astype(int)
        att.show_box.setChecked(False)
        assert (np.abs(shown - hidden).sum(axis=2) > 30).sum() > 100
        assert (np.abs(shown3d - hidden3d).sum(axis=2) > 30).sum() > 100      # the heat shells in 3D
        win.save_screenshot(screenshot_dir / "demo_model_attention.png")
    finally:
        win.close()


def test_cli_demo_generate_screenshot_with_the_demo_model(screenshot_dir):
    out = screenshot_dir / "cli_demo_generate_demo_model.png"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "reg2rg.app.main", "--demo", "--generate", "--screenshot", str(out),
                           "--size", "1600x1000"], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the real demo model drafted: the summary names region sections with words in them
    summary = next((ln for ln in proc.stdout.splitlines() if ln.startswith("draft: ")), "")
    assert summary, proc.stdout[-2000:]
    n_sections, n_words = (int(v) for v in re.match(r"draft: (\d+) section\(s\), (\d+) words", summary).groups())
    assert n_sections >= 2 and n_words >= 10, summary
    named = [r.strip() for r in summary.split("regions: ", 1)[1].split(",")]
    assert named and set(named) <= set(REGIONS), summary
    img = QImage(str(out))
    assert not img.isNull() and img.width() >= 1500


def _heat_pixels(att, view) -> np.ndarray:
    """Pixels of ``view`` that the heat layer changes (the frame with the map vs without it)."""
    QApplication.processEvents()
    shown = frame_pixels(view).astype(int)
    att.show_box.setChecked(True)
    hidden = frame_pixels(view).astype(int)
    att.show_box.setChecked(False)
    return np.abs(shown - hidden).sum(axis=2) > 30


def test_demo_two_sections_paint_different_places_and_each_shows_its_findings_check(qtbot, screenshot_dir):
    """The relevance maps of the pleura and the heart sections light up different pixels (on the slice of
    either map's peak), the chart is each selection's region dependence, Go to peak goes there, and every
    checked section shows its Findings check."""
    win = MainWindow()
    win.resize(1600, 1000)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    session = win.session
    try:
        with qtbot.waitSignal(win.studyLoaded, timeout=120000):
            win.open_request(LoadRequest(demo=True))
        panel, att = win.draft_panel, win.attention_panel
        with qtbot.waitSignal(session.findingsChanged, timeout=400000):
            session.generate()
        by_region = {s.region: s for s in session.draft.sections if s.region and s.grounding_ok}
        for region in ("pleura", "heart", "lung"):
            ed = panel.section_editor(by_region[region].key)
            assert ed.findings is not None and not ed.findings_label.isHidden()
            text = ed.findings_label.text()
            assert "Findings check" in text
            for f in ed.findings.findings:
                if f.assessed:         # the detector's probability of what it may call
                    assert f.source == "detector" and f"{f.finding.lower()} {f.probability:.0%}" in text
                else:                  # what it cannot see is said so, never shown as a 0 %
                    assert f.finding.lower() in text.split("not assessed:")[1] and f.flag is None
        assert "pleural effusion" in panel.section_editor(by_region["pleura"].key).findings_label.text()
        lung = panel.section_editor(by_region["lung"].key)
        assert "not assessed: " in lung.findings_label.text() and "lung nodule" in lung.findings_label.toolTip()
        axial = win.views[AXIS_AXIAL]
        vol = win.document.volume
        peaks, painted = {}, {}            # painted[(map, slice of which peak)]: heat pixels of the axial view

        def show(region):
            with qtbot.waitSignal(session.heatLayerChanged, timeout=120000):
                panel.section_editor(by_region[region].key).attention_button.click()
            assert att.method_name() == "relevance"
            drops = session.heat.dependence.drops                     # the chart is the region dependence
            assert [r[1] for r in att.chart.rows] == list(drops.values()) and att.chart.rows[0][0] == "global image"
            assert "peak" in att.status.text()
            peaks[region] = session.heat.amap.peak_voxel

        def paint(region, at):
            win.document.set_cursor(vol.from_stored(peaks[at]))
            if region == at:                  # its own peak is marked (ring + ticks) in every slice view
                for view in win.views.values():
                    assert_peak_marked_at(view, vol.from_stored(peaks[at]))
            painted[(region, at)] = _heat_pixels(att, axial)

        show("pleura")
        att.go_to_peak()                                              # the crosshair at the map's maximum
        assert tuple(win.document.cursor) == tuple(vol.from_stored(peaks["pleura"]))
        paint("pleura", "pleura")
        win.save_screenshot(screenshot_dir / "demo_relevance_pleura.png")
        show("heart")
        paint("heart", "heart")
        win.save_screenshot(screenshot_dir / "demo_relevance_heart.png")
        paint("heart", "pleura")
        show("pleura")
        paint("pleura", "heart")
        assert peaks["pleura"] != peaks["heart"]
        # on the heart peak's slice the pleura map's marker is elsewhere (another slice, or another place)
        pleura_at = vol.from_stored(peaks["pleura"])
        win.document.set_cursor(vol.from_stored(peaks["heart"]))
        QApplication.processEvents()
        if pleura_at[AXIS_AXIAL] == vol.from_stored(peaks["heart"])[AXIS_AXIAL]:
            assert_peak_marked_at(axial, pleura_at)
        else:
            assert not axial.peak_marker_shown()
        for at in ("pleura", "heart"):                 # on each peak's slice the two maps light other pixels
            a, b = painted[("pleura", at)], painted[("heart", at)]
            assert painted[(at, at)].sum() > 50
            assert (a & b).sum() / max((a | b).sum(), 1) < 0.5, f"both maps paint the same pixels at the {at} peak"
    finally:
        win.close()
