"""Published report metrics: hand-computed cases and conformance with the published CTRG numbers."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from reg2rg.train import metrics as M

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER = REPO_ROOT.parent / "shared" / "peer"

REF = "the cat sat on the mat"
HYP = "the cat sat on a mat"


def test_bleu_hand_computed_smoothed():
    # unigrams: 5 of 6 match (the, cat, sat, on, mat) -> (5+1)/(6+1); bigrams: 3 of 5 -> (3+1)/(5+1)
    p1, p2 = 6 / 7, 4 / 6
    assert M.bleu_scores([REF], [HYP], 1) == [pytest.approx(p1)]
    assert M.bleu_scores([REF], [HYP], 2) == [pytest.approx(math.sqrt(p1 * p2))]
    # brevity penalty: hypothesis of 3 tokens against 6 -> exp(1 - 6/3); 3/3 unigrams, 2/2 bigrams
    short = M.bleu_scores([REF], ["the cat sat"], 2)[0]
    assert short == pytest.approx(math.exp(1 - 2) * math.sqrt((4 / 4) * (3 / 3)))


def test_bleu_uses_13a_tokens_and_corpus_pools_counts():
    assert M.tokenize_13a("Heart is normal, no effusion.") == ["Heart", "is", "normal", ",", "no", "effusion", "."]
    refs = [REF, "no pleural effusion"]
    hyps = [HYP, "no effusion"]
    # corpus: unigram matches 5+2 of 6+2, bigram 3+0 of 5+1; lengths 8 vs 9 -> bp = exp(1 - 9/8)
    expected = math.exp(1 - 9 / 8) * math.sqrt(((7 + 1) / (8 + 1)) * ((3 + 1) / (6 + 1)))
    assert M.corpus_bleu(refs, hyps, 2) == pytest.approx(expected)
    assert M.bleu_scores(["x"], [""], 4) == [0.0]  # the nmt code divides by zero here


def test_rouge_hand_computed():
    r = M.rouge_scores([REF], [HYP])
    assert r["ROUGE-1"][0] == pytest.approx(5 / 6)
    assert r["ROUGE-2"][0] == pytest.approx(3 / 5)
    assert r["ROUGE-L"][0] == pytest.approx(5 / 6)  # LCS "the cat sat on mat"


def test_word_tokenize_splits_sentences_like_punkt():
    # Treebank alone would keep "effusion." glued: only the text's last period is split off.
    assert M.word_tokenize("No pleural effusion. Heart size is normal.") == [
        "No", "pleural", "effusion", ".", "Heart", "size", "is", "normal", ".",
    ]
    assert M.word_tokenize("A 1.5 cm nodule (IM 23); no change.") == [
        "A", "1.5", "cm", "nodule", "(", "IM", "23", ")", ";", "no", "change", ".",
    ]
    # an abbreviation of the English Punkt model does not end a sentence before a lower-case word
    assert "dr." in [t.lower() for t in M.word_tokenize("Seen by dr. smith today.")]


def test_meteor_matches_nltk_and_uses_wordnet_synonyms():
    from nltk.translate.meteor_score import meteor_score

    # Porter-stable synonyms: nltk stems unmatched words before the WordNet step
    ref, hyp = "The patient is sick.", "The patient is ill."
    with_syn = M.meteor_scores([ref], [hyp])[0]
    tokens_ref, tokens_hyp = ["The", "patient", "is", "sick", "."], ["The", "patient", "is", "ill", "."]
    no_syn = meteor_score([tokens_ref], tokens_hyp, wordnet=M._NoSynonyms())
    if M.wordnet_available():
        assert "sick" in {lemma.name() for s in M.load_wordnet().synsets("ill") for lemma in s.lemmas()}
        assert with_syn == pytest.approx(meteor_score([tokens_ref], tokens_hyp, wordnet=M.load_wordnet()))
        assert with_syn > no_syn
    else:
        assert with_syn == pytest.approx(no_syn)


def test_cider_is_computed_once_over_the_set():
    refs = ["no pleural effusion", "the heart is enlarged", "small nodule in the right lung"]
    # identical prediction and reference: cosine 1 at every order, no length penalty -> 10;
    # a 3-word text has no 4-grams, so that order contributes 0 -> 10 * 3/4
    assert M.cider_scores(refs, refs) == [pytest.approx(7.5), pytest.approx(10.0), pytest.approx(10.0)]
    # one sample alone: every n-gram occurs in every (one) reference, idf = 0 -> 0
    assert M.cider_scores(refs[:1], refs[:1]) == [0.0]


def test_compute_metrics_keys_and_population_std():
    out = M.compute_metrics([REF, REF], [HYP, REF])
    assert list(out) == list(M.METRIC_NAMES)
    for v in out.values():
        assert set(v) == {"mean", "std", "corpus"}
    rouge1 = [5 / 6, 1.0]
    assert out["ROUGE-1"]["mean"] == pytest.approx(np.mean(rouge1))
    assert out["ROUGE-1"]["std"] == pytest.approx(np.std(rouge1))  # ddof=0, as published
    assert out["ROUGE-1"]["std"] == pytest.approx((1.0 - 5 / 6) / 2)
    with pytest.raises(M.MetricsInputError, match="2 references but 1 predictions"):
        M.compute_metrics([REF, REF], [HYP])


def _published() -> dict[str, str]:
    with open(PEER / "ctrg_published_metrics.csv", newline="", encoding="utf-8") as f:
        header, values = list(csv.reader(f))
    return dict(zip(header, values))


@pytest.fixture(scope="module")
def peer_metrics(tmp_path_factory):
    """Run ``reg2rg-eval`` once on the published CTRG predictions."""
    if not (PEER / "ctrg_predictions_whole_report.csv").is_file():
        pytest.skip(f"published conformance data not found at {PEER} (the shared/ folder beside the repo)")
    from reg2rg.train.eval_cli import main

    out = tmp_path_factory.mktemp("peer_eval")
    assert main([str(PEER / "ctrg_predictions_whole_report.csv"), "--out", str(out), "--format", "json"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_conformance_with_published_ctrg_numbers(peer_metrics):
    published = _published()
    wordnet = M.wordnet_available()
    print(f"METEOR mode: {'WordNet 3.0 synonyms (published)' if wordnet else 'no WordNet: synonyms dropped'}")
    assert peer_metrics["meta"]["n_samples"] == 361
    assert peer_metrics["meta"]["meteor_wordnet"] is wordnet
    for name in M.METRIC_NAMES:
        got = peer_metrics[name]
        want_mean, want_std = published[name].split("±")
        if name == "METEOR" and not wordnet:
            assert abs(got["mean"] - float(want_mean)) < 0.006, name
            assert abs(got["corpus"] - float(published["Overall_METEOR"])) < 0.006, name
            continue
        assert f"{got['mean']:.4f}" == want_mean, name
        assert f"{got['std']:.4f}" == want_std, name
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4") + (("METEOR",) if wordnet else ()):
        assert f"{peer_metrics[name]['corpus']:.4f}" == published[f"Overall_{name}"], name
    # corpus ROUGE: published is a bootstrap median, ours the plain mean; they agree to ~1e-3
    for name in ("ROUGE-1", "ROUGE-2", "ROUGE-L"):
        assert abs(peer_metrics[name]["corpus"] - float(published[f"Overall_{name}"])) < 2e-3
