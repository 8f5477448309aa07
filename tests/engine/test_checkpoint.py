"""Our checkpoint folder, the published checkpoint names, RadFM files and safe loading."""

import os
import random
from collections import OrderedDict

import pytest
import torch

from reg2rg.engine.checkpoint import (CheckpointError, import_published, import_radfm, load_pretrained,
                                      save_pretrained)
from reg2rg.engine.model.config import Reg2RGConfig
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.tokens import PROMPT_INSTRUCTION, build_example, train_tokenizer

WORDS = "the lung is clear no nodule heart normal size pleural effusion bone lesion region report".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(200)] + [PROMPT_INSTRUCTION, *REGIONS]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 300, out)
    return out


def fresh_tokenizer(tokenizer_dir):
    from reg2rg.engine.tokens import load_tokenizer
    return load_tokenizer(tokenizer_dir)


def build(tokenizer_dir, seed, **overrides):
    torch.manual_seed(seed)
    config = Reg2RGConfig.preset("tiny")
    for k, v in overrides.items():
        setattr(config, k, v)
    tok = fresh_tokenizer(tokenizer_dir)
    model = Reg2RG.from_config(config, tok)
    # LoRA B starts at zero; make it matter so a lost adapter would change the logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), tok


def batch(model, tok):
    H, W, D = model.config.input_size
    g = torch.Generator().manual_seed(3)
    ex = build_example(tok, [("lung", "clear lung."), ("heart", "normal heart.")], 450, model.special)
    return dict(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None],
                images=torch.rand(1, 3, H, W, D, generator=g), region_images=torch.rand(2, 3, H, W, D, generator=g),
                region_masks=(torch.rand(2, 1, H, W, D, generator=g) > 0.5).float(),
                region_sample=torch.tensor([0, 0]), region_slot=torch.tensor([1, 0]))


@torch.no_grad()
def logits(model, tok):
    return model(**batch(model, tok)).logits


@pytest.mark.parametrize("train_llm", ["lora", "full"])
def test_save_load_round_trip_identical_logits(tokenizer_dir, tmp_path, train_llm):
    model, tok = build(tokenizer_dir, 0, train_llm=train_llm)
    before = logits(model, tok)
    out = save_pretrained(model, tok, tmp_path / "ckpt")
    names = set(os.listdir(out))
    assert {"config.json", "vision.safetensors", "llm", "tokenizer"} <= names
    assert ("adapter" in names) == (train_llm == "lora")
    if train_llm == "lora":
        assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    loaded, tok2 = load_pretrained(out)
    assert not loaded.training and len(tok2) == len(tok)
    torch.testing.assert_close(logits(loaded, tok2), before, atol=0, rtol=0)
    # the bundled LLM is a plain LLaMA folder any HF loader can read
    from transformers import LlamaForCausalLM
    plain = LlamaForCausalLM.from_pretrained(os.path.join(out, "llm"), local_files_only=True)
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())


def test_load_names_missing_files(tokenizer_dir, tmp_path):
    model, tok = build(tokenizer_dir, 0)
    out = save_pretrained(model, tok, tmp_path / "ckpt")
    os.remove(os.path.join(out, "vision.safetensors"))
    with pytest.raises(CheckpointError, match="vision.safetensors"):
        load_pretrained(out)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nowhere")


def published_names(cfg: Reg2RGConfig, n_llm_layers: int, base_layer: bool) -> list[str]:
    """State-dict names of the published checkpoint, written out from docs/reproduction.md §1."""
    names = ["embedding_layer.weight", "embedding_layer.image_token_weight", "embedding_layer.region_token_weight"]
    for enc, depth in (("vision_encoder", cfg.vision.depth), ("mask_encoder", cfg.mask_encoder.depth)):
        p = f"embedding_layer.{enc}."
        names += [f"{p}to_patch_embedding.{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")]
        names += [f"{p}pos_embedding.{t}.weight" for t in ("row_embed", "col_embed", "dep_embed")]
        for i in range(depth):
            l = f"{p}transformer.layers.{i}."
            names += [l + "0.norm.weight", l + "0.norm.bias", l + "0.fn.to_qkv.weight", l + "0.fn.to_out.0.weight",
                      l + "0.fn.to_out.0.bias", l + "1.norm.weight", l + "1.norm.bias", l + "1.fn.net.0.weight",
                      l + "1.fn.net.0.bias", l + "1.fn.net.3.weight", l + "1.fn.net.3.bias"]
    p = "embedding_layer.perceiver."
    names.append(p + "latents")
    for i in range(cfg.perceiver.depth):
        l = f"{p}layers.{i}."
        names += [l + f"0.{n}.{w}" for n in ("norm_media", "norm_latents") for w in ("weight", "bias")]
        names += [l + f"0.{n}.weight" for n in ("to_q", "to_kv", "to_out")]
        names += [l + "1.0.weight", l + "1.0.bias", l + "1.1.weight", l + "1.3.weight"]
    names += [p + "norm.weight", p + "norm.bias"]
    names += [f"embedding_layer.{fc}.{w}" for fc in ("fc", "mask_fc") for w in ("weight", "bias")]
    m = "lang_model.base_model.model."
    names += [m + "model.embed_tokens.weight", m + "model.norm.weight", m + "lm_head.weight"]
    for i in range(n_llm_layers):
        l = f"{m}model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if proj in ("q_proj", "v_proj"):
                names.append(l + f"self_attn.{proj}." + ("base_layer.weight" if base_layer else "weight"))
                names += [l + f"self_attn.{proj}.lora_{ab}.default.weight" for ab in "AB"]
            else:
                names.append(l + f"self_attn.{proj}.weight")
        names += [l + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        names += [l + "input_layernorm.weight", l + "post_attention_layernorm.weight"]
    return names


@pytest.mark.parametrize("base_layer", [True, False])
def test_import_published_names_reproduces_logits(tokenizer_dir, tmp_path, base_layer):
    source, tok = build(tokenizer_dir, 0)
    target, _ = build(tokenizer_dir, 1)
    src = source.state_dict()
    layers = source.config.llm_config["num_hidden_layers"]
    state = OrderedDict()
    for name in published_names(source.config, layers, base_layer):
        ours = name if name in src else name.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(
            ".v_proj.weight", ".v_proj.base_layer.weight")
        state[name] = src[ours].clone()
    path = tmp_path / "reg2rg_published.pth"
    torch.save(state, path)
    assert not torch.equal(logits(target, tok), logits(source, tok))
    report = import_published(target, path)
    assert report.complete, (report.missing, report.unexpected)
    torch.testing.assert_close(logits(target, tok), logits(source, tok), atol=0, rtol=0)
    # the rotary inv_freq buffers transformers 4.28 saved are not an error (the model computes them)
    rotary = "lang_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"
    report = import_published(target, {**state, rotary: torch.ones(4)})
    assert report.complete and report.buffers == [rotary]


def test_import_published_is_strict(tokenizer_dir, tmp_path):
    """A wrong file must not load as partly random weights: missing keys and unexpected non-buffer keys
    are refused with both lists, the model stays as it was; strict=False loads and reports them."""
    source, tok = build(tokenizer_dir, 0)
    target, _ = build(tokenizer_dir, 1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["embedding_layer.unknown"] = torch.zeros(1)
    del state["embedding_layer.fc.bias"]
    path = tmp_path / "reg2rg_published.pth"
    torch.save(state, path)
    before = logits(target, tok)
    with pytest.raises(CheckpointError) as info:
        import_published(target, path)
    message = str(info.value)
    assert message.startswith(str(path)) and "--non-strict" in message
    assert "1 model weight(s) missing from the file: embedding_layer.fc.bias" in message
    assert "1 key(s) in the file that the model does not have: embedding_layer.unknown" in message
    torch.testing.assert_close(logits(target, tok), before, atol=0, rtol=0)      # nothing was loaded
    report = import_published(target, path, strict=False)
    assert report.unexpected == ["embedding_layer.unknown"] and report.missing == ["embedding_layer.fc.bias"]
    assert torch.equal(target.embedding_layer.fc.weight, source.embedding_layer.fc.weight)
    # a long list is cut with a count
    many = {k: v for k, v in state.items() if not k.startswith("embedding_layer.vision_encoder.")}
    with pytest.raises(CheckpointError, match=r"model weight\(s\) missing from the file: .*\(\+\d+ more\)"):
        import_published(target, many)


def test_import_radfm_files(tokenizer_dir, tmp_path):
    source, tok = build(tokenizer_dir, 0)
    target, _ = build(tokenizer_dir, 1)
    torch.save(source.embedding_layer.vision_encoder.state_dict(), tmp_path / "RadFM_vit3d.pth")
    torch.save({"perceiver": source.embedding_layer.perceiver.state_dict(), "fc": {"weight": torch.zeros(2, 2)}},
               tmp_path / "RadFM_perceiver_fc.pth")
    import_radfm(target, tmp_path / "RadFM_vit3d.pth", tmp_path / "RadFM_perceiver_fc.pth")
    for a, b in ((source.embedding_layer.vision_encoder, target.embedding_layer.vision_encoder),
                 (source.embedding_layer.perceiver, target.embedding_layer.perceiver)):
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), n
    torch.save({"perceiver": {"latents": torch.zeros(3, 3)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth"):
        import_radfm(target, perceiver_fc_path=tmp_path / "bad.pth")


class NotATensor:
    pass


def test_pickled_code_is_refused(tokenizer_dir, tmp_path):
    target, _ = build(tokenizer_dir, 1)
    path = tmp_path / "evil.pth"
    torch.save({"embedding_layer.fc.bias": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        import_published(target, path)


def test_lora_on_external_llama_folder(tokenizer_dir, tmp_path):
    """The published layout: base LLaMA from a local folder, only the adapter saved with the checkpoint."""
    from reg2rg.engine.model.llm import base_llama
    fresh, tok = build(tokenizer_dir, 0, train_llm="full")
    llama_dir = tmp_path / "llama"
    base_llama(fresh.lang_model).save_pretrained(llama_dir)
    model, tok = build(tokenizer_dir, 0, llm_path=str(llama_dir), llm_config=None)
    before = logits(model, tok)
    out = save_pretrained(model, tok, tmp_path / "ckpt")
    assert not os.path.exists(os.path.join(out, "llm")) and os.path.isdir(os.path.join(out, "adapter"))
    loaded, tok2 = load_pretrained(out)
    torch.testing.assert_close(logits(loaded, tok2), before, atol=0, rtol=0)
    os.rename(llama_dir, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="llm_path"):
        load_pretrained(out)
    loaded, tok2 = load_pretrained(out, llm_path=tmp_path / "moved")
    torch.testing.assert_close(logits(loaded, tok2), before, atol=0, rtol=0)
