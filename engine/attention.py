"""Raw attention maps: where the model's attention went when it wrote a token, a sentence or a section.

This is the *raw attention* option of the viewer and ``reg2rg-generate``; it is not evidence (on the demo
model it is close to uniform over the visual tokens and barely depends on the selection). The default
explanation is the relevance map of `reg2rg.engine.explain.relevance`.

The path from a generated token back to the CT the radiologist is looking at:

1. **LLM → visual tokens.** One teacher-forced forward pass over prompt + generated text with eager
   attention (switched on for that pass only, so generation keeps its fast kernel). Forward hooks on
   the attention modules keep only the rows of the selected tokens and the visual key positions, so
   memory stays small even at 7B (no (layers × heads × T × T) tensor is kept). The row of generated
   token *i* is the query position that *produced* it (the last input position of that decoding step).
   Layers and heads are selectable; the shares are the mean over the selected tokens, layers and heads
   of the attention mass on the 32 global image tokens and on each region slot's 33 tokens.
2. **Visual tokens → perceiver latents.** Visual token *k* of a group is the projection of perceiver
   latent *k* of that group's volume (``fc`` acts per latent); the region's 33rd token encodes the mask
   and is counted in the shares but has no place in the image (it summarises the mask as a whole).
3. **Latents → ViT patches.** The latent→patch attention of the *last* perceiver layer, mean over its
   heads, each latent's row renormalised over the patches. The last layer is the one whose output the
   LLM reads; the earlier layers only shape the latents' queries.
4. **Patches → model voxels → CT voxels.** The patch grid (``h w d``, depth fastest, as the ViT's
   rearrange) is expanded block-wise onto the model grid (each patch covers exactly its voxels), and
   `Geometry.heatmap_to_original` maps it onto the original CT grid; region maps land inside their own
   crop box. Group maps are summed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .fileio import atomic_path

if TYPE_CHECKING:
    from .generation import DraftResult, ReportEngine

GLOBAL = "global"


class HeatmapOnCT:
    """What every map overlaid on the CT offers: ``heatmap`` (the study's shape, stored voxel order) with
    the CT's ``affine``, its peak and a NIfTI copy. Subclasses name their ``nifti_intent``."""

    heatmap: np.ndarray
    affine: np.ndarray
    nifti_intent = "heatmap"

    @property
    def peak_voxel(self) -> tuple[int, int, int]:
        """Voxel index (stored order) of the heatmap maximum."""
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape))  # type: ignore[return-value]

    def save_nifti(self, path: str | os.PathLike) -> str:
        """Write the heatmap as a float32 NIfTI with the CT's affine; returns the path."""
        import nibabel as nib

        path = os.fspath(path)
        img = nib.Nifti1Image(np.asarray(self.heatmap, dtype=np.float32), np.asarray(self.affine, dtype=np.float64))
        img.header.set_intent("estimate", name=self.nifti_intent)
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
        return path


@dataclass
class AttentionMap(HeatmapOnCT):
    """Attention of a selection of generated tokens, as shares and as a heatmap on the original CT.

    ``shares``: ``'global'`` and each region name (slot order) -> fraction of the total attention
    (averaged over tokens, layers and heads); ``other_share`` is the rest (prompt words, generated
    text, markers). ``heatmap`` has the study's shape (stored voxel order) and ``affine`` is the CT's,
    so the map overlays the CT in any viewer. ``visual_weights``: group -> attention on its tokens.
    """

    token_indices: tuple[int, ...]
    layers: tuple[int, ...]
    heads: str | tuple[int, ...]
    shares: dict[str, float]
    other_share: float
    heatmap: np.ndarray
    affine: np.ndarray
    visual_weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    nifti_intent = "attention"


# ------------------------------------------------------------------------------------------------
# visual positions in the prompt
# ------------------------------------------------------------------------------------------------
def visual_positions(prompt_ids: Sequence[int], special, slot_regions: dict[int, str]) -> dict[str, np.ndarray]:
    """Prompt positions of each visual group: ``'global'`` -> its L image tokens, region -> its L+1
    slot tokens (latents then the mask token). ``special`` is a `tokens.SpecialIds`."""
    ids = np.asarray(prompt_ids)
    where = {int(t): p for p, t in enumerate(ids.tolist()) if t >= special.first_image_token}
    out = {GLOBAL: np.array([where[t] for t in special.image_tokens()])}
    for slot, region in sorted(slot_regions.items()):
        out[region] = np.array([where[t] for t in special.region_tokens(slot)])
    return out


# ------------------------------------------------------------------------------------------------
# LLM attention (one teacher-forced pass)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eager_attention(base_model):
    """Switch a HF model to eager attention (which returns weights) for the duration of a block."""
    previous = base_model.config._attn_implementation
    if previous == "eager":
        yield
        return
    base_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        base_model.set_attn_implementation(previous)


def _attention_modules(base_model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in base_model.model.layers]


def capture_attention(lang_model, inputs_embeds: torch.Tensor, query_positions: Sequence[int],
                      key_positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None) -> torch.Tensor:
    """Attention rows of one forward pass, reduced while the pass runs.

    Returns (n_layers, Q, K) float32 on the CPU: for each selected layer (default all), the attention of
    the ``query_positions`` on ``key_positions`` (default all keys), averaged over ``heads`` (default all).
    ``inputs_embeds`` is (1, T, hidden).
    """
    base = lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model
    modules = _attention_modules(base)
    layer_ids = list(range(len(modules))) if layers is None else [int(l) for l in layers]
    for l in layer_ids:
        if not 0 <= l < len(modules):
            raise IndexError(f"layer {l} is outside 0..{len(modules) - 1}")
    n_heads = base.config.num_attention_heads
    head_ids = None if heads is None else [int(h) for h in heads]
    if head_ids is not None and any(not 0 <= h < n_heads for h in head_ids):
        raise IndexError(f"heads must lie in 0..{n_heads - 1}, got {head_ids}")
    dev = inputs_embeds.device
    q = torch.as_tensor(list(query_positions), dtype=torch.long, device=dev)
    k = None if key_positions is None else torch.as_tensor(list(key_positions), dtype=torch.long, device=dev)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(l: int):
        def hook(module, args, output):
            w = output[1]                                              # (1, heads, T, T)
            if w is None:
                raise RuntimeError("attention weights were not returned (eager attention is required)")
            w = w[0].index_select(1, q)                                # (heads, Q, T)
            if k is not None:
                w = w.index_select(2, k)                               # (heads, Q, K)
            if head_ids is not None:
                w = w[head_ids]
            captured[l] = w.float().mean(0).cpu()                      # (Q, K)
        return hook

    handles = [modules[l].register_forward_hook(hook_for(l)) for l in layer_ids]
    try:
        with eager_attention(base), torch.inference_mode():
            # logits of one position only: the pass is for the attention, not the text
            lang_model(inputs_embeds=inputs_embeds, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([captured[l] for l in layer_ids])              # (n_layers, Q, K)


def group_shares(weights: np.ndarray, columns: dict[str, np.ndarray]) -> dict[str, float]:
    """Attention mass per group: ``weights`` (K,) over the captured key columns; ``columns`` maps a
    group to its column indices in ``weights``."""
    return {g: float(weights[c].sum()) for g, c in columns.items()}


# ------------------------------------------------------------------------------------------------
# visual tokens -> CT
# ------------------------------------------------------------------------------------------------
def latent_patch_attention(perceiver_attention: Sequence[torch.Tensor]) -> torch.Tensor:
    """(V, L, P) latent→patch attention of the last perceiver layer, heads averaged, rows renormalised.

    ``perceiver_attention``: per layer (V, heads, L, P) for the V encoded volumes."""
    last = perceiver_attention[-1].float().mean(1)                      # (V, L, P)
    return last / last.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_map(latent_weights: np.ndarray, latent_patch: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """(h, w, d) patch-grid map: latent weights (L,) pushed through latent→patch attention (L, P).

    Patches are numbered ``(h w d)`` with depth fastest, the ViT's rearrange order."""
    flat = np.asarray(latent_weights, dtype=np.float64) @ np.asarray(latent_patch, dtype=np.float64)   # (P,)
    return flat.reshape(grid).astype(np.float32)


def patches_to_voxels(grid_map: np.ndarray, input_size: tuple[int, int, int]) -> np.ndarray:
    """Expand a (h, w, d) patch map onto the (H, W, D) model grid: each patch covers its own block."""
    reps = [s // g for s, g in zip(input_size, grid_map.shape)]
    if any(r * g != s for r, g, s in zip(reps, grid_map.shape, input_size)):
        raise ValueError(f"patch grid {grid_map.shape} does not tile the model grid {input_size}")
    out = grid_map
    for axis, r in enumerate(reps):
        out = np.repeat(out, r, axis=axis)
    return out                                                           # (H, W, D)


def project_to_ct(group_weights: dict[str, np.ndarray], latent_patch: dict[str, np.ndarray], geometry,
                  grid: tuple[int, int, int]) -> np.ndarray:
    """Sum over groups of their heatmaps on the original CT grid.

    ``group_weights``: group -> attention on its tokens ((L,) or (L+1,): the mask token is ignored);
    ``latent_patch``: group -> (L, P) latent→patch attention of that group's volume;
    ``geometry``: `preprocess.Geometry` (global map in the global crop box, a region's in its own box).
    """
    return grid_maps_to_ct(group_grid_maps(group_weights, latent_patch, grid), geometry)


def group_grid_maps(group_weights: dict[str, np.ndarray], latent_patch: dict[str, np.ndarray],
                    grid: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """group -> (h, w, d) patch-grid map of that group's attention (what a server sends a client)."""
    out = {}
    for group, w in group_weights.items():
        lp = np.asarray(latent_patch[group])
        out[group] = patch_map(np.asarray(w)[: lp.shape[0]], lp, grid)
    return out


def grid_maps_to_ct(grid_maps: dict[str, np.ndarray], geometry) -> np.ndarray:
    """Sum of the groups' patch-grid maps on the original CT grid (each region in its own crop box)."""
    out = np.zeros(geometry.original_shape, dtype=np.float32)
    for group, grid_map in grid_maps.items():
        model_map = patches_to_voxels(np.asarray(grid_map, dtype=np.float32), geometry.input_size)
        out += geometry.heatmap_to_original(model_map, None if group == GLOBAL else group)
    return out


# ------------------------------------------------------------------------------------------------
# the whole path, for a selection of a draft
# ------------------------------------------------------------------------------------------------
def attention_map(engine: "ReportEngine", result: "DraftResult", token_indices: Sequence[int] | int,
                  layers: str | Sequence[int] = "all", heads: str | Sequence[int] = "mean") -> AttentionMap:
    """Attention of the selected generated tokens: shares per visual group and a heatmap on the original
    CT (see the module docstring for the path). ``layers``: ``"all"`` or layer indices (their mean);
    ``heads``: ``"mean"`` (all heads) or head indices. One teacher-forced pass with eager attention; the
    head-mean rows of every token and layer are kept on the result after the first call, so later
    selections are instant. Call through `ReportEngine.attention_map` (which holds the engine's lock)."""
    from .generation import GenerationError

    idx = engine.check_selection(result, token_indices)
    prepared = result.prepared
    n = len(result.token_ids)
    groups = visual_positions(prepared.prompt_ids, engine.special, prepared.slot_regions)
    key_positions = np.concatenate(list(groups.values()))
    columns, c = {}, 0
    for g, pos in groups.items():
        columns[g] = np.arange(c, c + len(pos))
        c += len(pos)
    n_layers, _ = engine.layout
    layer_ids = list(range(n_layers)) if layers == "all" else [int(l) for l in layers]
    if not layer_ids or any(not 0 <= l < n_layers for l in layer_ids):
        raise GenerationError(f"layers must be 'all' or indices in 0..{n_layers - 1}, got {layers!r}")
    P = len(prepared.prompt_ids)
    lm = engine.model.lang_model
    if heads == "mean":
        rows = result.llm_attention_mean                                         # (layers, n, K)
        if rows is None:
            rows = capture_attention(lm, engine.teacher_embeds(result, n), [P - 1 + i for i in range(n)], key_positions)
            result.llm_attention_mean = rows
        sel = rows[layer_ids][:, idx]                                             # (l, q, K)
        head_spec: str | tuple[int, ...] = "mean"
    else:
        head_ids = [int(h) for h in heads]
        sel = capture_attention(lm, engine.teacher_embeds(result, max(idx) + 1), [P - 1 + i for i in idx],
                                key_positions, layer_ids, head_ids)
        head_spec = tuple(head_ids)
    weights = sel.mean(dim=(0, 1)).numpy()                                        # (K,)
    shares = group_shares(weights, columns)
    visual_weights = {g: weights[cols] for g, cols in columns.items()}
    latent_patch = {g: t.float().cpu().numpy() for g, t in prepared.latent_patch.items()}
    geometry = getattr(prepared.inputs, "geometry", None)
    # no geometry: a server's encoding of a client's pre-processed tensors (the client maps it onto its CT)
    heatmap = None if geometry is None else project_to_ct(visual_weights, latent_patch, geometry, prepared.patch_grid)
    affine = result.affine if result.affine is not None else np.eye(4)
    return AttentionMap(token_indices=tuple(idx), layers=tuple(layer_ids), heads=head_spec, shares=shares,
                        other_share=float(max(0.0, 1.0 - sum(shares.values()))), heatmap=heatmap,
                        affine=affine, visual_weights=visual_weights)
