"""Can a linear detector on a model's frozen encoders see each finding? (issue 12, MODEL_CARD.md)

    .venv/bin/python scripts/detector_probe.py --model resources/demo_model --root runs/demo_model/data \\
        --train train_1000,ft_2000,ft_2150 --eval ft_2300 --sizes 150,300,460 --l2 0.01,0.1,1 [--patches]

``--root`` holds `reg2rg-phantom` folders (``scripts/train_demo_model.sh`` writes them; never the test phantoms).
For each region and label the script fits the class-balanced logistic regression of the model's detector
(`reg2rg.train.features`) on the first N studies of the shuffled ``--train`` folders, for each N of ``--sizes`` and
each ridge penalty of ``--l2``, and prints its F1 on the ``--eval`` folder at the best of the detector's thresholds
(a learning curve: does the detector improve with more studies?). ``--patches`` also tries pooled ViT patch tokens
of the region crop (max / mean of the patch embedding, max / mean / top-4 mean of the last layer), alone and with
the latents, at the largest N (the best F1 over the penalties). Features are computed once per folder and kept
under ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))

from reg2rg.engine.checkpoint import load_pretrained                                  # noqa: E402
from reg2rg.train.cache import UncachedLoader                                         # noqa: E402
from reg2rg.train.data import RegionReportDataset, index_studies                      # noqa: E402
from reg2rg.train.features import (DETECTOR_THRESHOLDS, _detector_features, _f1,      # noqa: E402
                                   _logistic, encode_studies)

PROBED = [("esophagus", "Hiatal hernia"), ("heart", "Cardiomegaly"), ("heart", "Pericardial effusion"),
          ("heart", "Coronary artery wall calcification"), ("pleura", "Pleural effusion"), ("pleura", "Left side"),
          ("pleura", "Right side"), ("lung", "Lung opacity"), ("lung", "Consolidation"), ("lung", "Lung nodule"),
          ("lung", "Atelectasis"), ("mediastinum", "Lymphadenopathy")]
PATCH_REGIONS = ("lung", "esophagus", "mediastinum")
PATCH_PARTS = ("embedding max", "embedding mean", "last max", "last mean", "last top-4 mean")


def load_folder(model, tokenizer, loader, root: Path, name: str, cache: Path, patches: bool):
    """(latent features, finding targets, pooled patch features or None) of every study of one folder."""
    folder = root / name
    records = index_studies(folder, folder / "reports.csv")
    labeller = RegionReportDataset(records, tokenizer, model.special, loader, 8,
                                   finding_labels=model.config.finding_labels)
    targets = {r.name: labeller.finding_targets(r) for r in records}
    path = cache / f"latents_{name}.pt"
    if path.is_file():
        features = torch.load(path, weights_only=False)
    else:
        t0 = time.perf_counter()
        features = encode_studies(model, records, loader, log_every=0)
        torch.save(features, path)
        print(f"encoded {name}: {len(features)} studies in {time.perf_counter() - t0:.0f} s", flush=True)
    pooled = None
    if patches:
        path = cache / f"patches_{name}.pt"
        if path.is_file():
            pooled = torch.load(path, weights_only=False)
        else:
            pooled = pool_patches(model, records, loader)
            torch.save(pooled, path)
    return features, targets, pooled


@torch.no_grad()
def pool_patches(model, records, loader) -> dict:
    """Study -> region -> (5 x vision dim,) the `PATCH_PARTS` of its crop's ViT patch tokens."""
    layer = model.embedding_layer
    out = {}
    for record in records:
        tensors = loader(record)
        present = [g for g in PATCH_REGIONS if g in tensors.regions]
        if not present:
            continue
        crops = torch.stack([tensors.regions[g] for g in present])
        embedded = layer.embed_volumes(tensors.image[None][:0], crops)               # (N, P, dim)
        last = layer.vision_encoder.transformer(embedded)
        out[record.name] = {g: torch.cat([embedded[j].amax(0), embedded[j].mean(0), last[j].amax(0), last[j].mean(0),
                                          torch.topk(last[j], 4, dim=0).values.mean(0)])
                            for j, g in enumerate(present)}
    return out


def best_f1(x, y, xe, ye, l2: float) -> float:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    with torch.enable_grad():
        w, b = _logistic((x - mu) / sd, y, l2)
    p = (((xe - mu) / sd) @ w + b).sigmoid()
    return max(_f1(p > t, ye > 0.5) for t in DETECTOR_THRESHOLDS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "resources" / "demo_model"))
    p.add_argument("--root", type=Path, required=True, help="folder of reg2rg-phantom folders")
    p.add_argument("--train", required=True, help="comma-separated folder names under --root")
    p.add_argument("--eval", required=True, help="folder name under --root (training-side seeds, never test)")
    p.add_argument("--sizes", default="150,300,460")
    p.add_argument("--l2", default="0.01,0.1,1")
    p.add_argument("--patches", action="store_true")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: ROOT/detector_probe_cache)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache or args.root / "detector_probe_cache"
    os.makedirs(cache, exist_ok=True)
    model, tokenizer = load_pretrained(args.model)
    if model.embedding_layer.finding_latent_weight is None:
        p.error(f"{args.model}: not a model with a latent finding detector (finding_head_input 'latents')")
    loader = UncachedLoader(model.config.input_size, model.config.orientation)
    labels = model.config.finding_labels
    F, T, PP = {}, {}, {}
    train_names = args.train.split(",")
    pool = []
    for name in train_names + [args.eval]:
        f, t, pp = load_folder(model, tokenizer, loader, args.root, name, cache, args.patches)
        F.update(f), T.update(t), PP.update(pp or {})
        if name != args.eval:
            pool += [n for n in f if n in t]
    evaluation = [n for n in load_folder(model, tokenizer, loader, args.root, args.eval, cache, False)[0] if n in T]
    random.Random(0).shuffle(pool)
    sizes = [int(s) for s in args.sizes.split(",")]
    penalties = [float(s) for s in args.l2.split(",")]
    print(f"F1 on {args.eval} ({len(evaluation)} studies) of a detector fitted on N of {len(pool)} studies")
    for region, label in PROBED:
        k = labels.index(label)
        ev = [n for n in evaluation if region in F[n].regions and region in T[n]]
        ye = torch.stack([T[n][region].float() for n in ev])[:, k]
        cells = []
        for n in sizes:
            tr = [s for s in pool[:n] if region in F[s].regions and region in T[s]]
            y = torch.stack([T[s][region].float() for s in tr])[:, k]
            if y.sum() < 5 or ye.sum() < 2:
                cells.append(f"N={n}: -")
                continue
            x = torch.stack([_detector_features(F[s], region) for s in tr])
            xe = torch.stack([_detector_features(F[s], region) for s in ev])
            cells.append(f"N={n}: " + " ".join(f"{best_f1(x, y, xe, ye, l2):.2f}" for l2 in penalties))
        print(f"{region:12s} {label:36s} (eval positives {int(ye.sum()):3d}) " + " | ".join(cells), flush=True)
    if args.patches:
        print(f"pooled ViT patch tokens, N={sizes[-1]}, best over the penalties (alone / with the latents)")
        dim = model.config.vision.dim
        for region, label in PROBED:
            if region not in PATCH_REGIONS:
                continue
            k = labels.index(label)
            tr = [s for s in pool[: sizes[-1]] if s in PP and region in PP[s] and region in T[s]]
            ev = [s for s in evaluation if s in PP and region in PP[s] and region in T[s]]
            y = torch.stack([T[s][region].float() for s in tr])[:, k]
            ye = torch.stack([T[s][region].float() for s in ev])[:, k]
            cells = []
            for j, part in enumerate(PATCH_PARTS):
                got = []
                for with_latents in (False, True):
                    def feat(s):
                        x = PP[s][region][j * dim:(j + 1) * dim]
                        return torch.cat([x, _detector_features(F[s], region)]) if with_latents else x
                    x, xe = torch.stack([feat(s) for s in tr]), torch.stack([feat(s) for s in ev])
                    got.append(max(best_f1(x, y, xe, ye, l2) for l2 in penalties))
                cells.append(f"{part} {got[0]:.2f}/{got[1]:.2f}")
            print(f"{region:12s} {label:36s} " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
