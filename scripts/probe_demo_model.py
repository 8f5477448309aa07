"""Diagnostics behind the demo model card's "where the findings are lost" (not part of the product).

    # does the encoder see a finding? linear probe on the mean visual token of the finding's region
    .venv/bin/python scripts/probe_demo_model.py probe --model resources/demo_model --n 240 \
        --reports runs/demo_model/data/ft_2000/reports.csv runs/demo_model/data/ft_2180/reports.csv
    # does the LLM read it? the probability of " No" at each uncertain decision word of greedy drafts
    .venv/bin/python scripts/probe_demo_model.py decisions --model resources/demo_model --test runs/demo_model/test --n 8

``probe``: logistic regression (features standardised, L-BFGS, L2 1e-2) fitted on the first two thirds of the
studies and scored (F1) on the last third. ``decisions``: one line per test study, its planted findings, then
P(" No") wherever " No" is among the top-5 of a token drawn with probability < 0.95. Identical lines for studies
with and without a finding mean that the decisions do not depend on the image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from reg2rg.engine.checkpoint import load_pretrained

from reg2rg.engine.phantom import FINDING_REGION as PHANTOM_FINDING_REGION

PROBED = ("Pleural effusion", "Cardiomegaly", "Lung nodule", "Emphysema", "Pericardial effusion", "Lymphadenopathy")
FINDING_REGION = {finding: PHANTOM_FINDING_REGION[finding] for finding in PROBED}


def probe(args) -> None:
    from reg2rg.train.cache import PreprocessCache
    from reg2rg.train.config import load_train_config
    from reg2rg.train.labeller import label_report
    from reg2rg.train.trainer import prepare_data

    model, _ = load_pretrained(args.model)
    model.eval()
    cfg = load_train_config("demo", {"data.root": args.root, "data.reports": args.reports, "data.cache_dir": args.cache})
    cache = PreprocessCache(args.cache, model.config.input_size, model.config.orientation)
    records = prepare_data(cfg, cache, log=False).train[: args.n]
    regions = sorted(set(FINDING_REGION.values()))
    feats = {k: [] for k in FINDING_REGION}
    labels = {k: [] for k in FINDING_REGION}
    with torch.no_grad():
        for record in records:
            t = cache(record)
            visual = model.encode_visual(t.image[None], torch.stack([t.regions[r] for r in regions]),
                                         torch.stack([t.masks[r] for r in regions]))
            for finding, region in FINDING_REGION.items():
                feats[finding].append(visual.region_tokens[regions.index(region)].mean(0))
                labels[finding].append(float(label_report(record.reports[region])[finding]))
    for finding in FINDING_REGION:
        x, y = torch.stack(feats[finding]), torch.tensor(labels[finding])
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        k = len(y) * 2 // 3
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:k] @ w + b, y[:k]) + 1e-2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        pred, true = (x[k:] @ w + b) > 0, y[k:] > 0.5
        tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
        print(f"{finding:22s} positives {int(y.sum())}/{len(y)}  held out: tp {tp} fp {fp} fn {fn}  "
              f"F1 {2 * tp / max(2 * tp + fp + fn, 1):.2f}")


def decisions(args) -> None:
    from reg2rg.engine.generation import GenerationSettings, ReportEngine
    from reg2rg.engine.studyio import read_study

    test = Path(args.test)
    model, tokenizer = load_pretrained(args.model)
    engine = ReportEngine(model, tokenizer)
    for info in json.loads((test / "manifest.json").read_text())["studies"][: args.n]:
        result = engine.draft(read_study(test / info["path"], test / info["masks"]),
                              settings=GenerationSettings(strategy="greedy", max_new_tokens=600))
        p_no = [dict(t.top)[" No"] for t in result.tokens if t.prob < 0.95 and " No" in dict(t.top)]
        print([f["type"] for f in info["findings"]], " ".join(f"{p:.2f}" for p in p_no))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("probe")
    a.add_argument("--model", default="resources/demo_model")
    a.add_argument("--reports", nargs="+", required=True, help="reports.csv files of reg2rg-phantom folders")
    a.add_argument("--root", default="runs/demo_model/data")
    a.add_argument("--cache", default="runs/demo_model/cache")
    a.add_argument("--n", type=int, default=240)
    d = sub.add_parser("decisions")
    d.add_argument("--model", default="resources/demo_model")
    d.add_argument("--test", required=True)
    d.add_argument("--n", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    (probe if args.command == "probe" else decisions)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
