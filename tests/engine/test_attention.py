"""Attention maps: known-answer projection onto the original CT (stored as is, flipped, reoriented),
shares equal to HF's own attention weights, layer/head selection, NIfTI output."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from reg2rg.engine.attention import project_to_ct
from reg2rg.engine.generation import GenerationError, GenerationSettings
from reg2rg.engine.preprocess import preprocess

from generation_fixtures import BOXES, SHAPE, box_study, tiny_engine

INPUT = (32, 32, 16)       # the tiny preset's model grid
GRID = (4, 4, 4)           # its ViT patch grid (patch 8 x 8 x 4)
L = 4                      # latents
PATCH = (1, 2, 3)          # the patch the forced latent looks at


def _forced_inputs(region: str, latent: int = 2):
    """All LLM attention on one visual token of ``region``; that latent looks at one patch only."""
    weights = np.zeros(L + 1, dtype=np.float32)
    weights[latent] = 1.0
    lp = np.full((L, int(np.prod(GRID))), 1.0 / np.prod(GRID), dtype=np.float32)
    lp[latent] = 0.0
    lp[latent, np.ravel_multi_index(PATCH, GRID)] = 1.0       # (h w d) order, depth fastest
    return {region: weights}, {region: lp}


def _expected_voxels(start, stop):
    """Voxels (per axis) whose centres fall inside the patch's block of the crop box, computed from the
    box alone: a model voxel covers 1/INPUT of the box, a patch GRID-th of it."""
    out = []
    for axis in range(3):
        a, b = start[axis], stop[axis]
        frac = (np.arange(a, b) - a + 0.5) / (b - a)                  # centre position inside the box, 0..1
        lo, hi = PATCH[axis] / GRID[axis], (PATCH[axis] + 1) / GRID[axis]
        out.append(set((np.arange(a, b)[(frac >= lo) & (frac < hi)]).tolist()))
    return out


def _check_peak(heatmap, start, stop):
    assert heatmap.shape == SHAPE
    assert heatmap.max() == pytest.approx(1.0, abs=1e-5)
    want = _expected_voxels(start, stop)
    hot = np.argwhere(heatmap > 0.999)
    assert len(hot)
    for v in hot:
        assert all(int(v[a]) in want[a] for a in range(3)), (v, want)
    # the block's interior voxels are all at the maximum, nothing outside the region's box
    for v in np.ndindex(*(len(w) for w in want)):
        idx = tuple(sorted(want[a])[v[a]] for a in range(3))
        interior = all(sorted(want[a])[0] < idx[a] < sorted(want[a])[-1] for a in range(3))
        if interior:
            assert heatmap[idx] == pytest.approx(1.0, abs=1e-5)
    outside = np.ones(SHAPE, bool)
    outside[tuple(slice(a, b) for a, b in zip(start, stop))] = False
    assert not heatmap[outside].any()


def test_forced_attention_lands_on_the_patch_in_the_original_ct():
    study = box_study()
    geometry = preprocess(study, INPUT, None, ["heart"]).geometry
    heatmap = project_to_ct(*_forced_inputs("heart"), geometry, GRID)
    _check_peak(heatmap, *BOXES["heart"])


def test_forced_attention_on_a_study_stored_flipped():
    # the model sees the stored order: the patch lies in the flipped box of the stored array
    study = box_study(flip_axis=0)
    (a0, a1, a2), (b0, b1, b2) = BOXES["lung"]
    flipped_box = ((SHAPE[0] - b0, a1, a2), (SHAPE[0] - a0, b1, b2))
    geometry = preprocess(study, INPUT, None, ["lung"]).geometry
    heatmap = project_to_ct(*_forced_inputs("lung"), geometry, GRID)
    _check_peak(heatmap, *flipped_box)


def test_reoriented_model_grid_maps_back_to_the_same_anatomy():
    # with reorientation to RAS, a flipped storage shows the model the same volume, so the heatmap
    # must mark the same place in the world (mm), i.e. the flipped voxels of the stored array
    plain, flipped = box_study(), box_study(flip_axis=0)
    maps = []
    for study in (plain, flipped):
        geometry = preprocess(study, INPUT, "RAS", ["bone"]).geometry
        maps.append(project_to_ct(*_forced_inputs("bone"), geometry, GRID))
    _check_peak(maps[0], *BOXES["bone"])
    np.testing.assert_allclose(maps[1], np.flip(maps[0], 0), atol=1e-6)
    world = [s.affine @ np.r_[np.argwhere(m > 0.999).mean(0), 1] for s, m in zip((plain, flipped), maps)]
    np.testing.assert_allclose(world[0], world[1], atol=1e-6)


def test_global_tokens_map_into_the_global_crop_box():
    study = box_study()
    inputs = preprocess(study, INPUT, None, [])
    (w,), (lp,) = _forced_inputs("global")[0].values(), _forced_inputs("global")[1].values()
    heatmap = project_to_ct({"global": w[:L]}, {"global": lp}, inputs.geometry, GRID)
    _check_peak(heatmap, *inputs.geometry.box)


# ---- through the engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return tiny_engine()


@pytest.fixture(scope="module")
def result(engine):
    return engine.draft(box_study(), settings=GenerationSettings(max_new_tokens=8))


def _hf_attentions(engine, result):
    """Every layer's attention from HF's own ``output_attentions`` on prompt + generated text."""
    prepared = result.cache["prepared"]
    lm = engine.model.lang_model
    base = lm.get_base_model()
    ids = torch.tensor([result.token_ids[:-1]])
    with torch.no_grad():
        embeds = torch.cat([prepared.prompt_embeds, lm.get_input_embeddings()(ids)], dim=1)
        previous = base.config._attn_implementation
        base.set_attn_implementation("eager")
        try:
            att = lm(inputs_embeds=embeds, output_attentions=True).attentions
        finally:
            base.set_attn_implementation(previous)
    return torch.stack([a[0] for a in att])                          # (layers, heads, T, T)


def _groups(engine, result):
    ids = np.asarray(result.prompt_ids)
    sp = engine.special
    groups = {"global": np.flatnonzero((ids >= sp.first_image_token) & (ids < sp.first_region_token))}
    for slot, region in result.slot_regions.items():
        first = sp.first_region_token + slot * sp.tokens_per_region
        groups[region] = np.flatnonzero((ids >= first) & (ids < first + sp.tokens_per_region))
    return groups


@pytest.mark.parametrize("tokens,layers,heads", [([0], "all", "mean"), ([2, 5, 6], "all", "mean"),
                                                 ([1, 3], [1], [0, 2])])
def test_shares_are_hf_attention_mass_on_each_visual_group(engine, result, tokens, layers, heads):
    att = _hf_attentions(engine, result)
    P = len(result.prompt_ids)
    rows = att[:, :, [P - 1 + i for i in tokens]]                      # (layers, heads, q, T)
    if layers != "all":
        rows = rows[layers]
    if heads != "mean":
        rows = rows[:, heads]
    mean = rows.mean(dim=(0, 1, 2)).numpy()                           # (T,)
    am = engine.attention_map(result, tokens, layers=layers, heads=heads)
    groups = _groups(engine, result)
    assert list(am.shares) == ["global", "bone", "heart", "lung"]
    for g, pos in groups.items():
        assert am.shares[g] == pytest.approx(float(mean[pos].sum()), abs=1e-5)
        np.testing.assert_allclose(am.visual_weights[g], mean[pos], atol=1e-5)
    assert am.other_share == pytest.approx(1 - sum(float(mean[p].sum()) for p in groups.values()), abs=1e-5)
    assert am.heatmap.shape == SHAPE


def test_heatmap_follows_the_models_perceiver_attention(engine, result):
    am = engine.attention_map(result, [4])
    prepared = result.cache["prepared"]
    inputs = prepared.inputs
    slots = [result.slot_regions[j] for j in sorted(result.slot_regions)]
    with torch.no_grad():
        visual = engine.model.encode_visual(inputs.image[None], torch.stack([inputs.regions[r] for r in slots]),
                                            torch.stack([inputs.masks[r] for r in slots]), return_attention=True)
    last = visual.perceiver_attention[-1].mean(1)                     # (1 + N, L, P)
    last = (last / last.sum(-1, keepdim=True)).numpy()
    lp = {"global": last[0], **{r: last[1 + j] for j, r in enumerate(slots)}}
    expected = project_to_ct(am.visual_weights, lp, inputs.geometry, GRID)
    np.testing.assert_allclose(am.heatmap, expected, rtol=1e-4, atol=1e-7)
    assert am.heatmap.max() > 0


def test_attention_pass_leaves_generation_kernel_untouched(engine, result):
    engine.attention_map(result, [0], heads=[1])
    assert engine.model.lang_model.get_base_model().config._attn_implementation == "sdpa"


def test_save_nifti_has_the_ct_affine(engine, result, tmp_path):
    am = engine.attention_map(result, [0, 1])
    img = nib.load(am.save_nifti(tmp_path / "att.nii.gz"))
    np.testing.assert_allclose(img.affine, box_study().affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), am.heatmap)


def test_bad_selections_are_refused(engine, result):
    with pytest.raises(GenerationError, match="at least one"):
        engine.attention_map(result, [])
    with pytest.raises(GenerationError, match="outside"):
        engine.attention_map(result, [99])
    with pytest.raises(GenerationError, match="layers"):
        engine.attention_map(result, [0], layers=[7])
