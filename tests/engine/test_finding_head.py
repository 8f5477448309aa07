"""The optional finding head (not in the published model): its loss, its absence by default, save/load."""

import math

import pytest
import torch

from reg2rg.engine.checkpoint import load_pretrained, save_pretrained
from reg2rg.engine.model.config import ConfigError, Reg2RGConfig
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.tokens import build_example, train_tokenizer

LABELS = ("Lung nodule", "Pleural effusion", "Cardiomegaly")


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["no nodule in the lung", "a small pleural effusion on the left", "the heart is enlarged"] * 30
    return train_tokenizer(texts, 200)


def _config(**extra) -> Reg2RGConfig:
    config = Reg2RGConfig.preset("tiny")
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def _batch(model, tokenizer):
    H, W, D = model.config.input_size
    g = torch.Generator().manual_seed(3)
    example = build_example(tokenizer, [("lung", "a small pleural effusion on the left"), ("heart", "no nodule")],
                            900, model.special, pad=False)
    return dict(
        input_ids=example["input_ids"][None], attention_mask=example["attention_mask"][None],
        labels=example["labels"][None], images=torch.rand(1, 3, H, W, D, generator=g),
        region_images=torch.rand(2, 3, H, W, D, generator=g), region_masks=(torch.rand(2, 1, H, W, D, generator=g) > 0.5).float(),
        region_sample=torch.tensor([0, 0]), region_slot=torch.tensor([0, 1]))


def _reference_bce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for z, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-z))
        total -= t * math.log(p) + (1 - t) * math.log(1 - p)
    return total / logits.numel()


def test_published_configs_have_no_finding_head(tokenizer):
    model = Reg2RG.from_config(_config(), tokenizer)
    assert model.embedding_layer.finding_head is None
    assert not any("finding_head" in name for name in model.state_dict())
    with pytest.raises(RuntimeError, match="no finding head"):
        model.embedding_layer.finding_logits(model.encode_visual(*[_batch(model, tokenizer)[k] for k in
                                                                    ("images", "region_images", "region_masks")]))
    with pytest.raises(ConfigError, match="needs finding_labels"):
        _config(finding_loss_weight=1.0).validate(require_llm=False)
    with pytest.raises(ConfigError, match="named twice"):
        _config(finding_labels=("Cardiomegaly", "Cardiomegaly")).validate(require_llm=False)


def test_loss_adds_the_weighted_bce_of_the_head_on_each_volumes_mean_token(tokenizer):
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(finding_labels=LABELS, finding_loss_weight=0.5), tokenizer).eval()
    batch = _batch(model, tokenizer)
    region_targets = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    global_targets = torch.tensor([[0.0, 1.0, 0.0]])
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, finding_targets=region_targets, global_finding_targets=global_targets)
        visual = model.encode_visual(batch["images"], batch["region_images"], batch["region_masks"])
    head = model.embedding_layer.finding_head
    # reference: each token divided by its root mean square (as LLaMA's RMSNorm, without its weight), then the
    # mean over the global latents / over a region's latents AND its mask token, then the linear head
    def rms(t):
        return t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    means = torch.cat([rms(visual.global_tokens).mean(1), rms(visual.region_tokens).mean(1)])
    logits = means @ head.weight.T + head.bias
    expected = _reference_bce(logits, torch.cat([global_targets, region_targets]))
    assert out.finding_loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(out.finding_logits, logits, atol=1e-6)
    assert out.lm_loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.5 * expected, rel=1e-5)
    g, r = model.finding_probabilities(visual)
    assert torch.allclose(torch.cat([g, r]), logits.sigmoid(), atol=1e-6)


def test_finding_head_is_saved_and_loaded_with_the_model(tokenizer, tmp_path):
    torch.manual_seed(1)
    model = Reg2RG.from_config(_config(finding_labels=LABELS, finding_loss_weight=1.0), tokenizer)
    with torch.no_grad():
        model.embedding_layer.finding_head.weight.normal_()
    save_pretrained(model, tokenizer, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.finding_labels == LABELS and loaded.config.finding_loss_weight == 1.0
    assert torch.equal(loaded.embedding_layer.finding_head.weight, model.embedding_layer.finding_head.weight)


def test_focal_token_loss_is_the_published_cross_entropy_at_gamma_0_and_reweights_above(tokenizer):
    from reg2rg.engine.model.reg2rg import focal_token_loss

    torch.manual_seed(2)
    model = Reg2RG.from_config(_config(), tokenizer).eval()
    batch = _batch(model, tokenizer)
    with torch.no_grad():
        out = model(**batch)
    assert focal_token_loss(out.logits, batch["labels"], 0.0).item() == pytest.approx(out.loss.item(), rel=1e-5)
    # reference, token by token: -(1 - p)^2 log p over the labelled next tokens
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    terms = []
    for row, t in zip(logits, labels.tolist()):
        if t == -100:
            continue
        p = torch.softmax(row.double(), -1)[t].item()
        terms.append(-((1 - p) ** 2) * math.log(p))
    assert focal_token_loss(out.logits, batch["labels"], 2.0).item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    focal = Reg2RG.from_config(_config(token_focal_gamma=2.0), tokenizer).eval()
    focal.load_state_dict(model.state_dict())
    with torch.no_grad():
        out2 = focal(**batch)
    assert out2.lm_loss.item() == pytest.approx(out.loss.item(), rel=1e-5)      # logged: the published loss
    assert out2.loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)  # optimised: the focal loss


def test_visual_only_stage_trains_the_encoders_and_head_without_running_the_llm(tokenizer):
    torch.manual_seed(4)
    model = Reg2RG.from_config(_config(finding_labels=LABELS, finding_loss_weight=3.0, lm_loss_weight=0.0), tokenizer)
    batch = _batch(model, tokenizer)
    targets = dict(finding_targets=torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), global_finding_targets=torch.tensor([[1.0, 0, 1.0]]))
    calls = []
    hook = model.lang_model.register_forward_hook(lambda *_: calls.append(1))
    out = model(**batch, **targets)
    hook.remove()
    assert calls == [] and out.logits is None and math.isnan(float(out.token_accuracy))
    assert out.loss.item() == pytest.approx(3.0 * out.finding_loss.item(), rel=1e-6)
    out.loss.backward()
    for part in ("perceiver", "fc", "mask_encoder", "mask_fc"):     # (the tiny preset freezes the ViT)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model.embedding_layer, part).parameters()), part
    assert model.embedding_layer.finding_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.lang_model.parameters())
    # without targets (generation, scoring) the model is the usual one
    assert model(**batch).logits is not None


def test_the_engine_reports_the_heads_finding_probabilities_per_volume(tokenizer):
    from generation_fixtures import box_study

    from reg2rg.engine.generation import ReportEngine
    from reg2rg.engine.preprocess import preprocess

    torch.manual_seed(5)
    model = Reg2RG.from_config(_config(finding_labels=LABELS), tokenizer).eval()
    study = box_study()
    prepared = ReportEngine(model, tokenizer).prepare(study)
    regions = list(prepared.slot_regions.values())
    assert list(prepared.finding_probabilities) == ["global", *regions]
    inputs = preprocess(study, model.config.input_size)
    with torch.no_grad():
        visual = model.encode_visual(inputs.image[None], torch.stack([inputs.regions[r] for r in regions]),
                                     torch.stack([inputs.masks[r] for r in regions]))
        g, r = model.finding_probabilities(visual)
    for row, name in zip(torch.cat([g, r]), ["global", *regions]):
        got = prepared.finding_probabilities[name]
        assert list(got) == list(LABELS)
        assert torch.allclose(torch.tensor(list(got.values())), row, atol=1e-5)
    # a model without a head has none
    assert ReportEngine(Reg2RG.from_config(_config(), tokenizer).eval(), tokenizer).prepare(study).finding_probabilities is None


def test_lm_loss_weight_scales_the_language_part_only(tokenizer):
    torch.manual_seed(6)
    full = Reg2RG.from_config(_config(finding_labels=LABELS, finding_loss_weight=2.0), tokenizer).eval()
    half = Reg2RG.from_config(_config(finding_labels=LABELS, finding_loss_weight=2.0, lm_loss_weight=0.5), tokenizer).eval()
    half.load_state_dict(full.state_dict())
    batch = _batch(full, tokenizer)
    targets = dict(finding_targets=torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), global_finding_targets=torch.tensor([[1.0, 0, 1.0]]))
    with torch.no_grad():
        a, b = full(**batch, **targets), half(**batch, **targets)
    assert b.lm_loss.item() == pytest.approx(a.lm_loss.item(), rel=1e-6)          # logged unweighted
    assert b.loss.item() == pytest.approx(0.5 * a.lm_loss.item() + 2.0 * a.finding_loss.item(), rel=1e-5)


def test_finding_conditioning_adds_each_regions_calls_to_its_tokens(tokenizer):
    """With finding_conditioning the LLM's region tokens are the visual tokens + calls @ finding_embedding,
    the calls being the head's own probabilities at inference (computed by hand here)."""
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(finding_labels=LABELS, finding_conditioning=True), tokenizer).eval()
    batch = _batch(model, tokenizer)
    args = [batch[k] for k in ("input_ids", "images", "region_images", "region_masks", "region_sample", "region_slot")]
    layer = model.embedding_layer
    with torch.no_grad():
        visual = model.encode_visual(*args[1:4])
        probs = layer.finding_logits(visual)[1].sigmoid()                      # (N, K)
        embeds = model.embed_inputs(*args, visual=visual)
        calls = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        given = model.embed_inputs(*args, visual=visual, region_calls=calls)
    ids = batch["input_ids"][0]
    start = model.special.first_image_token
    for n, slot in enumerate(batch["region_slot"].tolist()):
        rows = (ids >= start).nonzero()[:, 0]
        table_rows = ids[rows] - model.special.vocab_size
        first = 4 + model.config.num_latents + slot * model.config.tokens_per_region
        in_slot = rows[(table_rows >= first) & (table_rows < first + model.config.tokens_per_region)]
        assert len(in_slot) == model.config.tokens_per_region
        token = table_rows[(table_rows >= first) & (table_rows < first + model.config.tokens_per_region)] - first
        expected = visual.region_tokens[n, token] + probs[n] @ layer.finding_embedding
        torch.testing.assert_close(embeds[0, in_slot], expected)
        forced = visual.region_tokens[n, token] + calls[n] @ layer.finding_embedding
        torch.testing.assert_close(given[0, in_slot], forced)
    # the global image's tokens are left as they are
    table_rows = ids - model.special.vocab_size
    global_rows = (ids >= start) & (table_rows >= 4) & (table_rows < 4 + model.config.num_latents)
    assert global_rows.sum() == model.config.num_latents
    torch.testing.assert_close(embeds[0, global_rows], visual.global_tokens[0, table_rows[global_rows] - 4])


def test_finding_conditioning_is_off_by_default_and_needs_labels(tokenizer):
    model = Reg2RG.from_config(_config(), tokenizer)
    assert model.embedding_layer.finding_embedding is None
    assert not any("finding_embedding" in name for name in model.state_dict())
    with pytest.raises(ConfigError, match="needs finding_labels"):
        _config(finding_conditioning=True).validate(require_llm=False)
    with pytest.raises(ConfigError, match="teacher_forcing"):
        _config(finding_labels=LABELS, finding_teacher_forcing=1.5).validate(require_llm=False)
    assert not Reg2RGConfig.preset("reg2rg-7b").finding_conditioning


def test_teacher_forcing_conditions_training_on_the_true_labels_only(tokenizer):
    """finding_teacher_forcing 1: in training the LLM reads the true labels (the loss differs from the one
    with the head's calls); in eval mode the head's calls are used whatever the targets."""
    torch.manual_seed(0)
    config = _config(finding_labels=LABELS, finding_conditioning=True, finding_teacher_forcing=1.0)
    model = Reg2RG.from_config(config, tokenizer)
    model.lang_model.config.attention_dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = _batch(model, tokenizer)
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    glob = torch.tensor([[1.0, 1.0, 1.0]])
    with torch.no_grad():
        model.train()
        forced = model(**batch, finding_targets=targets, global_finding_targets=glob).lm_loss
        model.eval()
        own = model(**batch, finding_targets=targets, global_finding_targets=glob).lm_loss
        own_no_targets = model(**batch).lm_loss
        # the reference: the same embeddings built from the given calls
        visual = model.encode_visual(batch["images"], batch["region_images"], batch["region_masks"])
        embeds = model.embed_inputs(batch["input_ids"], batch["images"], batch["region_images"], batch["region_masks"],
                                    batch["region_sample"], batch["region_slot"], visual=visual, region_calls=targets)
        reference = model.lang_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                     labels=batch["labels"]).loss
    assert forced.item() == pytest.approx(reference.item(), rel=1e-5)
    assert own.item() == pytest.approx(own_no_targets.item(), rel=1e-6)
    assert abs(forced.item() - own.item()) > 1e-4


def test_patch_head_is_the_maximum_over_each_volumes_vit_patches(tokenizer):
    """finding_head_input "patches": per volume, max over its ViT patches of the linear head on each
    RMS-normalised patch feature (checked against a loop over volumes and patches)."""
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(finding_labels=LABELS, finding_head_input="patches"), tokenizer).eval()
    layer = model.embedding_layer
    assert layer.finding_head is None and layer.finding_patch_head is not None
    batch = _batch(model, tokenizer)
    with torch.no_grad():
        visual = model.encode_visual(batch["images"], batch["region_images"], batch["region_masks"])
        global_logits, region_logits = layer.finding_logits(visual)
        volumes = torch.cat([batch["images"], batch["region_images"]])
        expected = []
        for v in volumes:
            patches = layer.vision_encoder.transformer(layer.vision_encoder.embed_patches(v[None]))[0]  # (P, dim)
            per_patch = [layer.finding_patch_head(p / (p.pow(2).mean() + 1e-6).sqrt()) for p in patches]
            expected.append(torch.stack(per_patch).amax(dim=0))
    torch.testing.assert_close(torch.cat([global_logits, region_logits]), torch.stack(expected), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="finding_head_input"):
        _config(finding_labels=LABELS, finding_head_input="voxels").validate(require_llm=False)
