"""Relevance maps and region dependence: the evidence in the CT for a selection of generated tokens.

**Relevance map** (the default explanation): gradient × input on the ViT's patch tokens. One
teacher-forced pass with gradients runs the whole model — ViT transformer, perceiver, projection, LLM —
from the embedded patch tokens of every volume (global and each region crop) to the selected tokens'
log-probability ``S = Σ_i log p(token_i | prefix)``; one backward pass gives ``∂S/∂x`` for every patch
token ``x``. A patch's relevance is ``|Σ_channels x · ∂S/∂x|``: the first-order change of the selection's
log-probability if that patch's content were removed. Unlike raw attention it is exactly zero for a
patch the output does not depend on, it changes with the selection (another target, another gradient),
and it follows the model through every layer (the generic rule for bi-modal transformers; attention
weights alone do not: attention to a token whose value is then ignored still looks important).
Chosen over the alternatives by measurement (`bench/explain.py`, bench/RESULTS.md): patch occlusion
needs one pass per patch and volume (≈1 400 LLM passes for the demo model's 11 volumes × 128 patches),
far over the 2-s budget; raw attention failed both the known-answer test and selection dependence.

**A model with a fitted finding detector** (``finding_head_input="latents"``, the demo model): its binary
calls condition the LLM, and a call has no useful gradient. Each call that was made (an uncalled finding is
no evidence in any voxel) gets its share ``φ_k`` of the selection's log-probability: its **Shapley value**
over the made calls (`call_shapley`: the study's made calls switched off in every combination, one batched
teacher-forced pass), and that share goes back to the patches by **occlusion** of the detector
(`call_occlusion`): ``φ_k · (logit_k − logit_k with patch p emptied)`` for each patch of the region's crop and
of its mask — the detector's true response to removing the patch in place of its linearisation. Chosen by
measurement on validation and training-side phantoms (never test; bench/RESULTS.md, explain): occlusion
over the logit's gradient (18 of 31 sentences that report a finding peaked on the lesion dilated 10 mm,
against 12 and 9 for the gradient through the calls); then the Shapley share over the gradient ``∂S/∂call``
(84 validation phantoms: 44 of 47 against 35 of 47; pleural effusions 15 of 16 against 7 — the sentence needs
the effusion and the side call together, and the gradient at the full set of calls gave it all to the side
call, whose detector also reads the other pleura).

The patch values go onto the CT as a *density*: a patch's relevance is spread evenly over the CT voxels
its block covers (so summing the map over the CT gives back the total relevance, and a fine region-crop
patch is not outweighed by a coarse global patch just because it covers fewer voxels). A region crop's
map is kept inside the region's mask, the only voxels of that crop the model saw (the rest is -1024).

**Region dependence**: the drop of the same log-probability when a visual group (the global image, or
one region slot) is removed from the prompt — its special run ``<image>…</image>`` or ``<region>…</region>``
masked out of the attention, every other token at its own position — computed for all groups in ONE
batched teacher-forced pass (row 0 the full prompt, one row per removed group). The causal counterpart
of the attention shares. Masking, not deleting: deleting a run shifts the positions of all that follows
and moves the whole prompt out of what the model was trained on, so every slot looked "needed" (measured
on the known-answer model of tests/engine/test_explain.py: deleting an uninformative slot cost more
than deleting the one the answer came from; masking names the right slot).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..attention import GLOBAL, HeatmapOnCT, patches_to_voxels, visual_positions
from ..model.density import occluded_density

if TYPE_CHECKING:
    from ..generation import DraftResult, ReportEngine


@dataclass
class RelevanceMap(HeatmapOnCT):
    """Relevance of a selection of generated tokens, as a heatmap on the original CT.

    ``heatmap`` has the study's shape (stored voxel order), ``affine`` is the CT's. ``patch_relevance``:
    group (``'global'`` or a region) -> (h, w, d) signed gradient × input of each ViT patch;
    ``group_relevance``: group -> sum of the absolute patch relevance (what each volume contributed).
    ``log_prob``: the selection's log-probability; ``seconds``: the cost of the map.
    """

    token_indices: tuple[int, ...]
    heatmap: np.ndarray
    affine: np.ndarray
    patch_relevance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    group_relevance: dict[str, float] = field(default_factory=dict)
    log_prob: float = 0.0
    seconds: float = 0.0
    method: str = "gradient_x_input"

    nifti_intent = "relevance"


@dataclass
class RegionDependence:
    """How much the selection's log-probability drops (nats) without each visual group.

    ``drops``: ``'global'`` and each region (slot order) -> log p(full prompt) - log p(without it);
    positive = the selection relied on that group. ``log_prob``: the selection's log-probability with
    the full prompt."""

    token_indices: tuple[int, ...]
    drops: dict[str, float]
    log_prob: float
    seconds: float = 0.0

    @property
    def strongest(self) -> str:
        """The group whose removal lowers the selection's probability most."""
        return max(self.drops, key=lambda g: self.drops[g])

    def to_dict(self) -> dict:
        return {"token_indices": list(self.token_indices), "drops_nats": dict(self.drops),
                "log_prob": self.log_prob, "strongest": self.strongest}

    @classmethod
    def from_dict(cls, d: dict) -> "RegionDependence":
        """The inverse of `to_dict` (what ``reg2rg-serve`` sends a client, with its ``seconds``)."""
        return cls(tuple(int(i) for i in d["token_indices"]), {str(g): float(v) for g, v in d["drops_nats"].items()},
                   float(d["log_prob"]), float(d.get("seconds", 0.0)))


def _base(lang_model):
    return lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model


def selected_log_prob(lang_model, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sum over each row's selected tokens of log p(target | prefix).

    ``embeds`` (B, T, hidden); ``positions`` (B, Q) the input positions whose next-token distribution
    chose ``targets`` (B, Q). Only those positions go through the LM head (a 7B vocabulary is large)."""
    base = _base(lang_model)
    hidden = base.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))       # (B, Q, hidden)
    logits = base.lm_head(picked).float()                                                   # (B, Q, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].sum(-1)      # (B,)


MASK = "mask:"        # patch_relevance key prefix of a region's mask-encoder patches


def relevance_map(engine: "ReportEngine", result: "DraftResult", token_indices: Sequence[int] | int,
                  density: bool = True) -> RelevanceMap:
    """Gradient × input relevance of the selected generated tokens, on the original CT (see the module
    docstring). Call through `ReportEngine.relevance_map` (which holds the engine's lock)."""
    t0 = time.perf_counter()
    idx, patches, log_prob = patch_relevance(engine, result, token_indices)
    return relevance_from_patches(idx, patches, result.prepared.inputs, result.affine, log_prob,
                                  time.perf_counter() - t0, density)


def patch_relevance(engine: "ReportEngine", result: "DraftResult", token_indices: Sequence[int] | int
                    ) -> tuple[list[int], dict[str, np.ndarray], float]:
    """(selection, group -> (h, w, d) signed gradient × input of each patch, the selection's
    log-probability): the model's part of `relevance_map`, from the model-grid tensors alone (no
    geometry: what ``reg2rg-serve`` computes; the client projects it onto its CT with
    `relevance_from_patches`). Hold the engine's lock around it."""
    from ..generation import model_tensors

    idx = engine.check_selection(result, token_indices)
    prepared = result.prepared
    model, dev = engine.model, engine.device
    slots = prepared.slots
    images, region_images, region_masks, region_sample, region_slot, region_ids = model_tensors(
        prepared.inputs, slots, dev, engine.dtype)
    upto = max(idx) + 1
    P = len(prepared.prompt_ids)
    ids = torch.tensor([list(prepared.prompt_ids) + result.token_ids[: upto - 1]], dtype=torch.long, device=dev)
    positions = torch.tensor([[P - 1 + i for i in idx]], dtype=torch.long, device=dev)
    targets = torch.tensor([[result.token_ids[i] for i in idx]], dtype=torch.long, device=dev)
    layer = model.embedding_layer
    detector = engine.finding_detector and layer.finding_embedding is not None and bool(slots)
    with torch.enable_grad():
        with torch.no_grad():
            x = layer.embed_volumes(images, region_images)                                  # (1+N, P, dim)
            xm = layer.mask_encoder.embed_patches(region_masks.to(x.dtype)) if slots else None  # (N, Pm, dm)
        leaves = [x.detach().requires_grad_(True)]
        if xm is not None:
            leaves.append(xm.detach().requires_grad_(True))
        visual = model.encode_visual(images, region_images, region_masks, patch_tokens=leaves[0],
                                     mask_patch_tokens=leaves[1] if xm is not None else None, region_ids=region_ids)
        # the fitted detector's calls are constants here: the gradient reaches the voxels through the LLM's
        # reading of the tokens, and through the calls by their Shapley values and occlusion below
        calls = layer.region_calls(visual).detach() if detector else None
        embeds = model.embed_inputs(ids, images, region_images, region_masks, region_sample, region_slot,
                                    visual=visual, region_calls=calls)
        log_prob = selected_log_prob(model.lang_model, embeds, None, positions, targets)[0]
        grads = torch.autograd.grad(log_prob, leaves)
    signed = [(g.float() * v.detach().float()).sum(-1).cpu().numpy() for g, v in zip(grads, leaves)]
    if detector:
        def selection_log_probs(variants: torch.Tensor) -> torch.Tensor:
            rows = torch.cat([model.embed_inputs(ids, images, region_images, region_masks, region_sample,
                                                 region_slot, visual=visual, region_calls=c) for c in variants])
            return selected_log_prob(model.lang_model, rows, None, positions.expand(len(rows), -1),
                                     targets.expand(len(rows), -1))

        weights = call_shapley(calls, selection_log_probs)  # each made call's share of S (N, K), in nats
        for j in torch.nonzero(weights.abs().sum(1) > 0).flatten().tolist():
            crop, mask = call_occlusion(layer, x[1 + j], xm[j], visual.rows[1 + j], weights[j],
                                        region_images[j], region_masks[j])
            signed[0][1 + j] += crop
            signed[1][j] += mask
    grid = tuple(visual.patch_grid)
    patches = {g: signed[0][k].reshape(grid) for k, g in enumerate([GLOBAL, *slots])}
    if xm is not None:
        mask_grid = model.config.mask_encoder.grid(tuple(region_masks.shape[-3:]))
        patches.update({MASK + r: signed[1][k].reshape(mask_grid) for k, r in enumerate(slots)})
    return idx, patches, float(log_prob.detach())


OCCLUSION_CHUNK = 32      # volumes per ViT + perceiver pass of `call_occlusion`
SHAPLEY_EXACT_MAX = 4     # made calls whose Shapley values `call_shapley` computes exactly (2^m rows)
SHAPLEY_PERMUTATIONS = 4  # orders `call_shapley` takes for more made calls than that (half seeded, half reversed)
SHAPLEY_CHUNK = 16        # LLM rows per pass of `call_shapley`


@torch.no_grad()
def call_shapley(calls: torch.Tensor, log_probs, permutations: int = SHAPLEY_PERMUTATIONS, seed: int = 0
                 ) -> torch.Tensor:
    """(N, K) float32: each call that was made (``calls`` (N, K) 0/1), its Shapley value on the selection's
    log-probability ``S``; 0 for the calls not made (an uncalled finding is no evidence in any voxel).

    The players are the m made calls; a coalition keeps its calls and switches the other made calls off (the
    uncalled ones stay off). ``log_probs(variants)`` gives ``S`` for a (R, N, K) stack of call tensors (R LLM
    rows, batched here by `SHAPLEY_CHUNK`). With m ≤ `SHAPLEY_EXACT_MAX` every coalition is evaluated (at most
    16 rows; the demo model's validation and test studies make 1–4 calls) and the value is exact; beyond that
    it is the mean marginal contribution over ``permutations`` orders (m + 1 rows each): seeded random orders
    and their reverses, so a joint effect of two calls is still shared exactly. The values add up to S(all
    made calls) − S(none). Cost on the demo model (one CPU thread): 16 rows ≈ 0.5 s, 64 rows ≈ 1.8 s — hence
    the exact limit of 4 calls and 4 orders beyond it, within a map's 2-s budget.

    Why not ∂S/∂call · call (the gradient at the full set of calls, used before): calls act together — the
    LLM writes "Left pleural effusion" only with both the effusion and the side call, and at the full set the
    gradient gave the effusion call ≈ 0 (even a negative share) and the whole sentence to the side call, whose
    detector reads the other pleura as much as the fluid. The Shapley value shares such a joint effect between
    the calls that make it (measured on validation phantoms; bench/RESULTS.md, explain)."""
    made = [tuple(jk) for jk in torch.nonzero(calls > 0.5).tolist()]
    out = torch.zeros(calls.shape, dtype=torch.float32, device=calls.device)
    m = len(made)
    if not m:
        return out

    def variant(coalition: int) -> torch.Tensor:
        c = calls.clone()
        for i, (j, k) in enumerate(made):
            if not coalition >> i & 1:
                c[j, k] = 0
        return c

    if m <= SHAPLEY_EXACT_MAX:
        coalitions = list(range(1 << m))
        orders = None
    else:
        generator = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(m, generator=generator).tolist() for _ in range(max(1, permutations // 2))]
        orders += [order[::-1] for order in orders]       # antithetic: a pair's joint effect is shared exactly
        coalitions = sorted({sum(1 << i for i in order[:n]) for order in orders for n in range(m + 1)})
    value: dict[int, float] = {}
    for lo in range(0, len(coalitions), SHAPLEY_CHUNK):
        chunk = coalitions[lo: lo + SHAPLEY_CHUNK]
        for coalition, s in zip(chunk, log_probs(torch.stack([variant(c) for c in chunk])).float().tolist()):
            value[coalition] = s
    phi = [0.0] * m
    if orders is None:
        weight = [math.factorial(n) * math.factorial(m - n - 1) / math.factorial(m) for n in range(m)]
        for coalition in coalitions:
            n = bin(coalition).count("1")
            for i in range(m):
                if not coalition >> i & 1:
                    phi[i] += weight[n] * (value[coalition | 1 << i] - value[coalition])
    else:
        for order in orders:
            coalition = 0
            for i in order:
                phi[i] += (value[coalition | 1 << i] - value[coalition]) / len(orders)
                coalition |= 1 << i
    for i, (j, k) in enumerate(made):
        out[j, k] = phi[i]
    return out


@torch.no_grad()
def call_occlusion(layer, tokens: torch.Tensor, mask_tokens: torch.Tensor, row, weights: torch.Tensor,
                   region_image: torch.Tensor, region_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The evidence for one region's detector calls, patch by patch, by occlusion: ``Σ_k weights_k ·
    (logit_k(crop) − logit_k(crop with patch p emptied))`` for each ViT patch of the region's crop, and the same
    for each patch of its mask (mask encoder). ``tokens`` (P, dim) / ``mask_tokens`` (Pm, dm): the crop's and
    the mask's embedded patches; ``weights`` (K,): each call's share of the selection's log-probability
    (`call_shapley`; 0 for calls not made); ``row``: the region's detector row. Emptying a patch token is exactly emptying its voxels
    (the patch embedding is patch-local): the crop's fill value (-1, the -1024 outside the mask) or no mask.

    Why occlusion, not the logit's gradient: the detector reads the perceiver's latents, which pool every
    patch; the logit's first-order sensitivity spreads over the whole crop, while emptying the patches one at
    a time finds those whose content the call needs (measured on validation phantoms: bench/RESULTS.md, explain).
    With ``finding_density`` the detector's densitometry of each occluded crop and mask comes from
    `engine.model.density.occluded_density` (exact, from the patches' own histograms).
    Cost: P + 1 ViT + perceiver passes of one crop and Pm + 1 mask-encoder passes, batched (`OCCLUSION_CHUNK`)."""
    P, Pm = tokens.shape[0], mask_tokens.shape[0]
    empty = layer.embed_volumes(region_image[None][:0], torch.full_like(region_image[None], -1.0))[0]
    empty_mask = layer.mask_encoder.embed_patches(torch.zeros_like(region_mask[None]).to(mask_tokens.dtype))[0]
    index = torch.arange(P)
    latents = []
    for lo in range(0, P + 1, OCCLUSION_CHUNK):
        rows = torch.arange(lo, min(P + 1, lo + OCCLUSION_CHUNK))        # row 0: nothing emptied; row p+1: patch p
        batch = tokens.expand(len(rows), -1, -1).clone()
        hit = rows > 0
        batch[hit.nonzero().flatten(), index[rows[hit] - 1]] = empty[rows[hit] - 1]
        latents.append(layer.perceiver(layer.vision_encoder.transformer(batch)))
    latents = torch.cat(latents)                                               # (P+1, L, dim)
    mask_rows = mask_tokens.expand(Pm + 1, -1, -1).clone()
    mask_index = torch.arange(Pm)
    mask_rows[mask_index + 1, mask_index] = empty_mask
    mask_features = torch.cat([layer.mask_encoder.transformer(c).mean(dim=1)
                               for c in mask_rows.split(OCCLUSION_CHUNK)])     # (Pm+1, mask dim)
    row = torch.as_tensor(row).reshape(1)
    crop_density = mask_density = None
    if layer.config.finding_density:        # the crop's densitometry with each patch emptied, exactly
        vision, masks = layer.config.vision, layer.config.mask_encoder
        crop_density, mask_density = occluded_density(
            region_image, region_mask, (vision.patch_size, vision.patch_size, vision.frame_patch_size),
            (masks.patch_size, masks.patch_size, masks.frame_patch_size))
    crop = layer.detector_logits(latents, mask_features[:1].expand(P + 1, -1), row.expand(P + 1), crop_density)
    mask = layer.detector_logits(latents[:1].expand(Pm + 1, -1, -1), mask_features, row.expand(Pm + 1), mask_density)
    w = weights.float()
    return (((crop[0] - crop[1:]) @ w).cpu().numpy(), ((mask[0] - mask[1:]) @ w).cpu().numpy())


def relevance_from_patches(token_indices: Sequence[int], patches: dict[str, np.ndarray], inputs, affine,
                           log_prob: float, seconds: float = 0.0, density: bool = True) -> RelevanceMap:
    """The `RelevanceMap` of `patch_relevance`'s patch maps on the CT of ``inputs`` (the study's
    `preprocess.ModelInputs`, with its geometry) and ``affine``."""
    return RelevanceMap(token_indices=tuple(int(i) for i in token_indices),
                        heatmap=project_relevance(patches, inputs, density),
                        affine=affine if affine is not None else np.eye(4), patch_relevance=dict(patches),
                        group_relevance={g: float(np.abs(m).sum()) for g, m in patches.items()},
                        log_prob=float(log_prob), seconds=seconds)


def _content(inputs, group: str) -> np.ndarray:
    """(H, W, D) model-grid voxels of a group that carry content: all of the global volume; the mask's
    voxels of a region crop (outside it the crop holds the -1024 fill, the scaled minimum -1) and of
    the region's mask volume (read by the mask encoder in the global box)."""
    if group == GLOBAL:
        return np.ones(inputs.geometry.input_size, dtype=bool)
    if group.startswith(MASK):
        return inputs.masks[group.removeprefix(MASK)][0].float().numpy() > 0.5
    return inputs.regions[group][0].float().numpy() > -1.0 + 1e-4


def project_relevance(patch_relevance: dict[str, np.ndarray], inputs, density: bool = True) -> np.ndarray:
    """Sum over groups of their |relevance| on the original CT grid (see the module docstring).

    ``patch_relevance``: group -> (h, w, d) patch map (``'global'``, a region's crop, or ``'mask:<region>'``
    for the patches of its mask, which the mask encoder reads in the global box); ``inputs``: the study's
    `preprocess.ModelInputs`. A patch's value covers the voxels of its block that carry content (a
    region's mask voxels); with ``density`` it is divided by the block's size in CT voxels, so coarse
    and fine patches are on one scale."""
    geometry = inputs.geometry
    size = geometry.input_size
    by_box: dict[str | None, np.ndarray] = {}
    for group, grid_map in patch_relevance.items():
        region = None if group == GLOBAL else group.removeprefix(MASK)
        box_region = None if group == GLOBAL or group.startswith(MASK) else region
        value = np.abs(grid_map).astype(np.float32)
        if density:
            start, stop = geometry.box_for(box_region)
            value = value / (float(np.prod(np.subtract(stop, start))) / float(np.prod(grid_map.shape)))
        model_map = patches_to_voxels(value, size) * _content(inputs, group)
        by_box[box_region] = by_box.get(box_region, 0) + model_map
    out = np.zeros(geometry.original_shape, dtype=np.float32)
    for box_region, model_map in by_box.items():      # one resampling per crop box
        out += geometry.heatmap_to_original(model_map, box_region)
    return out


def region_dependence(engine: "ReportEngine", result: "DraftResult", token_indices: Sequence[int] | int) -> RegionDependence:
    """Drop of the selection's log-probability when each visual group is removed from the prompt, all
    groups in one batched teacher-forced pass. Call through `ReportEngine.region_dependence`."""
    t0 = time.perf_counter()
    idx = engine.check_selection(result, token_indices)
    prepared = result.prepared
    upto = max(idx) + 1
    full = engine.teacher_embeds(result, upto)                                           # (1, T, hidden)
    T, P = full.shape[1], len(prepared.prompt_ids)
    groups = visual_positions(prepared.prompt_ids, engine.special, prepared.slot_regions)
    names = list(groups)
    B = 1 + len(names)
    dev = full.device
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    for b, g in enumerate(names, start=1):
        pos = groups[g]
        mask[b, int(pos.min()) - 1: int(pos.max()) + 2] = 0          # the start and end markers too
    embeds = full.expand(B, -1, -1)
    positions = torch.tensor([[P - 1 + i for i in idx]] * B, dtype=torch.long, device=dev)
    targets = torch.tensor([[result.token_ids[i] for i in idx]] * B, dtype=torch.long, device=dev)
    with torch.inference_mode():
        lp = selected_log_prob(engine.model.lang_model, embeds, mask, positions, targets).cpu().numpy()
    drops = {g: float(lp[0] - lp[1 + k]) for k, g in enumerate(names)}
    return RegionDependence(tuple(idx), drops, float(lp[0]), time.perf_counter() - t0)
