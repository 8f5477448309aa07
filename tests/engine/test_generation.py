"""Generation: streaming, cancel, greedy == HF generate, confidence from the same logits, sampling,
beam search, referring, grounding and confidence aggregates (tiny random Reg2RG, CPU)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from reg2rg.engine.confidence import TokenConfidence, sentence_spans
from reg2rg.engine.generation import (
    Decoder,
    EncodingDone,
    EncodingStarted,
    Finished,
    GenerationError,
    GenerationSettings,
    ModelFolderError,
    ReportEngine,
    StreamingDetokenizer,
    TokenEvent,
    ground_sections,
    region_accuracy_of,
    region_confidences,
    resolve_device,
    sentence_confidences,
)

from generation_fixtures import box_study, tiny_engine

N = 24


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return tiny_engine()


@pytest.fixture(scope="module")
def study():
    return box_study()


@pytest.fixture(scope="module")
def greedy(engine, study):
    return list(engine.generate(study, settings=GenerationSettings(max_new_tokens=N)))


def _result(events):
    assert isinstance(events[-1], Finished)
    return events[-1].result


def test_events_stream_in_order_and_concatenate_to_the_final_text(greedy, study):
    kinds = [type(e) for e in greedy]
    assert kinds[0] is EncodingStarted and kinds[1] is EncodingDone and kinds[-1] is Finished
    assert all(k is TokenEvent for k in kinds[2:-1])
    assert greedy[0].regions == tuple(study.regions_present)
    tokens = [e for e in greedy if isinstance(e, TokenEvent)]
    result = _result(greedy)
    assert [e.index for e in tokens] == list(range(N)) and result.stop_reason == "max_new_tokens"
    assert "".join(e.text for e in tokens) == result.text
    for t in result.tokens:
        assert result.text[t.start:t.end] == t.text
    assert [t.token_id for t in result.tokens] == [e.token_id for e in tokens]
    # slots follow the published region order
    assert result.slot_regions == {0: "bone", 1: "heart", 2: "lung"}


def test_greedy_is_token_identical_to_hf_generate_on_inputs_embeds(engine, study, greedy):
    result = _result(greedy)
    prepared = result.cache["prepared"]
    # the prompt embedding is the model's own embed_inputs (computed here without attention capture)
    inputs = prepared.inputs
    slots = [prepared.slot_regions[j] for j in sorted(prepared.slot_regions)]
    with torch.no_grad():
        ref_embeds = engine.model.embed_inputs(
            torch.tensor([prepared.prompt_ids]), inputs.image[None],
            torch.stack([inputs.regions[r] for r in slots]), torch.stack([inputs.masks[r] for r in slots]),
            torch.zeros(len(slots), dtype=torch.long), torch.arange(len(slots)))
    torch.testing.assert_close(prepared.prompt_embeds, ref_embeds, rtol=1e-5, atol=1e-5)
    # HF generate on the same inputs_embeds, greedy (the published preset's sampling: tests/engine/test_presets.py)
    with torch.no_grad():
        ref = engine.model.lang_model.generate(
            inputs_embeds=prepared.prompt_embeds, attention_mask=torch.ones(prepared.prompt_embeds.shape[:2], dtype=torch.long),
            max_new_tokens=N, top_k=30, do_sample=False, eos_token_id=engine.eos_token_id, pad_token_id=0)
    assert ref[0].tolist() == result.token_ids


def test_confidence_equals_softmax_of_a_separate_teacher_forced_pass(engine, greedy):
    result = _result(greedy)
    prepared = result.cache["prepared"]
    ids = torch.tensor([result.token_ids[:-1]])
    with torch.no_grad():
        embeds = torch.cat([prepared.prompt_embeds, engine.model.lang_model.get_input_embeddings()(ids)], dim=1)
        logits = engine.model.lang_model(inputs_embeds=embeds).logits[0]          # (P + N - 1, V)
    P = len(prepared.prompt_ids)
    probs = torch.softmax(logits[P - 1:].double(), dim=-1)                         # (N, V)
    for i, tok in enumerate(result.tokens):
        p = probs[i]
        assert tok.token_id == int(p.argmax())
        assert tok.prob == pytest.approx(float(p[tok.token_id]), abs=1e-5)
        assert tok.entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
        top = p.topk(5)
        assert list(tok.top_ids) == top.indices.tolist()
        np.testing.assert_allclose([q for _, q in tok.top], top.values.numpy(), atol=1e-5)
    assert result.confidence.min_prob == pytest.approx(min(t.prob for t in result.tokens))
    assert result.confidence.mean_prob == pytest.approx(np.mean([t.prob for t in result.tokens]))


def test_cancel_stops_between_tokens(engine, study):
    cancel = threading.Event()
    events = []
    for e in engine.generate(study, settings=GenerationSettings(max_new_tokens=N), cancel=cancel):
        events.append(e)
        assert not torch.is_inference_mode_enabled()     # the consumer's thread is left as it was
        if isinstance(e, TokenEvent) and e.index == 2:
            cancel.set()
    result = _result(events)
    assert result.stop_reason == "cancelled" and result.cancelled
    assert len(result.tokens) == 3
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == result.text


def test_stops_at_eos_like_hf_generate(engine, study, greedy):
    ids = _result(greedy).token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])       # first occurrence at k
    old = engine.eos_token_id
    engine.eos_token_id = ids[k]
    try:
        result = engine.draft(study, settings=GenerationSettings(max_new_tokens=N))
    finally:
        engine.eos_token_id = old
    assert result.stop_reason == "eos" and result.token_ids == ids[: k + 1]
    prepared = result.cache["prepared"]
    with torch.no_grad():
        ref = engine.model.lang_model.generate(inputs_embeds=prepared.prompt_embeds, max_new_tokens=N,
                                               do_sample=False, eos_token_id=ids[k], pad_token_id=0)
    assert ref[0].tolist() == ids[: k + 1]


def test_sampling_is_reproducible_by_seed(engine, study):
    def run(seed):
        s = GenerationSettings(strategy="sample", temperature=1.5, top_k=0, top_p=0.95, seed=seed, max_new_tokens=12)
        return engine.draft(study, settings=s)

    a, b, c = run(7), run(7), run(8)
    assert a.token_ids == b.token_ids and a.seed == 7
    assert a.token_ids != c.token_ids
    drawn = engine.draft(study, settings=GenerationSettings(strategy="sample", max_new_tokens=12))
    again = engine.draft(study, settings=dataclasses.replace(drawn.settings, seed=drawn.seed))
    assert again.token_ids == drawn.token_ids


def test_top_k_one_sampling_is_greedy(engine, study, greedy):
    r = engine.draft(study, settings=GenerationSettings(strategy="sample", top_k=1, seed=3, max_new_tokens=N))
    assert r.token_ids == _result(greedy).token_ids


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_beam_search_matches_hf_beam_search_and_records_the_chosen_beam():
    lm = _tiny_llama()
    embeds = torch.randn(1, 6, 32)
    steps = list(Decoder(lm, lm.get_input_embeddings(), embeds,
                         GenerationSettings(strategy="beam", num_beams=3, max_new_tokens=15), eos_token_id=None))
    with torch.no_grad():
        ref = lm.generate(inputs_embeds=embeds, max_new_tokens=15, num_beams=3, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ids = [s.token_id for s in steps]
    assert ids == ref[0].tolist()
    # the recorded probabilities are those of the chosen beam's own prefix
    with torch.no_grad():
        full = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([ids[:-1]]))], dim=1)
        probs = torch.softmax(lm(inputs_embeds=full).logits[0, 5:].double(), -1)
    np.testing.assert_allclose([s.prob for s in steps], [float(probs[i, t]) for i, t in enumerate(ids)], atol=1e-5)


def test_beam_search_through_the_engine(engine, study):
    r = engine.draft(study, settings=GenerationSettings(strategy="beam", num_beams=2, max_new_tokens=8))
    assert 1 <= len(r.tokens) <= 8 and r.stop_reason in ("eos", "max_new_tokens")
    assert "".join(t.text for t in r.tokens) == r.text


def test_referring_to_a_subset_of_regions(engine, study):
    events = list(engine.generate(study, regions=["Lung", "heart"], settings=GenerationSettings(max_new_tokens=3)))
    result = _result(events)
    assert result.slot_regions == {0: "heart", 1: "lung"}
    assert events[1].prompt_tokens == len(result.prompt_ids)
    with pytest.raises(GenerationError, match="spleen"):
        engine.draft(study, regions=["spleen"])
    with pytest.raises(GenerationError, match="thyroid"):
        engine.draft(study, regions=["thyroid"])        # no mask in this study


@pytest.mark.parametrize("bad", [dict(strategy="nucleus"), dict(max_new_tokens=0), dict(strategy="sample", temperature=0),
                                 dict(top_p=0)])
def test_bad_settings_are_refused(engine, study, bad):
    with pytest.raises(GenerationError):
        list(engine.generate(study, settings=GenerationSettings(**bad)))


def test_streaming_detokenizer_is_exact(engine):
    tok = engine.tokenizer
    text = "The region 1 is heart: No heart abnormality is seen.  Mild changes are noted."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = StreamingDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(p for p, _, _ in pieces) == d.finish() == tok.decode(ids, skip_special_tokens=True)
    assert all(d.text[a:b] == p for p, a, b in pieces)


def test_token_piece_text_is_remembered_and_unchanged(engine):
    """The alternatives' texts are remembered per tokenizer (five per token of every draft): every id
    gives what decoding it alone gives, leading space kept, the second time from the memory."""
    from reg2rg.engine.generation import _PIECE_TEXTS, token_piece_text

    tok = engine.tokenizer
    for i in range(len(tok)):
        text = tok.decode([i], skip_special_tokens=False)
        piece = tok.convert_ids_to_tokens(i)
        spaced = isinstance(piece, str) and piece[:1] in ("\u2581", "\u0120") and not text.startswith(" ")
        assert token_piece_text(tok, i) == (" " + text if spaced else text)
        assert token_piece_text(tok, i) is _PIECE_TEXTS[tok][i]
    assert any(token_piece_text(tok, i).startswith(" ") for i in range(len(tok)))


CRAFTED = ("The region 0 is heart: Normal size. No effusion! The region 1 is lung no nodules seen. "
           "The region 2 is spleen: odd. The region 0 is bone: repeated slot.")


def _fake_tokens(text):
    """One 'token' per word with a known probability."""
    toks, pos = [], 0
    for i, word in enumerate(text.split(" ")):
        start = text.index(word, pos)
        pos = start + len(word)
        toks.append(TokenConfidence(i, i, word, start, pos, prob=0.1 + 0.8 * ((i * 7) % 10) / 10, entropy=float(i),
                                    top=()))
    return toks


def test_grounding_on_crafted_text():
    slot_regions = {0: "heart", 1: "lung", 2: "bone", 3: "pleura"}
    tokens = _fake_tokens(CRAFTED)
    sections = ground_sections(CRAFTED, slot_regions, tokens)
    assert [(s.slot, s.area, s.region, s.grounding_ok) for s in sections] == [
        (0, "heart", "heart", True), (1, "lung", "lung", True), (2, None, "bone", False), (0, "bone", "heart", False)]
    assert sections[1].text == "no nodules seen."           # missing colon tolerated
    # slot 3 never written counts as wrong, the repeated slot 0 is judged by its first section
    assert region_accuracy_of(sections, slot_regions) == pytest.approx(2 / 4)
    assert region_accuracy_of(sections, {}) is None
    # per-region aggregates: region heart collects the bodies of both slot-0 sections
    heart_tokens = [t for t in tokens if any(s.region == "heart" and t.start >= s.body_start and t.end <= s.end
                                             for s in sections)]
    conf = region_confidences(sections, tokens)["heart"]
    assert conf.n_tokens == len(heart_tokens)
    assert conf.min_prob == pytest.approx(min(t.prob for t in heart_tokens))
    assert conf.mean_prob == pytest.approx(np.mean([t.prob for t in heart_tokens]))


def test_sentence_confidence_on_crafted_text():
    tokens = _fake_tokens(CRAFTED)
    sections = ground_sections(CRAFTED, {0: "heart", 1: "lung", 2: "bone"}, tokens)
    sentences = sentence_confidences(CRAFTED, sections, tokens)
    assert [s.text for s in sentences][:3] == ["Normal size.", "No effusion!", "no nodules seen."]
    s = sentences[1]
    words = [t for t in tokens if t.start >= s.start and t.end <= s.end]
    assert s.slot == 0 and s.confidence.min_prob == pytest.approx(min(t.prob for t in words))
    assert sentence_spans("A b. C d.  E") == [(0, 4), (5, 9), (11, 12)]


def test_result_serialises_to_json(greedy):
    import json

    d = json.loads(json.dumps(_result(greedy).to_dict()))
    assert d["slot_regions"] == {"0": "bone", "1": "heart", "2": "lung"}
    assert len(d["tokens"]) == N and set(d["tokens"][0]) >= {"prob", "entropy", "top", "text"}
    assert len(d["tokens"][0]["top"]) == 5


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelFolderError, match="nowhere"):
        ReportEngine.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="config.json"):
        ReportEngine.load(tmp_path / "empty")


def test_auto_device_is_cpu_float32_without_cuda():
    if torch.cuda.is_available():
        assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bf16")[1] is torch.bfloat16
