"""Report-generation metrics computed exactly as the published Reg2RG evaluation computes them.

The published scripts call HF ``evaluate`` (``bleu``, ``meteor``, ``rouge``) and pycocoevalcap's
``Cider``. ``evaluate`` downloads its metric scripts at run time, which is impossible here, so this
module re-implements the same definitions on offline libraries:

* BLEU-n: the nmt ``compute_bleu`` (the code behind ``evaluate``'s ``bleu``) on sacrebleu's 13a
  tokens split on whitespace, ``smooth=True`` = +1 on the numerator *and* denominator of every
  n-gram order (unigrams included). Per sample with ``max_order=n``; corpus level over all samples.
* METEOR: ``nltk.translate.meteor_score`` on ``word_tokenize`` tokens (Punkt sentences, then the
  improved Treebank word tokenizer), WordNet 3.0 for synonyms. The corpus value of ``evaluate``'s
  meteor is the mean of the per-sample scores.
* ROUGE-1/2/L: ``rouge_score`` F-measure, no stemming. The published corpus ROUGE is the median of
  an unseeded ``BootstrapAggregator`` (not reproducible); we report the plain mean of the samples.
* CIDEr: pycocoevalcap ``Cider`` called once over the whole file on raw (whitespace-split)
  strings; document frequencies come from all references, so one call per sample would give 0.

Standard deviations are ``numpy.std`` (population, ddof=0), as published.

Offline data: nltk's Punkt model (``punkt_tab``) and WordNet are normally downloaded. When
``punkt_tab`` is installed we use nltk's own ``word_tokenize``; otherwise a Punkt tokenizer with the
English model's abbreviation and sentence-starter lists (embedded below) and no orthographic
statistics, which agrees with the real model on every period that is not an abbreviation, initial
or number (all of the conformance file). WordNet is read from Debian's ``wordnet-base`` files
(``/usr/share/wordnet``); without it synonym matching is dropped (about 0.005 lower METEOR) and
:func:`wordnet_available` says so.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

METRIC_NAMES: tuple[str, ...] = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-1",
    "ROUGE-2",
    "ROUGE-L",
    "CIDEr",
)

CORPUS_ROUGE_NOTE = (
    "corpus ROUGE is the plain mean of per-sample F-measures; the published value is the median of "
    "an unseeded bootstrap (rouge_score BootstrapAggregator) and cannot be reproduced exactly"
)

WORDNET_DIRS: tuple[str, ...] = ("/usr/share/wordnet",)

ProgressFn = Callable[[int], None]


class MetricsInputError(ValueError):
    """References and predictions cannot be scored (length mismatch, non-string entries)."""


# --------------------------------------------------------------------------------------------
# BLEU (nmt compute_bleu on 13a tokens)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """WMT 13a tokens of ``text`` (what ``evaluate``'s bleu uses by default)."""
    return _tokenizer_13a()(text).split()


def _ngram_counts(tokens: Sequence[str], max_order: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def bleu_from_tokens(
    references: Sequence[Sequence[str]],
    translations: Sequence[Sequence[str]],
    max_order: int = 4,
    smooth: bool = True,
) -> float:
    """BLEU of tokenised translations against one tokenised reference each (nmt ``compute_bleu``).

    Returns 0.0 where the nmt code would divide by zero (an empty translation or reference corpus).
    """
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = 0
    hyp_len = 0
    for ref, hyp in zip(references, translations):
        ref_len += len(ref)
        hyp_len += len(hyp)
        overlap = _ngram_counts(hyp, max_order) & _ngram_counts(ref, max_order)
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            if len(hyp) - order + 1 > 0:
                possible[order - 1] += len(hyp) - order + 1
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) <= 0 or hyp_len == 0 or ref_len == 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = hyp_len / ref_len
    brevity = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * brevity


def bleu_scores(refs: Sequence[str], preds: Sequence[str], max_order: int) -> list[float]:
    """Per-sample smoothed BLEU with ``max_order`` (the published BLEU-n per sample)."""
    ref_toks = [tokenize_13a(r) for r in refs]
    pred_toks = [tokenize_13a(p) for p in preds]
    return [bleu_from_tokens([r], [p], max_order) for r, p in zip(ref_toks, pred_toks)]


def corpus_bleu(refs: Sequence[str], preds: Sequence[str], max_order: int) -> float:
    """Corpus-level smoothed BLEU with ``max_order`` (``evaluate`` bleu over the whole file)."""
    return bleu_from_tokens([tokenize_13a(r) for r in refs], [tokenize_13a(p) for p in preds], max_order)


# --------------------------------------------------------------------------------------------
# Word tokenisation for METEOR (nltk word_tokenize, offline)
# --------------------------------------------------------------------------------------------

# The English Punkt model (nltk_data punkt_tab/english): abbreviation types and sentence starters.
# Collocations (WSJ name pairs) and orthographic statistics are not embedded; see the module doc.
_PUNKT_EN_ABBREVS = """
ct m.j t a.c n.h ms p.a.m dr pa p.m u.k st dec u.s.a lt g.k adm p h.m ga tenn yr sen n.c j.j d.h s.g
inc vs s.p.a a.t n feb sr jan s.a.y n.y col g.f c.o.m.b d ft va r.k e.f chg r.i a.g minn a.h k n.j m
l.f f.j gen i.m.s s.a aug j.p okla m.d.c ltd oct s vt r.a j.c ariz w.w b.v ore h w.r e.h mrs cie corp
w n.v a.d r.j ok e.m w.c ill nov u.s prof conn u.s.s.r mg f.g ph.d g calif messrs h.f wash tues sw
bros u.n l wis mr sep d.c ave e.l co s.s reps c r.t h.c r wed a.s v fla jr r.h c.v m.b.a rep a.a e
c.i.t l.a b.f j.b d.w j.k ala f w.va sept mich n.m j.r l.p s.c colo fri a.m g.d kan maj ky a.m.e n.d
t.j cos nev
""".split()
_PUNKT_EN_SENT_STARTERS = """
most he since so both these it nevertheless this indeed however instead under similarly some though
while when in despite although nonetheless thus there if the nor separately moreover but they yet
many according sales among meanwhile even i
""".split()


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    """nltk's English Punkt model when installed, else Punkt with the embedded English lists."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        from nltk.tokenize import _get_punkt_tokenizer

        return _get_punkt_tokenizer("english"), True
    except (LookupError, ImportError, OSError, PermissionError):
        pass
    params = PunktParameters()
    params.abbrev_types = set(_PUNKT_EN_ABBREVS)
    params.sent_starters = set(_PUNKT_EN_SENT_STARTERS)
    tokenizer = PunktSentenceTokenizer()
    tokenizer._params = params  # the public constructor only accepts training text
    return tokenizer, False


def punkt_model_installed() -> bool:
    """Whether nltk's own ``punkt_tab`` English model is used (else the embedded lists)."""
    return _sentence_tokenizer()[1]


@functools.lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then the improved Treebank tokenizer."""
    sentences = _sentence_tokenizer()[0].tokenize(text)
    tok = _treebank()
    return [token for sent in sentences for token in tok.tokenize(sent)]


# --------------------------------------------------------------------------------------------
# METEOR (nltk, WordNet 3.0 from Debian's files)
# --------------------------------------------------------------------------------------------

# lexnames(5WN): Debian's wordnet-base omits this file, nltk's reader needs it (index, name, pos).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()
_LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))


class _NoSynonyms:
    """Stand-in for WordNet when it is absent: METEOR then matches exact words and stems only."""

    def synsets(self, *args, **kwargs):
        return []


def _find_wordnet_dir() -> str | None:
    candidates = [os.environ.get("REG2RG_WORDNET_DIR", ""), *WORDNET_DIRS]
    for folder in candidates:
        if folder and all(os.path.isfile(os.path.join(folder, f)) for f in ("data.noun", "index.noun", "index.sense")):
            return folder
    return None


@functools.lru_cache(maxsize=1)
def load_wordnet():
    """WordNet 3.0 as an nltk reader over Debian's dictionary files, or None when not installed.

    ``$REG2RG_WORDNET_DIR`` may point at another folder holding the WordNet 3.0 ``dict`` files.
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = _find_wordnet_dir()
    if folder is None:
        return None

    class _DebianWordNet(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames":
                return io.StringIO(_lexnames_text())
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None  # this *is* WordNet 3.0: no mapping to OMW's 3.0 ids is needed

    # nltk only opens files under its data path (its path sandbox); allow this read-only folder.
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return _DebianWordNet(folder, None)


def wordnet_available() -> bool:
    """Whether METEOR runs with WordNet synonyms (published mode) rather than without."""
    return load_wordnet() is not None


def meteor_scores(refs: Sequence[str], preds: Sequence[str], progress: ProgressFn | None = None) -> list[float]:
    """Per-sample METEOR (``evaluate`` meteor: nltk ``meteor_score`` on ``word_tokenize`` tokens)."""
    from nltk.translate.meteor_score import meteor_score

    wordnet = load_wordnet() or _NoSynonyms()
    scores = []
    for ref, pred in zip(refs, preds):
        scores.append(meteor_score([word_tokenize(ref)], word_tokenize(pred), wordnet=wordnet))
        if progress:
            progress(1)
    return scores


# --------------------------------------------------------------------------------------------
# ROUGE and CIDEr
# --------------------------------------------------------------------------------------------


def rouge_scores(refs: Sequence[str], preds: Sequence[str]) -> dict[str, list[float]]:
    """Per-sample ROUGE-1/2/L F-measures (rouge_score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    out: dict[str, list[float]] = {"ROUGE-1": [], "ROUGE-2": [], "ROUGE-L": []}
    for ref, pred in zip(refs, preds):
        s = scorer.score(ref, pred)
        out["ROUGE-1"].append(s["rouge1"].fmeasure)
        out["ROUGE-2"].append(s["rouge2"].fmeasure)
        out["ROUGE-L"].append(s["rougeL"].fmeasure)
    return out


def cider_scores(refs: Sequence[str], preds: Sequence[str]) -> list[float]:
    """Per-sample CIDEr-D from one pycocoevalcap ``Cider`` call over the whole set (raw strings)."""
    from pycocoevalcap.cider.cider import Cider

    if not refs:
        return []
    gts = {str(i): [r] for i, r in enumerate(refs)}
    res = {str(i): [p] for i, p in enumerate(preds)}
    _, scores = Cider().compute_score(gts, res)
    return [float(s) for s in scores]


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


def _check_inputs(refs: Sequence[str], preds: Sequence[str]) -> None:
    if len(refs) != len(preds):
        raise MetricsInputError(f"{len(refs)} references but {len(preds)} predictions")
    for i, (r, p) in enumerate(zip(refs, preds)):
        if not isinstance(r, str) or not isinstance(p, str):
            raise MetricsInputError(f"sample {i}: reference and prediction must be strings")


def per_sample_scores(
    refs: Sequence[str], preds: Sequence[str], progress: ProgressFn | None = None
) -> dict[str, list[float]]:
    """Every metric of :data:`METRIC_NAMES` for every sample, in input order."""
    _check_inputs(refs, preds)
    scores: dict[str, list[float]] = {}
    for n in range(1, 5):
        scores[f"BLEU-{n}"] = bleu_scores(refs, preds, n)
    scores["METEOR"] = meteor_scores(refs, preds, progress)
    scores.update(rouge_scores(refs, preds))
    scores["CIDEr"] = cider_scores(refs, preds)
    return {name: scores[name] for name in METRIC_NAMES}


def compute_metrics(
    refs: Sequence[str], preds: Sequence[str], progress: ProgressFn | None = None
) -> dict[str, dict[str, float]]:
    """The published metrics: ``{name: {"mean", "std", "corpus"}}`` for each of :data:`METRIC_NAMES`.

    ``mean``/``std`` are over per-sample scores (population std, as published); ``corpus`` is the
    corpus-level BLEU, the mean METEOR and CIDEr (what ``evaluate``/pycocoevalcap report at corpus
    level) and the mean ROUGE (see :data:`CORPUS_ROUGE_NOTE`). ``progress(k)`` is called as samples
    are scored by the slow METEOR pass. Empty input gives NaN everywhere.
    """
    per_sample = per_sample_scores(refs, preds, progress)
    out: dict[str, dict[str, float]] = {}
    for name, values in per_sample.items():
        arr = np.asarray(values, dtype=np.float64)
        mean = float(arr.mean()) if arr.size else float("nan")
        std = float(arr.std()) if arr.size else float("nan")
        if name.startswith("BLEU-") and arr.size:
            corpus = corpus_bleu(refs, preds, int(name[-1]))
        else:
            corpus = mean
        out[name] = {"mean": mean, "std": std, "corpus": corpus}
    return out
