"""``finding_head_input="latents"`` (issue 12; off in the published preset): a per-region detector on the frozen
encoders' output, fitted by logistic regression, whose binary calls condition the LLM through the mask token —
checked against computations written out here on features with a planted signal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reg2rg.engine.checkpoint import load_pretrained, save_pretrained
from reg2rg.engine.controls import BlindReportEngine
from reg2rg.engine.generation import ReportEngine
from reg2rg.engine.model.config import ConfigError, Reg2RGConfig
from reg2rg.engine.model.density import DENSITY_FEATURES
from reg2rg.engine.model.embedding import EncoderFeatures
from reg2rg.engine.model.reg2rg import Reg2RG
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.tokens import train_tokenizer
from reg2rg.train.features import DETECTOR_THRESHOLDS, StudyFeatures, fit_finding_detector

from generation_fixtures import REPORT_TEXTS, box_study

LABELS = ("Cardiomegaly", "Pleural effusion", "Left side")
HEART, PLEURA = REGIONS.index("heart"), REGIONS.index("pleura")


def _config(**changes) -> Reg2RGConfig:
    settings = dict(finding_labels=LABELS, finding_head_input="latents", finding_conditioning=True,
                    finding_conditioning_tokens="mask")
    return dataclasses.replace(Reg2RGConfig.preset("tiny"), **{**settings, **changes})


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(REPORT_TEXTS, 300)


def _studies(config: Reg2RGConfig, n: int = 240, seed: int = 0, shift: float = 3.0):
    """Features of ``n`` studies: cardiomegaly (every third) shifts four features of the heart's first latent by ``shift``;
    the pleura's labels are noise (nothing in its features says them)."""
    g = torch.Generator().manual_seed(seed)
    L, D, M = config.num_latents, config.vision.dim, config.mask_encoder.dim
    features, targets = {}, {}
    for i in range(n):
        sick = i % 3 == 0
        heart = torch.randn(L, D, generator=g)
        heart[0, :4] += shift * sick
        noise_label = float(torch.rand(1, generator=g) < 0.3)
        features[f"s{i}"] = StudyFeatures(torch.randn(L, D, generator=g),
                                          {"heart": (heart, torch.randn(M, generator=g)),
                                           "pleura": (torch.randn(L, D, generator=g), torch.randn(M, generator=g))})
        targets[f"s{i}"] = {"heart": torch.tensor([float(sick), 0.0, 0.0]),
                            "pleura": torch.tensor([0.0, noise_label, noise_label])}
    return features, targets


@pytest.fixture(scope="module")
def fitted(tok):
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(), tok).eval()
    features, targets = _studies(model.config)
    report = fit_finding_detector(model, features, list(features), lambda name: targets[name])
    return model, report


def _visual(model, feats: list[StudyFeatures], region: str):
    f = EncoderFeatures(torch.stack([s.global_latents for s in feats]), torch.stack([s.regions[region][0] for s in feats]),
                        torch.stack([s.regions[region][1] for s in feats]))
    return model.embedding_layer.project(f, torch.tensor([REGIONS.index(region)] * len(feats)))


def test_the_options_are_validated_and_off_in_the_published_preset():
    for preset in ("reg2rg-7b", "demo", "tiny"):
        config = Reg2RGConfig.preset(preset)
        assert config.finding_head_input == "tokens" and config.finding_conditioning_tokens == "all"
        assert not config.frozen_encoders
    with pytest.raises(ConfigError, match="finding_head_input must be"):
        _config(finding_head_input="voxels").validate(require_llm=False)
    with pytest.raises(ConfigError, match="finding_conditioning_tokens must be"):
        _config(finding_conditioning_tokens="first").validate(require_llm=False)
    assert _config().frozen_encoders


def test_encoders_are_frozen_and_the_detector_is_saved_as_buffers(fitted):
    model, _ = fitted
    layer = model.embedding_layer
    for frozen in (layer.vision_encoder, layer.perceiver, layer.mask_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    buffers = dict(layer.named_buffers())
    F = model.config.num_latents * model.config.vision.dim + model.config.mask_encoder.dim
    assert buffers["finding_latent_weight"].shape == (1 + len(REGIONS), len(LABELS), F)
    assert layer.finding_head is None and layer.finding_patch_head is None


def test_a_detectable_label_is_enabled_and_noise_is_never_called(fitted):
    model, report = fitted
    assert model.embedding_layer.finding_detector_fitted
    rows = {(r["region"], r["label"]): r for r in report}
    assert rows[("heart", "Cardiomegaly")]["enabled"] and rows[("heart", "Cardiomegaly")]["held_out_f1"] >= 0.9
    assert not rows[("pleura", "Pleural effusion")]["enabled"]          # its features say nothing of it
    thresholds = model.embedding_layer.finding_threshold
    assert float(thresholds[1 + HEART, 0]) in DETECTOR_THRESHOLDS
    assert torch.isinf(thresholds[1 + PLEURA]).all()
    assert torch.isinf(thresholds[0]).all()                              # the global image is never called


def test_a_precision_floor_keeps_only_thresholds_whose_held_out_calls_are_that_precise(tok):
    """model.detector_min_precision: a weakly visible finding is enabled at its best-F1 threshold without a floor;
    with a floor above that threshold's held-out precision it is called only at a threshold that meets it, or never."""
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(), tok).eval()
    features, targets = _studies(model.config, n=400, shift=0.9)
    fit = lambda **kw: fit_finding_detector(model, features, list(features), lambda name: targets[name],  # noqa: E731
                                            min_f1=0.3, **kw)
    plain = {(r["region"], r["label"]): r for r in fit()}
    weight, thresholds = model.embedding_layer.finding_latent_weight.clone(), model.embedding_layer.finding_threshold.clone()
    heart = plain[("heart", "Cardiomegaly")]
    assert heart["enabled"] and 0.3 <= heart["held_out_precision"] < 0.95
    p, r = heart["held_out_precision"], heart["held_out_recall"]
    assert heart["held_out_f1"] == pytest.approx(2 * p * r / (p + r), abs=2e-3)
    same = {(r["region"], r["label"]): r for r in fit(min_precision=0.0)}      # 0: the F1 bar only, as before
    assert same == plain
    assert torch.equal(model.embedding_layer.finding_latent_weight, weight)
    assert torch.equal(model.embedding_layer.finding_threshold, thresholds)
    floor = min(heart["held_out_precision"] + 0.05, 1.0)
    strict = {(r["region"], r["label"]): r for r in fit(min_precision=floor)}[("heart", "Cardiomegaly")]
    called = model.embedding_layer.finding_threshold[1 + HEART, 0]
    if strict["enabled"]:
        assert strict["held_out_precision"] >= floor and strict["threshold"] > heart["threshold"]
        assert float(called) == pytest.approx(strict["threshold"])
    else:
        assert torch.isinf(called)
    # nothing is precise at a floor of 1 on noise: the pleura is never called
    noisy = {(r["region"], r["label"]): r for r in fit(min_precision=1.0)}
    assert not noisy[("pleura", "Pleural effusion")]["enabled"]


def test_calls_are_the_logistic_regression_on_flattened_latents_and_mask_feature(fitted):
    model, _ = fitted
    layer = model.embedding_layer
    features, _ = _studies(model.config, n=30, seed=1)                   # studies the fit never saw
    feats = list(features.values())
    visual = _visual(model, feats, "heart")
    _, logits = layer.finding_logits(visual)
    x = torch.stack([torch.cat([s.regions["heart"][0].flatten(), s.regions["heart"][1]]) for s in feats])
    expected = x @ layer.finding_latent_weight[1 + HEART].T + layer.finding_latent_bias[1 + HEART]
    assert torch.allclose(logits, expected, atol=1e-4)
    calls = layer.region_calls(visual)
    assert torch.equal(calls[:, 0], (expected[:, 0].sigmoid() > layer.finding_threshold[1 + HEART, 0]).float())
    assert not calls[:, 1:].any()                                        # not enabled in the heart
    truth = torch.tensor([i % 3 == 0 for i in range(30)])
    assert (calls[:, 0].bool() == truth).float().mean() >= 0.9           # held out: the planted shift is found


def test_calls_reach_only_the_mask_token_and_teacher_forcing_gives_only_enabled_labels(fitted):
    model, _ = fitted
    layer = model.embedding_layer
    features, _ = _studies(model.config, n=6, seed=2)
    visual = _visual(model, list(features.values()), "heart")
    calls = torch.tensor([[1.0, 1.0, 0.0]] * 6)
    conditioned = layer.condition_on_findings(visual, calls)
    assert torch.equal(conditioned.region_tokens[:, :-1], visual.region_tokens[:, :-1])   # latent tokens untouched
    expected = visual.region_tokens[:, -1] + calls @ layer.finding_embedding
    assert torch.allclose(conditioned.region_tokens[:, -1], expected, atol=1e-5)
    model.train()
    model.config.finding_teacher_forcing = 1.0
    try:
        forced = model._teacher_forced_calls(visual, torch.tensor([[1.0, 1.0, 1.0]] * 6))
    finally:
        model.eval()
        model.config.finding_teacher_forcing = 0.0
    assert torch.equal(forced, torch.tensor([[1.0, 0.0, 0.0]] * 6))      # pleural effusion / side: not enabled here
    model.train()
    model.config.finding_teacher_forcing, model.config.finding_calls_only = 1.0, True
    try:       # calls only: every label's truth, so a finding the detector never calls is learned as absent
        forced = model._teacher_forced_calls(visual, torch.tensor([[1.0, 1.0, 1.0]] * 6))
    finally:
        model.eval()
        model.config.finding_teacher_forcing, model.config.finding_calls_only = 0.0, False
    assert torch.equal(forced, torch.ones(6, 3))


def test_the_detector_survives_save_and_load_and_the_engine_conditions_on_it(fitted, tok, tmp_path):
    model, _ = fitted
    save_pretrained(model, tok, tmp_path / "m")
    loaded, tok2 = load_pretrained(tmp_path / "m")
    for name in ("finding_latent_weight", "finding_latent_bias", "finding_threshold"):
        assert torch.equal(getattr(loaded.embedding_layer, name), getattr(model.embedding_layer, name)), name
    # the engine: the prompt's heart mask token carries the heart's calls; the blind control zeroes it with the rest
    layer = loaded.embedding_layer
    with torch.no_grad():
        layer.finding_latent_bias[1 + HEART, 0] = 1e4                    # this study: cardiomegaly called
    study = box_study()
    engine = ReportEngine(loaded, tok2)
    prepared = engine.prepare(study)
    assert set(prepared.finding_probabilities["heart"]) == {"Cardiomegaly"}         # what it may call there
    assert prepared.finding_probabilities["global"] == {} and prepared.finding_probabilities["heart"]["Cardiomegaly"] > 0.99
    heart_slot = [j for j, r in prepared.slot_regions.items() if r == "heart"][0]
    mask_id = engine.special.region_tokens(heart_slot)[-1]
    row = prepared.prompt_ids.index(mask_id)
    with torch.no_grad():
        layer.finding_latent_bias[1 + HEART, 0] = -1e4                   # not called
    plain = engine.prepare(study)
    difference = prepared.prompt_embeds[0, row] - plain.prompt_embeds[0, row]
    assert torch.allclose(difference, layer.finding_embedding[0].to(difference), atol=1e-4)
    blind = BlindReportEngine(loaded, tok2).prepare(study)
    assert not blind.prompt_embeds[0, row].any()


def test_calls_as_a_leaf_keep_their_values_and_take_the_selections_gradient(fitted):
    """Calls given from outside (what a relevance map's `call_shapley` does with some switched off) condition the
    tokens exactly as the model's own calls do, and as a leaf they receive d S / d call = e_k . direction; the
    encoders get no gradient through the calls themselves (the map takes the detector's evidence by occlusion,
    `call_occlusion`)."""
    model, _ = fitted
    layer = model.embedding_layer
    features, _ = _studies(model.config, n=3, seed=3)
    feats = list(features.values())
    with torch.no_grad():
        plain = layer.condition_on_findings(_visual(model, feats, "heart"))
    latents = torch.stack([s.regions["heart"][0] for s in feats]).requires_grad_(True)
    f = EncoderFeatures(torch.stack([s.global_latents for s in feats]), latents,
                        torch.stack([s.regions["heart"][1] for s in feats]))
    visual = layer.project(f, torch.tensor([HEART] * 3))
    calls = layer.region_calls(visual).requires_grad_(True)                            # (3, K) 0/1
    assert calls.sum() > 0 and (calls == 0).any()           # both kinds are checked
    conditioned = layer.condition_on_findings(visual, calls)
    assert torch.allclose(conditioned.region_tokens, plain.region_tokens, atol=1e-5)      # same values
    direction = torch.randn(layer.finding_embedding.shape[1])
    (conditioned.region_tokens[:, -1] @ direction).sum().backward()
    # mask token = mask_fc(...) + sum_k call_k e_k: d/d call_k = e_k . direction, for every study and label
    assert torch.allclose(calls.grad, (layer.finding_embedding @ direction).expand(3, -1), atol=1e-5)
    assert latents.grad is None or not latents.grad.any()     # the latents feed the other tokens only


def test_an_unfitted_detector_says_so(tok):
    model = Reg2RG.from_config(_config(), tok)
    assert not model.embedding_layer.finding_detector_fitted


@pytest.mark.parametrize("density", [False, True])
def test_call_occlusion_equals_emptying_the_voxels_of_each_patch(fitted, tok, density):
    """`call_occlusion` empties patch tokens; the reference here empties the patch's voxels (crop: the -1 fill;
    mask: 0) and encodes the volume again: the weighted logit drops must agree, patch by patch. With the crops'
    densitometry (``finding_density``, a detector with random weights on every feature) as well."""
    from reg2rg.engine.explain.relevance import call_occlusion

    model, _ = fitted
    if density:
        torch.manual_seed(4)
        model = Reg2RG.from_config(_config(finding_density=True), tok).eval()
        weight = model.embedding_layer.finding_latent_weight
        weight.copy_(torch.randn_like(weight) * 0.05)
    layer = model.embedding_layer
    cfg = model.config
    torch.manual_seed(3)
    H, W, D = cfg.input_size
    image = torch.rand(1, 1, H, W, D).expand(1, 3, H, W, D) * 2 - 1           # the pre-processing's equal channels
    mask = (torch.rand(1, 1, H, W, D) > 0.4).float()
    row = torch.tensor(1 + HEART)
    weights = torch.tensor([0.7, -0.4, 1.3])
    with torch.no_grad():
        tokens = layer.embed_volumes(image[:0], image)[0]
        mask_tokens = layer.mask_encoder.embed_patches(mask)[0]
        crop, mask_drop = call_occlusion(layer, tokens, mask_tokens, row, weights, image[0], mask[0])

        def logits(img, msk):
            f = layer.encoder_features(img[:0], img, msk)
            assert (f.density is not None) == density
            return layer.detector_logits(f.region_latents, f.mask_features, row.reshape(1), f.density)[0]

        full = logits(image, mask)
        p, pf = cfg.vision.patch_size, cfg.vision.frame_patch_size
        h, w, d = cfg.vision.grid((H, W, D))
        for index in (0, 5, h * w * d - 1):
            i, j, k = index // (w * d), index // d % w, index % d
            emptied = image.clone()
            emptied[..., i * p:(i + 1) * p, j * p:(j + 1) * p, k * pf:(k + 1) * pf] = -1.0
            assert crop[index] == pytest.approx(float((full - logits(emptied, mask)) @ weights), abs=2e-4)
        mp, mpf = cfg.mask_encoder.patch_size, cfg.mask_encoder.frame_patch_size
        mh, mw, md = cfg.mask_encoder.grid((H, W, D))
        for index in (0, mh * mw * md - 1):
            i, j, k = index // (mw * md), index // md % mw, index % md
            emptied = mask.clone()
            emptied[..., i * mp:(i + 1) * mp, j * mp:(j + 1) * mp, k * mpf:(k + 1) * mpf] = 0.0
            assert mask_drop[index] == pytest.approx(float((full - logits(image, emptied)) @ weights), abs=2e-4)
    assert crop.shape == (h * w * d,) and mask_drop.shape == (mh * mw * md,) and abs(crop).max() > 0


def test_with_densitometry_the_fit_keeps_the_feature_set_that_sees_each_label(tok):
    """``finding_density``: the fit tries the encoders' output, the densitometry and both, per region and label. A
    label only the densitometry carries is fitted on it alone (the latents' weights stay zero); the calls are the
    logistic regression on [latents, mask feature, densitometry]."""
    torch.manual_seed(0)
    model = Reg2RG.from_config(_config(finding_density=True), tok).eval()
    layer = model.embedding_layer
    features, targets = _studies(model.config)
    g = torch.Generator().manual_seed(5)
    for name, f in features.items():
        f.density = {r: torch.randn(DENSITY_FEATURES, generator=g) for r in f.regions}
        f.density["pleura"][7:11] += 3.0 * float(targets[name]["pleura"][1])     # the effusion, in the pleura's numbers
    report = fit_finding_detector(model, features, list(features), lambda name: targets[name])
    rows = {(r["region"], r["label"]): r for r in report}
    effusion = rows[("pleura", "Pleural effusion")]
    assert effusion["enabled"] and effusion["features"] == "densitometry" and effusion["held_out_f1"] >= 0.9
    assert rows[("heart", "Cardiomegaly")]["enabled"]
    assert rows[("heart", "Cardiomegaly")]["features"] in ("encoders", "both")
    E = model.config.num_latents * model.config.vision.dim + model.config.mask_encoder.dim
    weight = layer.finding_latent_weight
    assert weight.shape[-1] == E + DENSITY_FEATURES
    assert not weight[1 + PLEURA, 1, :E].any() and weight[1 + PLEURA, 1, E:].abs().sum() > 0
    assert weight[1 + HEART, 0, :E].abs().sum() > 0
    fresh, _ = _studies(model.config, n=20, seed=2)
    feats = list(fresh.values())
    density = torch.randn(len(feats), DENSITY_FEATURES)
    f = EncoderFeatures(torch.stack([s.global_latents for s in feats]), torch.stack([s.regions["pleura"][0] for s in feats]),
                        torch.stack([s.regions["pleura"][1] for s in feats]), density=density)
    visual = layer.project(f, torch.tensor([PLEURA] * len(feats)))
    _, logits = layer.finding_logits(visual)
    x = torch.stack([torch.cat([s.regions["pleura"][0].flatten(), s.regions["pleura"][1], d])
                     for s, d in zip(feats, density)])
    expected = x @ weight[1 + PLEURA].T + layer.finding_latent_bias[1 + PLEURA]
    assert torch.allclose(logits, expected, atol=1e-4)
    with pytest.raises(RuntimeError, match="densitometry"):
        layer.finding_logits(dataclasses.replace(visual, density=None))
