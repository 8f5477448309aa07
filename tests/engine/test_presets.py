"""Run presets (engine/presets.py): the `published` decoding preset reproduces HF generate with the LLaMA
folder's generation_config.json + top_k=30 + seed 20, and the `reference` precision runs the LLM in fp16
with the vision path in fp32 (docs/reproduction.md §5)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from reg2rg.engine.generation import GenerationError, GenerationSettings
from reg2rg.engine.model.llm import base_llama
from reg2rg.engine.presets import (PUBLISHED_SEED, decoding_preset, llm_folder_of, precision_of,
                                   resolve_precision)

from generation_fixtures import box_study, tiny_engine

# what Llama-2-7b-chat-hf's folder carries: sampling on, with its own temperature and top-p
CHAT_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
               "top_p": 0.9, "max_length": 4096, "transformers_version": "4.31.0"}
N = 14


def llama_folder(tmp_path, config: dict | None):
    folder = tmp_path / "llama"
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_published_preset_follows_the_llama_folders_generation_config(tmp_path):
    s = decoding_preset("published", llama_folder(tmp_path, CHAT_CONFIG))
    assert (s.strategy, s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens, s.preset) == \
        ("sample", 0.6, 0.9, 30, PUBLISHED_SEED, 500, "published")
    # a folder without the file: HF's defaults, i.e. greedy (top_k has no effect there)
    s = decoding_preset("published", llama_folder(tmp_path / "plain", None))
    assert s.strategy == "greedy" and s.top_k == 30 and s.preset == "published"
    assert decoding_preset("greedy") == GenerationSettings(preset="greedy")


def test_published_preset_refuses_what_it_cannot_reproduce(tmp_path):
    folder = llama_folder(tmp_path, {**CHAT_CONFIG, "repetition_penalty": 1.2})
    with pytest.raises(GenerationError, match=r"generation_config\.json: sets repetition_penalty=1\.2"):
        decoding_preset("published", folder)
    (folder / "generation_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GenerationError, match=r"generation_config\.json: not a readable JSON"):
        decoding_preset("published", folder)
    with pytest.raises(GenerationError, match="unknown decoding preset"):
        decoding_preset("creative")


def test_published_preset_is_token_identical_to_hf_generate_with_that_config(tmp_path):
    """The reference's call — generate(inputs_embeds, max_new_tokens, top_k=30) on a model whose generation
    config came from the folder, after seeding with 20 — draws exactly the tokens our engine draws."""
    from transformers import GenerationConfig

    engine = tiny_engine()
    study = box_study()
    folder = llama_folder(tmp_path, CHAT_CONFIG)
    settings = dataclasses.replace(decoding_preset("published", folder), max_new_tokens=N)
    ours = engine.draft(study, settings=settings)
    assert ours.seed == PUBLISHED_SEED and len(ours.token_ids) == N
    assert engine.draft(study, settings=settings).token_ids == ours.token_ids      # reproducible
    greedy = engine.draft(study, settings=GenerationSettings(max_new_tokens=N))
    assert greedy.token_ids != ours.token_ids                                      # it really samples

    lm = engine.model.lang_model
    base_llama(lm).generation_config = GenerationConfig.from_pretrained(folder)   # as from_pretrained loads it
    embeds = ours.cache["prepared"].prompt_embeds
    torch.manual_seed(20)
    with torch.no_grad():
        ref = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=N, top_k=30, eos_token_id=engine.eos_token_id, pad_token_id=0)
    assert ref[0].tolist() == ours.token_ids


def test_llm_folder_of_a_model(tmp_path):
    assert llm_folder_of(llm_path=tmp_path / "llama") == tmp_path / "llama"
    assert llm_folder_of().name == "llm"                      # the embedded demo model bundles its LLaMA
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "config.json").write_text(json.dumps({"llm_path": "/models/llama-2-7b-chat"}))
    assert str(llm_folder_of(tmp_path / "lora")) == "/models/llama-2-7b-chat"


def test_precisions_resolve_by_device_and_checkpoint():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, cpu, published=True).name == "fp32"
    assert resolve_precision("auto", cuda, published=True).name == "reference"
    assert resolve_precision("auto", cuda).name == "bf16"
    ref = resolve_precision("fp16", cpu)
    assert ref.name == "reference" and (ref.llm_dtype, ref.vision_dtype) == (torch.float16, torch.float32)
    assert resolve_precision(torch.bfloat16, cpu).vision_dtype == torch.bfloat16
    with pytest.raises(GenerationError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_reference_precision_keeps_the_vision_path_in_fp32_and_drafts():
    """LLM (and the tied text table) in fp16, every vision part in fp32, the prompt handed to the LLM in
    fp16; the vision weights are not rounded through fp16 on the way."""
    engine = tiny_engine()
    model = engine.model
    vision_before = {k: v.clone() for k, v in model.embedding_layer.state_dict().items() if k != "weight"}
    model.set_precision(torch.float16, torch.float32)
    layer = model.embedding_layer
    assert layer.weight is model.lang_model.get_input_embeddings().weight          # still tied
    assert layer.weight.dtype == torch.float16
    for name, p in model.lang_model.named_parameters():
        assert p.dtype == torch.float16, name
    for name, p in layer.named_parameters():
        if name != "weight":
            assert p.dtype == torch.float32, name
    for k, v in layer.state_dict().items():
        if k != "weight":
            assert torch.equal(v, vision_before[k]), k
    assert precision_of(model).name == "reference"

    from reg2rg.engine.generation import ReportEngine

    engine = ReportEngine(model, engine.tokenizer)
    assert engine.precision.describe() == "reference (LLM fp16, vision fp32)"
    result = engine.draft(box_study(), settings=GenerationSettings(max_new_tokens=4))
    prepared = result.cache["prepared"]
    assert prepared.prompt_embeds.dtype == torch.float16 and len(result.token_ids) == 4


def test_fp16_no_longer_casts_the_vision_path(tmp_path):
    """Loading a model folder in fp16 (or `reference`) keeps the vision weights exactly as saved, in fp32."""
    from reg2rg.engine.checkpoint import save_pretrained
    from reg2rg.engine.generation import ReportEngine

    engine = tiny_engine()
    folder = save_pretrained(engine.model, engine.tokenizer, tmp_path / "tiny")
    for name in ("fp16", "float16", "reference"):
        loaded = ReportEngine.load(folder, "cpu", name)
        layer = loaded.model.embedding_layer
        assert layer.fc.weight.dtype == torch.float32 and layer.vision_encoder.transformer.layers[0][0].norm.weight.dtype \
            == torch.float32
        assert torch.equal(layer.fc.weight, engine.model.embedding_layer.fc.weight)
        assert loaded.model.lang_model.get_input_embeddings().weight.dtype == torch.float16
        assert loaded.precision.name == "reference"
    assert ReportEngine.load(folder, "cpu", "bf16").model.embedding_layer.fc.weight.dtype == torch.bfloat16
