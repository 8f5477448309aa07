"""The CT-RATE abnormality labeller, re-exported for the evaluator: its home is `reg2rg.engine.labeller`
(the engine's findings check reads drafts with the same rules the evaluator scores them with)."""

from reg2rg.engine.labeller import (  # noqa: F401
    ABNORMALITIES,
    AFFIRMED,
    NEGATED,
    RULES,
    SIDE_LABELS,
    UNCERTAIN,
    AbnormalityRule,
    clinical_efficacy,
    find_mentions,
    finding_sides,
    label_report,
    split_sentences,
)
