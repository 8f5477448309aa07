"""The viewer drafting on a reg2rg-serve (a real server on loopback in a child process): Engine "server URL +
token" streams, stops, explains (attention, relevance map, region dependence, findings check) and, when the
server dies mid-draft, keeps the draft so far marked stopped, says so in one line and offers Retry, which
drafts again once the server is back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PySide6.QtWidgets import QMessageBox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve_fixtures import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("viewer_serve")).start()
    yield srv
    srv.stop()


@pytest.fixture
def win(main_window, qtbot):
    from reg2rg.engine.phantom import demo_study

    w = main_window(1500, 950)
    with qtbot.waitSignal(w.studyLoaded, timeout=60000):
        w.open_study(demo_study())
    return w


def test_the_viewer_drafts_on_the_server(qtbot, win, server, tmp_path):
    from reg2rg.app.generation import ModelChoice
    from reg2rg.app.main import build_parser

    assert build_parser().parse_args(["--server", server.url, "--token-file", "F"]).server == server.url
    session = win.session
    session.set_model(ModelChoice("server", url=server.url, token_file=str(server.token_file)))
    assert server.url in win.draft_panel.model_label.text()
    streamed, results = [], []
    session.tokenStreamed.connect(streamed.append)
    session.resultReady.connect(results.append)
    with qtbot.waitSignal(session.generationFinished, timeout=240000):
        session.generate()
    assert session.engine is not None and type(session.engine).__name__ == "RemoteEngine"
    result = results[-1]
    assert result.remote_draft and result.complete
    assert len(streamed) == len(result.tokens) > 0
    assert session.draft is not None and any(s.text.strip() for s in session.draft.sections)
    # provenance names the served model, not "in memory"
    assert "demo" in session.draft.provenance.model_name.lower()
    # attention of a section: computed by the server, drawn on this CT
    amap = session.engine.attention_map(result, [0, 1, 2])
    assert amap.heatmap.shape == win.document.study.voxels.shape and amap.heatmap.max() > 0

    # Stop mid-stream over the network
    def stop_after_three(ev):
        if ev.index == 2:
            session.stop()
    session.tokenStreamed.connect(stop_after_three)
    results.clear()
    from reg2rg.engine.generation import GenerationSettings

    session.set_settings(GenerationSettings(max_new_tokens=300))
    with qtbot.waitSignal(session.generationFinished, timeout=240000):
        session.generate()
    session.tokenStreamed.disconnect(stop_after_three)
    stopped = results[-1]
    assert stopped.stop_reason == "cancelled" and 3 <= len(stopped.tokens) < 300
    assert "stopped" in win.draft_panel.status.text()


def test_selecting_words_in_a_remote_draft_shows_the_relevance_map(qtbot, win, server):
    """The viewer's default explanation over --server: the relevance map on this CT (heat layer, peak
    marker, Go to peak), the region-dependence chart of the same selection, and the Findings check."""
    from PySide6.QtWidgets import QApplication

    from reg2rg.app.generation import ModelChoice
    from reg2rg.engine.explain.relevance import RegionDependence, RelevanceMap
    from reg2rg.engine.generation import GenerationSettings

    session, panel, att = win.session, win.draft_panel, win.attention_panel
    session.set_model(ModelChoice("server", url=server.url, token_file=str(server.token_file)))
    session.set_settings(GenerationSettings(max_new_tokens=60))
    with qtbot.waitSignal(session.generationFinished, timeout=240000):
        session.generate()
    assert type(session.engine).__name__ == "RemoteEngine"
    assert session.wait_for_background(120000)                # the findings check, asked of the server
    section = next(s for s in session.draft.sections if s.region and len(s.tokens) > 3)
    result = session.results[section.key]
    assert result.findings_check is not None and result.findings_check.threshold == session.omission_threshold
    ed = panel.section_editor(section.key)
    cur = ed.editor.textCursor()
    end = section.tokens[3].end
    cur.setPosition(0)
    cur.setPosition(end, cur.MoveMode.KeepAnchor)
    with qtbot.waitSignal(session.heatLayerChanged, timeout=120000):
        ed.editor.setTextCursor(cur)                          # select the first words, as with the mouse
    amap = att.current
    assert isinstance(amap, RelevanceMap) and att.method_name() == "relevance"
    assert list(amap.token_indices) == [t.index for t in section.tokens if t.start < end and t.text.strip()]
    assert amap.heatmap.shape == win.document.study.voxels.shape and amap.heatmap.max() > 0
    assert session.heat.codes is not None and session.heat.codes.max() > 0        # a non-empty heat layer
    dependence = session.heat.dependence
    assert isinstance(dependence, RegionDependence)
    assert [r[0] for r in att.chart.rows][0] == "global image"
    assert [r[1] for r in att.chart.rows] == list(dependence.drops.values())
    assert "peak" in att.status.text() and att.peak_button.isEnabled()
    att.peak_button.click()                                   # Go to peak
    QApplication.processEvents()
    peak = win.document.volume.from_stored(amap.peak_voxel)
    assert tuple(win.document.cursor) == tuple(peak)
    assert all(view.peak_marker_shown() for view in win.views.values())


def test_server_lost_mid_draft_keeps_the_draft_and_offers_retry(qtbot, win, server):
    from reg2rg.app.generation import ModelChoice
    from reg2rg.engine.generation import GenerationSettings

    session = win.session
    session.set_model(ModelChoice("server", url=server.url, token_file=str(server.token_file)))
    session.set_settings(GenerationSettings(max_new_tokens=400))
    unavailable, results = [], []
    session.resultReady.connect(results.append)
    session.engineUnavailable.connect(lambda msg, retry: unavailable.append((msg, retry)))

    def kill_after_five(ev):
        if ev.index == 4:
            server.kill()
    session.tokenStreamed.connect(kill_after_five)
    with qtbot.waitSignal(session.generationFinished, timeout=240000):
        session.generate()
    session.tokenStreamed.disconnect(kill_after_five)
    assert unavailable, "the failure was not reported"
    message, retry = unavailable[-1]
    assert retry and "\n" not in message and "kept" in message and server.token not in message
    partial = results[-1]
    assert partial.stop_reason == "interrupted" and not partial.complete and len(partial.tokens) >= 5
    assert session.draft is not None                        # the draft so far is kept
    panel = win.draft_panel
    qtbot.waitUntil(lambda: getattr(panel, "retry_box", None) is not None and panel.retry_box.isVisible(),
                    timeout=5000)
    retry_button = next(b for b in panel.retry_box.buttons() if b.text() == "Retry")
    assert panel.retry_box.icon() == QMessageBox.Warning
    server.start()                                            # the server is back
    with qtbot.waitSignal(session.generationFinished, timeout=240000):
        retry_button.click()
    again = results[-1]
    assert again.complete and len(again.tokens) > len(partial.tokens) - 1
    assert again.token_ids[:len(partial.tokens)] == partial.token_ids


def test_a_wrong_token_is_one_clear_line(qtbot, win, server, tmp_path):
    from reg2rg.app.generation import ModelChoice

    bad = tmp_path / "token"
    bad.write_text("wrong\n")
    session = win.session
    session.set_model(ModelChoice("server", url=server.url, token_file=str(bad)))
    errors = []
    session.errorOccurred.connect(errors.append)
    with qtbot.waitSignal(session.generationFinished, timeout=120000):
        session.generate()
    assert errors and "refused the token" in errors[-1] and "Traceback" not in errors[-1]
    assert "wrong" not in errors[-1].replace("wrong token", "")
