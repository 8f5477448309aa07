"""Rule-based labeller for the 18 CT-RATE abnormalities, and clinical efficacy from its labels.

The published clinical-efficacy numbers come from a RadBERT classifier trained on CT-RATE; its
weights are not available offline, so this module labels reports with transparent rules instead:
keywords and synonyms per abnormality, found sentence by sentence, each mention then classed as
affirmed, negated ("no pleural effusion", "effusion is not observed", "free of nodules",
"no ... or ...") or uncertain ("cannot be excluded", "possible"). A report is positive for an
abnormality when at least one mention is affirmed (uncertain mentions count as ``uncertain_as``).

Clinical efficacy follows the published script: per-abnormality precision/recall/F1 of the
prediction labels against the reference labels (0 where undefined), then the support-weighted
average (support = number of positive references).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .sections import parse_sections

ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

AFFIRMED, NEGATED, UNCERTAIN = "affirmed", "negated", "uncertain"

_W = r"(?:\s+[\w-]+)"  # one more word
_CALCIFIC = r"(?:calcif\w*|atherom\w*|atheroscl\w*|plaques?)"
_VESSEL = r"(?:aort\w*|arter\w*|vascular|vessels?|carotids?|subclavian|iliac|brachiocephalic|vasculature)"


@dataclass(frozen=True)
class AbnormalityRule:
    """Mention patterns of one abnormality.

    ``patterns`` find a mention in a sentence; ``mask`` is removed from the sentence first (a
    look-alike that is another finding, e.g. "subcutaneous emphysema"); a mention with ``exclude``
    within the same clause is not this abnormality (e.g. a thyroid nodule). ``weak`` patterns count
    only when the clause has none of ``weak_exclude`` (e.g. "atherosclerotic" is arterial unless
    the clause is about the coronaries).
    """

    name: str
    patterns: tuple[str, ...]
    mask: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    weak: tuple[str, ...] = ()
    weak_exclude: tuple[str, ...] = ()


RULES: tuple[AbnormalityRule, ...] = (
    AbnormalityRule(
        "Medical material",
        (
            r"\b(?:catheters?|pacemakers?|stents?|prosthe\w*|implants?|implanted|cerclage|electrodes?"
            r"|sternotomy|sutures?|staples?|surgical\s+clips?|clips?|coils?|drains?|drainage\s+tubes?"
            r"|(?:chest|endotracheal|tracheostomy|nasogastric|feeding|thoracostomy)\s+tubes?"
            r"|port(?:-a-cath)?|portacath|(?:medical|surgical|metallic|orthopedic)\s+(?:material|devices?|implants?|screws?|plates?)"
            r"|screws?|plates?\s+and\s+screws|wires?|foreign\s+bod(?:y|ies))\b",
        ),
        exclude=(r"\b(?:heart\s+)?valves?\s+(?:are|is)\s+normal",),
    ),
    AbnormalityRule(
        "Arterial wall calcification",
        (
            rf"\b{_CALCIFIC}{_W}{{0,6}}?\s+{_VESSEL}\b",
            rf"\b{_VESSEL}{_W}{{0,6}}?\s+{_CALCIFIC}",
        ),
        mask=(r"\bcoronar\w*(?:\s+arter\w*)?(?:\s+(?:wall|walls|tree|system))?",),
        weak=(r"\batheroscl\w*", r"\bcalcified\s+atherom\w*"),
        weak_exclude=(r"\bcoronar\w*",),
    ),
    AbnormalityRule(
        "Cardiomegaly",
        (
            r"\bcardiomegal\w*",
            r"\b(?:cardiac|heart)\s+enlargement",
            r"\benlargement\s+of\s+the\s+(?:heart|cardiac)",
            r"\b(?:enlarged|increased)\s+(?:heart|cardiac)(?:\s+(?:size|silhouette|contours?|dimensions?|shadow))?",
            r"\b(?:heart|cardiac)(?:\s+(?:size|silhouette|contours?|dimensions?|shadow|volume))?(?:\s+and\s+\w+)?"
            r"\s+(?:is|are|was|were|appears?|seems?)(?:\s+\w+)?\s+(?:enlarged|increased|large)\b",
            r"\b(?:increased|enlarged)\s+cardiothoracic\s+ratio|\bcardiothoracic\s+ratio(?:\s+\w+){0,2}\s+increased",
        ),
    ),
    AbnormalityRule(
        "Pericardial effusion",
        (
            r"\bpericardi\w*(?:\s+[\w-]+){0,4}?\s+(?:effusions?|fluid)",
            r"\b(?:effusions?|fluid)(?:\s+\w+){0,2}\s+(?:in|within)\s+the\s+pericard\w*",
            r"\bhydropericardium\b",
        ),
    ),
    AbnormalityRule(
        "Coronary artery wall calcification",
        (
            rf"\bcoronar\w*{_W}{{0,6}}?\s+{_CALCIFIC}",
            rf"\b{_CALCIFIC}{_W}{{0,6}}?\s+coronar\w*",
        ),
    ),
    AbnormalityRule(
        "Hiatal hernia",
        (r"\bhiat(?:al|us)\s+hernia\w*", r"\bhernia\w*(?:\s+\w+){0,4}\s+(?:through\s+the\s+)?(?:esophageal\s+)?hiatus"),
    ),
    AbnormalityRule(
        "Lymphadenopathy",
        (
            r"\b(?:lymph)?adenopath\w*",
            r"\b(?:enlarged|enlargement\s+of(?:\s+the)?|pathologic(?:al)?(?:ly)?(?:\s+(?:enlarged|sized?))?|prominent|bulky)"
            r"(?:\s+[\w-]+){0,2}?\s+(?:lymph\s+)?nodes?\b",
            r"\blymph\s+nodes?(?:\s+[\w-]+){0,6}?\s+(?:enlarged|enlargement|pathologic\w*(?:\s+(?:size|sizes|dimensions?))?)",
            r"\blymph\s+node\s+enlargement",
            # a node of 10 mm or more (short axis) is pathological by size
            r"\blymph\s+nodes?\b(?:\s+[\w-]+){0,3}?\s+(?:measuring|of|with\s+a\s+(?:size|diameter)\s+of)\s+(?:up\s+to\s+)?"
            r"(?:[1-9]\d(?:\.\d+)?\s*mm|[1-9]\d*(?:\.\d+)?\s*cm)\b",
        ),
    ),
    AbnormalityRule(
        "Emphysema",
        (r"\bemphysem\w*", r"\bbull(?:a|ae|ous)\b", r"\bblebs?\b"),
        mask=(r"\b(?:subcutaneous|soft\s+tissue|mediastinal|interstitial\s+subcutaneous)\s+(?:\w+\s+)?emphysema\b",),
    ),
    AbnormalityRule(
        "Atelectasis",
        (r"\w*atelecta\w*", r"\b(?:collapsed|collapse\s+of\s+the)\s+(?:\w+\s+)?(?:lobe|lung|segment)"),
    ),
    AbnormalityRule(
        "Lung nodule",
        (r"\b\w*nodul\w*",),
        exclude=(
            r"\b(?:thyroid|adrenal|hepatic|liver|renal|kidney|breast|spleen|splenic|pancrea\w*|lymph|pleural|skin|"
            r"subcutaneous|goiter|lobe\s+of\s+the\s+thyroid)\b",
        ),
    ),
    AbnormalityRule(
        "Lung opacity",
        (
            r"\bopacit\w*",
            r"\bground[\s-]*glass",
            r"\binfiltrat\w*",
            r"\b(?:increased|patchy)\s+(?:density|densities)\b",
            r"\bdensity\s+increase\w*",
        ),
    ),
    AbnormalityRule(
        "Pulmonary fibrotic sequela",
        (
            r"\bfibro(?!adenom|id|us\s+dysplasia)\w*",
            r"\bsequela\w*",
            r"\bscar\w*",
            r"\bcicatri\w*",
            r"\bparenchymal\s+bands?",
        ),
    ),
    AbnormalityRule(
        "Pleural effusion",
        (
            r"\bpleural(?:\s+[\w-]+){0,4}?\s+(?:effusions?|fluid)",
            r"\b(?:effusions?|fluid)(?:\s+\w+){0,2}\s+(?:in|within)\s+the\s+pleura\w*",
            r"\bhydrothora\w*",
            r"\beffusions?\b",
        ),
        # a bare "effusion" that is the pericardial one ("pericardial effusion") is not pleural
        mask=(r"\bpericardi\w*(?:\s+(?:and|or)\s+(?!pleural)\w+)?\s+(?:effusions?|fluid)",),
    ),
    AbnormalityRule("Mosaic attenuation pattern", (r"\bmosaic\w*",)),
    AbnormalityRule(
        "Peribronchial thickening",
        (
            r"\bperibronch\w*(?:\s+[\w-]+){0,2}?\s+(?:thicken\w*|cuffing)",
            r"\bbronch\w*\s+walls?\s+thicken\w*",
            r"\bthicken\w*\s+(?:of\s+)?(?:the\s+)?(?:peri)?bronch\w*(?:\s+walls?)?",
            r"\b(?:peri)?bronch\w*\s+walls?\s+(?:are|is|were|was)\s+thicken\w*",
        ),
    ),
    AbnormalityRule("Consolidation", (r"\bconsolidat\w*",)),
    AbnormalityRule("Bronchiectasis", (r"\bbronchi(?:ol)?ectas\w*", r"\bbronchiectatic\b")),
    AbnormalityRule(
        "Interlobular septal thickening",
        (
            r"\b(?:interlobular\s+)?sept(?:al|a)\s+thicken\w*",
            r"\bthicken\w*\s+(?:of\s+)?(?:the\s+)?(?:interlobular\s+)?sept(?:a|al|um)\b",
            r"\binterlobular\s+sept\w*(?:\s+\w+){0,3}\s+thicken\w*",
        ),
    ),
)

# --- negation and uncertainty (NegEx-style triggers with a clause-bounded scope) ---------------

_PSEUDO = re.compile(
    r"\bno\s+(?:significant\s+|interval\s+|marked\s+|obvious\s+)?(?:change|progression|increase|regression|difference)\w*"
    r"|\bnot\s+only\b|\bwithout\s+(?:significant\s+)?change\w*",
    re.IGNORECASE,
)
_PRE_UNCERTAIN = re.compile(
    r"\b(?:possibl[ey]|probabl[ey]|questionabl[ey]|suspicious\s+(?:for|of)|suspected|suspect|"
    r"(?:cannot|can\s+not|could\s+not)\s+(?:exclude|rule\s+out)|rule\s+out|may\s+(?:represent|be|indicate)|might|"
    r"equivocal|differential\s+diagnos\w*|consider(?:ed)?)\b",
    re.IGNORECASE,
)
_POST_UNCERTAIN = re.compile(
    r"\b(?:(?:cannot|can\s+not|could\s+not|can't)\s+be\s+(?:excluded|ruled\s+out|distinguished)|not\s+(?:be\s+)?excluded|"
    r"(?:is|are)\s+(?:suspected|possible|questionable|considered)|may\s+be\s+present)\b",
    re.IGNORECASE,
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|nor|neither|none|absence\s+of|free\s+of|negative\s+for|nothing)\b",
    re.IGNORECASE,
)
_POST_NEGATION = re.compile(
    r"\b(?:(?:not|no\s+longer|never)\s+(?:\w+\s+)?(?:seen|observed|detected|identified|found|present|evident|"
    r"visuali[sz]ed|noted|demonstrated|appreciated|apparent|visible|shown|recognized|determined)|absent|"
    r"excluded|ruled\s+out|resolved|disappeared)\b",
    re.IGNORECASE,
)
# Words and marks that end a trigger's scope inside a sentence.
_BREAK = re.compile(
    r"[;:]|\b(?:but|however|although|though|whereas|while|except|besides|yet|nevertheless|which|whose|"
    r"apart\s+from|aside\s+from|other\s+than|there\s+(?:is|are|was|were))\b",
    re.IGNORECASE,
)
_PRE_SCOPE_WORDS = 10
_POST_SCOPE_WORDS = 8

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report (periods inside numbers such as 1.5 do not split)."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def _n_words(text: str) -> int:
    return len(re.findall(r"[\w-]+", text))


def _masked(text: str, pattern: re.Pattern) -> str:
    """``text`` with every match of ``pattern`` blanked out (offsets kept)."""
    return pattern.sub(lambda m: " " * len(m.group()), text)


def _classify(sentence: str, start: int, end: int) -> str:
    """Affirmed, negated or uncertain for the mention ``sentence[start:end]``."""
    clean = _masked(sentence, _PSEUDO)
    # pre-scope: back from the mention to the nearest break, at most _PRE_SCOPE_WORDS words
    before = clean[:start]
    breaks = list(_BREAK.finditer(before))
    pre_from = breaks[-1].end() if breaks else 0
    # post-scope: forward from the mention to the next break
    after_break = _BREAK.search(clean, end)
    post_to = after_break.start() if after_break else len(clean)
    inside = clean[start:end]

    def pre_hit(pattern: re.Pattern) -> bool:
        return any(_n_words(clean[m.end() : start]) <= _PRE_SCOPE_WORDS for m in pattern.finditer(clean, pre_from, start))

    def post_hit(pattern: re.Pattern) -> bool:
        return any(_n_words(clean[end : m.start()]) <= _POST_SCOPE_WORDS for m in pattern.finditer(clean, end, post_to))

    if pre_hit(_PRE_UNCERTAIN) or post_hit(_POST_UNCERTAIN) or _POST_UNCERTAIN.search(inside):
        return UNCERTAIN
    if pre_hit(_PRE_NEGATION) or post_hit(_POST_NEGATION) or _PRE_NEGATION.search(inside):
        return NEGATED
    return AFFIRMED


_COMPILED = {
    rule.name: tuple(
        [re.compile(p, re.IGNORECASE) for p in group]
        for group in (rule.patterns, rule.mask, rule.exclude, rule.weak, rule.weak_exclude)
    )
    for rule in RULES
}


def find_mentions(sentence: str, abnormality: str) -> list[tuple[int, int, str]]:
    """Mentions of ``abnormality`` in one sentence: ``(start, end, affirmed|negated|uncertain)``."""
    patterns, masks, excludes, weak, weak_excludes = _COMPILED[abnormality]
    text = sentence
    for m in masks:
        text = _masked(text, m)
    spans: list[tuple[int, int, bool]] = []  # (start, end, weak)
    for is_weak, group in ((False, patterns), (True, weak)):
        for p in group:
            for m in p.finditer(text):
                if any(s <= m.start() < e or m.start() <= s < m.end() for s, e, _ in spans):
                    continue  # one mention per stretch of text
                spans.append((m.start(), m.end(), is_weak))
    mentions = []
    for s, e, is_weak in sorted(spans):
        clause_from = max((b.end() for b in _BREAK.finditer(text, 0, s)), default=0)
        nxt = _BREAK.search(text, e)
        clause = sentence[clause_from : nxt.start() if nxt else len(text)]  # unmasked: the look-alike counts
        if any(x.search(clause) for x in excludes) or (is_weak and any(x.search(clause) for x in weak_excludes)):
            continue
        mentions.append((s, e, _classify(text, s, e)))
    return mentions


def _report_sentences(text: str) -> list[str]:
    # Region headers ("The region 2 is lung:") are not findings: label the section bodies only.
    sections = parse_sections(text)
    bodies = [s.text for s in sections] if any(s.slot is not None for s in sections) else [text]
    return [sent for body in bodies for sent in split_sentences(body)]


def label_report(text: str, uncertain_as: int = 0) -> dict[str, int]:
    """0/1 label of each of the 18 :data:`ABNORMALITIES` for one report.

    1 when some sentence affirms the abnormality; uncertain mentions count as ``uncertain_as``.
    Region prefixes ("The region i is area:") are ignored.
    """
    sentences = _report_sentences(text)
    labels = {}
    for name in ABNORMALITIES:
        value = 0
        for sent in sentences:
            for _, _, status in find_mentions(sent, name):
                if status == AFFIRMED or (status == UNCERTAIN and uncertain_as):
                    value = 1
        labels[name] = value
    return labels


#: Pseudo-labels of the side of a region's findings (for a model's finding head; not CT-RATE labels).
SIDE_LABELS: tuple[str, ...] = ("Left side", "Right side")
_SIDE_WORDS = {"Left side": re.compile(r"\b(?:left|both|bilateral(?:ly)?)\b", re.I),
               "Right side": re.compile(r"\b(?:right|both|bilateral(?:ly)?)\b", re.I)}


def finding_sides(text: str) -> dict[str, int]:
    """0/1 for each of :data:`SIDE_LABELS`: whether a sentence that affirms an abnormality names that
    side ("both"/"bilateral" name both). Normal sentences ("both lungs are clear") do not count."""
    sides = dict.fromkeys(SIDE_LABELS, 0)
    for sent in _report_sentences(text):
        affirmed = any(status == AFFIRMED for name in ABNORMALITIES for _, _, status in find_mentions(sent, name))
        if affirmed:
            for name, pattern in _SIDE_WORDS.items():
                sides[name] |= int(bool(pattern.search(sent)))
    return sides


def clinical_efficacy(
    refs: Sequence[str], preds: Sequence[str], uncertain_as: int = 0
) -> dict[str, dict[str, float]]:
    """Per-abnormality and support-weighted precision, recall and F1 of predicted vs reference labels.

    Returns ``{abnormality: {"precision", "recall", "f1", "support"}}`` for the 18 abnormalities and
    a final ``"weighted"`` entry (weights = support, the number of positive references; NaN when no
    reference is positive). Undefined ratios are 0, as in the published script.
    """
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} references but {len(preds)} predictions")
    ref_labels = [label_report(t, uncertain_as) for t in refs]
    pred_labels = [label_report(t, uncertain_as) for t in preds]
    out: dict[str, dict[str, float]] = {}
    for name in ABNORMALITIES:
        tp = sum(r[name] and p[name] for r, p in zip(ref_labels, pred_labels))
        fp = sum((not r[name]) and p[name] for r, p in zip(ref_labels, pred_labels))
        fn = sum(r[name] and not p[name] for r, p in zip(ref_labels, pred_labels))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    total = sum(v["support"] for v in out.values())
    weighted = {
        key: (sum(v[key] * v["support"] for v in out.values()) / total if total else float("nan"))
        for key in ("precision", "recall", "f1")
    }
    out["weighted"] = {**weighted, "support": total}
    return out
