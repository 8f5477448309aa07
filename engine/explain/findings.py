"""Findings check: the model's own probability of each CT-RATE abnormality in each drafted region, and
the omission / contradiction flags a reader most needs.

For every drafted section whose slot holds a region with findings (lung, pleura, heart, mediastinum,
esophagus), and every CT-RATE abnormality relevant to that region, the model scores under teacher
forcing — the prompt, the draft up to a sentence start in that section — the sentence *openings* that
state the finding (abnormal) and those that deny it (normal), in the register it was trained on (the
RadGenome-style sentences of `phantom_reports`, cut right after the finding's own words, so e.g.
"Pleural effusion" and "No pleural effusion"; a prefix's probability is the model's probability of all
its continuations). ``p(finding) = Σ P(abnormal openings) / (Σ P(abnormal) + Σ P(normal))``: normalised
between the two ways the section could go on at that point. The point is the sentence start of the
section (or its end) where the two together are most probable: where the model is most inclined to
speak about that finding at all (right after the header a finding that is usually stated second is
unlikely either way, and the ratio of two tiny numbers says little).

**A model with a fitted finding detector** (`ReportEngine.finding_detector`, the demo model) writes exactly the
findings its detector calls, so its sentence probabilities only echo the calls (~0 for every finding it was
not told of). For the labels the detector may call in a region, ``p`` is the **detector's own probability**
(from the image; `PreparedStudy.finding_probabilities`, ``source="detector"``): a finding it rated likely but
below its calling threshold is then an omission alert. A label it may not call there is **not assessed**
(``source="not assessed"``: the model cannot see it, and its ~0 % must not read as "absent"); it raises no
flag.

Flags, from the labeller the evaluator uses (`labeller.find_mentions`) on the drafted section:
- **omission**: the section does not affirm the finding but ``p >= threshold``;
- **contradiction**: the section affirms it but ``p < contradiction_below``.
The default threshold was chosen on the validation phantoms (seeds 5000-5099), never the test ones
(`bench/explain.py --val`; bench/RESULTS.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..labeller import AFFIRMED, find_mentions, split_sentences
from ..tokens import encode_text

if TYPE_CHECKING:
    from ..generation import DraftResult, ReportEngine

#: Omission alert when an unmentioned finding has at least this probability: the F1-best threshold for the
#: shipped demo model (its detector's probabilities) on validation phantoms 5000-5099, never the test ones
#: (`bench/explain.py --val`, bench/RESULTS.md: 0.6, 7 alerts, 6 right). The previous detector model's gave 0.8,
#: the stage-1 demo model's sentence probabilities 0.15. Choose it again for another model: it depends on how the
#: model spreads them.
DEFAULT_OMISSION_THRESHOLD = 0.6
#: Contradiction alert when an asserted finding has less than this probability.
DEFAULT_CONTRADICTION_BELOW = 0.2

NOT_ASSESSED = "not assessed"

#: region -> the CT-RATE abnormalities its section reports on (the phantom's finding -> region table).
#: Left out: medical material (the register never denies it, so there is no "normal" sentence to weigh
#: it against) and the five lung labels the register has no sentences for (fibrotic sequela, mosaic
#: attenuation, peribronchial and septal thickening, bronchiectasis).
REGION_FINDINGS: dict[str, tuple[str, ...]] = {
    "lung": ("Lung nodule", "Lung opacity", "Consolidation", "Emphysema", "Atelectasis"),
    "pleura": ("Pleural effusion",),
    "heart": ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"),
    "mediastinum": ("Lymphadenopathy", "Arterial wall calcification"),
    "esophagus": ("Hiatal hernia",),
}


@dataclass(frozen=True)
class FindingProbability:
    """One abnormality in one drafted region: the model's probability, what the draft says, the flag.

    ``stated``: ``"affirmed"`` | ``"negated"`` | ``"uncertain"`` | None (not mentioned), from the labeller;
    ``flag``: None | ``"omission"`` | ``"contradiction"``; ``reason``: one line for the reader; ``source``:
    where ``probability`` comes from — ``"sentences"`` (the model's sentence openings), ``"detector"`` (its
    fitted finding detector) or ``"not assessed"`` (a detector model that cannot call this finding here)."""

    finding: str
    probability: float
    stated: str | None
    flag: str | None = None
    reason: str = ""
    source: str = "sentences"

    @property
    def assessed(self) -> bool:
        return self.source != NOT_ASSESSED


@dataclass(frozen=True)
class SectionFindings:
    slot: int
    region: str
    findings: tuple[FindingProbability, ...]

    @property
    def flags(self) -> list[FindingProbability]:
        return [f for f in self.findings if f.flag]


@dataclass
class FindingsCheck:
    """The findings check of a whole draft (one entry per checked section)."""

    threshold: float
    contradiction_below: float
    sections: list[SectionFindings] = field(default_factory=list)
    seconds: float = 0.0

    def for_slot(self, slot: int) -> SectionFindings | None:
        return next((s for s in self.sections if s.slot == slot), None)

    @property
    def flags(self) -> list[tuple[str, FindingProbability]]:
        return [(s.region, f) for s in self.sections for f in s.flags]

    def to_dict(self) -> dict:
        return {"method": "teacher-forced normal vs abnormal sentence openings, normalised; the finding detector's "
                          "probability for the labels a detector model may call (source)",
                "threshold": self.threshold, "contradiction_below": self.contradiction_below,
                "seconds": self.seconds,
                "sections": [{"slot": s.slot, "region": s.region, "findings": [asdict(f) for f in s.findings]}
                             for s in self.sections]}

    @classmethod
    def from_dict(cls, d: dict) -> "FindingsCheck":
        """The inverse of `to_dict` (what ``reg2rg-serve`` sends a client)."""
        return cls(float(d["threshold"]), float(d["contradiction_below"]),
                   [SectionFindings(int(s["slot"]), str(s["region"]),
                                    tuple(FindingProbability(**f) for f in s["findings"])) for s in d["sections"]],
                   float(d.get("seconds", 0.0)))


# ------------------------------------------------------------------------------------------------
# candidate openings
# ------------------------------------------------------------------------------------------------
class _Choose:
    """Stands in for a numpy Generator in `phantom_reports`: always picks template ``i``."""

    def __init__(self, i: int):
        self.i = i

    def integers(self, n):  # noqa: D102 - the Generator API
        if self.i >= n:
            raise IndexError(self.i)
        return self.i


def _cut_at_mention(sentence: str, finding: str, status: str | None) -> str | None:
    """The sentence up to the end of its first mention of ``finding`` with ``status`` (None: any)."""
    for s, e, st in find_mentions(sentence, finding):
        if status is None or st == status:
            return sentence[:e]
    return None


def _phantom_records(finding: str) -> list[dict]:
    """Finding records covering the details the report templates print before the finding's name."""
    sizes = [float(v) for v in range(2, 61)]
    base = {"type": finding}
    if finding in ("Lung nodule", "Lung opacity", "Consolidation", "Atelectasis"):
        return [{**base, "side": s, "lobe": lo, "size_mm": mm} for s in ("right", "left")
                for lo in ("upper", "middle", "lower") for mm in sizes]
    if finding == "Emphysema":
        return [{**base, "side": s, "amount": a} for s in ("right", "left", "bilateral") for a in ("mild", "moderate", "severe")]
    if finding == "Pleural effusion":
        return [{**base, "side": s, "amount": a, "size_mm": 20.0} for s in ("right", "left", "bilateral")
                for a in ("small", "moderate", "large")]
    if finding in ("Arterial wall calcification", "Coronary artery wall calcification"):
        locations = ("aortic arch", "descending aorta", "aortic arch and descending aorta") \
            if finding.startswith("Arterial") else ("LAD", "LAD and RCA", "LAD, LCx and RCA")
        return [{**base, "amount": a, "location": lo} for a in ("mild", "moderate", "severe") for lo in locations]
    if finding == "Lymphadenopathy":
        from ..phantom import LYMPH_STATIONS

        return [{**base, "location": st, "size_mm": mm} for st in LYMPH_STATIONS for mm in sizes]
    if finding == "Medical material":
        return [{**base, "kind": k, "side": s} for k in ("pacemaker", "port") for s in ("right", "left")]
    if finding == "Cardiomegaly":
        return [{**base, "amount": a} for a in ("mild", "moderate", "severe")]
    return [{**base, "size_mm": mm} for mm in sizes]


@lru_cache(maxsize=None)
def finding_openings(finding: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(abnormal, normal) sentence openings of ``finding`` in the phantom/RadGenome register."""
    from ..phantom_reports import _ABSENT, finding_sentence

    abnormal: set[str] = set()
    for rec in _phantom_records(finding):
        for i in range(8):
            try:
                sentence = finding_sentence(rec, _Choose(i))
            except IndexError:
                break
            cut = _cut_at_mention(sentence, finding, AFFIRMED)
            if cut:
                abnormal.add(cut)
    normal = set()
    for sentence in _ABSENT.get(finding, []):
        normal.add(_cut_at_mention(sentence, finding, None) or sentence)
    return tuple(sorted(abnormal)), tuple(sorted(normal))


def _disjoint(candidates: list[tuple[list[int], int]]) -> list[tuple[list[int], int]]:
    """Drop every candidate that extends another (its probability is already inside the shorter one's)."""
    out = []
    keys = {tuple(ids) for ids, _ in candidates}
    for ids, cls in candidates:
        if not any(tuple(ids[:n]) in keys for n in range(1, len(ids))):
            out.append((ids, cls))
    seen, unique = set(), []
    for ids, cls in out:
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            unique.append((ids, cls))
    return unique


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def _stated(section_text: str, finding: str) -> str | None:
    """What the drafted section says about ``finding``: affirmed wins over uncertain over negated."""
    statuses = {st for sent in split_sentences(section_text) for _, _, st in find_mentions(sent, finding)}
    for st in (AFFIRMED, "uncertain", "negated"):
        if st in statuses:
            return st
    return None


def _body_token(result: "DraftResult", body_start: int) -> int:
    """Index of the first generated token of a section's body."""
    for t in result.tokens:
        if t.end > body_start:
            return t.index
    # after the last section: before the end-of-sequence token when the draft ended with one
    return len(result.tokens) - (1 if result.stop_reason == "eos" and result.tokens else 0)


class _DraftPrefixes:
    """One cached pass over the prompt and the whole draft; any prefix (prompt + first k draft tokens)
    is then a cropped copy of that cache plus the logits at its last position."""

    def __init__(self, engine: "ReportEngine", result: "DraftResult"):
        from ..generation import _cache_kwarg, _new_cache

        self.lm = engine.model.lang_model
        self.kw = _cache_kwarg(self.lm)
        self.device = engine.device
        embeds = engine.teacher_embeds(result, len(result.token_ids) + 1)                # (1, P + n, hidden)
        self.dtype = embeds.dtype
        self.P = len(result.prepared.prompt_ids)
        self.cache = _new_cache(self.lm)
        with torch.inference_mode():
            self.logits = self.lm(inputs_embeds=embeds, use_cache=True, **{self.kw: self.cache}).logits[0].float()

    def score(self, k: int, candidates: list[list[int]]) -> np.ndarray:
        """(M,) log-probability of each candidate continuation after the prompt + the first ``k`` tokens.

        All candidates go in ONE row after the cached prefix, each at the positions right after it, with
        a block mask: a candidate sees the prefix and its own earlier tokens only (no per-candidate copy
        of the prefix's cache, which dominated the cost)."""
        lengths = [len(c) for c in candidates]
        S, prefix = sum(lengths), self.P + k
        ids = torch.tensor([t for c in candidates for t in c], dtype=torch.long, device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(candidates), device=self.device),
                                        torch.tensor(lengths, device=self.device))            # (S,)
        offset = torch.cat([torch.arange(n, device=self.device) for n in lengths])            # (S,)
        allowed = torch.ones(S, prefix + S, dtype=torch.bool, device=self.device)
        allowed[:, prefix:] = (owner[:, None] == owner[None, :]) & (offset[:, None] >= offset[None, :])
        mask = torch.zeros(1, 1, S, prefix + S, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        with torch.inference_mode():
            cache = copy.deepcopy(self.cache)
            extra = self.logits.shape[0] - prefix
            if extra > 0:
                cache.crop(-extra)            # transformers' crop takes the number of positions to drop
            embeds = self.lm.get_input_embeddings()(ids[None]).to(self.dtype)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=(prefix + offset)[None],
                          use_cache=True, **{self.kw: cache}).logits[0].float()                # (S, V)
            logp = torch.log_softmax(out, -1)
            first = torch.log_softmax(self.logits[prefix - 1], -1)                            # (V,)
            # token j > 0 of a candidate is predicted at its token j - 1; token 0 by the prefix's last logits
            prev = torch.arange(S, device=self.device) - 1
            lp = torch.where(offset == 0, first[ids], logp[prev.clamp(min=0), ids])
            return torch.zeros(len(candidates), device=self.device).index_add_(0, owner, lp).cpu().numpy()


def finding_check(engine: "ReportEngine", result: "DraftResult", threshold: float | None = None,
                  contradiction_below: float | None = None) -> FindingsCheck:
    """Per-finding probabilities and flags for every drafted region section (see the module docstring).
    Call through `ReportEngine.finding_check` (which holds the engine's lock)."""
    t0 = time.perf_counter()
    threshold = DEFAULT_OMISSION_THRESHOLD if threshold is None else float(threshold)
    contradiction_below = DEFAULT_CONTRADICTION_BELOW if contradiction_below is None else float(contradiction_below)
    check = FindingsCheck(threshold, contradiction_below)
    if result.prepared is None:
        return check
    done: set[int] = set()
    prefixes = _DraftPrefixes(engine, result)
    detector = (result.prepared.finding_probabilities or {}) if engine.finding_detector else None
    for section in result.sections:
        if section.slot is None or section.region is None or section.slot in done:
            continue
        findings = REGION_FINDINGS.get(section.region, ())
        if not findings:
            continue
        done.add(section.slot)        # a repeated slot is judged by its first section, as the grounding
        cands: list[tuple[list[int], int]] = []
        owner: list[str] = []
        for name in findings:
            abn, norm = finding_openings(name)
            group = [(encode_text(engine.tokenizer, s), 1) for s in abn] + \
                    [(encode_text(engine.tokenizer, s), 0) for s in norm]
            group = _disjoint([g for g in group if g[0]])
            cands.extend(group)
            owner.extend([name] * len(group))
        starts = [section.body_start] + [st.start for st in result.sentences
                                         if section.body_start < st.start < section.end] + [section.end]
        boundaries = sorted({_body_token(result, c) for c in starts})
        scores = np.stack([prefixes.score(k, [c for c, _ in cands]) for k in boundaries])
        out = []
        for name in findings:
            sel = [i for i, o in enumerate(owner) if o == name]
            abn = np.logaddexp.reduce(scores[:, [i for i in sel if cands[i][1] == 1]], axis=1)   # (boundaries,)
            norm = np.logaddexp.reduce(scores[:, [i for i in sel if cands[i][1] == 0]], axis=1)
            best = int(np.argmax(np.logaddexp(abn, norm)))
            la, ln = abn[best], norm[best]
            p = float(1.0 / (1.0 + np.exp(ln - la)))
            source = "sentences"
            if detector is not None:
                seen = detector.get(section.region, {})
                p, source = (float(seen[name]), "detector") if name in seen else (p, NOT_ASSESSED)
            stated = _stated(section.text, name)
            flag, reason = None, ""
            if source == NOT_ASSESSED:
                pass
            elif stated != AFFIRMED and p >= threshold:
                flag = "omission"
                reason = (f"{name.lower()} not reported, but the model rates it {p:.0%} likely here"
                          + (" (the draft denies it)" if stated == "negated" else ""))
            elif stated == AFFIRMED and p < contradiction_below:
                flag = "contradiction"
                reason = f"{name.lower()} is reported, but the model itself rates it only {p:.0%} likely"
            out.append(FindingProbability(name, p, stated, flag, reason, source))
        check.sections.append(SectionFindings(section.slot, section.region, tuple(out)))
    check.seconds = time.perf_counter() - t0
    return check
