"""Explanations with known answers: a tiny model made to depend on one ViT patch or on one region slot
(the relevance map peaks in that patch, the region dependence names that slot, raw attention does not
know either), the findings check's scores against a plain forward pass, and — on the demo model —
selection dependence."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from reg2rg.engine.explain.findings import REGION_FINDINGS, _DraftPrefixes, finding_openings
from reg2rg.engine.explain.relevance import SHAPLEY_EXACT_MAX, call_shapley, selected_log_prob
from reg2rg.engine.generation import GenerationError, GenerationSettings, PreparedStudy
from reg2rg.engine.preprocess import preprocess

from generation_fixtures import SHAPE, box_study, tiny_engine

GRID = (4, 4, 4)            # the tiny preset's ViT patch grid (model grid 32 x 32 x 16, patches 8 x 8 x 4)
INPUT = (32, 32, 16)
PATCH = (2, 1, 3)           # the one patch the constructed model reads
SETTINGS = GenerationSettings(max_new_tokens=10)


def _block_voxels(box):
    """Voxels (per axis) of the original CT whose centres lie in PATCH's block of ``box``."""
    out = []
    for axis in range(3):
        a, b = box[0][axis], box[1][axis]
        frac = (np.arange(a, b) - a + 0.5) / (b - a)
        lo, hi = PATCH[axis] / GRID[axis], (PATCH[axis] + 1) / GRID[axis]
        out.append(np.arange(a, b)[(frac >= lo) & (frac < hi)])
    return out


@pytest.fixture(scope="module")
def one_patch_engine():
    """A tiny model whose output depends on ONE patch of the global volume: the ViT's input keeps only
    that patch token (every other token and the whole mask pathway are zeroed before the transformers)."""
    torch.set_num_threads(1)
    engine = tiny_engine(seed=3)
    layer = engine.model.embedding_layer
    keep = int(np.ravel_multi_index(PATCH, GRID))

    def only_patch(_module, args):
        x = args[0].clone()
        m = torch.zeros_like(x)
        m[0, keep] = 1.0
        return (x * m,)

    layer.vision_encoder.transformer.register_forward_pre_hook(only_patch)
    layer.mask_encoder.transformer.register_forward_pre_hook(lambda _m, args: (args[0] * 0.0,))
    return engine


def test_relevance_peaks_in_the_one_patch_the_model_reads(one_patch_engine):
    engine = one_patch_engine
    study = box_study()
    result = engine.draft(study, settings=SETTINGS)
    rm = engine.relevance_map(result, list(range(len(result.tokens))))
    # every other patch of every volume, and every mask patch, has exactly zero relevance
    glob = rm.patch_relevance["global"]
    assert abs(glob[PATCH]) > 0
    others = np.abs(glob).sum() - abs(glob[PATCH]) + sum(np.abs(v).sum() for g, v in rm.patch_relevance.items()
                                                        if g != "global")
    assert others == 0
    # on the CT: all the map lies in that patch's block of the global crop box (trilinear edges aside)
    box = result.geometry.box
    xs, ys, zs = _block_voxels(box)
    peak = rm.peak_voxel
    assert peak[0] in xs and peak[1] in ys and peak[2] in zs
    inside = rm.heatmap[np.ix_(xs, ys, zs)].sum()
    assert inside / rm.heatmap.sum() > 0.8
    # raw attention does not know what the model reads: most of its mass is elsewhere
    am = engine.attention_map(result, list(range(len(result.tokens))))
    assert am.heatmap[np.ix_(xs, ys, zs)].sum() / am.heatmap.sum() < 0.5
    # selection dependence of the gradient: another token, another (but still one-patch) map
    other = engine.relevance_map(result, [0])
    assert not np.allclose(other.patch_relevance["global"][PATCH], glob[PATCH])


def _contrast_study(heart_hu: int, name: str):
    """The box study with the heart box made bright or dark: the studies differ in the heart only."""
    from reg2rg.engine.study import Study

    st = box_study(name=name)
    vox = st.voxels.copy()
    # the box masks overlap: change only voxels no other region's crop shows
    vox[st.masks["heart"] & ~st.masks["bone"] & ~st.masks["lung"]] = heart_hu
    return Study(voxels=vox, affine=st.affine, masks=st.masks, name=name, source=st.source)


HEART_TEXT = {150: "Mild changes are noted.", -900: "No heart abnormality is seen."}


@pytest.fixture(scope="module")
def one_slot_engine(request):
    """A tiny model trained in the test to write the heart section from the heart slot: two studies that
    differ only inside the heart get two different heart sentences, the global image is hidden from the
    LLM (its tokens are zeroed), so the heart slot is the one place the answer can come from. Each study is
    also shown with one slot removed from the prompt (attention-masked, as the region dependence removes a
    slot): without the bone or the lung slot the report is the same, without the heart slot the heart
    sentence is the default one — so the other slots are known not to matter (without this, removing any
    slot puts two-example training out of its distribution and moves every word)."""
    from reg2rg.engine.attention import visual_positions
    from reg2rg.engine.generation import model_tensors
    from reg2rg.engine.tokens import build_example

    torch.set_num_threads(1)
    seed = getattr(request, "param", 5)
    engine = tiny_engine(seed=seed)
    model = engine.model
    regions = ["bone", "heart", "lung"]
    variants = [None, "bone", "lung", "heart"]      # the slot removed from the prompt (None: the full prompt)
    n_global = {"n": 1}

    def hide_global(_module, _args, out):
        out = out.clone()
        out[: n_global["n"]] = 0.0
        return out

    model.embedding_layer.fc.register_forward_hook(hide_global)
    tensors, rows = [], {k: [] for k in ("input_ids", "attention_mask", "labels")}
    for hu, text in HEART_TEXT.items():
        study = _contrast_study(hu, f"heart{hu}")
        inputs = preprocess(study, INPUT, None, regions)
        t = model_tensors(inputs, regions, "cpu", torch.float32)
        groups = None
        for removed in variants:
            heart_text = HEART_TEXT[-900] if removed == "heart" else text
            example = build_example(engine.tokenizer, [("bone", "No bone abnormality is seen."), ("heart", heart_text),
                                                       ("lung", "Lungs are clear.")], 512, engine.special)
            if groups is None:
                groups = visual_positions(example["input_ids"].tolist(), engine.special, dict(enumerate(regions)))
            tensors.append(t)
            mask = example["attention_mask"].clone()
            if removed:
                mask[int(groups[removed].min()) - 1: int(groups[removed].max()) + 2] = 0
            rows["input_ids"].append(example["input_ids"])
            rows["attention_mask"].append(mask)
            rows["labels"].append(example["labels"])
    images = torch.cat([t[0] for t in tensors])
    region_images, region_masks = torch.cat([t[1] for t in tensors]), torch.cat([t[2] for t in tensors])
    region_sample = torch.arange(len(tensors)).repeat_interleave(len(regions))
    region_slot = torch.arange(len(regions)).repeat(len(tensors))
    ex = {k: torch.stack(v) for k, v in rows.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n_global["n"] = len(tensors)
    torch.manual_seed(seed)
    # at least 250 steps, then on until every target token is the argmax under teacher forcing (the decision
    # word included): how many steps that takes varies with the CPU's float rounding, so no fixed count
    for step in range(2000):
        opt.zero_grad()
        out = model(ex["input_ids"], ex["attention_mask"], ex["labels"], images, region_images, region_masks,
                    region_sample, region_slot)
        if step >= 250 and float(out.token_accuracy) == 1.0:
            break
        out.loss.backward()
        opt.step()
    assert float(out.token_accuracy) == 1.0, "the heart-slot model did not learn its two reports"
    n_global["n"] = 1
    model.eval()
    return engine


def test_region_dependence_names_the_slot_the_model_reads(one_slot_engine):
    engine = one_slot_engine
    for hu, text in HEART_TEXT.items():
        result = engine.draft(_contrast_study(hu, "x"), settings=GenerationSettings(max_new_tokens=60))
        heart = next(s for s in result.sections if s.region == "heart")
        assert heart.text == text                     # the training worked: the heart sentence follows the heart
        if text.startswith("No"):
            continue     # the default sentence: written whatever the heart shows, so it depends on no slot
        # the word that decides between the two sentences (the rest follows from it and the text)
        idx = result.token_indices_in_span(heart.body_start, heart.end)[:1]
        dep = engine.region_dependence(result, idx)
        assert list(dep.drops) == ["global", "bone", "heart", "lung"]
        assert dep.strongest == "heart", dep.drops
        others = sorted(v for g, v in dep.drops.items() if g != "heart")
        assert dep.drops["heart"] > 0.2 and dep.drops["heart"] > 1.5 * max(others[-1], 0.0), dep.drops
        # the batched pass's full-prompt row equals an ordinary pass
        P = len(result.prompt_ids)
        full = engine.teacher_embeds(result, max(idx) + 1)
        with torch.no_grad():
            lp = selected_log_prob(engine.model.lang_model, full, None, torch.tensor([[P - 1 + i for i in idx]]),
                                   torch.tensor([[result.token_ids[i] for i in idx]]))
        assert dep.log_prob == pytest.approx(float(lp[0]), abs=1e-3)
        # the global image is hidden from the LLM: it has no relevance; the heart crop has
        rm = engine.relevance_map(result, idx)
        assert rm.group_relevance["global"] == 0 and rm.group_relevance["heart"] > 0


def test_relevance_map_is_on_the_ct_grid_and_saves(one_patch_engine, tmp_path):
    engine = one_patch_engine
    study = box_study(flip_axis=0)
    result = engine.draft(study, settings=SETTINGS)
    rm = engine.relevance_map(result, [0, 1])
    assert rm.heatmap.shape == SHAPE and rm.heatmap.max() > 0
    img = nib.load(rm.save_nifti(tmp_path / "rel.nii.gz"))
    np.testing.assert_allclose(img.affine, study.affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), rm.heatmap)
    with pytest.raises(GenerationError, match="at least one"):
        engine.relevance_map(result, [])
    with pytest.raises(GenerationError, match="outside"):
        engine.region_dependence(result, [99])


def test_result_carries_a_typed_prepared_study_and_the_engine_its_layout():
    engine = tiny_engine()
    result = engine.draft(box_study(), settings=GenerationSettings(max_new_tokens=3))
    assert isinstance(result.prepared, PreparedStudy)
    assert result.inputs is result.prepared.inputs and result.geometry is result.prepared.inputs.geometry
    assert engine.layout == (2, 4) or engine.layout == (engine.model.lang_model.config.num_hidden_layers,
                                                         engine.model.lang_model.config.num_attention_heads)
    assert engine.lock.acquire(blocking=False)
    engine.lock.release()


# ---- findings check -----------------------------------------------------------------------------
def test_finding_openings_are_stated_and_denied_in_the_register():
    from reg2rg.engine.labeller import find_mentions

    for region, names in REGION_FINDINGS.items():
        for name in names:
            abnormal, normal = finding_openings(name)
            assert abnormal and normal, name
            assert any(st == "affirmed" for s in abnormal for *_, st in find_mentions(s, name)), name
    assert "No pleural effusion" in finding_openings("Pleural effusion")[1]


def test_candidate_scores_equal_plain_forward_passes():
    """The one-row block-masked scoring of many candidates equals one ordinary pass per candidate."""
    torch.set_num_threads(1)
    engine = tiny_engine()
    result = engine.draft(box_study(), settings=GenerationSettings(max_new_tokens=8))
    prefixes = _DraftPrefixes(engine, result)
    cands = [[5, 9, 11], [7], [5, 9, 12, 13], [20, 21]]
    for k in (0, 3, 8):
        got = prefixes.score(k, cands)
        base = engine.teacher_embeds(result, k + 1)
        for c, g in zip(cands, got):
            emb = torch.cat([base, engine.model.lang_model.get_input_embeddings()(torch.tensor([c]))], dim=1)
            P = base.shape[1]
            pos = torch.tensor([[P - 1 + j for j in range(len(c))]])
            with torch.no_grad():
                want = selected_log_prob(engine.model.lang_model, emb, None, pos, torch.tensor([c]))
            assert g == pytest.approx(float(want[0]), abs=2e-4)


def test_findings_check_flags_follow_the_threshold():
    torch.set_num_threads(1)
    engine = tiny_engine()
    study = box_study()
    result = engine.draft(study, settings=GenerationSettings(max_new_tokens=40))
    # the tiny model writes its own section headers; give it the heart and lung sections to check
    check = engine.finding_check(result, threshold=0.0)
    assert result.findings_check is check
    for sec in check.sections:
        assert set(f.finding for f in sec.findings) == set(REGION_FINDINGS[sec.region])
        for f in sec.findings:
            assert 0.0 <= f.probability <= 1.0
            assert (f.flag == "omission") == (f.stated != "affirmed")
    none = engine.finding_check(result, threshold=1.01, contradiction_below=0.0)
    assert not none.flags
    data = result.to_dict()
    assert data["findings_check"]["threshold"] == 1.01


# ---- the demo model: selection dependence --------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from reg2rg.engine.generation import ReportEngine
    from reg2rg.engine.phantom import demo_study

    torch.set_num_threads(1)
    engine = ReportEngine.load(device="cpu")
    study = demo_study()
    return engine, study, engine.draft(study)


def _section(result, region):
    return next(s for s in result.sections if s.region == region and s.grounding_ok)


def test_demo_model_sections_depend_on_their_own_region(demo):
    engine, study, result = demo
    maps = {}
    for region in ("pleura", "heart"):
        sec = _section(result, region)
        idx = result.token_indices_in_span(sec.start, sec.end)
        assert engine.region_dependence(result, idx).strongest == region
        rm = engine.relevance_map(result, idx)
        mask = study.masks[region]
        share, chance = rm.heatmap[mask].sum() / rm.heatmap.sum(), mask.sum() / (rm.heatmap > 0).sum()
        assert share > 3 * chance, (region, share, chance)
        maps[region] = rm.heatmap.ravel()
    assert np.corrcoef(maps["pleura"], maps["heart"])[0, 1] < 0.5


def test_demo_model_sentence_maps_peak_in_their_own_region(demo):
    """The first sentence of the pleura and of the heart section (the demo draft names the effusion and the
    cardiomegaly there): each map's maximum lies in its own region's mask, and the two maps differ."""
    engine, study, result = demo
    maps = {}
    for region in ("pleura", "heart"):
        sec = _section(result, region)
        sentence = next(s for s in result.sentences if sec.body_start <= s.start < sec.end)
        rm = engine.relevance_map(result, list(sentence.token_indices))
        assert study.masks[region][rm.peak_voxel], region
        maps[region] = rm.heatmap.ravel()
    assert np.corrcoef(maps["pleura"], maps["heart"])[0, 1] < 0.5


def _players(calls):
    return [tuple(jk) for jk in torch.nonzero(calls > 0.5).tolist()]


def _reference_shapley(calls, value):
    """Shapley values by their definition: the mean over every order of the made calls of each one's marginal
    contribution (m! orders; independent of `call_shapley`'s coalition weights)."""
    import itertools
    import math

    made = _players(calls)
    phi = {p: 0.0 for p in made}
    for order in itertools.permutations(made):
        on: set = set()
        for p in order:
            phi[p] += (value(on | {p}) - value(on)) / math.factorial(len(made))
            on = on | {p}
    return phi


def _as_log_probs(calls, value):
    """``call_shapley``'s callback for a set function ``value`` of the made calls that are switched on."""
    made = _players(calls)
    return lambda variants: torch.tensor([value({p for p in made if v[p] > 0.5}) for v in variants])


@pytest.mark.parametrize("m", [2, 4, 5, 8])
def test_call_shapley_shares_a_joint_effect_and_adds_up(m):
    """Known answers: S rises by 3 nats only when calls a and b are both on (a sentence that needs the finding
    and its side) -> 1.5 each, whatever the gradient at the full set says; an additive call keeps its own
    effect; a made call S ignores gets 0, an uncalled one 0; the values add up to S(all) - S(none); they equal
    the definition's average over orders (up to `SHAPLEY_EXACT_MAX` made calls; beyond, sampled orders and their
    reverses, which share a pair's joint effect exactly)."""
    calls = torch.zeros(3, 5)
    made = [(0, 1), (2, 3), (1, 0), (2, 4), (0, 0), (0, 2), (1, 1), (1, 2)][:m]
    for j, k in made:
        calls[j, k] = 1
    a, b = made[0], made[1]
    extra = made[2] if m > 2 else None

    def value(on):
        return 3.0 * (a in on and b in on) - 0.5 * (extra in on) + 7.0

    phi = call_shapley(calls, _as_log_probs(calls, value))
    assert phi[a] == pytest.approx(1.5) and phi[b] == pytest.approx(1.5)
    if extra:
        assert phi[extra] == pytest.approx(-0.5)
    for p in made[3:]:
        assert phi[p] == pytest.approx(0.0)
    assert phi[calls == 0].abs().sum() == 0
    assert float(phi.sum()) == pytest.approx(value(set(made)) - value(set()))
    if m <= SHAPLEY_EXACT_MAX:
        reference = _reference_shapley(calls, value)
        assert all(phi[p] == pytest.approx(reference[p]) for p in made)


def test_call_shapley_of_an_interaction_matches_the_definition():
    """A value with every order of interaction (random over the 2^4 coalitions): exact against the m! orders."""
    calls = torch.zeros(2, 4)
    for j, k in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        calls[j, k] = 1
    table = torch.randn(16, generator=torch.Generator().manual_seed(3)).tolist()
    made = _players(calls)

    def value(on):
        return table[sum(1 << i for i, p in enumerate(made) if p in on)]

    phi = call_shapley(calls, _as_log_probs(calls, value))
    reference = _reference_shapley(calls, value)
    assert all(phi[p] == pytest.approx(reference[p], abs=1e-6) for p in made)


def test_demo_model_effusion_sentence_peaks_on_the_effusion(demo):
    """The demo draft's effusion sentence depends on the effusion call and the side call together; its map's
    maximum lies within 10 mm of the planted effusion's own voxels (the phantom's lesion map, rebuilt from the
    demo seed: the same voxels as the embedded study). With the gradient's share of each call (before
    `call_shapley`) it peaked 32 mm away, on the pleura the side detector also reads."""
    from scipy.ndimage import distance_transform_edt

    from reg2rg.engine.phantom import DEMO_FINDINGS, DEMO_SEED, make_study

    engine, study, result = demo
    made = make_study(DEMO_SEED, list(DEMO_FINDINGS))
    assert np.array_equal(np.asarray(made.voxels), np.asarray(study.voxels))
    effusion = next(f for f in made.metadata["findings"] if f["type"] == "Pleural effusion")
    sec = _section(result, "pleura")
    sentence = next(s for s in result.sentences if sec.body_start <= s.start < sec.end)
    assert "effusion" in sentence.text and "left" in sentence.text.lower()
    rm = engine.relevance_map(result, list(sentence.token_indices))
    spacing = np.sqrt((np.asarray(study.affine)[:3, :3] ** 2).sum(0))
    distance = distance_transform_edt(made.metadata["lesions"] != effusion["lesion_label"], sampling=spacing)
    assert distance[rm.peak_voxel] <= 10.0


def test_demo_model_findings_check_uses_its_detector_and_says_what_it_cannot_see(demo):
    """A detector model: the labels it may call in a region carry the detector's own probability (an omission
    alert when an unreported one reaches the threshold); the others are 'not assessed', never a 0 % or a flag."""
    engine, _, result = demo
    assert engine.finding_detector
    seen = result.prepared.finding_probabilities
    check = engine.finding_check(result)
    by_region = {s.region: s for s in check.sections}
    for sec in check.sections:
        for f in sec.findings:
            if f.finding in seen.get(sec.region, {}):
                assert f.source == "detector" and f.probability == pytest.approx(seen[sec.region][f.finding])
            else:
                assert f.source == "not assessed" and not f.assessed and f.flag is None
    lung = {f.finding: f for f in by_region["lung"].findings}
    assert not lung["Lung nodule"].assessed                                  # too small for it to see
    effusion = next(f for f in by_region["pleura"].findings if f.finding == "Pleural effusion")
    assert effusion.stated == "affirmed" and effusion.probability > 0.5 and effusion.flag is None
    # an assessed finding the draft does not report: alerted exactly when its probability reaches the threshold
    quiet = [f for s in check.sections for f in s.findings if f.assessed and f.stated != "affirmed"]
    assert quiet
    f = max(quiet, key=lambda f: f.probability)
    region = next(s.region for s in check.sections if f in s.findings)
    flagged = lambda threshold: {(s.region, g.finding) for s in engine.finding_check(result, threshold).sections  # noqa: E731
                                 for g in s.flags}
    assert (region, f.finding) in flagged(f.probability * 0.999)
    assert (region, f.finding) not in flagged(min(1.0, f.probability * 1.001 + 1e-9))
