"""Autosave keyed by the study's content (issue 17, defects 1 and 6): never the wrong patient's draft.

Real NIfTI and DICOM files, the real `DraftStore` and `DraftPanel` under Xvfb, real processes racing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reg2rg.app.draft import DraftFileError, DraftStore, ReportDraft, study_key
from reg2rg.engine.studyio import read_study, write_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from generation_fixtures import box_study  # noqa: E402
from test_draft import make_result  # noqa: E402


def patient(seed: int):
    """A box study whose body voxels differ by patient (same shape, same masks, same affine)."""
    st = box_study(name="ct_001")
    rng = np.random.default_rng(seed)
    body = st.voxels > -500
    st.voxels[body] = rng.integers(-100, 200, size=int(body.sum())).astype(st.voxels.dtype)
    return st


def edited_draft(st, text="Patient A: edited findings."):
    draft = ReportDraft.from_result(make_result(), st, study_key=study_key(st))
    draft.set_text(0, text)
    return draft


# ---- keys ---------------------------------------------------------------------------------------
def test_nifti_key_is_the_content_not_the_path(tmp_path):
    path = tmp_path / "ct.nii.gz"
    write_study(patient(1), path)
    a = read_study(path)
    write_study(patient(2), path)                       # another patient at the same path
    b = read_study(path)
    assert a.source == b.source and study_key(a) != study_key(b)
    copy = tmp_path / "elsewhere" / "renamed.nii.gz"
    write_study(patient(1), copy)
    assert study_key(read_study(copy)) == study_key(a)  # the same study, moved: its draft follows it


def test_dicom_key_is_the_series_and_its_instances(tmp_path):
    from dicom_fixtures import write_series

    vox = np.random.default_rng(0).integers(-1000, 400, size=(12, 10, 5)).astype(np.float32)
    write_series(tmp_path / "a", vox, np.diag([-1.0, -1.0, 2.0, 1.0]))
    write_series(tmp_path / "b", vox, np.diag([-1.0, -1.0, 2.0, 1.0]))   # same pixels, new UIDs
    a, a_again, b = read_study(tmp_path / "a"), read_study(tmp_path / "a"), read_study(tmp_path / "b")
    assert study_key(a) == study_key(a_again) and study_key(a) != study_key(b)
    assert "instances_digest" in a.metadata and "SOPInstanceUID" not in json.dumps(a.metadata, default=str)


# ---- the store ----------------------------------------------------------------------------------
def test_a_corrupt_autosave_is_moved_aside_and_never_overwritten(tmp_path):
    store = DraftStore(tmp_path)
    st = patient(1)
    path = store.save(edited_draft(st))
    path.write_text('{"clean": false, "draft": {"study_key": ', encoding="utf-8")   # cut mid-write by a crash
    with pytest.raises(DraftFileError) as err:
        store.load(study_key(st))
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and "kept as" in message
    kept = [p for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    assert len(kept) == 1 and kept[0].read_text().startswith('{"clean": false, "draft": {"study_key": ')
    store.save(edited_draft(st, "New work."))                 # the next autosave
    assert kept[0].read_text().startswith('{"clean": false')  # still there, untouched
    assert store.load(study_key(st)).draft.section(0).text == "New work."


@pytest.mark.parametrize("field, value, words", [
    ("text", 5, "sections[0].text is int 5, expected text"),
    ("tokens", "abc", "sections[0].tokens is str"),
    ("grounding_ok", "yes", "sections[0].grounding_ok is str"),
    ("slot", 1.5, "sections[0].slot is float"),
])
def test_a_wrong_typed_field_is_one_clear_message(tmp_path, field, value, words):
    store = DraftStore(tmp_path)
    st = patient(1)
    path = store.save(edited_draft(st))
    payload = json.loads(path.read_text())
    payload["draft"]["sections"][0][field] = value
    path.write_text(json.dumps(payload))
    with pytest.raises(DraftFileError, match="not a readable Reg2RG draft") as err:
        store.load(study_key(st))
    assert words in str(err.value) and "AttributeError" not in str(err.value)


def test_a_draft_file_of_another_study_is_not_restored(tmp_path):
    store = DraftStore(tmp_path)
    a, b = patient(1), patient(2)
    path = store.save(edited_draft(a))
    os.replace(path, store.path_for(study_key(b)))          # copied into b's name by hand or by an old tool
    with pytest.raises(DraftFileError, match="another study"):
        store.load(study_key(b))


_RACER = r"""
import sys
from reg2rg.app.draft import DraftStore, ReportDraft, DraftSection
store = DraftStore(sys.argv[1])
draft = ReportDraft(study_key="k" * 32, study_name="ct_001",
                    sections=[DraftSection(0, "heart", "heart", "x" * 50000, "x" * 50000)])
for i in range(60):
    draft.sections[0].text = f"{sys.argv[2]} {i} " + "y" * 50000
    store.save(draft)
"""


def test_two_processes_autosaving_one_study_do_not_collide(tmp_path):
    """Before: both wrote ``<key>.json.tmp``; one process's rename found the file gone (or half-written)."""
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), name], stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    saved = DraftStore(tmp_path).load("k" * 32)
    assert saved.draft.section(0).text.split(" ")[1] == "59"       # complete, one process's last save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k" * 32 + ".json"]


# ---- the viewer ---------------------------------------------------------------------------------
@pytest.mark.gui
def test_same_path_different_patient_is_never_restored(qtbot, tmp_path):
    """Before: the key was the path's hash, so patient B opened with "Restored the saved draft" and A's text."""
    from reg2rg.app.display import build_display_volume
    from reg2rg.app.document import ViewerDocument
    from reg2rg.app.draft_panel import DraftPanel
    from reg2rg.app.session import DraftingSession

    path = tmp_path / "today.nii.gz"
    write_study(patient(1), path, tmp_path / "masks")
    a = read_study(path, tmp_path / "masks")
    store = DraftStore(tmp_path / "drafts")
    store.save(edited_draft(a, "Patient A: 8 mm nodule."), clean=True)     # A closed normally

    write_study(patient(2), path, tmp_path / "masks")                     # B replaces A at the same path
    b = read_study(path, tmp_path / "masks")
    doc = ViewerDocument()
    panel = DraftPanel(DraftingSession(doc, store=store))
    qtbot.addWidget(panel)
    doc.set_study(b, build_display_volume(b))
    assert panel.session.draft is None and panel.restore_box is None
    assert "Restored" not in panel.status.text()

    write_study(patient(1), path, tmp_path / "masks")                     # A again: its draft comes back
    a_again = read_study(path, tmp_path / "masks")
    doc.set_study(a_again, build_display_volume(a_again))
    assert panel.session.draft is not None and panel.session.draft.section(0).text == "Patient A: 8 mm nodule."
    status = panel.status.text()
    assert status.startswith("Restored the draft of today saved ") and status[-5:-3].isdigit()


@pytest.mark.gui
def test_wrong_typed_autosave_in_the_viewer_is_a_message_and_screenshot_finishes(tmp_path):
    """Before: "Unexpected error: AttributeError" and ``--screenshot`` never finished."""
    from reg2rg.engine.phantom import demo_study

    data = tmp_path / "userdata"
    store = DraftStore(data / "drafts")
    demo = demo_study()
    path = store.save(edited_draft(demo), clean=False)
    payload = json.loads(path.read_text())
    payload["draft"]["sections"][0]["text"] = 5
    path.write_text(json.dumps(payload))
    out = tmp_path / "shot.png"
    env = {**os.environ, "REG2RG_DATA_DIR": str(data)}
    proc = subprocess.run([sys.executable, "-m", "reg2rg.app.main", "--demo", "--screenshot", str(out),
                           "--size", "1200x800"], env=env, capture_output=True, text=True, timeout=240)
    assert out.is_file(), proc.stderr[-2000:]
    assert "sections[0].text is int 5, expected text" in proc.stderr
    assert "AttributeError" not in proc.stderr and "Traceback" not in proc.stderr
    assert any(".unreadable-" in p.name for p in (data / "drafts").iterdir())    # kept, set aside
