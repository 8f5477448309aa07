"""The Reg2RG fusion layer (the published ``embedding_layer``): visual encoders + gather-based embedding.

The reference built, per sample, a (V + 4 + L + R(L+1)) x hidden table and multiplied a one-hot
matrix of the whole prompt by it. Here text ids read the LLM's input embedding and special ids read a
small per-sample table of 4 + L + R(L+1) rows by gather — the same numbers at a tiny fraction of the
work (docs/reproduction.md §2, §7). The global volume and every region volume of the batch go through the ViT and the
perceiver in one batched pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .config import Reg2RGConfig
from .density import DENSITY_FEATURES, region_density
from .perceiver import PerceiverResampler
from .vit3d import ViT3D

# Volumes patch-embedded together in `encode_visual` (bounds the peak memory of that stage).
PATCH_EMBED_CHUNK = 2


@dataclass
class VisualTokens:
    """Projected visual tokens of a batch, plus the perceiver attention when requested."""

    global_tokens: torch.Tensor                  # (B, L, hidden)
    region_tokens: torch.Tensor                  # (N, L+1, hidden); token L is the mask token
    perceiver_attention: tuple[torch.Tensor, ...] | None = None  # per layer (B+N, heads, L, P)
    patch_grid: tuple[int, int, int] | None = None               # ViT grid (h, w, d) of the P patches
    patch_tokens: torch.Tensor | None = None     # (B+N, P, vision dim), kept when the finding head reads them
    latents: torch.Tensor | None = None          # (B+N, L, vision dim) fc's raw input, kept for the latent detector
    mask_features: torch.Tensor | None = None    # (N, mask dim), kept for the latent detector
    rows: torch.Tensor | None = None             # (B+N,) each volume's row: 0 global, 1 + r region r of REGIONS
    density: torch.Tensor | None = None          # (N, DENSITY_FEATURES) the crops' densitometry (finding_density)


@dataclass
class EncoderFeatures:
    """What the encoders give before the projection (``fc`` / ``mask_fc``) of a batch."""

    global_latents: torch.Tensor                 # (B, L, vision dim) perceiver output of the global volumes
    region_latents: torch.Tensor                 # (N, L, vision dim) of the region volumes
    mask_features: torch.Tensor                  # (N, mask dim) mean mask-encoder token of each region
    perceiver_attention: tuple[torch.Tensor, ...] | None = None
    patch_grid: tuple[int, int, int] | None = None
    patch_tokens: torch.Tensor | None = None
    density: torch.Tensor | None = None          # (N, DENSITY_FEATURES) with finding_density (engine.model.density)


class RegionFusionEmbedding(nn.Module):
    """Children and parameter names follow the published ``embedding_layer``.

    ``weight`` is tied to (is the same tensor as) the LLM's input embedding; it is attached by `Reg2RG`.
    """

    def __init__(self, config: Reg2RGConfig, hidden_size: int, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_latents = config.num_latents
        self.num_regions = config.num_regions
        self.image_token_weight = nn.Parameter(torch.randn(2, hidden_size))
        self.region_token_weight = nn.Parameter(torch.randn(2, hidden_size))
        self.vision_encoder = ViT3D(config.vision)
        self.mask_encoder = ViT3D(config.mask_encoder)
        p = config.perceiver
        self.perceiver = PerceiverResampler(config.vision.dim, config.num_latents, depth=p.depth, heads=p.heads,
                                            dim_head=p.dim_head, ff_mult=p.ff_mult)
        self.fc = nn.Linear(config.vision.dim, hidden_size)
        self.mask_fc = nn.Linear(config.mask_encoder.dim, hidden_size)
        # Optional (not published): linear finding head on the projected tokens, see Reg2RGConfig.
        K = len(config.finding_labels)
        on_patches = config.finding_head_input == "patches"
        on_latents = config.finding_head_input == "latents"
        self.finding_head = nn.Linear(hidden_size, K) if K and config.finding_head_input == "tokens" else None
        self.finding_patch_head = nn.Linear(config.vision.dim, K) if K and on_patches else None
        if K and on_latents:
            # the fitted per-region detector (see Reg2RGConfig.finding_head_input; fitted by reg2rg-train):
            # rows as projector_norm's, features = the region's flattened latents then its mask feature
            rows, features = 1 + config.num_regions, config.num_latents * config.vision.dim + config.mask_encoder.dim
            features += DENSITY_FEATURES if config.finding_density else 0          # then the crop's densitometry
            self.register_buffer("finding_latent_weight", torch.zeros(rows, K, features))
            self.register_buffer("finding_latent_bias", torch.zeros(rows, K))
            self.register_buffer("finding_threshold", torch.full((rows, K), float("inf")))   # inf: never called
        else:
            self.finding_latent_weight = self.finding_latent_bias = self.finding_threshold = None
        # Optional (not published): one learned vector per label, added to a region's tokens in proportion
        # to the head's probability of that label (see Reg2RGConfig.finding_conditioning).
        self.finding_embedding = (nn.Parameter(torch.randn(len(config.finding_labels), hidden_size))
                                  if config.finding_conditioning else None)
        if config.freeze_vision_encoder:
            self.vision_encoder.requires_grad_(False)
        # Optional (not published): per-region standardisation of fc's input, see Reg2RGConfig.projector_norm.
        # Row 0: the global image; row 1 + r: region r of `REGIONS`. Saved with the model (state_dict buffers).
        if config.projector_norm == "region":
            rows = (1 + config.num_regions, config.num_latents, config.vision.dim)
            self.register_buffer("projector_mean", torch.zeros(rows))
            self.register_buffer("projector_std", torch.ones(rows))
        else:
            self.projector_mean = self.projector_std = None
        if config.frozen_encoders:
            # fitted statistics / a fitted detector describe the encoders' output: they stay frozen
            for frozen in (self.vision_encoder, self.perceiver, self.mask_encoder):
                frozen.requires_grad_(False)
        self.weight: nn.Parameter | None = None

    # ---- visual side ---------------------------------------------------------------------------
    def embed_volumes(self, images: torch.Tensor, region_images: torch.Tensor) -> torch.Tensor:
        """(B+N, P, dim) position-embedded patch tokens of the global and region volumes (ViT input)."""
        dtype = self.fc.weight.dtype   # volumes arrive as float32; follow the model's dtype (bf16/fp16)
        # Patch embedding is per volume, and its full-resolution intermediates (the rearranged patches and
        # their LayerNorm, each as large as the input) dominate memory: embed a few volumes at a time. The
        # transformer and the perceiver, where batching pays, then run on all B+N volumes at once.
        chunks = [images, *region_images.split(PATCH_EMBED_CHUNK)]
        return torch.cat([self.vision_encoder.embed_patches(c.to(dtype)) for c in chunks if len(c)])

    def encoder_features(self, images: torch.Tensor, region_images: torch.Tensor, region_masks: torch.Tensor,
                         return_attention: bool = False, patch_tokens: torch.Tensor | None = None,
                         mask_patch_tokens: torch.Tensor | None = None) -> EncoderFeatures:
        """The encoders' part of `encode_visual` (everything before ``fc`` and ``mask_fc``): the global volumes
        (B,C,H,W,D) and region volumes (N,C,H,W,D) in ONE ViT + perceiver pass, the masks through the mask encoder."""
        B, N = images.shape[0], region_images.shape[0]
        if region_masks.shape[0] != N:
            raise ValueError(f"{N} region volumes but {region_masks.shape[0]} region masks")
        images = images.to(self.fc.weight.dtype)
        tokens = self.embed_volumes(images, region_images) if patch_tokens is None else patch_tokens
        patches = self.vision_encoder.transformer(tokens)                      # (B+N, P, dim)
        if return_attention:
            latents, attention = self.perceiver(patches, return_attention=True)
        else:
            latents, attention = self.perceiver(patches), None                 # (B+N, L, dim)
        if N:
            if mask_patch_tokens is None:
                mask_patch_tokens = self.mask_encoder.embed_patches(region_masks.to(images.dtype))
            mask_features = self.mask_encoder.transformer(mask_patch_tokens).mean(dim=1)  # (N, mask_dim)
        else:
            mask_features = latents.new_zeros(0, self.config.mask_encoder.dim)
        grid = self.config.vision.grid(tuple(images.shape[-3:]))
        kept = patches if self.finding_patch_head is not None else None
        density = region_density(region_images, region_masks) if self.config.finding_density else None
        return EncoderFeatures(latents[:B], latents[B:], mask_features, attention, grid, kept, density)

    def normalise_latents(self, latents: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``projector_norm="region"``: (latents - mean) / std of each volume's statistics row (0 global,
        1 + r region r); unchanged otherwise."""
        if self.projector_mean is None:
            return latents
        mean, std = self.projector_mean[rows], self.projector_std[rows]
        return ((latents.float() - mean) / std).to(latents.dtype)

    def region_rows(self, batch: int, region_ids: torch.Tensor | None, regions: int) -> torch.Tensor:
        """Statistics rows of B global volumes then N regions (``region_ids``: each region's index in `REGIONS`)."""
        if region_ids is None or region_ids.shape[0] != regions:
            raise ValueError(f"this model reads each region by its kind (projector_norm / finding detector): give the "
                             f"{regions} regions' indices in REGIONS (region_ids), got "
                             f"{None if region_ids is None else tuple(region_ids.shape)}")
        if regions and (int(region_ids.min()) < 0 or int(region_ids.max()) >= self.num_regions):
            raise ValueError(f"region_ids must lie in 0..{self.num_regions - 1}")
        return torch.cat([region_ids.new_zeros(batch), 1 + region_ids]).to(self.fc.weight.device)

    def project(self, features: EncoderFeatures, region_ids: torch.Tensor | None = None) -> VisualTokens:
        """``fc`` on the latents (standardised per region first with ``projector_norm="region"``) and ``mask_fc``
        on the mask features -> the tokens the LLM reads."""
        raw = latents = torch.cat([features.global_latents, features.region_latents])
        B, N = features.global_latents.shape[0], features.region_latents.shape[0]
        needs_rows = self.projector_mean is not None or self.finding_latent_weight is not None
        rows = self.region_rows(B, region_ids, N) if needs_rows else None
        if self.projector_mean is not None:
            latents = self.normalise_latents(latents, rows)
        tokens = self.fc(latents.to(self.fc.weight.dtype))                     # (B+N, L, hidden)
        global_tokens, region_tokens = tokens[:B], tokens[B:]
        if N:
            mask_tokens = self.mask_fc(features.mask_features.to(self.mask_fc.weight.dtype))   # (N, hidden)
            region_tokens = torch.cat([region_tokens, mask_tokens[:, None, :]], dim=1)  # (N, L+1, hidden)
        else:
            region_tokens = tokens.new_zeros(0, self.num_latents + 1, self.hidden_size)
        detector = self.finding_latent_weight is not None
        return VisualTokens(global_tokens, region_tokens, features.perceiver_attention, features.patch_grid,
                            features.patch_tokens, raw if detector else None,
                            features.mask_features if detector else None, rows,
                            features.density if detector else None)

    def encode_visual(self, images: torch.Tensor, region_images: torch.Tensor, region_masks: torch.Tensor,
                      return_attention: bool = False, patch_tokens: torch.Tensor | None = None,
                      mask_patch_tokens: torch.Tensor | None = None,
                      region_ids: torch.Tensor | None = None) -> VisualTokens:
        """Global volumes (B,C,H,W,D), region volumes (N,C,H,W,D) and region masks (N,1,H,W,D) ->
        projected tokens, the global and all region volumes in ONE ViT + perceiver pass.

        ``patch_tokens``: the volumes' `embed_volumes` output, ``mask_patch_tokens`` the masks'
        ``mask_encoder.embed_patches`` output, given when the caller needs them as tensors of its own
        (relevance maps take the gradient of the output with respect to them). ``region_ids`` (N,): each
        region's index in `REGIONS`, needed by a model with ``projector_norm="region"``."""
        features = self.encoder_features(images, region_images, region_masks, return_attention, patch_tokens,
                                         mask_patch_tokens)
        return self.project(features, region_ids)

    @torch.no_grad()
    def set_projector_statistics(self, latents: torch.Tensor, rows: torch.Tensor, min_std: float = 1e-3) -> list[int]:
        """Fit ``projector_norm="region"``'s statistics: ``latents`` (M, L, dim) pre-``fc`` features of M
        training volumes, ``rows`` (M,) their statistics row (0 global, 1 + r region r). Each row's mean and
        std over its volumes, per latent and feature (std floored at ``min_std`` x the row's mean std). A row
        with fewer than 2 volumes (a region no training study has) keeps the identity; returns the rows fitted."""
        if self.projector_mean is None:
            raise RuntimeError("this model has no projector statistics (projector_norm is 'none')")
        fitted = []
        for row in range(self.projector_mean.shape[0]):
            chosen = latents[rows == row].float()
            if len(chosen) < 2:
                continue
            mean, std = chosen.mean(dim=0), chosen.std(dim=0)
            self.projector_mean[row] = mean.to(self.projector_mean)
            self.projector_std[row] = std.clamp(min=float(std.mean()) * min_std).to(self.projector_std)
            fitted.append(row)
        return fitted

    @property
    def projector_statistics_fitted(self) -> bool:
        """False for a ``projector_norm="region"`` model whose statistics are still the identity."""
        return self.projector_mean is None or not (bool((self.projector_mean == 0).all())
                                                   and bool((self.projector_std == 1).all()))

    def finding_logits(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (B, K), regions (N, K)) float32 finding-head logits of each volume: the linear head on
        the mean of its tokens (a region's latents and its mask token), each RMS-normalised as the LLM's
        first layer sees it; or, with ``finding_head_input="patches"``, the maximum over the volume's ViT
        patches of the linear head on each RMS-normalised patch feature."""
        if self.finding_latent_weight is not None:
            return self._latent_detector_logits(visual)
        if self.finding_patch_head is not None:
            if visual.patch_tokens is None:
                raise RuntimeError("the finding head reads the ViT patches: encode with this model's encode_visual")
            patch_head = self.finding_patch_head
            normed = nn.functional.rms_norm(visual.patch_tokens.float(), (visual.patch_tokens.shape[-1],), eps=1e-6)
            logits = patch_head(normed.to(patch_head.weight.dtype)).float().amax(dim=1)   # (B+N, K)
            B = visual.global_tokens.shape[0]
            return logits[:B], logits[B:]
        if self.finding_head is None:
            raise RuntimeError("this model has no finding head (its config has no finding_labels)")

        def pooled(tokens: torch.Tensor) -> torch.Tensor:
            return nn.functional.rms_norm(tokens.float(), (tokens.shape[-1],), eps=1e-6).mean(dim=1)

        head = self.finding_head
        dtype = head.weight.dtype
        return head(pooled(visual.global_tokens).to(dtype)).float(), head(pooled(visual.region_tokens).to(dtype)).float()

    def _latent_detector_logits(self, visual: VisualTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``finding_head_input="latents"``: each volume's row of the fitted detector on [its flattened latents,
        its mask feature (zeros for a global image), with ``finding_density`` its crop's densitometry (zeros for a
        global image)]."""
        if visual.latents is None or visual.rows is None:
            raise RuntimeError("the finding detector reads the encoders' latents: encode with this model's encode_visual")
        B = visual.global_tokens.shape[0]
        masks = visual.mask_features.float()
        masks = torch.cat([masks.new_zeros(B, masks.shape[1]), masks])
        density = None
        if self.config.finding_density:
            if visual.density is None:
                raise RuntimeError("the finding detector reads the crops' densitometry: encode with this model's "
                                   "encode_visual, or give the features' density")
            density = torch.cat([visual.density.new_zeros(B, visual.density.shape[1]), visual.density.float()])
        logits = self.detector_logits(visual.latents, masks, visual.rows, density)
        return logits[:B], logits[B:]

    def detector_logits(self, latents: torch.Tensor, mask_features: torch.Tensor, rows: torch.Tensor,
                        density: torch.Tensor | None = None) -> torch.Tensor:
        """(M, K) float32 logits of the fitted latent detector for M volumes: ``latents`` (M, L, vision dim),
        ``mask_features`` (M, mask dim; zeros for a global image), ``rows`` (M,) each volume's row (0 global,
        1 + r region r of REGIONS), ``density`` (M, DENSITY_FEATURES) with ``finding_density``."""
        parts = [latents.float().flatten(1), mask_features.float()]
        if self.config.finding_density:
            if density is None:
                raise ValueError("this detector also reads the crops' densitometry (finding_density): give density")
            parts.append(density.float())
        x = torch.cat(parts, dim=1).to(self.finding_latent_weight)
        rows = rows.to(x.device)
        return (torch.einsum("nkf,nf->nk", self.finding_latent_weight[rows], x) + self.finding_latent_bias[rows]).float()

    def finding_enabled(self, visual: VisualTokens) -> torch.Tensor | None:
        """(N, K) bool: the labels the fitted detector may call in each region (None: every label, other heads)."""
        if self.finding_threshold is None:
            return None
        return torch.isfinite(self.finding_threshold[visual.rows[visual.global_tokens.shape[0]:]])

    @property
    def finding_detector_fitted(self) -> bool:
        """False for a ``finding_head_input="latents"`` model whose detector is still unfitted (calls nothing)."""
        return self.finding_threshold is None or bool(torch.isfinite(self.finding_threshold).any()) \
            or bool(self.finding_latent_weight.any())

    @torch.no_grad()
    def region_calls(self, visual: VisualTokens) -> torch.Tensor:
        """(N, K) the calls the LLM is given: the fitted detector's binary calls (probability above the region's
        threshold), else the head's probabilities."""
        probabilities = self.finding_logits(visual)[1].sigmoid()
        if self.finding_threshold is None:
            return probabilities
        thresholds = self.finding_threshold[visual.rows[visual.global_tokens.shape[0]:]].to(probabilities)
        return (probabilities > thresholds).to(probabilities)

    def condition_on_findings(self, visual: VisualTokens, region_calls: torch.Tensor | None = None) -> VisualTokens:
        """Region tokens + ``calls @ finding_embedding`` (added to all a region's tokens, or to its mask token
        only with ``finding_conditioning_tokens="mask"``).

        ``region_calls`` (N, K) in [0, 1]; None: `region_calls` (the head's own, detached). Without
        ``finding_conditioning`` the tokens are returned unchanged. A relevance map passes the fitted detector's
        calls with some switched off, to measure each call's share of the selection
        (`engine.explain.relevance.call_shapley`)."""
        if self.finding_embedding is None or visual.region_tokens.shape[0] == 0:
            return visual
        if region_calls is None:
            region_calls = self.region_calls(visual)
        dtype = visual.region_tokens.dtype
        shift = (region_calls.to(self.finding_embedding.dtype) @ self.finding_embedding).to(dtype)   # (N, hidden)
        if self.config.finding_conditioning_tokens == "mask":
            tokens = torch.cat([visual.region_tokens[:, :-1], visual.region_tokens[:, -1:] + shift[:, None, :]], dim=1)
        else:
            tokens = visual.region_tokens + shift[:, None, :]
        return dataclasses.replace(visual, region_tokens=tokens)

    # ---- the per-sample special table and the gather ---------------------------------------------
    def special_table(self, visual: VisualTokens, region_sample: torch.Tensor,
                      region_slot: torch.Tensor) -> torch.Tensor:
        """(B, 4 + L + R(L+1), hidden): markers, global tokens, then slot j's 33 tokens at 4+L+(L+1)j.

        Slots without a region stay zero, as in the reference."""
        B, L = visual.global_tokens.shape[0], self.num_latents
        dtype = visual.global_tokens.dtype
        markers = torch.cat([self.image_token_weight, self.region_token_weight]).to(dtype)   # (4, hidden)
        regions = visual.global_tokens.new_zeros(B * self.num_regions, L + 1, self.hidden_size)
        if region_sample.numel():
            _check_slots(region_sample, region_slot, B, self.num_regions)
            flat = region_sample * self.num_regions + region_slot                          # (N,)
            regions = regions.index_put((flat.to(regions.device),), visual.region_tokens.to(dtype))
        regions = regions.view(B, self.num_regions * (L + 1), self.hidden_size)
        return torch.cat([markers.expand(B, -1, -1), visual.global_tokens, regions], dim=1)

    def embed(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden): ids < V from the tied text embedding, the rest from ``table``."""
        if self.weight is None:
            raise RuntimeError("the fusion layer's text embedding is not tied to an LLM yet")
        V = self.vocab_size
        if int(input_ids.max()) >= V + table.shape[1] or int(input_ids.min()) < 0:
            raise ValueError(f"input ids must lie in 0..{V + table.shape[1] - 1}, got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        is_special = input_ids >= V
        text = nn.functional.embedding(input_ids.masked_fill(is_special, 0), self.weight).to(table.dtype)
        rows = (input_ids - V).clamp(min=0)                                                 # (B, T)
        special = torch.gather(table, 1, rows[..., None].expand(-1, -1, table.shape[-1]))  # (B, T, hidden)
        return torch.where(is_special[..., None], special, text)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor, region_images: torch.Tensor,
                region_masks: torch.Tensor, region_sample: torch.Tensor, region_slot: torch.Tensor,
                region_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs embeds (B, T, hidden) for ids and the batch's flat region lists."""
        visual = self.encode_visual(images, region_images, region_masks, region_ids=region_ids)
        return self.embed(input_ids, self.special_table(visual, region_sample, region_slot))


def _check_slots(region_sample: torch.Tensor, region_slot: torch.Tensor, batch: int, num_regions: int) -> None:
    if region_sample.shape != region_slot.shape:
        raise ValueError(f"region_sample {tuple(region_sample.shape)} and region_slot "
                         f"{tuple(region_slot.shape)} must have the same shape")
    if int(region_sample.min()) < 0 or int(region_sample.max()) >= batch:
        raise ValueError(f"region_sample must index the {batch} samples of the batch")
    if int(region_slot.min()) < 0 or int(region_slot.max()) >= num_regions:
        raise ValueError(f"region_slot must lie in 0..{num_regions - 1}")
    flat = region_sample * num_regions + region_slot
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("two regions of one sample were given the same slot")
