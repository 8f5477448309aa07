"""The viewer without masks, Segment regions…, the mask plausibility warning and "not drafted" sections,
on the real window under Xvfb. TotalSegmentator cannot run here: where a test segments, the stated
stand-in package of tests/engine/stand_ins (a third-party fake writing a phantom's TotalSegmentator label
maps) is put on the path; the missing-package test runs with the package absent."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PySide6.QtWidgets import QApplication, QMessageBox

from reg2rg.engine.masks import TOTALSEG_V2_CLASSES, save_label_map
from reg2rg.engine.phantom import make_study
from reg2rg.engine.phantom_cli import write_totalseg
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.segment import TASK_WEIGHTS, totalsegmentator_available
from reg2rg.engine.studyio import read_study, read_volume, write_study

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[2]
STAND_INS = ROOT / "tests" / "engine" / "stand_ins"
REALCT = ROOT / ".." / "shared" / "realct"
SHAPE = (80, 80, 40)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    study = make_study(9, shape=SHAPE, totalseg=True)
    write_study(study, root / "ct.nii.gz", root / "masks")
    write_totalseg(study, root / "labels")
    return study, root


@pytest.fixture
def window(main_window):
    return main_window(1400, 900)


def open_request(qtbot, win, **request):
    from reg2rg.app.loader import LoadRequest

    with qtbot.waitSignal(win.studyLoaded, timeout=60000):
        win.open_request(LoadRequest(**request))
    QApplication.processEvents()


def test_generate_is_disabled_without_masks_and_says_the_two_ways_out(qtbot, window, phantom, screenshot_dir):
    _, root = phantom
    open_request(qtbot, window, volume=str(root / "ct.nii.gz"))
    panel = window.draft_panel
    assert window.document.study.regions_present == []
    assert not panel.generate_button.isEnabled()
    for text in (panel.status.text(), panel.generate_button.toolTip()):
        assert "No region masks" in text and "Open masks" in text and "Segment regions" in text
    window.save_screenshot(screenshot_dir / "no_masks.png")
    window.session.generate()                          # a programmatic call is refused too
    assert not window.session.busy and window.session.draft is None
    # File ▸ Open masks… on the open CT: Generate comes on
    open_request(qtbot, window, masks=str(root / "masks"), study=window.document.study, masks_only=True)
    assert window.document.study.regions_present == list(REGIONS)
    assert panel.generate_button.isEnabled() and "10 region(s)" in panel.status.text()


def test_segment_regions_without_the_package_shows_the_install_hint(qtbot, window, phantom):
    if totalsegmentator_available():
        pytest.skip("the real TotalSegmentator is installed here; this test needs it absent")
    _, root = phantom
    open_request(qtbot, window, volume=str(root / "ct.nii.gz"))
    window.act_segment.trigger()
    box = window.last_message_box
    assert box is not None and box.isVisible() and box.windowTitle() == "Segment regions"
    assert "pip install 'reg2rg-viewer[segment]'" in box.text() and "Open masks" in box.text()
    assert window.segmentation is None
    box.close()


@pytest.fixture
def stand_in(phantom, tmp_path, monkeypatch):
    """The stated TotalSegmentator stand-in on the path, its weights folders present, a private cache."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    monkeypatch.setenv("REG2RG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_TOTALSEG_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TOTALSEG_LABELS", str(phantom[1] / "labels"))
    monkeypatch.setenv("FAKE_TOTALSEG_SLEEP", "0.5")
    for ids in TASK_WEIGHTS.values():
        for i in ids:
            (tmp_path / "tshome" / "nnunet" / "results" / f"Dataset{i}_w").mkdir(parents=True, exist_ok=True)
    return monkeypatch


def test_segment_regions_shows_progress_and_the_masks_arrive(qtbot, window, phantom, stand_in, screenshot_dir):
    study, root = phantom
    open_request(qtbot, window, volume=str(root / "ct.nii.gz"))
    window.segment_regions()
    assert window.segment_dialog is not None and window.segment_dialog.isVisible()
    seen = []
    window.studyLoaded.connect(lambda: seen.append(len(window.document.study.regions_present)))
    # the masks loads of the segmented tasks go one at a time; wait for the last one to land
    qtbot.waitUntil(lambda: window.segmentation is None and not window._segment_loading
                    and window._segment_pending is None, timeout=120000)
    assert seen and seen[-1] == 10
    assert seen[0] < 10                                 # the first task's regions arrived before the last task
    got = window.document.study
    for region in REGIONS:
        assert np.array_equal(got.masks[region], study.masks[region]), region
    assert not any("stay absent" in w for w in got.warnings)   # the partial loads' warnings are gone
    assert window.draft_panel.generate_button.isEnabled()
    window.render_all()
    window.save_screenshot(screenshot_dir / "segmented_regions.png")


def test_cancel_stops_segmenting_at_once(qtbot, window, phantom, stand_in):
    import time

    stand_in.setenv("FAKE_TOTALSEG_SLEEP", "60")
    open_request(qtbot, window, volume=str(phantom[1] / "ct.nii.gz"))
    window.segment_regions()
    qtbot.wait(1500)
    t0 = time.perf_counter()
    from PySide6.QtWidgets import QPushButton

    window.segment_dialog.findChild(QPushButton).click()   # the dialog's Cancel button
    qtbot.waitUntil(lambda: window.segmentation is None, timeout=60000)
    assert time.perf_counter() - t0 < 60                  # the stand-in's 60 s task was killed, not waited for
    assert "cancelled" in window.statusBar().currentMessage()
    assert window.document.study.regions_present == []
    assert not window.draft_panel.generate_button.isEnabled()


def test_wrong_patient_masks_are_flagged_before_drafting(qtbot, window, phantom, tmp_path):
    """The real CT's TotalSegmentator map on the phantom's grid (another patient, same-sized grid)."""
    if not (REALCT / "example_seg_fast.nii.gz").is_file():
        pytest.skip(f"{REALCT} (the real CT for tests) is not on this machine")
    study, root = phantom
    seg = np.asarray(nib.load(str(REALCT / "example_seg_fast.nii.gz")).dataobj)
    labels = np.zeros(SHAPE, np.uint8)
    n = [min(a, b) for a, b in zip(seg.shape, SHAPE)]
    labels[:n[0], :n[1], :n[2]] = seg[:n[0], :n[1], :n[2]]
    save_label_map(tmp_path / "other_patient.nii.gz", labels, study.affine, TOTALSEG_V2_CLASSES)
    open_request(qtbot, window, volume=str(root / "ct.nii.gz"), masks=str(tmp_path / "other_patient.nii.gz"))
    opened = window.last_message_box
    assert opened is not None and "may not belong to this CT" in opened.text()
    assert str(tmp_path) not in opened.text()             # file names, not folders, for the reader
    opened.close()
    panel = window.draft_panel
    assert panel.generate_button.isEnabled()               # the reader may still proceed
    window.session.generate()
    box = panel.mask_check_box
    assert box is not None and box.isVisible() and "may not belong to this CT" in box.text()
    for problem in window.document.study.mask_problems:
        assert problem in box.text()
    window.save_screenshot(ROOT / "artifacts" / "screenshots" / "mask_plausibility_warning.png")
    box.button(QMessageBox.Cancel).click()
    QApplication.processEvents()
    session = window.session
    assert not session.busy and session.engine is None and session.draft is None   # nothing drafted


def test_regions_not_written_are_shown_as_not_drafted(qtbot, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "engine"))
    import torch
    from generation_fixtures import box_study, tiny_engine

    from reg2rg.app.display import build_display_volume
    from reg2rg.app.document import ViewerDocument
    from reg2rg.app.draft import NOT_DRAFTED, DraftStore
    from reg2rg.app.draft_panel import DraftPanel
    from reg2rg.app.session import DraftingSession

    torch.set_num_threads(1)
    doc = ViewerDocument()
    session = DraftingSession(doc, store=DraftStore(tmp_path / "drafts"))
    panel = DraftPanel(session)
    qtbot.addWidget(panel)
    panel.show()
    st = box_study()
    doc.set_study(st, build_display_volume(st))
    session.set_engine(tiny_engine())
    panel.max_tokens.setValue(4)                         # too short for any section of a random model
    results = []
    session.resultReady.connect(results.append)
    with qtbot.waitSignal(session.generationFinished, timeout=60000):
        session.generate()
    missing = results[0].not_drafted
    assert missing and set(missing) <= set(st.regions_present)
    for region in missing:
        section = session.draft.section_of_region(region)
        assert section is not None and section.state == NOT_DRAFTED
    headers = [ed.header.text() for ed in panel._editors if ed.section.state == NOT_DRAFTED]
    assert len(headers) >= len(missing) and all("not drafted" in h for h in headers)


def test_mask_plausibility_matches_the_engine(phantom):
    """The viewer shows the engine's own check (one home): reading the study gives the same problems."""
    _, root = phantom
    assert read_study(root / "ct.nii.gz", root / "masks").mask_problems == []
    assert read_volume(root / "ct.nii.gz").mask_problems == []
