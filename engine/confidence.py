"""Token confidence: how sure the model was of every token it wrote, and aggregates over text spans.

Everything here is computed from the logits of the decoding step that produced the token (the same
forward pass — no second model run). ``prob`` is the probability under the model's own distribution
(softmax of the raw logits, temperature 1) even when the token was sampled at another temperature:
that is the quantity a reader can compare across settings.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class StepDistribution:
    """The statistics of one next-token distribution, kept from a decoding step."""

    token_id: int                 # the token that was chosen
    prob: float                   # its probability, softmax(logits)[token_id]
    entropy: float                # entropy of softmax(logits), in nats
    top_ids: tuple[int, ...]      # the k most probable ids, most probable first
    top_probs: tuple[float, ...]  # their probabilities


def distribution_stats(logits: torch.Tensor, token_ids: torch.Tensor, k: int = 5) -> list[StepDistribution]:
    """Probability, entropy and top-``k`` of each row of ``logits`` for the chosen ``token_ids``.

    ``logits``: (N, V) raw next-token logits (any float dtype; computed in float32);
    ``token_ids``: (N,) the chosen token of each row.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)        # (N, V)
    p = logp.exp()
    # 0 * -inf is nan: masked-out entries contribute nothing to the entropy
    entropy = -(p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)  # (N,)
    chosen = p.gather(-1, token_ids.view(-1, 1).long()).squeeze(-1)        # (N,)
    top_p, top_i = p.topk(min(k, p.shape[-1]), dim=-1)                       # (N, k)
    chosen, entropy, top_p, top_i = (t.cpu().tolist() for t in (chosen, entropy, top_p, top_i))
    ids = token_ids.view(-1).cpu().tolist()
    return [
        StepDistribution(int(ids[n]), float(chosen[n]), float(entropy[n]), tuple(top_i[n]), tuple(top_p[n]))
        for n in range(len(ids))
    ]


@dataclass(frozen=True)
class TokenConfidence:
    """One generated token, where it sits in the report text, and how sure the model was of it."""

    index: int                            # position among the generated tokens (0 = first)
    token_id: int
    text: str                             # the characters this token added to the report ('' for eos)
    start: int                            # character span of ``text`` in ``DraftResult.text``
    end: int
    prob: float                           # probability of this token, softmax of the raw logits
    entropy: float                        # entropy of the next-token distribution, nats
    top: tuple[tuple[str, float], ...]    # the top-5 alternatives (text, prob), most probable first
    top_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top"] = [{"text": t, "prob": p, "token_id": i} for (t, p), i in zip(self.top, self.top_ids)]
        del d["top_ids"]
        return d


@dataclass(frozen=True)
class ConfidenceSummary:
    """Minimum and mean token probability (and mean entropy) over a span of generated tokens."""

    n_tokens: int = 0
    min_prob: float = float("nan")
    mean_prob: float = float("nan")
    mean_entropy: float = float("nan")

    @classmethod
    def of(cls, tokens: Iterable[TokenConfidence]) -> "ConfidenceSummary":
        toks = list(tokens)
        if not toks:
            return cls()
        probs = [t.prob for t in toks]
        return cls(len(toks), min(probs), sum(probs) / len(probs), sum(t.entropy for t in toks) / len(toks))

    def to_dict(self) -> dict:
        # NaN is not JSON: an empty span has no confidence
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def tokens_in_span(tokens: Sequence[TokenConfidence], start: int, end: int) -> list[TokenConfidence]:
    """The tokens whose text overlaps the character span ``[start, end)`` of the report."""
    return [t for t in tokens if t.end > start and t.start < end and t.end > t.start]


# a sentence ends at . ! ? followed by whitespace or the end of the text
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]`` (leading whitespace excluded)."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    pos = start
    for m in _SENTENCE_END.finditer(text, start, end):
        spans.append((pos, m.end()))
        pos = m.end()
    if pos < end:
        spans.append((pos, end))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        if s < e:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class SentenceConfidence:
    """A sentence of the report with the confidence of its tokens."""

    start: int
    end: int
    text: str
    slot: int | None                       # the region section it belongs to, None outside sections
    confidence: ConfidenceSummary = field(default_factory=ConfidenceSummary)
    token_indices: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confidence"] = self.confidence.to_dict()
        d["token_indices"] = list(self.token_indices)
        return d
