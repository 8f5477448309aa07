"""``reg2rg-train``: fine-tune Reg2RG from a config file (see README, "Training").

    reg2rg-train --config demo --data.root DIR --data.reports CSV --tokenizer TOK [--key value ...]
    reg2rg-train --config radgenome-7b ... --resume
    reg2rg-train prepare --config FILE [--workers 8] [--key value ...]     # build the pre-processing cache
    torchrun --nproc_per_node 2 -m reg2rg.train.cli --config radgenome-7b ...

Every setting of the config file can be overridden with ``--section.key value``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import PRESETS, TrainConfigError, load_train_config

EPILOG = (
    "Any config setting can be overridden: --train.lr 1e-4 --output.dir runs/x --data.root /data. "
    f"Packaged presets: {', '.join(PRESETS)}; DeepSpeed configs: zero2, zero3 (--distributed.deepspeed_config)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reg2rg-train", description="Fine-tune Reg2RG (torchrun + DeepSpeed ZeRO, or one process). "
        "With 'prepare' first, only build the pre-processing cache.",
        usage="reg2rg-train [prepare] --config CONFIG [--resume] [--workers N] [--section.key value ...]\n"
              "       reg2rg-train export RUN_DIR OUT_DIR [--checkpoint DIR]",
        epilog=EPILOG)
    parser.add_argument("--config", required=False, default=None,
                        help="a YAML/JSON training config, or a packaged preset name")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the output folder")
    parser.add_argument("--workers", type=int, default=None,
                        help="prepare: processes building the cache (default: data.num_workers)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``reg2rg-train``; returns the process exit code."""
    from reg2rg.engine.errors import StudyError
    from reg2rg.engine.model.config import ConfigError
    from reg2rg.engine.tokens import TokenizerError

    from .data import DatasetError
    from .trainer import NonFiniteLossError

    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "prepare", "export") else "train"
    if command == "export":
        return _export(argv)
    args, rest = parser.parse_known_args(argv)
    if args.config is None:
        parser.error("--config is required (a YAML/JSON file or one of: " + ", ".join(PRESETS) + ")")
    _setup_logging()
    try:
        config = load_train_config(args.config, rest)
        if command == "prepare":
            return _prepare(config, args.workers)
        from .trainer import Trainer

        trainer = Trainer(config, resume=args.resume)
        trainer.setup()
        final = trainer.train()
        if trainer.rank == 0:
            print(f"reg2rg-train: model written to {final}")
        return 0
    except NonFiniteLossError as err:
        print(f"reg2rg-train: stopped: {err}", file=sys.stderr)
        return 3
    except (TrainConfigError, DatasetError, ConfigError, TokenizerError, StudyError) as err:
        print(f"reg2rg-train: error: {err}", file=sys.stderr)
        return 2


def _export(argv: list[str]) -> int:
    """``reg2rg-train export RUN_DIR OUT_DIR [--checkpoint DIR]``: a checkpoint in the engine's format."""
    from .trainer import export_checkpoint

    parser = argparse.ArgumentParser(prog="reg2rg-train export",
                                     description="Write a run's newest (or a given) checkpoint in the engine's format.")
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    try:
        print(f"reg2rg-train export: {export_checkpoint(args.run_dir, args.out_dir, args.checkpoint)}")
    except TrainConfigError as err:
        print(f"reg2rg-train: error: {err}", file=sys.stderr)
        return 2
    return 0


def _prepare(config, workers: int | None) -> int:
    """Build every missing cache entry of the train and validation splits in parallel."""
    from reg2rg.engine.model.config import Reg2RGConfig  # noqa: F401  (fail early if the engine is broken)

    from .cache import PreprocessCache
    from .trainer import prepare_data, resolve_model_config

    if not config.data.root or not config.data.reports:
        raise TrainConfigError(f"{config.source}: set data.root and data.reports")
    model_config = resolve_model_config(config)
    cache_dir = config.data.cache_dir or os.path.join(config.output.dir, "cache")
    cache = PreprocessCache(cache_dir, model_config.input_size, model_config.orientation)
    splits = prepare_data(config, cache, workers=workers or config.data.num_workers)
    print(f"reg2rg-train prepare: {len(splits.train)} training and {len(splits.val)} validation studies "
          f"cached in {cache_dir}; {splits.skips.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
