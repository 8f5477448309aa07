"""``projector_norm="region"`` (issue 12; off in the published preset): fc's input standardised per anatomical
region with statistics fitted on training volumes, saved with the model, used by the engine and by the blind
control (random standardised latents, the masks' own tokens) — each checked against a computation written out here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reg2rg.engine.checkpoint import load_pretrained, save_pretrained
from reg2rg.engine.controls import NOISE_SEED, BlindReportEngine
from reg2rg.engine.generation import GenerationSettings, ReportEngine, model_tensors
from reg2rg.engine.model.config import ConfigError, Reg2RGConfig
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.preprocess import preprocess
from reg2rg.engine.regions import REGIONS

from reg2rg.engine.tokens import train_tokenizer

from generation_fixtures import REPORT_TEXTS, box_study

REGION_SET = ["bone", "heart", "lung"]


def _normed_config() -> Reg2RGConfig:
    return dataclasses.replace(Reg2RGConfig.preset("tiny"), projector_norm="region")


@pytest.fixture(scope="module")
def normed():
    """A tiny projector_norm model whose statistics are fitted on random 'training' latents."""
    torch.manual_seed(0)
    tok = train_tokenizer(REPORT_TEXTS, 300)
    model = Reg2RG.from_config(_normed_config(), tok).eval()
    return model, tok


def test_the_option_is_validated_and_off_in_the_published_preset():
    for preset in ("reg2rg-7b", "demo", "tiny"):
        assert Reg2RGConfig.preset(preset).projector_norm == "none"
    with pytest.raises(ConfigError, match="projector_norm must be 'none' or 'region'"):
        dataclasses.replace(Reg2RGConfig.preset("tiny"), projector_norm="batch").validate(require_llm=False)


def test_encoders_are_frozen_and_the_projection_trains(normed):
    model, _ = normed
    layer = model.embedding_layer
    for frozen in (layer.vision_encoder, layer.perceiver, layer.mask_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert layer.fc.weight.requires_grad and layer.mask_fc.weight.requires_grad
    names = [n for n, _ in layer.named_buffers()]
    assert "projector_mean" in names and "projector_std" in names
    assert not layer.projector_statistics_fitted                      # identity until fitted


def test_fitted_statistics_standardise_each_region_and_leave_unseen_regions_alone(normed):
    model, _ = normed
    layer = model.embedding_layer
    L, dim = model.config.num_latents, model.config.vision.dim
    g = torch.Generator().manual_seed(3)
    # rows 0 (global), 1 + bone, 1 + heart; each with its own offset and scale; lung has one volume only
    rows, latents = [], []
    for row, (shift, scale, n) in {0: (5.0, 2.0, 12), 1 + REGIONS.index("bone"): (-3.0, 0.5, 9),
                                   1 + REGIONS.index("heart"): (0.7, 4.0, 7), 1 + REGIONS.index("lung"): (1.0, 1.0, 1)}.items():
        latents.append(shift + scale * torch.randn(n, L, dim, generator=g))
        rows += [row] * n
    latents, rows = torch.cat(latents), torch.tensor(rows)
    fitted = layer.set_projector_statistics(latents, rows)
    assert fitted == sorted({0, 1 + REGIONS.index("bone"), 1 + REGIONS.index("heart")})
    assert layer.projector_statistics_fitted
    for row in fitted:                                 # independently: each row standardised has mean 0, std 1
        z = layer.normalise_latents(latents[rows == row], torch.full((int((rows == row).sum()),), row))
        assert torch.allclose(z.mean(dim=0), torch.zeros(L, dim), atol=1e-4)
        assert torch.allclose(z.std(dim=0), torch.ones(L, dim), atol=1e-4)
    lung = 1 + REGIONS.index("lung")                    # too few volumes: identity kept
    assert torch.equal(layer.projector_mean[lung], torch.zeros(L, dim))
    assert torch.equal(layer.projector_std[lung], torch.ones(L, dim))


def _tensors(model):
    inputs = preprocess(box_study(), model.config.input_size, None, REGION_SET)
    return model_tensors(inputs, REGION_SET, "cpu", torch.float32)


def test_the_projection_is_fc_of_the_standardised_latents_and_needs_region_ids(normed):
    model, _ = normed
    layer = model.embedding_layer
    images, region_images, region_masks, _, _, region_ids = _tensors(model)
    assert region_ids.tolist() == [REGIONS.index(r) for r in REGION_SET]
    with torch.no_grad():
        visual = layer.encode_visual(images, region_images, region_masks, region_ids=region_ids)
        # the reference, written out: ViT -> perceiver per volume, (x - mean_row) / std_row, fc
        for j, region in enumerate(REGION_SET):
            lat = layer.perceiver(layer.vision_encoder(region_images[j:j + 1]))[0]
            row = 1 + REGIONS.index(region)
            expected = layer.fc((lat - layer.projector_mean[row]) / layer.projector_std[row])
            assert torch.allclose(visual.region_tokens[j, :-1], expected, atol=1e-4)
            mask = layer.mask_fc(layer.mask_encoder(region_masks[j:j + 1]).mean(dim=1))[0]
            assert torch.allclose(visual.region_tokens[j, -1], mask, atol=1e-4)      # the mask token: unchanged
        glob = layer.perceiver(layer.vision_encoder(images))[0]
        expected = layer.fc((glob - layer.projector_mean[0]) / layer.projector_std[0])
        assert torch.allclose(visual.global_tokens[0], expected, atol=1e-4)
        # precomputed features (reg2rg-train's frozen-encoder path) give the same tokens
        feats = layer.encoder_features(images, region_images, region_masks)
        again = layer.project(feats, region_ids)
        assert torch.allclose(again.region_tokens, visual.region_tokens, atol=1e-5)
    with pytest.raises(ValueError, match="region_ids"):
        layer.encode_visual(images, region_images, region_masks)


def test_statistics_are_saved_with_the_model_and_the_engine_and_blind_control_use_them(normed, tmp_path):
    model, tok = normed
    save_pretrained(model, tok, tmp_path / "m")
    loaded, tok2 = load_pretrained(tmp_path / "m")
    assert loaded.config.projector_norm == "region"
    for name in ("projector_mean", "projector_std"):
        assert torch.equal(getattr(loaded.embedding_layer, name), getattr(model.embedding_layer, name))
    engine, blind = ReportEngine(loaded, tok2), BlindReportEngine(loaded, tok2)
    study = box_study()
    prepared, prepared_blind = engine.prepare(study, REGION_SET), blind.prepare(study, REGION_SET)
    ids = torch.tensor(prepared.prompt_ids)
    visual = ids >= engine.special.first_image_token
    mask_ids = {engine.special.region_tokens(j)[-1] for j in range(engine.special.num_regions)}
    is_mask = torch.tensor([i in mask_ids for i in prepared.prompt_ids])
    # blind: the latent rows are fc of N(0, 1) standardised latents from the fixed seed (a draw from the average
    # region's distribution); the mask tokens (from the masks, not the CT) and the text rows are the model's own
    n_latent = int((visual & ~is_mask).sum())
    noise = torch.randn(n_latent, loaded.embedding_layer.fc.in_features, generator=torch.Generator().manual_seed(NOISE_SEED))
    with torch.no_grad():
        assert torch.allclose(prepared_blind.prompt_embeds[0, visual & ~is_mask], loaded.embedding_layer.fc(noise), atol=1e-6)
    assert is_mask.sum() == len(REGION_SET)
    assert torch.equal(prepared_blind.prompt_embeds[0, is_mask], prepared.prompt_embeds[0, is_mask])
    assert torch.equal(prepared_blind.prompt_embeds[0, ~visual], prepared.prompt_embeds[0, ~visual])
    # a study with other CT voxels but the same masks gets the same blind prompt
    other = box_study()
    body = other.voxels > -1000
    other.voxels = np.where(body, other.voxels + 150, other.voxels).astype(other.voxels.dtype)   # the body brighter
    assert torch.equal(blind.prepare(other, REGION_SET).prompt_embeds, prepared_blind.prompt_embeds)
    assert not torch.equal(engine.prepare(other, REGION_SET).prompt_embeds, prepared.prompt_embeds)
    # the seeing engine's latent rows are this study's
    assert not torch.allclose(prepared.prompt_embeds[0, visual & ~is_mask], prepared_blind.prompt_embeds[0, visual & ~is_mask],
                              atol=1e-3)
    result = engine.draft(study, REGION_SET, GenerationSettings(max_new_tokens=8))
    assert result.tokens
