"""The draft document model, its autosave/restore, and drafting with a real (tiny) engine through the
drafting session and its draft panel."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from reg2rg.app.draft import ACCEPTED, EDITED, GENERATED, DraftFileError, DraftStore, ReportDraft, study_key
from reg2rg.engine.confidence import TokenConfidence
from reg2rg.engine.generation import ground_sections
from reg2rg.engine.study import Study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

TEXT = ("The region 0 is heart: The heart is enlarged. The region 1 is lung: "
        "No nodule. The region 2 is lung: Bone is intact.")
SLOTS = {0: "heart", 1: "lung", 2: "bone"}


def word_tokens(text: str) -> list[TokenConfidence]:
    """Tokens = words with their leading space; probabilities fall along the text (known answers)."""
    tokens, pos = [], 0
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        tokens.append(TokenConfidence(index=i, token_id=100 + i, text=piece, start=pos, end=pos + len(piece),
                                      prob=1.0 - i / 40, entropy=0.1 * i, top=((piece, 1.0 - i / 40), (" x", 0.01))))
        pos += len(piece)
    return tokens


def make_result(text=TEXT, slots=SLOTS):
    tokens = word_tokens(text)
    sections = ground_sections(text, slots, tokens)
    return SimpleNamespace(text=text, tokens=tokens, sections=sections, settings=None, stop_reason="eos",
                           cancelled=False)


def study(seed=1, source="/data/ct_001.nii.gz"):
    """A small real `Study` (its draft key comes from its voxels, not from ``source``)."""
    voxels = np.random.default_rng(seed).integers(-1000, 400, size=(6, 5, 4)).astype(np.int16)
    return Study(voxels=voxels, affine=np.eye(4), name="ct_001", source=source)


def test_draft_sections_follow_the_report_and_its_grounding():
    draft = ReportDraft.from_result(make_result(), study())
    assert [s.slot for s in draft.sections] == [0, 1, 2]
    heart, lung, bone = draft.sections
    assert heart.text == "The heart is enlarged." and heart.region == "heart" and heart.grounding_ok
    assert bone.region == "bone" and bone.area == "lung" and not bone.grounding_ok     # named the wrong area
    # Token offsets are re-based on each section body: they select exactly the token's characters.
    for s in draft.sections:
        for t in s.tokens:
            assert s.generated_text[t.start:t.end] == t.text[len(t.text) - (t.end - t.start):]
    assert "enlarged." in [t.text.strip() for t in heart.tokens]
    low = bone.low_confidence(0.6)
    assert low and low == sorted(low, key=lambda t: t.prob) and all(t.prob < 0.6 for t in low)
    # the findings in reading order (lungs before the heart), headed by the region
    assert draft.report_text().startswith("Lungs: No nodule.\n\nHeart: The heart is enlarged.")


def test_editing_accepting_resetting_and_regenerating_are_recorded():
    draft = ReportDraft.from_result(make_result(), study())
    assert draft.set_text(0, "The heart is mildly enlarged.")
    assert not draft.set_text(0, "The heart is mildly enlarged.")          # no change, no edit
    assert draft.section(0).state == EDITED
    draft.accept(1)
    assert draft.section(1).state == ACCEPTED
    draft.reset(0)
    assert draft.section(0).text == "The heart is enlarged." and draft.section(0).state == GENERATED
    one = ReportDraft.from_result(make_result("The region 0 is bone: Old rib fracture.", {0: "bone"}), study())
    draft.replace_section(one.sections[0])
    assert draft.section(2).text == "Old rib fracture." and draft.section(2).grounding_ok
    assert [e.action for e in draft.edits] == ["edit", "accept", "reset", "regenerate"]
    again = ReportDraft.from_dict(json.loads(json.dumps(draft.to_dict())))
    assert again == draft


def test_autosave_round_trip_keys_and_crash_flag(tmp_path):
    store = DraftStore(tmp_path / "drafts")
    draft = ReportDraft.from_result(make_result(), study(), study_key=study_key(study()))
    draft.set_text(0, "Edited.")
    path = store.save(draft)
    assert path.name == f"{study_key(study())}.json" and "ct_001" not in path.name   # no identifiers in names
    saved = store.load(draft.study_key)
    assert saved.draft == draft and saved.clean is False
    store.mark_clean(draft.study_key)
    assert store.load(draft.study_key).clean is True
    assert study_key(study(seed=2)) != draft.study_key                       # other voxels, other key
    assert study_key(study(source="/elsewhere/copy.nii.gz")) == draft.study_key   # same study moved
    assert store.load(study_key(study(seed=2))) is None
    path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(DraftFileError, match=str(path.name)):
        store.load(draft.study_key)


# ---------------------------------------------------------------------------------------------
# the panel, with a real tiny engine (random weights: the text is gibberish, the plumbing is real)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    import torch

    torch.set_num_threads(1)
    from generation_fixtures import tiny_engine

    return tiny_engine()


@pytest.fixture
def panel(qtbot, tmp_path):
    from generation_fixtures import box_study

    from reg2rg.app.display import build_display_volume
    from reg2rg.app.document import ViewerDocument
    from reg2rg.app.draft_panel import DraftPanel
    from reg2rg.app.session import DraftingSession

    doc = ViewerDocument()
    session = DraftingSession(doc, store=DraftStore(tmp_path / "drafts"))
    p = DraftPanel(session)
    p._keep_session = session
    qtbot.addWidget(p)
    p.show()
    st = box_study()
    doc.set_study(st, build_display_volume(st))
    return p


def test_generation_streams_into_the_draft_and_stop_cancels(qtbot, panel, engine, screenshot_dir):
    panel.session.set_engine(engine)
    panel.max_tokens.setValue(16)
    assert [panel.region_list.item(i).text() for i in range(panel.region_list.count())] == ["bone", "heart", "lung"]
    tokens = []
    panel.session.tokenStreamed.connect(tokens.append)
    with qtbot.waitSignal(panel.session.generationFinished, timeout=60000):
        panel.session.generate()
    panel.session.tokenStreamed.disconnect(tokens.append)
    assert panel.session.draft is not None and panel.session.draft.sections
    assert panel.stream.toPlainText() == "".join(t.text for t in tokens)
    assert panel.session.draft.study_key == study_key(panel.session.document.study)
    panel.colour_box.setChecked(True)
    panel.threshold.setValue(95)          # random weights: every word is below 95 %
    ed = next(e for e in panel._editors if any(t.text.strip() for t in e.section.tokens))
    assert ed.editor.extraSelections() and ed.low_label.isVisibleTo(ed)
    panel.grab().save(str(screenshot_dir / "draft_panel.png"))
    # Stop: a long generation ends early with a cancelled result, and the panel is usable again.
    panel.max_tokens.setValue(2000)
    results = []
    panel.session.resultReady.connect(results.append)
    panel.session.tokenStreamed.connect(lambda ev: panel.session.stop() if ev.index == 2 else None)
    with qtbot.waitSignal(panel.session.generationFinished, timeout=60000):
        panel.session.generate()
    assert results and results[0].stop_reason == "cancelled" and len(results[0].tokens) < 50
    assert panel.generate_button.isEnabled() and not panel.stop_button.isEnabled()


def test_engine_error_is_a_message_and_the_draft_stays(qtbot, panel, engine):
    panel.session.set_engine(engine)
    errors = []
    panel.session.errorOccurred.connect(errors.append)
    with qtbot.waitSignal(panel.session.generationFinished, timeout=60000):
        panel.session.generate(regions=["thyroid"])            # no thyroid mask in this study
    assert errors and "thyroid" in errors[0] and "Traceback" not in errors[0]
    assert panel.session.document.study is not None and panel.session.can_generate()


def test_restore_prompt_after_a_crash(qtbot, panel):
    from reg2rg.app.draft_panel import DraftPanel

    st = panel.session.document.study
    draft = ReportDraft.from_result(make_result(), st, study_key=study_key(st))
    draft.set_text(0, "Unsaved work.")
    panel.session.store.save(draft, clean=False)       # what autosave left when the app died
    from reg2rg.app.session import DraftingSession

    other = DraftPanel(DraftingSession(panel.session.document, store=panel.session.store))
    qtbot.addWidget(other)
    panel.session.document.set_study(st, panel.session.document.volume)   # reopen the study
    box = other.restore_box
    assert box is not None and box.isVisible() and "did not close normally" in box.text()
    box.done(box.standardButton(box.button(box.StandardButton.Yes)))
    assert other.session.draft is not None and other.session.draft.section(0).text == "Unsaved work."
    assert other.section_editor(0).editor.toPlainText() == "Unsaved work."


def test_export_text_json_pdf(panel, tmp_path):
    from reg2rg.app.session import NoDraftError

    with pytest.raises(NoDraftError, match="no report draft to export"):
        panel.session.export(tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()
    panel.session.restore(ReportDraft.from_result(make_result(), panel.session.document.study), "")
    txt = panel.session.export(tmp_path / "r.txt")
    assert txt.read_text().startswith("*** AI-generated draft") and "Heart [drafted]" in txt.read_text()
    data = json.loads(panel.session.export(tmp_path / "r.json").read_text())
    assert data["draft"]["sections"][0]["tokens"][0]["prob"] == pytest.approx(1 - 5 / 40)  # 6th word: "The" and "edits" in data
    pdf = panel.session.export(tmp_path / "r.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_confidence_threshold_counts_tooltips_and_grounding_marks(qtbot, panel, screenshot_dir):
    from reg2rg.app.draft_panel import LOW_CONFIDENCE

    panel.resize(560, 900)
    panel.session.restore(ReportDraft.from_result(make_result(), panel.session.document.study), "")
    heart, bone = panel.section_editor(0), panel.section_editor(2)
    # the bone section's text names the lung: marked in its header and its frame
    assert bone.property("grounding_mismatch") and "⚠" in bone.header.text() and "lung" in bone.header.text()
    assert not heart.property("grounding_mismatch") and "⚠" not in heart.header.text()
    panel.colour_box.setChecked(True)
    for pct in (80, 70):
        panel.threshold.setValue(pct)
        low = [t for t in bone.section.tokens if t.prob < pct / 100 and t.text.strip()]
        assert low, "the known-answer probabilities fall below both thresholds in the bone section"
        assert len(bone.editor.extraSelections()) == len(low)
        assert f"{len(low)}&nbsp;{LOW_CONFIDENCE}" in bone.header.text()
        assert bone.low_label.text().startswith(f"{len(low)} word(s) below {pct}%")
        # the lowest-confidence word is listed first
        lowest = min(low, key=lambda t: t.prob)
        assert f"{lowest.text.strip()} ({lowest.prob:.0%})" in bone.low_label.text().split("lowest:")[1].split(",")[0]
    assert panel.threshold_label.text() == "70%"
    lung = panel.section_editor(1)                       # "No nodule." : 65 % and 62 %, both below 70 %
    assert f"2&nbsp;{LOW_CONFIDENCE}" in lung.header.text()
    panel.threshold.setValue(50)
    assert LOW_CONFIDENCE not in lung.header.text()
    panel.colour_box.setChecked(False)
    assert bone.editor.extraSelections() == []
    # hovering a word: its probability and the model's alternatives
    from PySide6.QtWidgets import QApplication

    QApplication.processEvents()                      # lay the section editors out
    tok = heart.section.tokens[2]
    cur = heart.editor.textCursor()
    cur.setPosition(tok.start + 2)
    tip = heart.tooltip_at(heart.editor.cursorRect(cur).center())
    assert tok.text.strip() in tip and f"{tok.prob:.1%}" in tip and "top alternatives" in tip and "1.0%" in tip
    qtbot.wait(50)                                       # let the section layouts settle before the picture
    panel.grab().save(str(screenshot_dir / "draft_confidence.png"))


def test_decoding_settings_reach_the_engine_settings(panel):
    from reg2rg.engine.generation import GenerationSettings

    assert panel.settings() == GenerationSettings(max_new_tokens=500, preset="greedy")     # the default preset
    panel.settings_button.setChecked(True)
    assert panel.settings_box.isVisible() and not panel.temperature.isEnabled()
    panel.strategy.setCurrentText("sample")
    assert panel.temperature.isEnabled() and not panel.num_beams.isEnabled()
    panel.temperature.setValue(0.7)
    panel.top_k.setValue(0)
    panel.top_p.setValue(0.9)
    panel.seed.setValue(1234)
    panel.max_tokens.setValue(64)
    s = panel.settings()
    assert (s.strategy, s.temperature, s.top_k, s.top_p, s.seed, s.max_new_tokens) == ("sample", 0.7, 0, 0.9, 1234, 64)
    s.validate()
    panel.seed.setValue(-1)
    assert panel.settings().seed is None and panel.seed.text() == "random"
    panel.strategy.setCurrentText("beam")
    panel.num_beams.setValue(3)
    assert panel.settings().num_beams == 3 and panel.settings().strategy == "beam"


def test_published_decoding_preset_follows_the_models_llama_folder(qtbot, panel, tmp_path, screenshot_dir):
    import json

    from reg2rg.app.generation import ModelChoice

    model = tmp_path / "model"
    (model / "llm").mkdir(parents=True)
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1, "eos_token_id": 2}
    (model / "llm" / "generation_config.json").write_text(json.dumps(config))
    panel.session.set_model(ModelChoice("folder", str(model)))
    panel.settings_button.setChecked(True)
    panel.decoding_preset.setCurrentText("published")
    s = panel.settings()
    assert (s.preset, s.strategy, s.temperature, s.top_k, s.top_p, s.seed, s.max_new_tokens) == \
        ("published", "sample", 0.6, 30, 0.9, 20, 500)
    assert panel.temperature.isEnabled() and "published (sample)" in panel.settings_button.text()
    panel.settings_box.grab().save(str(screenshot_dir / "decoding_published_preset.png"))
    panel.top_p.setValue(0.8)                             # any edit: the settings are no longer the preset
    assert panel.decoding_preset.currentText() == "custom" and panel.settings().preset is None
    panel.decoding_preset.setCurrentText("greedy")
    assert panel.settings().strategy == "greedy" and panel.settings().preset == "greedy"
    # a config the decoder cannot follow: a message, and the settings stay the user's
    (model / "llm" / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    with qtbot.waitSignal(panel.session.errorOccurred, timeout=5000) as blocker:
        panel.decoding_preset.setCurrentText("published")
    assert "repetition_penalty=1.3" in blocker.args[0]
    assert panel.decoding_preset.currentText() == "custom" and panel.settings().strategy == "greedy"


def test_sampling_with_a_seed_is_reproducible_through_the_panel(qtbot, panel, engine):
    panel.session.set_engine(engine)
    panel.strategy.setCurrentText("sample")
    panel.seed.setValue(7)
    panel.max_tokens.setValue(10)
    texts = []
    for _ in range(2):
        with qtbot.waitSignal(panel.session.generationFinished, timeout=60000):
            panel.session.generate(regions=["heart"])
        texts.append(panel.stream.toPlainText())
        assert panel.session.draft.settings["seed"] == 7 and panel.session.draft.settings["strategy"] == "sample"
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("what", ["missing", "broken", "published", "truncated"])
def test_model_load_errors_name_the_folder_and_the_app_stays_usable(qtbot, panel, tmp_path, what, engine):
    from reg2rg.app.generation import ModelChoice

    if what == "truncated":               # issue 17: a truncated weights file was a traceback dialog
        import bad_inputs

        from reg2rg.engine.checkpoint import save_pretrained

        good = save_pretrained(engine.model, engine.tokenizer, tmp_path / "good")
        choice = ModelChoice("folder", str(bad_inputs.truncated_vision_weights(Path(good), tmp_path)))
    elif what == "missing":
        choice = ModelChoice("folder", str(tmp_path / "no_such_model"))
    elif what == "broken":
        (tmp_path / "broken_model").mkdir()
        (tmp_path / "broken_model" / "config.json").write_text("{ not json", encoding="utf-8")
        choice = ModelChoice("folder", str(tmp_path / "broken_model"))
    else:
        choice = ModelChoice("published", checkpoint=str(tmp_path / "reg2rg.pth"), llm_path=str(tmp_path / "llama"))
    panel.session.set_model(choice)
    label = panel.model_label.text()
    assert label.startswith(f"Model: {choice.describe()} ") and "not validated" in label
    errors = []
    panel.session.errorOccurred.connect(errors.append)
    panel.session.generate()
    qtbot.waitUntil(lambda: bool(errors), timeout=30000)
    name = {"missing": "no_such_model", "broken": "broken_model", "published": "reg2rg.pth",
            "truncated": "vision.safetensors"}[what]
    assert name in errors[0] and "Could not load the model" in errors[0] and "Traceback" not in errors[0]
    assert "SafetensorError" not in errors[0].split(":")[0]
    assert panel.session.engine is None and panel.session.can_generate() and panel.generate_button.isEnabled()
    assert panel.session.document.study is not None
