"""Gather fusion == the published one-hot x table product; batched encoding == one-at-a-time (docs/reproduction.md §2, §7)."""

import random

import pytest
import torch
import torch.nn.functional as F

from reg2rg.engine.model.config import Reg2RGConfig
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.tokens import PROMPT_INSTRUCTION, build_example, build_prompt_ids, train_tokenizer

WORDS = "the lung is clear no nodule heart normal size pleural effusion bone lesion region report".split()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(200)] + [PROMPT_INSTRUCTION]
    tok = train_tokenizer(texts + list(REGIONS), 300)
    model = Reg2RG.from_config(Reg2RGConfig.preset("tiny"), tok).eval()
    return model, tok


# sample -> {slot: area}; different region sets and orders, one sample without regions
BATCH = [{0: "heart", 1: "lung", 2: "bone"}, {0: "abdomen"}, {}, {1: "thyroid", 0: "lung"}]


def make_batch(model, tok):
    H, W, D = model.config.input_size
    g = torch.Generator().manual_seed(1)
    images = torch.rand(len(BATCH), 3, H, W, D, generator=g)
    # per (sample, area) volumes, as the reference's dict of region tensors would hold them
    region_vol = {(b, a): torch.rand(3, H, W, D, generator=g) for b, s in enumerate(BATCH) for a in s.values()}
    region_msk = {(b, a): (torch.rand(1, H, W, D, generator=g) > 0.5).float() for b, a in region_vol}
    flat = [(b, j, a) for b, s in enumerate(BATCH) for j, a in sorted(s.items(), reverse=True)]  # any order
    region_images = torch.stack([region_vol[(b, a)] for b, _, a in flat])
    region_masks = torch.stack([region_msk[(b, a)] for b, _, a in flat])
    region_sample = torch.tensor([b for b, _, _ in flat])
    region_slot = torch.tensor([j for _, j, _ in flat])
    prompts = [build_prompt_ids(tok, len(s), model.special) for s in BATCH]
    prompts[0] = prompts[0] + build_example(tok, [("heart", "<image1> text")], 900, model.special, pad=False)["input_ids"].tolist()[-6:]
    T = max(map(len, prompts))
    ids = torch.zeros(len(BATCH), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    return ids, images, region_vol, region_msk, region_images, region_masks, region_sample, region_slot


def reference_visual(layer, volume, mask=None):
    """The reference's path for ONE volume: ViT -> perceiver -> fc (+ mask ViT -> mean -> mask_fc)."""
    tokens = layer.fc(layer.perceiver(layer.vision_encoder(volume[None])))[0]            # (L, hidden)
    if mask is None:
        return tokens
    m = layer.mask_fc(layer.mask_encoder(mask[None]).mean(dim=1))                        # (1, hidden)
    return torch.cat([tokens, m], dim=0)                                                  # (L+1, hidden)


def reference_embeds(model, ids, global_tokens, region_tokens):
    """Published one-hot x [text table; image/region marker weights; global; 33-per-slot] per sample."""
    layer, L, R = model.embedding_layer, model.config.num_latents, model.config.num_regions
    out = []
    for b in range(ids.shape[0]):
        slots = torch.zeros(R * (L + 1), layer.hidden_size)
        for j, area in BATCH[b].items():
            slots[j * (L + 1):(j + 1) * (L + 1)] = region_tokens[(b, area)]
        table = torch.cat([layer.weight, layer.image_token_weight, layer.region_token_weight,
                           global_tokens[b], slots], dim=0)
        out.append(F.one_hot(ids[b], table.shape[0]).to(table.dtype) @ table)
    return torch.stack(out)


@torch.no_grad()
def test_gather_equals_one_hot_product(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, images, _, _, r_img, r_msk, r_sample, r_slot = make_batch(model, tok)
    visual = model.encode_visual(images, r_img, r_msk)
    ours = model.embed_inputs(ids, images, r_img, r_msk, r_sample, r_slot, visual=visual)
    region_tokens = {(int(b), BATCH[int(b)][int(j)]): visual.region_tokens[n]
                     for n, (b, j) in enumerate(zip(r_sample, r_slot))}
    ref = reference_embeds(model, ids, visual.global_tokens, region_tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-6
    # absent slots really are zero rows, and text rows are the LLM's own embedding
    absent = torch.full((len(BATCH), 1), model.special.region_tokens(5)[2])   # slot 5 is empty everywhere
    zeros = model.embed_inputs(absent, images, r_img, r_msk, r_sample, r_slot, visual=visual)
    assert zeros.abs().max() == 0
    emb = model.lang_model.get_input_embeddings().weight
    assert model.embedding_layer.weight is emb
    assert torch.equal(ours[2][ids[2] < model.special.vocab_size], emb[ids[2][ids[2] < model.special.vocab_size]])


@torch.no_grad()
def test_batched_encoding_equals_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, images, region_vol, region_msk, r_img, r_msk, r_sample, r_slot = make_batch(model, tok)
    layer = model.embedding_layer
    global_tokens = torch.stack([reference_visual(layer, images[b]) for b in range(len(BATCH))])
    region_tokens = {k: reference_visual(layer, region_vol[k], region_msk[k]) for k in region_vol}
    ref = reference_embeds(model, ids, global_tokens, region_tokens)
    ours = model.embed_inputs(ids, images, r_img, r_msk, r_sample, r_slot)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_forward_loss_is_reference_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    H, W, D = model.config.input_size
    exs = [build_example(tok, [("lung", "clear lung."), ("heart", "normal heart.")], 500, model.special),
           build_example(tok, [("bone", "no bone lesion.")], 500, model.special)]
    ids = torch.stack([e["input_ids"] for e in exs])
    labels = torch.stack([e["labels"] for e in exs])
    mask = torch.stack([e["attention_mask"] for e in exs])
    g = torch.Generator().manual_seed(2)
    images, r_img = torch.rand(2, 3, H, W, D, generator=g), torch.rand(3, 3, H, W, D, generator=g)
    r_msk = torch.ones(3, 1, H, W, D)
    with torch.no_grad():
        out = model(ids, mask, labels, images, r_img, r_msk, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    # HF causal-LM loss: shift by one, mean CE over labels != -100
    logits, target = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = target != -100
    expected = F.cross_entropy(logits[keep].float(), target[keep])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    pred = logits.argmax(-1)
    assert out.token_accuracy.item() == pytest.approx(((pred == target) & keep).sum().item() / keep.sum().item())
    # a batch of one gives the same loss for that sample
    with torch.no_grad():
        one = model(ids[1:], mask[1:], labels[1:], images[1:], r_img[2:], r_msk[2:], torch.tensor([0]),
                    torch.tensor([0]))
    t1 = labels[1, 1:]
    exp1 = F.cross_entropy(out.logits[1, :-1][t1 != -100], t1[t1 != -100])
    torch.testing.assert_close(one.loss, exp1, atol=1e-4, rtol=1e-4)


def test_training_step_updates_trainable_parts(model_and_tokenizer):
    _, tok = model_and_tokenizer
    torch.manual_seed(0)
    config = Reg2RGConfig.preset("tiny")
    config.gradient_checkpointing = True      # published setting: needs input-embedding grads to reach LoRA
    model = Reg2RG.from_config(config, tok).train()
    H, W, D = model.config.input_size
    ex = build_example(tok, [("lung", "clear lung.")], 450, model.special)
    out = model(ex["input_ids"][None], ex["attention_mask"][None], ex["labels"][None], torch.rand(1, 3, H, W, D),
                torch.rand(1, 3, H, W, D), torch.ones(1, 1, H, W, D), torch.tensor([0]), torch.tensor([0]))
    out.loss.backward()
    layer = model.embedding_layer
    assert layer.perceiver.latents.grad is not None and layer.fc.weight.grad is not None
    assert layer.mask_fc.weight.grad is not None and layer.region_token_weight.grad is not None
    assert all(p.grad is None for p in layer.vision_encoder.parameters())  # frozen
    lora = [p for n, p in model.lang_model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert not layer.weight.requires_grad   # base LLM embedding frozen under LoRA


def test_bad_slots_are_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    H, W, D = model.config.input_size
    ids = torch.tensor([build_prompt_ids(tok, 1, model.special)])
    args = (ids, torch.rand(1, 3, H, W, D), torch.rand(2, 3, H, W, D), torch.ones(2, 1, H, W, D))
    with pytest.raises(ValueError, match="same slot"):
        model.embed_inputs(*args, torch.tensor([0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="region_slot"):
        model.embed_inputs(*args, torch.tensor([0, 0]), torch.tensor([0, 10]))
