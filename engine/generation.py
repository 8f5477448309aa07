"""Streaming, region-aware report generation with token confidence and grounding.

`ReportEngine.generate` turns a `Study` into a draft report token by token:

1. pre-process the study (global volume + one crop per region, with the geometry back to the CT),
2. encode all volumes in one batched pass and assemble the prompt's ``inputs_embeds`` by gather
   (`Reg2RG.embed_inputs`) — the prompt is encoded once,
3. decode with our own loop over the LLaMA and a `DynamicCache` (KV cache always) so that every
   token can be streamed, the loop can be cancelled between tokens, and each token's probability,
   entropy and top-5 alternatives come from the very logits that chose it (no second model run),
4. parse the text into region sections and check each named area against the mask in that slot.

Greedy decoding is the default because it is reproducible: the same study gives the same draft. It is
*not* what the published run did with Llama-2-7b-chat: the reference's `generate(inputs_embeds=…, top_k=30)`
passes no ``do_sample``, so the LLaMA folder's ``generation_config.json`` (which samples) decided. The
``published`` preset of `presets.decoding_preset` reproduces that (docs/reproduction.md §5). Sampling
(temperature, top-k, top-p, seed) and a simple beam search are options.
"""

from __future__ import annotations

import contextlib

import inspect
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .attention import latent_patch_attention
from .checkpoint import CheckpointError, import_published, load_pretrained
from .confidence import (
    ConfidenceSummary,
    SentenceConfidence,
    StepDistribution,
    TokenConfidence,
    distribution_stats,
    sentence_spans,
    tokens_in_span,
)
from .model.config import Reg2RGConfig
from .model.reg2rg import Reg2RG
from .preprocess import ModelInputs, preprocess
from .presets import precision_of, resolve_precision
from .regions import REGIONS, canonical_region
from .sections import RegionSection, parse_sections, region_prediction_accuracy
from .tokens import SpecialIds, build_prompt_ids, load_tokenizer

if TYPE_CHECKING:
    from .explain.findings import FindingsCheck

logger = logging.getLogger("reg2rg.engine.generation")

TOP_ALTERNATIVES = 5


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
class ModelFolderError(FileNotFoundError):
    """A model folder is missing or lacks files. The message names the folder and what is missing."""


class EngineOutOfMemory(MemoryError):
    """The device ran out of memory; the message says which smaller option to try."""


class GenerationError(ValueError):
    """A study or a setting cannot be used for generation; the message says what is wrong."""


# ------------------------------------------------------------------------------------------------
# settings and events
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. The defaults are greedy decoding with the published limit of 500 new tokens;
    `presets.decoding_preset("published", llm_folder)` gives the published run's settings.

    ``strategy``: ``"greedy"`` | ``"sample"`` | ``"beam"``. ``top_k``/``top_p``/``temperature``/``seed``
    apply to sampling only (``top_k=30`` is the published call's value; 0 disables it; ``seed=None``
    draws a seed, recorded in the result so the draft can be reproduced). ``num_beams`` and
    ``length_penalty`` apply to beam search (score = sum log p / length ** length_penalty, as HF).
    """

    strategy: str = "greedy"
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int = 30
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    preset: str | None = None      # the named preset these settings came from (engine/presets.py), if any

    def validate(self) -> None:
        """Raise `GenerationError` for settings that cannot work."""
        if self.strategy not in ("greedy", "sample", "beam"):
            raise GenerationError(f"unknown decoding strategy {self.strategy!r}; use 'greedy', 'sample' or 'beam'")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.strategy == "sample" and not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise GenerationError(f"num_beams must be at least 1, got {self.num_beams}")


@dataclass(frozen=True)
class EncodingStarted:
    """Pre-processing and visual encoding began for these regions (slot order)."""

    regions: tuple[str, ...]


@dataclass(frozen=True)
class EncodingDone:
    """The prompt is ready: ``prompt_tokens`` positions, encoded in ``seconds``."""

    prompt_tokens: int
    seconds: float
    slot_regions: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is exactly what it appends to the streamed report (may be '')."""

    index: int
    token_id: int
    text: str
    prob: float
    entropy: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Finished:
    """Generation ended (eos, token limit or cancel: see ``result.stop_reason``)."""

    result: "DraftResult"


def run_to_draft(events) -> "DraftResult":
    """Run a ``generate`` event stream to its end; its `Finished` event's `DraftResult` (the non-streaming
    ``draft`` of every engine)."""
    result = None
    for event in events:
        if isinstance(event, Finished):
            result = event.result
    if result is None:
        raise RuntimeError("the engine's event stream ended without a finished draft")
    return result


GenerationEvent = EncodingStarted | EncodingDone | TokenEvent | Finished


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundedSection(RegionSection):
    """A region section of the report (`sections.RegionSection`) with its grounding check.

    ``area`` is the area the model named (canonical spelling, or None when unknown/missing);
    ``region`` is the region whose mask was really placed in ``slot`` (None: no such slot);
    ``grounding_ok`` is True when the model named that region.
    """

    region: str | None = None
    grounding_ok: bool = False
    confidence: ConfidenceSummary = field(default_factory=ConfidenceSummary)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confidence"] = self.confidence.to_dict()
        return d


@dataclass
class DraftResult:
    """Everything one generation produced, and what the explanations need to follow it back to the CT.

    Character offsets (tokens, sections, sentences) index ``text``. ``region_confidence`` is keyed by
    the true region of the slot the section belongs to. ``prepared`` (the encoded study: inputs,
    geometry, prompt embeddings) and ``affine`` (the CT's) are kept for the explanations
    (`ReportEngine.relevance_map`, `attention_map`, `region_dependence`, `finding_check`); they are not
    serialised. ``findings_check`` is filled by `ReportEngine.finding_check` (and then serialised).
    """

    text: str
    token_ids: list[int]
    tokens: list[TokenConfidence]
    sections: list[GroundedSection]
    slot_regions: dict[int, str]
    sentences: list[SentenceConfidence]
    region_confidence: dict[str, ConfidenceSummary]
    confidence: ConfidenceSummary
    region_accuracy: float | None
    stop_reason: str                        # "eos" | "max_new_tokens" | "cancelled" | "interrupted"
    settings: GenerationSettings
    seed: int | None = None                 # the seed actually used when sampling
    study_name: str = ""
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    # about the input: {"orientation": {model, study, reoriented, ...}, "warnings": [...]} (ReportEngine.input_facts)
    input: dict[str, Any] = field(default_factory=dict)
    not_drafted: dict[str, str] = field(default_factory=dict)         # region asked for -> why it has no section
    prepared: "PreparedStudy | None" = field(default=None, repr=False)
    affine: np.ndarray | None = field(default=None, repr=False)          # the CT's (4, 4)
    findings_check: "FindingsCheck | None" = None       # filled by ReportEngine.finding_check
    # head-mean LLM attention rows of every generated token (layers, n, K), kept after the first
    # raw-attention map so later selections need no second pass
    llm_attention_mean: torch.Tensor | None = field(default=None, repr=False)
    # the draft's id on the reg2rg-serve that made it (a RemoteEngine's explanations ask that server)
    remote_draft: str | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return self.stop_reason == "cancelled"

    @property
    def inputs(self) -> ModelInputs | None:
        """The pre-processed tensors and geometry (``prepared.inputs``)."""
        return None if self.prepared is None else self.prepared.inputs

    @property
    def complete(self) -> bool:
        """True when the model ended the draft itself (eos or the token limit); False when it was
        stopped by the reader ("cancelled") or by a failure ("interrupted": the draft so far)."""
        return self.stop_reason in ("eos", "max_new_tokens")

    @property
    def geometry(self):
        return None if self.inputs is None else self.inputs.geometry

    @property
    def cache(self) -> dict[str, Any]:
        """Read-only view for callers written before ``prepared``/``affine`` were typed fields."""
        return {"prepared": self.prepared, "affine": self.affine}

    def section_of_token(self, index: int) -> GroundedSection | None:
        """The region section that contains generated token ``index``."""
        tok = self.tokens[index]
        for s in self.sections:
            if s.start <= tok.start < s.end:
                return s
        return None

    def token_indices_in_span(self, start: int, end: int) -> list[int]:
        """Indices of the generated tokens overlapping the character span ``[start, end)``."""
        return [t.index for t in tokens_in_span(self.tokens, start, end)]

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (what ``report.json`` holds)."""
        return {
            "study": self.study_name,
            "text": self.text,
            "stop_reason": self.stop_reason,
            "settings": asdict(self.settings),
            "seed": self.seed,
            "slot_regions": {str(k): v for k, v in self.slot_regions.items()},
            "region_accuracy": self.region_accuracy,
            "confidence": self.confidence.to_dict(),
            "region_confidence": {k: v.to_dict() for k, v in self.region_confidence.items()},
            "sections": [s.to_dict() for s in self.sections],
            "sentences": [s.to_dict() for s in self.sentences],
            "tokens": [t.to_dict() for t in self.tokens],
            "timings": dict(self.timings),
            "input": dict(self.input),
            "not_drafted": dict(self.not_drafted),
            **({"findings_check": self.findings_check.to_dict()} if self.findings_check is not None else {}),
        }


# ------------------------------------------------------------------------------------------------
# decoding over a causal LM with a KV cache
# ------------------------------------------------------------------------------------------------
def _cache_kwarg(lang_model: torch.nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever the model takes."""
    base = lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(lang_model: torch.nn.Module):
    base = lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model
    return DynamicCache(config=base.config)


def _warp_logits(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Temperature, top-k and top-p (HF semantics) applied to (N, V) logits for sampling."""
    logits = logits.float() / settings.temperature
    if settings.top_k > 0 and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]          # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop the low tail whose mass is <= 1 - top_p; the most probable token always survives
        drop_sorted = cum <= (1 - settings.top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Decoder:
    """Iterates over the `StepDistribution` of each generated token; ``stop_reason`` is set at the end.

    ``lang_model`` is a (PEFT-wrapped) causal LM; ``embed_tokens`` maps (N, 1) token ids to (N, 1, H)
    input embeddings; ``prompt_embeds`` is the (1, L, H) prompt. The prompt is run once (prefill),
    then one token per step through the cache. With greedy or sampling each step is yielded as soon as
    it is chosen; beam search yields the chosen beam's steps when the search ends.
    ``cancel`` is checked before every model step.
    """

    def __init__(self, lang_model: torch.nn.Module, embed_tokens: Callable[[torch.Tensor], torch.Tensor],
                 prompt_embeds: torch.Tensor, settings: GenerationSettings, eos_token_id: int | None,
                 cancel: threading.Event | None = None, top_k_alternatives: int = TOP_ALTERNATIVES):
        settings.validate()
        self.lm = lang_model
        self.embed_tokens = embed_tokens
        self.prompt_embeds = prompt_embeds
        self.settings = settings
        self.eos = eos_token_id
        self.cancel = cancel
        self.k_alt = top_k_alternatives
        self.stop_reason = "max_new_tokens"
        self.seed: int | None = None
        self._cache_kw = _cache_kwarg(lang_model)

    def _cancelled(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.stop_reason = "cancelled"
            return True
        return False

    def _step(self, embeds: torch.Tensor, cache) -> torch.Tensor:
        """Run ``embeds`` (N, T, H) through the LM; returns the (N, V) next-token logits."""
        # inference mode per step, not around the generator: a suspended generator must not leave the
        # consumer's thread in inference mode between tokens
        with torch.inference_mode():
            out = self.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.embed_tokens(tokens)

    def __iter__(self) -> Iterator[StepDistribution]:
        if self.settings.strategy == "beam" and self.settings.num_beams > 1:
            yield from self._beam()
        else:
            yield from self._greedy_or_sample()

    def _greedy_or_sample(self) -> Iterator[StepDistribution]:
        s = self.settings
        generator = None
        if s.strategy == "sample":
            self.seed = int(s.seed) if s.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            generator = torch.Generator(device=self.prompt_embeds.device).manual_seed(self.seed)
        cache = _new_cache(self.lm)
        if self._cancelled():
            return
        logits = self._step(self.prompt_embeds, cache)                        # (1, V)
        for _ in range(s.max_new_tokens):
            if s.strategy == "sample":
                probs = _warp_logits(logits, s).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).view(1)
            else:
                token = logits.argmax(-1)                                      # (1,)
            step = distribution_stats(logits, token, self.k_alt)[0]
            yield step
            if self.eos is not None and step.token_id == self.eos:
                self.stop_reason = "eos"
                return
            if self._cancelled():
                return
            embeds = self._embed(token.view(1, 1))                       # (1, 1, H)
            logits = self._step(embeds, cache)
        self.stop_reason = "max_new_tokens"

    def _beam(self) -> Iterator[StepDistribution]:
        """A plain beam search (HF scoring: sum log p / length ** length_penalty, eos ends a beam)."""
        s = self.settings
        B = s.num_beams
        cache = _new_cache(self.lm)
        if self._cancelled():
            return
        logits = self._step(self.prompt_embeds, cache)                        # (1, V)
        V = logits.shape[-1]
        scores = torch.zeros(1, device=logits.device)                         # (beams,)
        histories: list[list[StepDistribution]] = [[]]
        finished: list[tuple[float, list[StepDistribution]]] = []
        for step_i in range(s.max_new_tokens):
            n = logits.shape[0]
            logp = torch.log_softmax(logits.float(), dim=-1)                  # (n, V)
            cand = (scores[:, None] + logp).view(-1)                          # (n*V,)
            top_scores, top_flat = cand.topk(min(2 * B, cand.numel()))
            beam_idx, tok_idx = top_flat // V, top_flat % V
            stats = distribution_stats(logits[beam_idx], tok_idx, self.k_alt)
            keep_beams, keep_tokens, keep_scores, keep_hist = [], [], [], []
            length = step_i + 1
            for sc, b, t, st in zip(top_scores.tolist(), beam_idx.tolist(), tok_idx.tolist(), stats):
                hist = histories[b] + [st]
                if self.eos is not None and t == self.eos:
                    finished.append((sc / length ** s.length_penalty, hist))
                else:
                    keep_beams.append(b)
                    keep_tokens.append(t)
                    keep_scores.append(sc)
                    keep_hist.append(hist)
                if len(keep_beams) == B:
                    break
            best_running = keep_scores[0] / length ** s.length_penalty if keep_scores else -math.inf
            finished.sort(key=lambda x: -x[0])
            finished = finished[:B]
            # done when B hypotheses ended and no running beam can still beat the worst of them
            # (log-probs only fall, so with length_penalty >= 0 the running score is an upper bound)
            if not keep_beams or (len(finished) == B and best_running <= finished[-1][0]):
                self.stop_reason = "eos"
                break
            if step_i == s.max_new_tokens - 1 or self._cancelled():
                for sc, h in zip(keep_scores, keep_hist):
                    finished.append((sc / length ** s.length_penalty, h))
                if self.stop_reason != "cancelled":
                    self.stop_reason = "max_new_tokens"
                break
            sel = torch.tensor(keep_beams, device=logits.device)
            if n == 1:
                cache.batch_repeat_interleave(len(keep_beams))
            else:
                cache.reorder_cache(sel)
            scores = torch.tensor(keep_scores, device=logits.device)
            histories = keep_hist
            tokens = torch.tensor(keep_tokens, device=logits.device).view(-1, 1)
            logits = self._step(self._embed(tokens), cache)             # (B, V)
        if finished:
            best = max(finished, key=lambda x: x[0])[1]
            if self.eos is not None and best and best[-1].token_id == self.eos and self.stop_reason != "cancelled":
                self.stop_reason = "eos"
            yield from best


# ------------------------------------------------------------------------------------------------
# incremental detokenisation
# ------------------------------------------------------------------------------------------------
class StreamingDetokenizer:
    """Turns ids into text increments whose concatenation is exactly ``decode(all ids)``.

    Decoding a token alone loses the leading space of SentencePiece pieces and splits multi-byte
    characters, so each step decodes the whole sequence and emits what is new. A trailing U+FFFD
    (an incomplete UTF-8 character) is held back until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> tuple[str, int, int]:
        """Add one id; returns (new text, start, end) of the increment in the running text."""
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return "", len(self.text), len(self.text)
        if not full.startswith(self.text):
            # a tokenizer whose decoding of a prefix is not a prefix: fall back to the difference
            common = os.path.commonprefix([full, self.text])
            self.text = common
        start = len(self.text)
        self.text = full
        return full[start:], start, len(full)

    def finish(self) -> str:
        """The final text (anything still held back included)."""
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.text


_PIECE_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # tokenizer -> {token id: text}


def token_piece_text(tokenizer, token_id: int) -> str:
    """Readable text of one token for the alternatives list (keeps its leading space). Remembered per
    tokenizer: five of them are shown for every generated token of every draft."""
    try:
        known = _PIECE_TEXTS.setdefault(tokenizer, {})
    except TypeError:                       # a tokenizer that cannot be weakly referenced: not remembered
        known = {}
    token_id = int(token_id)
    text = known.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece[:1] in ("\u2581", "\u0120") and not text.startswith(" "):
            text = " " + text
        known[token_id] = text
    return text


# ------------------------------------------------------------------------------------------------
# sections, grounding and aggregates
# ------------------------------------------------------------------------------------------------
def ground_sections(text: str, slot_regions: dict[int, str], tokens: Sequence[TokenConfidence]) -> list[GroundedSection]:
    """Parse ``text`` into region sections and check each named area against the slot's true region."""
    out = []
    for sec in parse_sections(text):
        slot = None if sec.slot is None else int(sec.slot)
        region = None if slot is None else slot_regions.get(slot)
        named = sec.area
        conf = ConfidenceSummary.of(tokens_in_span(tokens, sec.body_start, sec.end))
        out.append(GroundedSection(
            slot=slot, area=named, raw_area=sec.raw_area, text=sec.text, start=sec.start,
            end=sec.end, body_start=sec.body_start, region=region,
            grounding_ok=region is not None and named == region, confidence=conf,
        ))
    return out


def region_accuracy_of(sections: Sequence[GroundedSection], slot_regions: dict[int, str]) -> float | None:
    """The published region prediction accuracy of one study (`sections.region_prediction_accuracy`:
    a slot never written counts as wrong, a repeated slot is judged by its first section); None when
    the prompt had no region slots."""
    if not slot_regions:
        return None
    return float(region_prediction_accuracy(sections, slot_regions))


def sentence_confidences(text: str, sections: Sequence[GroundedSection],
                         tokens: Sequence[TokenConfidence]) -> list[SentenceConfidence]:
    """Sentences of every section body (and of text outside sections) with their confidence."""
    pieces: list[tuple[int, int, int | None]] = []
    pos = 0
    for s in sorted(sections, key=lambda s: s.start):
        if s.start > pos:
            pieces.append((pos, s.start, None))
        pieces.append((s.body_start, s.end, s.slot))
        pos = max(pos, s.end)
    if pos < len(text):
        pieces.append((pos, len(text), None))
    out = []
    for a, b, slot in pieces:
        for s, e in sentence_spans(text, a, b):
            toks = tokens_in_span(tokens, s, e)
            out.append(SentenceConfidence(s, e, text[s:e], slot, ConfidenceSummary.of(toks),
                                          tuple(t.index for t in toks)))
    return out


def region_confidences(sections: Sequence[GroundedSection], tokens: Sequence[TokenConfidence]) -> dict[str, ConfidenceSummary]:
    """Confidence over all section bodies of each true region (keyed by the slot's region)."""
    by_region: dict[str, list[TokenConfidence]] = {}
    for s in sections:
        if s.region is not None:
            by_region.setdefault(s.region, []).extend(tokens_in_span(tokens, s.body_start, s.end))
    return {r: ConfidenceSummary.of(t) for r, t in by_region.items()}


def regions_not_drafted(requested: Sequence[str], slot_regions: dict[int, str],
                        sections: Sequence[GroundedSection], stop_reason: str = "eos") -> dict[str, str]:
    """Regions the draft was asked for that have no section in it, with the reason in the reader's words
    (a region is never dropped from a draft silently)."""
    placed = set(slot_regions.values())
    written = {s.region for s in sections if s.region is not None and s.text.strip()} if sections else set()
    out = {}
    for region in requested:
        if region not in placed:
            out[region] = "its mask could not be prepared for the model (too small or on air only)"
        elif region not in written:
            out[region] = ("the draft stopped before this section" if stop_reason in ("max_new_tokens", "cancelled")
                           else "the model did not write this section")
    return out


def build_result(text: str, steps: Sequence[StepDistribution], pieces: Sequence[tuple[str, int, int]],
                 tokenizer, slot_regions: dict[int, str], settings: GenerationSettings, stop_reason: str,
                 **extra) -> DraftResult:
    """Assemble a `DraftResult` from the decoded steps and their text increments."""
    tokens = [
        TokenConfidence(index=i, token_id=st.token_id, text=txt, start=a, end=b, prob=st.prob,
                        entropy=st.entropy,
                        top=tuple((token_piece_text(tokenizer, t), p) for t, p in zip(st.top_ids, st.top_probs)),
                        top_ids=tuple(st.top_ids))
        for i, (st, (txt, a, b)) in enumerate(zip(steps, pieces))
    ]
    return result_from_tokens(text, tokens, slot_regions, settings, stop_reason, **extra)


def result_from_tokens(text: str, tokens: Sequence[TokenConfidence], slot_regions: dict[int, str],
                       settings: GenerationSettings, stop_reason: str, **extra) -> DraftResult:
    """A `DraftResult` from the report text and its tokens (sections, grounding, confidences derived
    here): how a remote engine's client rebuilds exactly the result the server's engine built."""
    tokens = list(tokens)
    sections = ground_sections(text, slot_regions, tokens)
    return DraftResult(
        text=text, token_ids=[t.token_id for t in tokens], tokens=tokens, sections=sections,
        slot_regions=dict(slot_regions), sentences=sentence_confidences(text, sections, tokens),
        region_confidence=region_confidences(sections, tokens), confidence=ConfidenceSummary.of(tokens),
        region_accuracy=region_accuracy_of(sections, slot_regions), stop_reason=stop_reason,
        settings=settings, **extra,
    )


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """The embedded demo model (``resources/demo_model``)."""
    from .. import resources

    return Path(resources.__file__).resolve().parent / "demo_model"


def resolve_device(device: str | torch.device = "auto", dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """``"auto"``: CUDA with bfloat16 when available, else CPU float32. ``dtype`` overrides the choice."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("device 'cuda' was requested but no CUDA device is available; use device='cpu'")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype.lower() not in names:
            raise GenerationError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype.lower()]
    return device, dtype


def _oom_message(device: torch.device, what: str) -> str:
    if device.type == "cuda":
        return (f"the GPU ran out of memory while {what}. Try fewer regions, a smaller max_new_tokens or "
                f"num_beams, or run on the CPU (device='cpu', slower but limited only by RAM).")
    return (f"the computer ran out of memory while {what}. Try fewer regions, a smaller max_new_tokens or "
            f"num_beams, or the smaller demo model.")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def model_tensors(inputs: ModelInputs, slots: Sequence[str], device, dtype) -> tuple[torch.Tensor, ...]:
    """(images (1,3,H,W,D), region_images (N,3,H,W,D), region_masks (N,1,H,W,D), region_sample (N,),
    region_slot (N,), region_ids (N,)) of one study for `Reg2RG.encode_visual`/`embed_inputs`, regions in
    slot order (``region_ids``: each slot's region index in `REGIONS`)."""
    images = inputs.image[None].to(device, dtype)
    if slots:
        region_images = torch.stack([inputs.regions[r] for r in slots]).to(device, dtype)
        region_masks = torch.stack([inputs.masks[r] for r in slots]).to(device, dtype)
    else:
        region_images = images.new_zeros(0, *images.shape[1:])
        region_masks = images.new_zeros(0, 1, *images.shape[2:])
    region_sample = torch.zeros(len(slots), dtype=torch.long, device=device)
    region_slot = torch.arange(len(slots), dtype=torch.long, device=device)
    region_ids = torch.tensor([REGIONS.index(r) for r in slots], dtype=torch.long, device=device)
    return images, region_images, region_masks, region_sample, region_slot, region_ids


def study_orientation_for(study, model_orientation: str | None) -> str | None:
    """`ReportEngine.study_orientation` for a model trained in ``model_orientation`` (a remote one too)."""
    if not study.metadata.get("orientation_known", True):
        return None
    return model_orientation


def input_facts_for(study, inputs, model_orientation: str | None) -> dict:
    """`ReportEngine.input_facts` for a model trained in ``model_orientation`` (a remote one too)."""
    target = study_orientation_for(study, model_orientation)
    stored = study.orientation
    warnings = list(dict.fromkeys([*study.warnings, *getattr(inputs, "warnings", [])]))   # once each
    return {"orientation": {"model": model_orientation, "study": stored,
                            "study_orientation_known": bool(study.metadata.get("orientation_known", True)),
                            "reoriented": target is not None and target.upper() != stored},
            "warnings": warnings}


def finish_result(result: DraftResult, study, inputs, chosen: Sequence[str], model_orientation: str | None) -> None:
    """What a result says about its study, filled in where the study is known (this computer): the
    input facts and the regions asked for but not drafted."""
    result.input = input_facts_for(study, inputs, model_orientation)
    result.not_drafted = regions_not_drafted(chosen, result.slot_regions, result.sections, result.stop_reason)


def select_regions(study, regions: Sequence[str] | None, num_regions: int) -> list[str]:
    """`ReportEngine.select_regions` for a model with ``num_regions`` slots (a remote one too)."""
    present = study.regions_present
    if regions is None:
        chosen = present
    else:
        chosen = []
        for name in regions:
            canon = canonical_region(name)
            if canon is None:
                raise GenerationError(f"{study.name}: unknown region {name!r}; regions are {', '.join(REGIONS)}")
            if canon not in present:
                raise GenerationError(f"{study.name}: region {canon!r} has no mask (or an empty one) in this study")
            chosen.append(canon)
        chosen = [r for r in REGIONS if r in set(chosen)]
    if len(chosen) > num_regions:
        raise GenerationError(f"{study.name}: {len(chosen)} regions but the model has {num_regions} slots")
    return chosen


@dataclass
class PreparedStudy:
    """A study ready to decode: model inputs, slot assignment, prompt ids and embeddings, and the
    perceiver's latent→patch attention (kept from the same encoding pass, for attention maps)."""

    inputs: ModelInputs
    slot_regions: dict[int, str]
    prompt_ids: list[int]
    prompt_embeds: torch.Tensor              # (1, P, hidden)
    latent_patch: dict[str, torch.Tensor]    # 'global' / region -> (L, patches), last perceiver layer
    patch_grid: tuple[int, int, int]
    # the finding head's probabilities, 'global' / region -> {label: p}, when the model has one (a fitted
    # detector: the labels it may call in that region only)
    finding_probabilities: dict[str, dict[str, float]] | None = None

    @property
    def slots(self) -> list[str]:
        """Region names in slot order."""
        return [self.slot_regions[j] for j in sorted(self.slot_regions)]


class ReportEngine:
    """Reg2RG inference for the viewer and the command line.

    ``generate`` streams `GenerationEvent`s and ends with `Finished`; ``attention_map`` turns a
    selection of generated tokens into shares and a heatmap on the original CT.
    """

    def __init__(self, model, tokenizer, model_dir: str | os.PathLike | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.special: SpecialIds = model.special
        self.model_dir = None if model_dir is None else Path(model_dir)
        first = next(model.parameters())
        self.device = first.device
        self.dtype = next(model.embedding_layer.parameters()).dtype      # the vision path's (inputs are cast to it)
        self.precision = precision_of(model)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
        self._lock = threading.RLock()

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | os.PathLike | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype | None = None, llm_path: str | os.PathLike | None = None) -> "ReportEngine":
        """Load a model folder (None = the embedded demo model) onto ``device`` (``"auto"``: CUDA if
        available, else the CPU) in precision ``dtype`` (`presets.resolve_precision`: ``auto``/None =
        bf16 on CUDA, fp32 on the CPU; ``fp32``, ``bf16``, ``reference``/``fp16`` = LLM fp16 with the
        vision path in fp32). ``llm_path`` overrides the base LLaMA folder of a LoRA checkpoint.
        Raises `ModelFolderError` when the folder or one of its files is missing and
        `EngineOutOfMemory` when the weights do not fit."""
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        if not folder.is_dir():
            hint = " (the embedded demo model is not built yet)" if model_dir is None else ""
            raise ModelFolderError(f"{folder}: model folder not found{hint}")
        dev, _ = resolve_device(device)
        precision = resolve_precision(dtype, dev)
        try:
            model, tokenizer = load_pretrained(folder, dev, precision.llm_dtype, llm_path=llm_path,
                                               vision_dtype=precision.vision_dtype)
        except CheckpointError as err:
            if "missing" in err.problem or "not found" in err.problem or "not on this machine" in err.problem:
                raise ModelFolderError(str(err)) from err
            raise
        except Exception as err:  # noqa: BLE001 - only memory errors are translated
            if _is_oom(err):
                raise EngineOutOfMemory(_oom_message(dev, f"loading {folder}")) from err
            raise
        return cls(model, tokenizer, folder)

    @classmethod
    def from_published(cls, checkpoint: str | os.PathLike, llm_path: str | os.PathLike,
                       device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
                       strict: bool = True) -> "ReportEngine":
        """The published Reg2RG checkpoint (a full state dict, safetensors or ``weights_only`` pickle)
        on the published dimensions, with the LLaMA-2-7B-chat folder ``llm_path`` (tokenizer and base
        weights, read offline). ``dtype`` is the precision (`presets.resolve_precision`); ``auto``/None on
        CUDA is ``reference`` — the LLM in fp16, the vision path in fp32, as the published run.
        ``strict`` (default): a file whose keys do not match the model raises `CheckpointError` listing
        them; ``strict=False`` loads what matches and logs the rest."""
        for path, what in ((checkpoint, "published checkpoint file"), (llm_path, "LLaMA folder")):
            if not Path(path).exists():
                raise ModelFolderError(f"{path}: {what} not found")
        dev, _ = resolve_device(device)
        precision = resolve_precision(dtype, dev, published=True)
        config = Reg2RGConfig.preset("reg2rg-7b")
        config.llm_path = os.fspath(llm_path)
        config.gradient_checkpointing = False
        try:
            tokenizer = load_tokenizer(llm_path)
            # the LLM is read from its folder straight in its dtype; the vision path is built in its own
            model = Reg2RG.from_config(config, tokenizer, dtype=precision.llm_dtype)
            model.set_precision(precision.llm_dtype, precision.vision_dtype)
            report = import_published(model, checkpoint, strict=strict)
            model.to(dev).eval()
        except Exception as err:  # noqa: BLE001
            if _is_oom(err):
                raise EngineOutOfMemory(_oom_message(dev, f"loading {checkpoint}")) from err
            raise
        if not report.complete:     # only reached with strict=False
            logger.warning("%s: loaded non-strictly: %s", checkpoint, report.describe())
        return cls(model, tokenizer, Path(checkpoint).parent)

    # ---- what this engine is -------------------------------------------------------------------
    def model_info(self) -> dict:
        """Name, version, weights digest, model card and layout of the loaded model (the viewer's
        panels and ``GET /v1/model`` of ``reg2rg-serve`` show it). The digest is computed once."""
        info = getattr(self, "_model_info", None)
        if info is None:
            info = model_info_of(self)
            self._model_info = info
        return dict(info)

    # ---- regions and prompt -------------------------------------------------------------------
    def select_regions(self, study, regions: Sequence[str] | None = None) -> list[str]:
        """Regions to report on, in the published order: all present (non-empty masks) by default."""
        return select_regions(study, regions, self.config.num_regions)

    def study_orientation(self, study) -> str | None:
        """The orientation ``study`` is brought to before pre-processing: the model's training orientation
        (config ``orientation``), or None (as stored) when the file does not say how its axes lie."""
        return study_orientation_for(study, self.config.orientation)

    def input_facts(self, study, inputs) -> dict:
        """What ``report.json`` records about the input: orientations and every warning about the study."""
        return input_facts_for(study, inputs, self.config.orientation)

    def prepare(self, study, regions: Sequence[str] | None = None) -> PreparedStudy:
        """Pre-process, encode every volume in one pass, and embed the prompt (done once per study)."""
        chosen = self.select_regions(study, regions)
        inputs = preprocess(study, self.config.input_size, self.study_orientation(study), chosen)
        return self.prepare_inputs(inputs, chosen)

    def prepare_inputs(self, inputs, chosen: Sequence[str]) -> PreparedStudy:
        """Encode already pre-processed ``inputs`` (`preprocess.ModelInputs`) for the regions ``chosen``
        (REGIONS order): what a server does with the tensors a client pre-processed."""
        # preprocess skips regions it cannot crop (warned there): slots follow what it produced
        slots = [r for r in chosen if r in inputs.regions]
        slot_regions = {j: r for j, r in enumerate(slots)}
        dev, dt = self.device, self.dtype
        images, region_images, region_masks, region_sample, region_slot, region_ids = model_tensors(
            inputs, slots, dev, dt)
        prompt_ids = build_prompt_ids(self.tokenizer, len(slots), self.special)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)                  # (1, P)
        with torch.inference_mode():
            visual = self.model.encode_visual(images, region_images, region_masks, return_attention=True,
                                              region_ids=region_ids)
            embeds = self.model.embed_inputs(ids, images, region_images, region_masks, region_sample,
                                             region_slot, visual=visual)                  # (1, P, hidden)
        lp = _latent_patch(visual.perceiver_attention)                                    # (1+N, L, P)
        latent_patch = {"global": lp[0]}
        latent_patch.update({r: lp[1 + j] for j, r in enumerate(slots)})
        findings = None
        if self.config.finding_labels:
            g, r = self.model.finding_probabilities(visual)
            labels = self.config.finding_labels
            assessed = torch.ones_like(torch.cat([g, r]), dtype=torch.bool)
            enabled = self.model.embedding_layer.finding_enabled(visual)
            if enabled is not None:     # the fitted detector: only the labels it may call in that region
                assessed = torch.cat([torch.zeros_like(g, dtype=torch.bool), enabled.to(assessed.device)])
            findings = {name: {k: p for k, p, a in zip(labels, row.tolist(), keep.tolist()) if a}
                        for name, row, keep in zip(["global", *slots], torch.cat([g, r]), assessed)}
        return PreparedStudy(inputs, slot_regions, prompt_ids, embeds, latent_patch, tuple(visual.patch_grid),
                             findings)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, study, regions: Sequence[str] | None = None,
                 settings: GenerationSettings = GenerationSettings(),
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Draft the report of ``study``: yields `EncodingStarted`, `EncodingDone`, one `TokenEvent` per
        generated token (their ``text`` concatenated is the report), then `Finished`.

        ``regions``: names to report on ("referring"; default all with a mask). Setting ``cancel``
        stops between tokens; `Finished` still comes, with ``stop_reason == "cancelled"``.
        Safe to consume from a worker thread (one generation at a time per engine).
        """
        settings.validate()
        with self._out_of_memory_as_error(f"drafting the report of {study.name}"):
            yield from self._generate(study, regions, settings, cancel)

    def _generate(self, study, regions, settings, cancel) -> Iterator[GenerationEvent]:
        chosen = self.select_regions(study, regions)
        yield EncodingStarted(tuple(chosen))
        t0 = time.perf_counter()
        prepared = self.prepare(study, chosen)
        for event in self.decode_prepared(prepared, settings, cancel, started=t0, study_name=study.name,
                                          affine=study.affine):
            if isinstance(event, Finished):
                finish_result(event.result, study, prepared.inputs, chosen, self.config.orientation)
            yield event

    def decode_prepared(self, prepared: PreparedStudy, settings: GenerationSettings,
                        cancel: threading.Event | None = None, started: float | None = None,
                        study_name: str = "", affine=None, decoder=None) -> Iterator[GenerationEvent]:
        """`EncodingDone`, one `TokenEvent` per token, then `Finished` for an encoded study.

        ``decoder``: any iterable of `StepDistribution` with ``stop_reason`` and ``seed`` attributes
        (default: a `Decoder` of its own; `batching.DecodeScheduler` passes one whose steps come from
        a batch shared with other requests). ``started``: when encoding began (for the timings)."""
        t1 = time.perf_counter()
        t0 = t1 if started is None else started
        yield EncodingDone(len(prepared.prompt_ids), t1 - t0, dict(prepared.slot_regions))
        if decoder is None:
            decoder = Decoder(self.model.lang_model, self.model.lang_model.get_input_embeddings(),
                              prepared.prompt_embeds, settings, self.eos_token_id, cancel)
        detok = StreamingDetokenizer(self.tokenizer)
        steps: list[StepDistribution] = []
        pieces: list[tuple[str, int, int]] = []
        first_token_at = None
        for step in decoder:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            text, a, b = detok.push(step.token_id)
            steps.append(step)
            pieces.append((text, a, b))
            top = tuple((token_piece_text(self.tokenizer, t), p) for t, p in zip(step.top_ids, step.top_probs))
            yield TokenEvent(len(steps) - 1, step.token_id, text, step.prob, step.entropy, top)
        text = detok.finish()
        if pieces and pieces[-1][2] < len(text):
            # a trailing incomplete character was held back: it belongs to the last token
            t, a, _ = pieces[-1]
            pieces[-1] = (text[a:], a, len(text))
        t2 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "decode_s": t2 - t1, "tokens": float(len(steps)),
                   "first_token_s": (first_token_at or t2) - t0,
                   "tokens_per_s": len(steps) / (t2 - t1) if t2 > t1 else 0.0}
        result = build_result(text, steps, pieces, self.tokenizer, prepared.slot_regions, settings,
                              decoder.stop_reason, seed=decoder.seed, study_name=study_name,
                              prompt_ids=list(prepared.prompt_ids), timings=timings, prepared=prepared,
                              affine=np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
        yield Finished(result)

    def draft(self, study, regions: Sequence[str] | None = None,
              settings: GenerationSettings = GenerationSettings()) -> DraftResult:
        """Generate without streaming; returns the `DraftResult`."""
        return run_to_draft(self.generate(study, regions, settings))

    # ---- explanations (engine/attention.py, engine/explain/) ------------------------------------
    @property
    def lock(self) -> threading.RLock:
        """Serialises this engine's work across threads: a generation, an explanation pass (which may
        switch the model to eager attention or run a backward pass) must not overlap."""
        return self._lock

    @property
    def finding_detector(self) -> bool:
        """True when the model's finding calls come from a fitted detector (``finding_head_input="latents"``):
        its drafts report only what the detector may call, and `PreparedStudy.finding_probabilities` holds
        the detector's own probability of exactly those labels."""
        return self.model.embedding_layer.finding_threshold is not None

    @property
    def layout(self) -> tuple[int, int]:
        """(layers, heads) of the language model: the choices for raw attention maps."""
        cfg = _base_config(self.model.lang_model)
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)

    def attention_layout(self) -> tuple[int, int]:
        """(layers, heads) of the language model: what ``attention_map``'s ``layers``/``heads`` index."""
        return self.layout

    def attention_map(self, result: DraftResult, token_indices: Sequence[int] | int,
                      layers: str | Sequence[int] = "all", heads: str | Sequence[int] = "mean"):
        """Raw attention of the selected generated tokens (`attention.attention_map`)."""
        from .attention import attention_map

        return self._explaining(lambda: attention_map(self, result, token_indices, layers, heads), "an attention map")

    def relevance_map(self, result: DraftResult, token_indices: Sequence[int] | int):
        """Evidence in the CT for the selected tokens (`explain.relevance.relevance_map`)."""
        from .explain.relevance import relevance_map

        return self._explaining(lambda: relevance_map(self, result, token_indices), "a relevance map")

    def relevance_patches(self, result: DraftResult, token_indices: Sequence[int] | int):
        """The model's part of a relevance map, without geometry (`explain.relevance.patch_relevance`):
        what ``reg2rg-serve`` computes for a client, which projects it onto its own CT."""
        from .explain.relevance import patch_relevance

        return self._explaining(lambda: patch_relevance(self, result, token_indices), "a relevance map")

    def region_dependence(self, result: DraftResult, token_indices: Sequence[int] | int):
        """Log-probability drop of the selection without each visual group (`explain.relevance`)."""
        from .explain.relevance import region_dependence

        return self._explaining(lambda: region_dependence(self, result, token_indices), "the region dependence")

    def finding_check(self, result: DraftResult, threshold: float | None = None,
                      contradiction_below: float | None = None):
        """Per-finding probabilities, omission and contradiction flags of each drafted region
        (`explain.findings.finding_check`); also stored in ``result.findings_check``."""
        from .explain.findings import finding_check

        check = self._explaining(lambda: finding_check(self, result, threshold, contradiction_below),
                                 "the findings check")
        result.findings_check = check
        return check

    @contextlib.contextmanager
    def _out_of_memory_as_error(self, what: str):
        """Memory errors inside become one `EngineOutOfMemory` naming ``what`` (the GPU cache is freed)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - only memory errors are translated
            if _is_oom(err):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise EngineOutOfMemory(_oom_message(self.device, what)) from err
            raise

    def _explaining(self, run, what: str):
        with self._out_of_memory_as_error(f"computing {what}"), self.lock:
            return run()

    def check_selection(self, result: DraftResult, token_indices: Sequence[int] | int) -> list[int]:
        """The selection as a list of generated-token indices; `GenerationError` when it cannot be explained."""
        if result.prepared is None:
            raise GenerationError("this result carries no encoding; explanations need a result of this engine")
        idx = [int(token_indices)] if isinstance(token_indices, int) else [int(i) for i in token_indices]
        n = len(result.token_ids)
        if not idx:
            raise GenerationError("select at least one generated token for an explanation")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise GenerationError(f"token indices {bad} are outside 0..{n - 1}")
        return idx

    def teacher_embeds(self, result: DraftResult, upto: int) -> torch.Tensor:
        """(1, P + upto - 1, hidden): the prompt, then the generated tokens that were fed back before
        token ``upto - 1`` was chosen (a token is never an input to its own choice)."""
        prepared = result.prepared
        ids = torch.tensor([result.token_ids[: max(upto - 1, 0)]], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            gen = self.model.lang_model.get_input_embeddings()(ids).to(prepared.prompt_embeds.dtype)
        return torch.cat([prepared.prompt_embeds, gen], dim=1)


def model_info_of(engine: "ReportEngine") -> dict:
    """`ReportEngine.model_info`: the model's identity as the reports give it (`report.provenance`:
    name, version, weights digest, validation), its model card and its layout."""
    from .report.provenance import model_card, model_identity

    ident = model_identity(engine.model_dir, engine.config)
    cfg = _base_config(engine.model.lang_model)
    return {**ident, "model_card": model_card(engine.model_dir) or None,
            "layers": int(cfg.num_hidden_layers), "heads": int(cfg.num_attention_heads),
            "num_regions": int(engine.config.num_regions), "input_size": list(engine.config.input_size),
            "orientation": engine.config.orientation, "device": str(engine.device),
            "precision": str(getattr(engine, "precision", engine.dtype)).replace("torch.", "")}


def _base_config(lang_model):
    base = lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model
    return base.config


def _latent_patch(perceiver_attention) -> torch.Tensor:
    return latent_patch_attention(perceiver_attention).cpu()
