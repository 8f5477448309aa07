"""Checking a draft: relevance maps (and raw attention) of a selection (heatmap over the CT, region
dependence chart, NIfTI), with a
real tiny engine and real rendering; the panel's pure helpers with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PySide6.QtWidgets import QApplication

from reg2rg.app.attention_panel import (
    AttentionRequestError,
    colormap_table,
    heatmap_to_display,
    parse_indices,
)
from reg2rg.app.display import AXIS_AXIAL, build_display_volume
from reg2rg.app.draft_panel import sentence_span
from reg2rg.app.main_window import frame_pixels
from conftest import assert_peak_marked_at, peak_mark_pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

pytestmark = pytest.mark.gui


def test_heatmap_follows_the_ct_display_orientation():
    from generation_fixtures import box_study

    st = box_study(flip_axis=0)                       # stored right-to-left: display flips it back
    vol = build_display_volume(st)
    heat = np.zeros(st.shape, dtype=np.float32)
    heat[3, 5, 7] = 2.0                                # the peak
    heat[4, 5, 7] = 1.0                                # half of it
    codes = heatmap_to_display(heat, vol)
    assert codes.flags.f_contiguous and codes.dtype == np.uint8 and codes.shape == vol.shape
    assert codes[vol.from_stored((3, 5, 7))] == 255
    assert codes[vol.from_stored((4, 5, 7))] == 128    # rint(127.5)
    assert codes.sum() == 255 + 128
    assert heat[3, 5, 7] == 2.0                        # the engine's map is left intact
    with pytest.raises(AttentionRequestError, match="not the CT grid"):
        heatmap_to_display(heat[:-1], vol)


def test_colormaps_fade_out_weak_attention_and_indices_parse():
    for name in ("Hot", "Jet", "Viridis"):
        t = colormap_table(name)
        assert t.shape == (256, 4) and t[0, 3] == 0 and t[-1, 3] == 255
        assert np.all(np.diff(t[:, 3].astype(int)) >= 0)
    assert parse_indices("0, 2-3", 4, "Layers") == [0, 2, 3]
    with pytest.raises(AttentionRequestError, match=r"Layers: \[4\] outside 0..3"):
        parse_indices("1,4", 4, "Layers")
    with pytest.raises(AttentionRequestError, match="not a number"):
        parse_indices("x", 4, "Heads")


def test_sentence_span():
    text = "The heart is enlarged. No effusion; lungs clear."
    assert text[slice(*sentence_span(text, 3))] == "The heart is enlarged."
    assert text[slice(*sentence_span(text, 25))] == "No effusion;"
    assert text[slice(*sentence_span(text, len(text) - 2))] == "lungs clear."


@pytest.fixture(scope="module")
def engine():
    import torch

    torch.set_num_threads(1)
    from generation_fixtures import tiny_engine

    return tiny_engine()


@pytest.fixture
def win(main_window):
    return main_window(1600, 1000)


def test_selecting_text_shows_a_heatmap_in_the_views_and_saves_nifti(qtbot, win, engine, tmp_path, screenshot_dir):
    from generation_fixtures import box_study

    study = box_study()
    with qtbot.waitSignal(win.studyLoaded, timeout=30000):
        win.open_study(study)
    panel, att = win.draft_panel, win.attention_panel
    win.session.set_engine(engine)
    panel.max_tokens.setValue(24)
    with qtbot.waitSignal(win.session.generationFinished, timeout=60000):
        win.session.generate()
    section = win.session.draft.sections[0]
    ed = panel.section_editor(section.key)
    axial = win.views[AXIS_AXIAL]
    before = frame_pixels(axial).astype(int)

    # select the first few words in the editor, as the radiologist would with the mouse
    cur = ed.editor.textCursor()
    end = section.tokens[min(3, len(section.tokens) - 1)].end
    cur.setPosition(0)
    cur.setPosition(end, cur.MoveMode.KeepAnchor)
    with qtbot.waitSignal(win.session.heatLayerChanged, timeout=60000):
        ed.editor.setTextCursor(cur)
    amap = att.current
    expected = [t.index for t in section.tokens if t.start < end and t.text.strip()]
    assert list(amap.token_indices) == expected
    assert amap.heatmap.shape == study.shape and amap.heatmap.max() > 0
    assert att.method_name() == "relevance" and amap.method == "gradient_x_input"   # the default map
    assert not att.layers.isEnabled()                 # layer/head choices are for raw attention only
    # the chart is the region dependence of the same selection: the global image and every region slot
    names = [r[0] for r in att.chart.rows]
    assert names[0] == "global image"
    assert set(names[1:]) == set(win.session.results[section.key].slot_regions.values())
    drops = win.session.heat.dependence.drops
    assert [r[1] for r in att.chart.rows] == list(drops.values())
    assert "peak" in att.status.text()
    # the heatmap is drawn over the CT: the frame changes where the map is strong
    peak = win.document.volume.from_stored(amap.peak_voxel)
    win.document.set_cursor(peak)
    QApplication.processEvents()
    # the peak is marked in every slice view (each shows the peak's slice now) and in 3D
    for view in win.views.values():
        assert view.peak_marker_shown()
        assert_peak_marked_at(view, peak)
    assert win.view3d.peak_marker_shown()
    assert len(peak_mark_pixels(frame_pixels(win.view3d))) > 20
    shown = frame_pixels(axial).astype(int)
    shown3d = frame_pixels(win.view3d).astype(int)
    assert win.view3d.heat_shown()
    att.show_box.setChecked(True)                      # hide it: back to the CT alone at that slice
    hidden = frame_pixels(axial).astype(int)
    hidden3d = frame_pixels(win.view3d).astype(int)
    assert not win.view3d.heat_shown()
    assert len(peak_mark_pixels(hidden)) == 0 and len(peak_mark_pixels(hidden3d)) == 0   # hidden with the layer
    assert (np.abs(shown - hidden).sum(axis=2) > 30).sum() > 50
    # ...and in 3D: the heat shells change the rendered pixels, and they are warm (the Hot map: red > blue)
    changed3d = np.abs(shown3d - hidden3d).sum(axis=2) > 30
    assert changed3d.sum() > 50
    assert (shown3d[changed3d, 0] - shown3d[changed3d, 2]).mean() > 20
    att.show_box.setChecked(False)
    att.opacity.setValue(100)

    stronger = frame_pixels(axial).astype(int)
    assert np.abs(stronger - hidden).sum() > np.abs(shown - hidden).sum()
    assert np.abs(before).sum() > 0
    win.save_screenshot(screenshot_dir / "attention_selection.png")

    # raw attention stays an option, clearly named; its layer aggregation: the last layer alone
    with qtbot.waitSignal(win.session.heatLayerChanged, timeout=60000):
        att.set_method("raw")
    assert att.layers.isEnabled() and hasattr(att.current, "shares")
    assert "raw attention" in att.status.text()
    att.layers.setCurrentText("Last layer")
    with qtbot.waitSignal(win.session.heatLayerChanged, timeout=60000):
        att.recompute()
    assert len(att.current.layers) == 1 and att.current.token_indices == amap.token_indices

    out = att.save_nifti(tmp_path / "attention.nii.gz")
    img = nib.load(str(out))
    assert img.shape == study.shape
    np.testing.assert_allclose(img.affine, study.affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), att.current.heatmap, rtol=1e-6)

    # a whole section through its button
    with qtbot.waitSignal(win.session.heatLayerChanged, timeout=60000):
        ed.attention_button.click()
    assert list(att.current.token_indices) == [t.index for t in section.tokens if t.text.strip()]
    # the marker follows the selection: the section's map is marked at its own peak
    new_peak = win.document.volume.from_stored(att.current.peak_voxel)
    win.document.set_cursor(new_peak)
    for view in win.views.values():
        assert_peak_marked_at(view, new_peak)
    # a slice without the peak shows no marker; clearing the heat layer removes it everywhere
    other = list(new_peak)
    other[axial.axis] = (other[axial.axis] + 3) % win.document.volume.shape[axial.axis]
    win.document.set_cursor(tuple(other))
    QApplication.processEvents()
    assert not axial.peak_marker_shown() and len(peak_mark_pixels(frame_pixels(axial))) == 0
    win.session.clear_heat()
    QApplication.processEvents()
    assert not any(v.peak_marker_shown() for v in win.all_views())
    assert len(peak_mark_pixels(frame_pixels(win.views[1]))) == 0
    assert len(peak_mark_pixels(frame_pixels(win.view3d))) == 0
