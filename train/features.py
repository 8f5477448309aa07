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
from dataclasses import dataclass
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
                {r: (f.region_latents[j].float().cpu(), f.mask_features[j].float().cpu()) for j, r in enumerate(present)})
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
