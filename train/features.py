"""The frozen encoders' output, computed once per study, and the per-region statistics of ``fc``'s input.

A model with ``projector_norm="region"`` (`Reg2RGConfig`) standardises the perceiver's latents per anatomical
region before ``fc``; its encoders (ViT, perceiver, mask encoder) are frozen, since the statistics describe
their output. ``reg2rg-train`` then:

1. runs the encoders once over every training and validation study (eval mode: no dropout, as at inference)
   and keeps their output in memory (`encode_studies`; ~50 kB per study at the demo dimensions);
2. fits the statistics on the training studies when the starting model has none (`fit_projector_statistics`):
   one row for the global image, one per region of `REGIONS`, each the mean and std of every feature at every
   latent position over that row's training volumes — saved with the model as buffers;
3. trains ``fc``, ``mask_fc``, the markers and the LLM on those features (`RegionReportDataset(features=...)`),
   without reading or encoding a volume again: the step costs the LLM's forward and backward only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from reg2rg.engine.errors import StudyError
from reg2rg.engine.regions import REGIONS

from .data import StudyRecord

logger = logging.getLogger("reg2rg.train.features")


@dataclass
class StudyFeatures:
    """One study's encoder output: the global image's latents and, per region present, (latents, mask feature)."""

    global_latents: torch.Tensor                                  # (L, vision dim)
    regions: dict[str, tuple[torch.Tensor, torch.Tensor]]         # region -> ((L, vision dim), (mask dim,))
    density: dict[str, torch.Tensor] = field(default_factory=dict)   # region -> (DENSITY_FEATURES,), finding_density


@torch.no_grad()
def encode_studies(model, records: Iterable[StudyRecord], load_study: Callable,
                   log_every: int = 100) -> dict[str, StudyFeatures]:
    """Study name -> `StudyFeatures` for every record that can be read (the others are left out: the
    dataset then reads them itself and reports why they are skipped)."""
    layer = model.embedding_layer
    was_training = layer.training
    layer.eval()
    out: dict[str, StudyFeatures] = {}
    records = list(records)
    t0 = time.perf_counter()
    try:
        for i, record in enumerate(records, 1):
            try:
                tensors = load_study(record)
            except (StudyError, OSError, ValueError):
                continue
            present = [r for r in REGIONS if r in tensors.regions]
            if present:
                region_images = torch.stack([tensors.regions[r] for r in present])
                region_masks = torch.stack([tensors.masks[r] for r in present])
            else:
                region_images = tensors.image.new_zeros(0, *tensors.image.shape)
                region_masks = tensors.image.new_zeros(0, 1, *tensors.image.shape[1:])
            dev = layer.fc.weight.device
            f = layer.encoder_features(tensors.image[None].to(dev), region_images.to(dev), region_masks.to(dev))
            out[record.name] = StudyFeatures(
                f.global_latents[0].float().cpu(),
                {r: (f.region_latents[j].float().cpu(), f.mask_features[j].float().cpu()) for j, r in enumerate(present)},
                {} if f.density is None else {r: f.density[j].float().cpu() for j, r in enumerate(present)})
            if log_every and i % log_every == 0:
                logger.info("encoded %d of %d studies (%.1f studies/s)", i, len(records), i / (time.perf_counter() - t0))
    finally:
        layer.train(was_training)
    return out


def fit_projector_statistics(model, features: dict[str, StudyFeatures], names: Iterable[str]) -> int:
    """Fit the model's ``projector_norm="region"`` statistics on the studies ``names``; returns how many
    volumes they came from."""
    latents, rows = [], []
    for name in names:
        if name not in features:
            continue
        f = features[name]
        latents.append(f.global_latents)
        rows.append(0)
        for region, (region_latents, _) in f.regions.items():
            latents.append(region_latents)
            rows.append(1 + REGIONS.index(region))
    if not latents:
        raise ValueError("no encoded training study to fit the projector statistics on")
    model.embedding_layer.set_projector_statistics(torch.stack(latents), torch.tensor(rows))
    return len(latents)


#: Fitting the ``finding_head_input="latents"`` detector (`fit_finding_detector`).
DETECTOR_HELD_OUT = 0.2         # share of the training studies held out to decide which labels it may call
DETECTOR_MIN_F1 = 0.7           # held-out F1 a region's label needs to be called at all
DETECTOR_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)   # the probability a call needs: the best of these on held-out
DETECTOR_MIN_POSITIVES = 10     # training studies with the finding in that region needed to try
DETECTOR_L2 = 1e-2              # ridge penalty on the standardised features (mean of the squared weights' sum)


def _detector_features(f: StudyFeatures, region: str) -> torch.Tensor:
    """What the detector reads of one region: its latents (flattened), its mask feature, then (``finding_density``)
    its crop's densitometry."""
    latents, mask = f.regions[region]
    parts = [latents.float().flatten(), mask.float()]
    if f.density:
        parts.append(f.density[region].float())
    return torch.cat(parts)


def _feature_groups(f: StudyFeatures, region: str) -> dict[str, slice]:
    """The feature sets the fitting chooses from, as slices of `_detector_features`: the encoders' output and,
    with the densitometry, the densitometry alone and both."""
    latents, mask = f.regions[region]
    encoders = latents.numel() + mask.numel()
    if not f.density:
        return {"encoders": slice(0, encoders)}
    total = encoders + f.density[region].numel()
    return {"encoders": slice(0, encoders), "densitometry": slice(encoders, total), "both": slice(0, total)}


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a class-balanced logistic regression (positives weighted by the negatives/positives
    ratio) with a ridge penalty, fitted by L-BFGS on standardised features ``x`` (n, F)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = ((1 - y).sum() / y.sum().clamp(min=1)).clamp(max=20.0)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _precision_recall(called: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    tp = int((called & truth).sum())
    return tp / max(int(called.sum()), 1), tp / max(int(truth.sum()), 1)


def _f1(called: torch.Tensor, truth: torch.Tensor) -> float:
    tp = int((called & truth).sum())
    return 2 * tp / max(2 * tp + int((called & ~truth).sum()) + int((~called & truth).sum()), 1)


@torch.no_grad()
def fit_finding_detector(model, features: dict[str, StudyFeatures], names: Iterable[str],
                         targets: Callable[[str], dict[str, torch.Tensor]], seed: int = 0,
                         held_out: float = DETECTOR_HELD_OUT, min_f1: float | None = None,
                         min_positives: int | None = None, l2: float = DETECTOR_L2,
                         min_precision: float = 0.0) -> list[dict]:
    """Fit the model's ``finding_head_input="latents"`` detector on the training studies ``names``:
    ``targets(name)`` gives region -> (K,) 0/1 labels (the finding head's targets, from the region's sentence).

    For every region and label with at least ``min_positives`` positive studies: a logistic regression is fitted
    on a seeded ``1 - held_out`` share of the studies and scored on the rest at each of `DETECTOR_THRESHOLDS`
    (a class-balanced fit puts 0.5 at equal error rates; a finding the detector sees only when it is large is
    called precisely at a higher threshold); when the best held-out F1 reaches ``min_f1`` the label is enabled in
    that region at that threshold and re-fitted on all the studies, else it is never called there. With the
    crops' densitometry (``finding_density``) the fit is tried on the encoders' output, on the densitometry and on
    both, and the feature set with the best held-out F1 is kept (the others' weights are zero; a tie keeps the
    earlier). ``min_precision`` > 0: only thresholds whose held-out calls are at least that precise count (a label
    with none is never called). The standardisation is folded into the saved weights. Returns one row per region
    and label tried: region, label, features, positives, held-out F1, precision and recall, threshold, enabled."""
    min_f1 = DETECTOR_MIN_F1 if min_f1 is None else min_f1
    min_positives = DETECTOR_MIN_POSITIVES if min_positives is None else min_positives
    layer = model.embedding_layer
    if layer.finding_latent_weight is None:
        raise RuntimeError("this model has no latent finding detector (finding_head_input is not 'latents')")
    labels = model.config.finding_labels
    names = [n for n in names if n in features]
    generator = torch.Generator().manual_seed(seed)
    report = []
    layer.finding_latent_weight.zero_()
    layer.finding_latent_bias.zero_()
    layer.finding_threshold.fill_(float("inf"))
    for r, region in enumerate(REGIONS):
        chosen = [n for n in names if region in features[n].regions and region in targets(n)]
        if not chosen:
            continue
        x_all = torch.stack([_detector_features(features[n], region) for n in chosen])
        if x_all.shape[1] != layer.finding_latent_weight.shape[-1]:
            raise RuntimeError(f"the detector reads {layer.finding_latent_weight.shape[-1]} features, the encoded "
                               f"studies give {x_all.shape[1]} (finding_density on one side only?)")
        groups = _feature_groups(features[chosen[0]], region)
        y = torch.stack([targets(n)[region].float() for n in chosen])                   # (n, K)
        order = torch.randperm(len(chosen), generator=generator)
        cut = int(round(len(chosen) * (1 - held_out)))
        fit_idx, test_idx = order[:cut], order[cut:]
        for k, label in enumerate(labels):
            positives = int(y[:, k].sum())
            if positives < min_positives or positives == len(chosen):
                continue
            best = None
            for group, cols in groups.items():
                x = x_all[:, cols]
                with torch.enable_grad():
                    mu, sd = x[fit_idx].mean(0), x[fit_idx].std(0) + 1e-6
                    w, b = _logistic((x[fit_idx] - mu) / sd, y[fit_idx, k], l2)
                probability = ((((x[test_idx] - mu) / sd) @ w + b)).sigmoid()
                truth = y[test_idx, k] > 0.5
                scored = []
                for t in DETECTOR_THRESHOLDS:
                    called = probability > t
                    precision, recall = _precision_recall(called, truth)
                    if min_precision <= 0 or (precision >= min_precision and bool(called.any())):
                        scored.append((_f1(called, truth), t, precision, recall, True))
                if not scored:                      # no threshold is precise enough: this feature set never calls
                    scored = [(0.0, DETECTOR_THRESHOLDS[-1], 0.0, 0.0, False)]
                f1, threshold, precision, recall, precise = max(scored, key=lambda row: row[:2])
                if best is None or f1 > best[0]:
                    best = (f1, threshold, group, precision, recall, precise)
            f1, threshold, group, precision, recall, precise = best
            enabled = precise and f1 >= min_f1
            report.append({"region": region, "label": label, "features": group, "positives": positives,
                           "held_out_f1": round(f1, 3), "held_out_precision": round(precision, 3),
                           "held_out_recall": round(recall, 3), "threshold": threshold, "enabled": enabled})
            if not enabled:
                continue
            cols = groups[group]
            x = x_all[:, cols]
            with torch.enable_grad():
                mu, sd = x.mean(0), x.std(0) + 1e-6
                w, b = _logistic((x - mu) / sd, y[:, k], l2)
            weight = torch.zeros(x_all.shape[1])
            weight[cols] = w / sd
            layer.finding_latent_weight[1 + r, k] = weight.to(layer.finding_latent_weight)
            layer.finding_latent_bias[1 + r, k] = (b - (w / sd) @ mu).to(layer.finding_latent_bias)
            layer.finding_threshold[1 + r, k] = threshold
    return report
