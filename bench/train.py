"""Training throughput of the demo preset on CPU: with the pre-processing cache vs reading every .nii.gz.

    .venv/bin/python bench/train.py [--studies 6] [--steps 4] [--batch 2] [--threads 1]

Writes ``--studies`` phantom studies (default phantom size) in the RadGenome layout, then runs
``reg2rg-train``'s single-process loop twice, each in a fresh child process: once reading and
pre-processing every study on each draw (``data.use_cache: false``, the baseline) and once from the
warm on-disk cache. Prints samples/s of each, their ratio, and each child's peak resident memory.
The first optimizer step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import torch

    from reg2rg.train.config import load_train_config
    from reg2rg.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    cfg = load_train_config("demo", {
        "tokenizer": str(root / "tok"), "data.root": str(root / "data"), "data.reports": str(root / "data/reports.csv"),
        "data.use_cache": args.mode == "cache", "data.cache_dir": str(root / "cache"), "data.num_workers": 0,
        "output.dir": str(root / f"run_{args.mode}_{args.steps}"), "train.max_steps": args.steps + 1,
        "train.micro_batch_size": args.batch, "train.epochs": 1000, "output.save_steps": None,
        "output.save_every_epoch": False, "output.tensorboard": False, "output.log_steps": 1})
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    log = [json.loads(line) for line in (root / f"run_{args.mode}_{args.steps}" / "train_log.jsonl").read_text().splitlines()]
    timed = log[1:]                                        # step 1 is the warm-up
    seconds = sum(args.batch / r["samples_per_s"] for r in timed)
    print(json.dumps({"mode": args.mode, "samples_per_s": len(timed) * args.batch / seconds if timed else 0.0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def prepare(root: Path, n: int) -> None:
    from reg2rg.engine.tokens import train_tokenizer

    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "reg2rg-phantom"), "--out", str(root / "data"), "--n", str(n), "--seed", "700"],
                   check=True, capture_output=True)
    import csv

    with open(root / "data/reports.csv", newline="", encoding="utf-8") as f:
        texts = [row["Sentence"] for row in csv.DictReader(f)]
    train_tokenizer(texts, 600, root / "tok")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["cache", "nocache"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        prepare(root, args.studies)
        print(f"{args.studies} phantom studies written in {time.perf_counter() - t0:.1f} s")
        results = {}
        for mode in ("nocache", "cache"):
            cmd = [sys.executable, __file__, "--mode", mode, "--root", str(root), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            if mode == "cache":
                # warm the cache first (the build is a one-off, `reg2rg-train prepare`)
                subprocess.run(cmd[:2] + ["--mode", "cache", "--root", str(root), "--steps", "0", "--batch", "1",
                                          "--threads", str(args.threads)], check=True, capture_output=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        base, cached = results["nocache"], results["cache"]
        print(f"demo preset, batch {args.batch}, {args.steps} timed steps, {args.threads} thread(s)")
        print(f"  no cache (read + pre-process each draw): {base['samples_per_s']:.2f} samples/s, "
              f"peak RSS {base['peak_rss_mb']:.0f} MB")
        print(f"  pre-processing cache:                    {cached['samples_per_s']:.2f} samples/s, "
              f"peak RSS {cached['peak_rss_mb']:.0f} MB")
        print(f"  ratio cache / no cache: {cached['samples_per_s'] / base['samples_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
