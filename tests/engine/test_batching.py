"""Batched decoding across drafts (engine/batching.py): drafts that share decode steps get exactly the
tokens of a lone draft under greedy decoding, whatever joins or leaves the batch around them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from reg2rg.engine.batching import BatchingEngine, DecodeScheduler
from reg2rg.engine.generation import Finished, GenerationError, GenerationSettings, ReportEngine, TokenEvent
from reg2rg.engine.interface import DraftingEngine
from reg2rg.engine.phantom import demo_study


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return ReportEngine.load(None, "cpu")


@pytest.fixture(scope="module")
def study():
    return demo_study()


def _concurrently(fns):
    out = [None] * len(fns)
    errors = []

    def run(i):
        try:
            out[i] = fns[i]()
        except Exception as err:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return out


def test_engines_satisfy_the_one_interface(engine):
    batching = BatchingEngine(engine, max_batch=2)
    try:
        assert isinstance(engine, DraftingEngine)
        assert isinstance(batching, DraftingEngine)
    finally:
        batching.close()


def test_batched_greedy_equals_lone_with_joins_and_leaves(engine, study):
    """Four drafts of different prompt lengths and token limits, started at different times (they join
    a running batch and leave it at different steps): each equals the same draft decoded alone."""
    present = study.regions_present
    jobs = [(None, 40), (present[:2], 25), (present[3:8], 60), (present[-3:], 12)]
    lone = [engine.draft(study, regions, GenerationSettings(max_new_tokens=n)) for regions, n in jobs]
    steps = []
    batching = BatchingEngine(engine, max_batch=8, on_step=lambda n, s: steps.append(n))
    try:
        def job(i):
            def run():
                time.sleep(0.15 * i)          # staggered: later drafts join a batch already decoding
                return batching.draft(study, jobs[i][0], GenerationSettings(max_new_tokens=jobs[i][1]))
            return run

        batched = _concurrently([job(i) for i in range(len(jobs))])
    finally:
        batching.close()
    assert max(steps) >= 2, f"the drafts never shared a decode step (batch sizes {sorted(set(steps))})"
    assert len(set(steps)) >= 2, "the batch never changed size: nothing joined or left between steps"
    for a, b in zip(lone, batched):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.stop_reason == a.stop_reason
        assert b.slot_regions == a.slot_regions
        assert max(abs(x.prob - y.prob) for x, y in zip(a.tokens, b.tokens)) < 1e-4


def test_sampling_with_a_seed_is_reproducible_in_a_batch(engine, study):
    s = GenerationSettings(strategy="sample", seed=1234, max_new_tokens=20, temperature=1.3)
    lone = engine.draft(study, None, s)
    batching = BatchingEngine(engine, max_batch=4)
    try:
        other = GenerationSettings(max_new_tokens=30)
        batched, _ = _concurrently([lambda: batching.draft(study, None, s), lambda: batching.draft(study, None, other)])
    finally:
        batching.close()
    assert batched.seed == 1234
    assert batched.token_ids == lone.token_ids


def test_cancel_stops_one_draft_and_the_others_go_on(engine, study):
    batching = BatchingEngine(engine, max_batch=4)
    cancel = threading.Event()
    try:
        def cancelled():
            result = None
            for ev in batching.generate(study, None, GenerationSettings(max_new_tokens=200), cancel):
                if isinstance(ev, TokenEvent) and ev.index == 4:
                    cancel.set()
                if isinstance(ev, Finished):
                    result = ev.result
            return result

        full = GenerationSettings(max_new_tokens=30)
        stopped, kept = _concurrently([cancelled, lambda: batching.draft(study, None, full)])
    finally:
        batching.close()
    assert stopped.stop_reason == "cancelled" and not stopped.complete
    assert 5 <= len(stopped.tokens) < 200
    alone = engine.draft(study, None, full)
    assert kept.token_ids == alone.token_ids
    assert stopped.token_ids == engine.draft(study, None, GenerationSettings(max_new_tokens=len(stopped.tokens))).token_ids


def test_a_reader_that_goes_away_leaves_the_batch(engine, study):
    batching = BatchingEngine(engine, max_batch=4)
    try:
        events = batching.generate(study, None, GenerationSettings(max_new_tokens=300))
        for ev in events:
            if isinstance(ev, TokenEvent) and ev.index == 2:
                break
        events.close()                                 # the reader stops listening
        deadline = time.time() + 30
        while batching.scheduler.active and time.time() < deadline:
            time.sleep(0.05)
        assert batching.scheduler.active == 0 and batching.scheduler.waiting == 0
    finally:
        batching.close()


def test_beam_search_runs_beside_the_batch(engine, study):
    beam = GenerationSettings(strategy="beam", num_beams=2, max_new_tokens=12)
    lone = engine.draft(study, None, beam)
    batching = BatchingEngine(engine, max_batch=4)
    try:
        b, g = _concurrently([lambda: batching.draft(study, None, beam),
                              lambda: batching.draft(study, None, GenerationSettings(max_new_tokens=20))])
    finally:
        batching.close()
    assert b.token_ids == lone.token_ids
    assert g.token_ids == engine.draft(study, None, GenerationSettings(max_new_tokens=20)).token_ids


def test_max_batch_one_decodes_one_draft_at_a_time(engine, study):
    sizes = []
    batching = BatchingEngine(engine, max_batch=1, on_step=lambda n, s: sizes.append(n))
    try:
        s = GenerationSettings(max_new_tokens=10)
        a, b = _concurrently([lambda: batching.draft(study, None, s), lambda: batching.draft(study, None, s)])
    finally:
        batching.close()
    assert set(sizes) == {1}
    assert a.token_ids == b.token_ids
    with pytest.raises(GenerationError, match="max_batch"):
        DecodeScheduler(engine.model.lang_model, engine.model.lang_model.get_input_embeddings(), 2,
                        threading.RLock(), max_batch=0)


def test_growing_cache_layer_holds_what_concatenation_holds():
    """`GrowingLayer` writes each step into a preallocated buffer (doubling when full): after any sequence
    of updates its keys/values equal DynamicLayer's concatenation, and it is what the batch decodes with."""
    from transformers.cache_utils import DynamicLayer

    from reg2rg.engine.batching import GrowingLayer, growing_cache

    gen = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(3, 2, 5, 4, generator=gen), torch.randn(3, 2, 5, 4, generator=gen)
    grow, ref = GrowingLayer(k0, v0, spare=2), DynamicLayer()
    ref.update(k0, v0)
    for q in (1, 1, 1, 3, 1, 7, 1):                    # crosses the capacity several times
        k, v = torch.randn(3, 2, q, 4, generator=gen), torch.randn(3, 2, q, 4, generator=gen)
        gk, gv = grow.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
        assert grow.get_seq_length() == ref.get_seq_length()
    assert grow._k.shape[2] >= grow.get_seq_length()
    cache = growing_cache([(k0, v0), (k0, v0)], None)
    assert cache.get_seq_length() == 5 and all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def test_batched_greedy_equals_lone_when_the_cache_grows_every_step(engine, study):
    """With no spare room the batch's cache doubles again and again while two drafts decode together:
    the tokens are still those of each draft alone."""
    present = study.regions_present
    jobs = [(None, 30), (present[:3], 20)]
    lone = [engine.draft(study, regions, GenerationSettings(max_new_tokens=n)) for regions, n in jobs]
    steps = []
    batching = BatchingEngine(engine, max_batch=4, on_step=lambda n, s: steps.append(n))
    batching.scheduler.cache_spare = 1
    try:
        batched = _concurrently([lambda r=r, n=n: batching.draft(study, r, GenerationSettings(max_new_tokens=n))
                                 for r, n in jobs])
    finally:
        batching.close()
    assert max(steps) == 2, f"the drafts never shared a decode step (batch sizes {sorted(set(steps))})"
    for a, b in zip(lone, batched):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
