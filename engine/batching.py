"""Batched decoding across concurrent drafts: one forward pass per step over every active draft.

`DecodeScheduler` runs a single decode thread. A draft joins with its encoded prompt: it is
prefilled alone (its prompt through the LLM, batch 1, exactly as `generation.Decoder` does), then
joins the running batch between two steps. Each step feeds the last token of every active draft as
one (N, 1, hidden) batch through the LLM over a shared KV cache; drafts leave the batch between
steps when they end (eos, token limit, cancel, or their reader went away).

The shared cache is left-padded: row *i* holds draft *i*'s keys/values right-aligned, an attention mask
hides the padding, and each row gets its own position ids, so a draft attends to exactly the keys it
would attend to alone. Its layers are `GrowingLayer`s: a step writes in place into preallocated room
instead of concatenating a new copy of the whole cache (under the server's ``tune_malloc`` every such
copy was a fresh mmap: 23 ms a step at 8 drafts against 10 ms in place). Under greedy decoding the
tokens are those of a lone request (tested); probabilities agree to float rounding (a padded, batched
matmul sums in another order). Sampling keeps one generator per draft, seeded like a lone run. Beam
search keeps its own beams in its own cache: it runs beside the batch, one locked forward at a time
(`LockedModule`).

`BatchingEngine` wraps a `ReportEngine` with a scheduler and satisfies `interface.DraftingEngine`;
``reg2rg-serve`` serves through it (``--max-batch 1`` gives one request at a time, the baseline of
``bench/serve.py``).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .confidence import StepDistribution, distribution_stats
from .generation import (TOP_ALTERNATIVES, Decoder, DraftResult, EncodingStarted, Finished, GenerationError,
                         GenerationEvent, GenerationSettings, ReportEngine, _base_config, _cache_kwarg,
                         _is_oom, _new_cache, _warp_logits, run_to_draft, finish_result, study_orientation_for)
from .preprocess import preprocess

logger = logging.getLogger("reg2rg.engine.batching")


class LockedModule:
    """Calls ``module`` under ``lock`` (everything else passes through): a beam search or an attention
    pass beside the batch never overlaps a batched step on the same weights."""

    def __init__(self, module: torch.nn.Module, lock: threading.RLock) -> None:
        self._module, self._lock = module, lock

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a preallocated buffer (batch, heads, capacity, dim):
    a decode step writes its one position in place instead of copying the whole cache into a new tensor
    (`DynamicLayer.update` concatenates); the buffer doubles when full. The values are the same, so a
    draft's tokens are those of a lone request (tested)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._k, self._v = self._alloc(keys, keys.shape[2] + spare), self._alloc(values, values.shape[2] + spare)
        self._n = keys.shape[2]
        self._k[:, :, :self._n] = keys
        self._v[:, :, :self._n] = values
        self._expose()

    @staticmethod
    def _alloc(like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty(b, h, capacity, d)

    def _expose(self) -> None:
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[2]
        if self._n + q > self._k.shape[2]:
            capacity = max(2 * self._k.shape[2], self._n + q)
            k, v = self._alloc(self._k, capacity), self._alloc(self._v, capacity)
            k[:, :, :self._n], v[:, :, :self._n] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, self._n:self._n + q] = key_states
        self._v[:, :, self._n:self._n + q] = value_states
        self._n += q
        self._expose()
        return self.keys, self.values


def growing_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config, spare: int = 64) -> DynamicCache:
    """A `DynamicCache` holding ``layers`` (keys, values) in `GrowingLayer`s with room for ``spare`` more positions."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(k, v, spare) for k, v in layers]
    return cache


@dataclass(eq=False)
class _Request:
    """One draft in the scheduler: its prompt, settings, stop signals and the queue its steps go to."""

    prompt_embeds: torch.Tensor                       # (1, P, hidden)
    settings: GenerationSettings
    cancel: threading.Event | None
    out: "queue.Queue" = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)   # the reader stopped listening
    generator: torch.Generator | None = None
    seed: int | None = None
    n_tokens: int = 0
    next_token: torch.Tensor | None = None            # (1,) the token to feed at the next step
    length: int = 0                                   # positions in this draft's cache (= next position id)
    cache: object = None                              # its own cache until it joins the batch
    enqueued_at: float = field(default_factory=time.perf_counter)

    def stop_requested(self) -> bool:
        return self.gone.is_set() or (self.cancel is not None and self.cancel.is_set())


class StepStream:
    """The decoder a batched draft hands to `ReportEngine.decode_prepared`: iterates over the
    `StepDistribution`s the scheduler computes for it; ``stop_reason`` and ``seed`` as `Decoder`.
    Leaving the loop early (the reader went away) takes the draft out of the batch."""

    def __init__(self, request: _Request) -> None:
        self.request = request
        self.stop_reason = "max_new_tokens"
        self.seed = request.seed

    def __iter__(self) -> Iterator[StepDistribution]:
        finished = False
        try:
            while True:
                kind, value = self.request.out.get()
                if kind == "step":
                    yield value
                elif kind == "end":
                    self.stop_reason, self.seed, finished = value, self.request.seed, True
                    return
                else:                                          # "error": the scheduler's exception
                    finished = True
                    raise value
        finally:
            if not finished:
                self.request.gone.set()


class DecodeScheduler:
    """The decode thread: admits drafts between steps and runs one batched forward per step.

    ``lang_model``: the (PEFT-wrapped) causal LM; ``embed_tokens``: its input embeddings; ``lock``:
    held for every forward (shared with encoding and attention passes). ``max_batch``: drafts decoded
    together (1 = one request at a time, in arrival order). ``on_step(batch_size, seconds)`` is called
    after each batched step (metrics). The batch's cache has room for ``cache_spare`` more positions
    each time it is rebuilt (a draft joins or leaves) and doubles when full.
    """

    cache_spare = 64

    def __init__(self, lang_model, embed_tokens: Callable[[torch.Tensor], torch.Tensor], eos_token_id: int | None,
                 lock: threading.RLock, max_batch: int = 8,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise GenerationError(f"max_batch must be at least 1, got {max_batch}")
        self.lm, self.embed_tokens, self.eos = lang_model, embed_tokens, eos_token_id
        self.lock, self.max_batch, self.on_step = lock, max_batch, on_step
        self._cache_kw = _cache_kwarg(lang_model)
        self._config = _base_config(lang_model)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._cache = None                      # the batch's DynamicCache, left-padded
        self._mask: torch.Tensor | None = None  # (N, L) 1 = real key, 0 = padding
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="reg2rg-decode", daemon=True)
        self._thread.start()

    # ---- what the server reports -----------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Drafts queued for a place in the batch."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Drafts in the running batch."""
        return len(self._active)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    # ---- joining -----------------------------------------------------------------------------------
    def submit(self, prompt_embeds: torch.Tensor, settings: GenerationSettings,
               cancel: threading.Event | None = None) -> StepStream:
        """Queue a greedy or sampling draft; returns the `StepStream` its steps arrive on."""
        settings.validate()
        if settings.strategy == "beam" and settings.num_beams > 1:
            raise GenerationError("beam search is decoded beside the batch (BatchingEngine does this)")
        req = _Request(prompt_embeds, settings, cancel)
        if settings.strategy == "sample":
            req.seed = int(settings.seed) if settings.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            req.generator = torch.Generator(device=prompt_embeds.device).manual_seed(req.seed)
        with self._wake:
            if self._closed:
                raise GenerationError("the decoder is shut down")
            self._waiting.append(req)
            self._wake.notify()
        return StepStream(req)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; drafts still running end with "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._admit()
                if self._active:
                    self._batched_step()
            except Exception as err:  # noqa: BLE001 - every draft in flight gets the error, the loop goes on
                logger.warning("decode step failed (%s); %d draft(s) ended with the error", type(err).__name__,
                               len(self._active))
                for req in self._active:
                    req.out.put(("error", err))
                self._active, self._cache, self._mask = [], None, None
                if _is_oom(err) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
        for req in list(self._active) + list(self._waiting):
            req.out.put(("end", "cancelled"))
        self._active, self._cache, self._mask = [], None, None
        self._waiting.clear()

    def _admit(self) -> None:
        """Prefill waiting drafts (alone, batch 1) and merge them into the batch, up to ``max_batch``."""
        joined = []
        while len(self._active) + len(joined) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if req.stop_requested():
                req.out.put(("end", "cancelled"))
                continue
            try:
                cache = _new_cache(self.lm)
                with self.lock, torch.inference_mode():
                    out = self.lm(inputs_embeds=req.prompt_embeds, use_cache=True, logits_to_keep=1,
                                  **{self._cache_kw: cache})
            except Exception as err:  # noqa: BLE001 - this draft fails, the batch goes on
                req.out.put(("error", err))
                continue
            req.cache, req.length = cache, req.prompt_embeds.shape[1]
            if self._emit(req, out.logits[:, -1, :]):
                joined.append(req)
        if joined:
            self._merge(joined)

    @staticmethod
    def _choose(req: _Request, logits: torch.Tensor) -> torch.Tensor:
        """``req``'s next token (1,) from its (1, V) logits: argmax, or a draw from its own generator."""
        s = req.settings
        if s.strategy == "sample":
            probs = _warp_logits(logits, s).softmax(-1)
            return torch.multinomial(probs, 1, generator=req.generator).view(1)
        return logits.argmax(-1)

    def _emit(self, req: _Request, logits: torch.Tensor, token: torch.Tensor | None = None,
              step: StepDistribution | None = None) -> bool:
        """Send ``req``'s next token (chosen from its (1, V) logits unless given, with its statistics);
        True when the draft goes on."""
        s = req.settings
        if token is None:
            token = self._choose(req, logits)
        if step is None:
            step = distribution_stats(logits, token, TOP_ALTERNATIVES)[0]
        req.out.put(("step", step))
        req.n_tokens += 1
        if self.eos is not None and step.token_id == self.eos:
            req.out.put(("end", "eos"))
            return False
        if req.stop_requested():
            req.out.put(("end", "cancelled"))
            return False
        if req.n_tokens >= s.max_new_tokens:
            req.out.put(("end", "max_new_tokens"))
            return False
        req.next_token = token
        return True

    # ---- the shared, left-padded cache -------------------------------------------------------------
    @staticmethod
    def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _merge(self, joined: list[_Request]) -> None:
        """Add prefilled drafts to the batch: every row right-aligned to the longest, padding masked."""
        parts = []                                   # (layers, length, mask row) per row
        if self._cache is not None:
            old = self._layers(self._cache)
            for i in range(len(self._active)):
                parts.append(([(k[i:i + 1], v[i:i + 1]) for k, v in old], self._mask[i]))
        for req in joined:
            layers = self._layers(req.cache)
            mask = torch.ones(req.length, dtype=torch.long, device=req.prompt_embeds.device)
            parts.append((layers, mask))
            req.cache = None
        width = max(m.shape[0] for _, m in parts)
        n_layers = len(parts[0][0])
        merged = []
        for li in range(n_layers):
            ks, vs = [], []
            for layers, mask in parts:
                k, v = layers[li]
                pad = width - k.shape[2]
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                    v = torch.nn.functional.pad(v, (0, 0, pad, 0))
                ks.append(k)
                vs.append(v)
            merged.append((torch.cat(ks), torch.cat(vs)))
        masks = [torch.nn.functional.pad(m, (width - m.shape[0], 0)) for _, m in parts]
        self._cache = growing_cache(merged, self._config, self.cache_spare)
        self._mask = torch.stack(masks)
        self._active = self._active + joined

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch; drop padding columns no remaining row needs."""
        if not rows:
            self._active, self._cache, self._mask = [], None, None
            return
        if len(rows) == len(self._active):
            return
        idx = torch.tensor(rows, device=self._mask.device)
        self._active = [self._active[i] for i in rows]
        mask = self._mask.index_select(0, idx)
        first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
        merged = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                  for k, v in self._layers(self._cache)]
        self._cache = growing_cache(merged, self._config, self.cache_spare)
        self._mask = mask[:, first:]

    def _batched_step(self) -> None:
        """One forward of the last token of every active draft; choose each draft's next token."""
        reqs = self._active
        t0 = time.perf_counter()
        tokens = torch.cat([r.next_token for r in reqs]).view(-1, 1)                    # (N, 1)
        positions = torch.tensor([[r.length] for r in reqs], device=tokens.device)      # (N, 1)
        mask = torch.cat([self._mask, self._mask.new_ones(len(reqs), 1)], dim=1)         # (N, L + 1)
        with self.lock, torch.inference_mode():
            embeds = self.embed_tokens(tokens)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self._cache_kw: self._cache})
        logits = out.logits[:, -1, :]                                                    # (N, V)
        self._mask = mask
        chosen = torch.cat([self._choose(r, logits[i:i + 1]) for i, r in enumerate(reqs)])      # (N,)
        steps = distribution_stats(logits, chosen, TOP_ALTERNATIVES)       # one pass over the batch's rows
        keep = []
        for i, req in enumerate(reqs):
            req.length += 1
            if self._emit(req, logits[i:i + 1], chosen[i:i + 1], steps[i]):
                keep.append(i)
        if self.on_step is not None:
            self.on_step(len(reqs), time.perf_counter() - t0)
        self._keep(keep)


class BatchingEngine:
    """A `ReportEngine` whose greedy and sampling drafts share decode steps (`DecodeScheduler`).

    Satisfies `interface.DraftingEngine`. Encoding (the visual pass and the prompt) runs in the
    caller's thread under the model lock, decoding in the scheduler's thread; beam search runs beside
    the batch through a `LockedModule`. ``generate_inputs`` starts from pre-processed tensors (what a
    ``reg2rg-serve`` client sends).
    """

    def __init__(self, engine: ReportEngine, max_batch: int = 8,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        self.engine = engine
        self.lock = getattr(engine, "lock", None) or threading.RLock()   # the engine's own: explanations hold it
        self.max_batch = max_batch
        lm = engine.model.lang_model
        self.scheduler = DecodeScheduler(lm, lm.get_input_embeddings(), engine.eos_token_id, self.lock, max_batch,
                                         on_step)

    # what callers read off an engine
    @property
    def model_dir(self):
        return self.engine.model_dir

    @property
    def config(self):
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def model_info(self) -> dict:
        return self.engine.model_info()

    @property
    def layout(self) -> tuple[int, int]:
        return self.engine.layout

    def attention_layout(self) -> tuple[int, int]:
        return self.engine.layout

    def close(self) -> None:
        self.scheduler.close()

    # ---- drafting ------------------------------------------------------------------------------------
    def generate(self, study, regions: Sequence[str] | None = None,
                 settings: GenerationSettings = GenerationSettings(),
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """As `ReportEngine.generate` (pre-processing here), decoding in the shared batch."""
        settings.validate()
        chosen = self.engine.select_regions(study, regions)
        yield EncodingStarted(tuple(chosen))
        t0 = time.perf_counter()
        inputs = preprocess(study, self.config.input_size, study_orientation_for(study, self.config.orientation), chosen)
        for event in self._decode(inputs, chosen, settings, cancel, t0, study.name, study.affine):
            if isinstance(event, Finished):
                finish_result(event.result, study, inputs, chosen, self.config.orientation)
            yield event

    def generate_inputs(self, inputs, regions: Sequence[str], settings: GenerationSettings = GenerationSettings(),
                        cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Draft from pre-processed `preprocess.ModelInputs` for ``regions`` (REGIONS order, each in
        ``inputs.regions``); events as `generate`."""
        settings.validate()
        chosen = list(regions)
        yield EncodingStarted(tuple(chosen))
        yield from self._decode(inputs, chosen, settings, cancel, time.perf_counter(), "", None)

    def _decode(self, inputs, chosen, settings, cancel, t0, name, affine) -> Iterator[GenerationEvent]:
        eng = self.engine
        with self.lock:
            prepared = eng.prepare_inputs(inputs, chosen)
        if settings.strategy == "beam" and settings.num_beams > 1:
            decoder = Decoder(LockedModule(eng.model.lang_model, self.lock), eng.model.lang_model.get_input_embeddings(),
                              prepared.prompt_embeds, settings, eng.eos_token_id, cancel)
        else:
            decoder = self.scheduler.submit(prepared.prompt_embeds, settings, cancel)
        yield from eng.decode_prepared(prepared, settings, cancel, started=t0, study_name=name, affine=affine,
                                       decoder=decoder)

    def draft(self, study, regions: Sequence[str] | None = None,
              settings: GenerationSettings = GenerationSettings()) -> DraftResult:
        return run_to_draft(self.generate(study, regions, settings))

    def attention_map(self, result: DraftResult, token_indices, layers="all", heads="mean"):
        """`ReportEngine.attention_map` under the model lock (it switches attention to eager)."""
        with self.lock:
            return self.engine.attention_map(result, token_indices, layers, heads)

    # the other explanations hold the same lock (`ReportEngine._explaining`): the decode thread takes it
    # for each batched step, so an explanation runs between two steps and the batch waits for it
    def relevance_map(self, result: DraftResult, token_indices):
        return self.engine.relevance_map(result, token_indices)

    def relevance_patches(self, result: DraftResult, token_indices):
        return self.engine.relevance_patches(result, token_indices)

    def region_dependence(self, result: DraftResult, token_indices):
        return self.engine.region_dependence(result, token_indices)

    def finding_check(self, result: DraftResult, threshold: float | None = None,
                      contradiction_below: float | None = None):
        return self.engine.finding_check(result, threshold, contradiction_below)
