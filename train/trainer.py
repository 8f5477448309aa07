"""The training loop of ``reg2rg-train``: one CPU/GPU process, or many under torchrun with DeepSpeed ZeRO.

Two engines run the same loop:

* ``distributed.backend: none`` — plain PyTorch (AdamW, clipping, accumulation by hand); what the
  CPU demo model uses, because it has no communication overhead;
* ``distributed.backend: deepspeed`` — `deepspeed.initialize` with the packaged ZeRO-2/ZeRO-3 JSON
  (the published run), bf16 on GPU, fp32 on CPU (gloo). Our own torch AdamW is handed to DeepSpeed, as
  the published ``adamw_torch`` was.

Checkpoints (`checkpoint-<step>` under ``<output>/checkpoints``) are written to a temporary folder, get
a manifest of their files' sizes and sha256 digests (written last), and are renamed into place when
complete; a checkpoint being re-saved is moved aside first and removed only once the new one is in
place. So a run killed at any moment leaves complete checkpoints. ``--resume`` verifies the newest
against its manifest and falls back to the newest intact one (saying which file is damaged), then
continues with model, optimizer, scheduler, RNG and data position, and trims ``train_log.jsonl`` to
the rows written up to that checkpoint. The data order depends only on (seed, epoch), and the region
order of a draw on (seed, epoch, index), so the resumed run sees exactly the batches the uninterrupted
run would have.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, TrainConfigError, deepspeed_config_dict
from .data import (MODEL_INPUT_KEYS, OPTIONAL_INPUT_KEYS, DatasetError, RegionReportDataset, SkipLog, StudyRecord,
                   collate_regions, epoch_batches, index_studies, read_reports, resolve_splits, scan_volumes)

logger = logging.getLogger("reg2rg.train")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"     # {relative path: {bytes, sha256}} of every other file; written last
_REPLACED_PREFIX = ".replaced-"     # a checkpoint being re-saved, until its successor is in place
FINAL_DIR = "final"
LOG_FILE = "train_log.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    global_step: int = 0          # optimizer steps done
    epoch: int = 0                # current epoch (0-based)
    batch_in_epoch: int = 0       # this rank's micro-batches of `epoch` already consumed
    samples_seen: int = 0         # samples over all ranks
    world_size: int = 1
    log_rows: int | None = None   # rows of train_log.jsonl written up to this checkpoint (None: older runs)


# ---- distributed helpers -----------------------------------------------------------------------------

def _rank() -> int:
    return torch.distributed.get_rank() if _dist_ready() else int(os.environ.get("RANK", 0))


def _world() -> int:
    return torch.distributed.get_world_size() if _dist_ready() else int(os.environ.get("WORLD_SIZE", 1))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def _all_min(value: float) -> float:
    if not _dist_ready():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return float(t.item())


def _all_sum(values: list[float]) -> list[float]:
    if not _dist_ready():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ---- checkpoints -------------------------------------------------------------------------------------

def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with their state file), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and sha256 of every file of a checkpoint folder in ``manifest.json`` (atomically);
    written last, after every other file of the checkpoint is complete."""
    from reg2rg.engine.fileio import atomic_write

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    with atomic_write(folder / MANIFEST_FILE) as f:
        json.dump({"format": 1, "files": entries}, f, indent=1)
    return folder / MANIFEST_FILE


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """None when every file of the checkpoint matches its manifest, else the first problem in words
    ("trainable.safetensors: its content differs from the manifest (damaged)"). A checkpoint written
    before manifests existed passes unverified (None)."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        items = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE}: unreadable ({type(err).__name__})"
    if not any(name == STATE_FILE for name, _, _ in items):
        return f"{MANIFEST_FILE}: does not list {STATE_FILE}"
    for name, size, digest in items:
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != size:
            return f"{name}: {path.stat().st_size} bytes, the manifest says {size} (truncated or damaged)"
        if _sha256(path) != digest:
            return f"{name}: its content differs from the manifest (damaged)"
    return None


def newest_intact_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their manifest, and one line per newer damaged one."""
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append(f"{path}: {problem}")
    return None, damaged


def _recover_checkpoint_folders(output_dir: str | os.PathLike) -> None:
    """After a kill during a save: put back a checkpoint that was moved aside for a re-save whose
    successor never arrived, and remove half-written temporary folders (never complete by design)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(_REPLACED_PREFIX):
            original = root / path.name[len(_REPLACED_PREFIX):]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)       # the new one made it into place
            else:
                os.replace(path, original)
                logger.info("%s: restored the checkpoint a killed re-save had moved aside", original)
        elif path.name.startswith(".tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def trim_log(output_dir: str | os.PathLike, state: TrainState) -> int:
    """Cut ``train_log.jsonl`` back to the rows written up to the checkpoint of ``state`` (so a resumed
    run does not log its repeated steps twice); returns the rows kept. Older checkpoints, which did not
    count rows, keep the rows up to their step; a row cut off by a kill is dropped either way."""
    from reg2rg.engine.fileio import atomic_write

    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines if state.log_rows is None else lines[: state.log_rows]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if state.log_rows is not None or int(row.get("step", 0)) <= state.global_step:
            kept.append(line)
    if len(kept) != len(lines):
        with atomic_write(path) as f:
            f.writelines(line + "\n" for line in kept)
    return len(kept)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- model and data setup ----------------------------------------------------------------------------

def load_training_tokenizer(config: TrainConfig, model_config):
    """The tokenizer (``config.tokenizer``, else the LLM folder) with Reg2RG's special tokens."""
    from reg2rg.engine.tokens import add_special_tokens, load_tokenizer

    path = config.tokenizer or (os.path.join(config.model.init_from, "tokenizer") if config.model.init_from
                                else model_config.llm_path)
    if not path:
        raise TrainConfigError(f"{config.source}: set 'tokenizer' (a tokenizer folder) or model.overrides.llm_path")
    tokenizer = load_tokenizer(path)
    add_special_tokens(tokenizer, model_config.num_latents, model_config.num_regions)
    return tokenizer


def resolve_model_config(config: TrainConfig):
    """`Reg2RGConfig` from the preset (or a folder/JSON), the overrides and the training switches."""
    from reg2rg.engine.model.config import Reg2RGConfig

    m = config.model
    source = m.init_from or m.preset
    base = Reg2RGConfig.load(source) if os.path.exists(source) else Reg2RGConfig.preset(source)
    data = base.to_dict()
    for key, value in (m.overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    model_config = Reg2RGConfig.from_dict(data)
    model_config.freeze_vision_encoder = not m.train_vit
    model_config.gradient_checkpointing = bool(config.train.gradient_checkpointing)
    return model_config


def build_model(config: TrainConfig, model_config, tokenizer, dtype: torch.dtype | None = None):
    """Build Reg2RG (seeded, so frozen random parts are the same in every run and after resume), and
    load the starting weights: an engine checkpoint (``model.init_from``) or the RadFM files."""
    from reg2rg.engine.model.reg2rg import Reg2RG

    torch.manual_seed(config.train.seed)
    model = Reg2RG.from_config(model_config, tokenizer, dtype=dtype)
    if config.model.init_from:
        from reg2rg.engine.checkpoint import load_pretrained

        source, _ = load_pretrained(config.model.init_from)
        state = source.state_dict()
        own = model.state_dict()
        # a fitted detector whose inputs changed (e.g. finding_density switched on), or any with
        # model.refit_detector, is not carried over: it is fitted again on this run's studies (`_fit_finding_detector`)
        detector = [n for n in state if n.rpartition(".")[2] in DETECTOR_BUFFERS]
        changed = any(n in own and own[n].shape != state[n].shape for n in detector)
        if detector and (changed or config.model.refit_detector):
            logger.info("%s: the finding detector %s; it is fitted again", config.model.init_from,
                        "reads other features here" if changed else "is not carried over (model.refit_detector)")
            for name in detector:
                del state[name]
        model.load_state_dict(state, strict=False)
        del source, state
    if config.model.vision_weights or config.model.perceiver_weights:
        from reg2rg.engine.checkpoint import import_radfm

        import_radfm(model, config.model.vision_weights, config.model.perceiver_weights)
    return model


#: Buffers the training fits (not parameters, not recomputed by the model): saved in every checkpoint.
DETECTOR_BUFFERS = ("finding_latent_weight", "finding_latent_bias", "finding_threshold")
FITTED_BUFFERS = ("projector_mean", "projector_std", *DETECTOR_BUFFERS)


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a single-process checkpoint holds of the model: its trainable parameters and its fitted buffers."""
    out = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b.detach().cpu().contiguous() for n, b in model.named_buffers()
                if n.rpartition(".")[2] in FITTED_BUFFERS})
    return out


def restorable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of everything a checkpoint may restore (parameters and fitted buffers)."""
    return {**dict(model.named_parameters()),
            **{n: b for n, b in model.named_buffers() if n.rpartition(".")[2] in FITTED_BUFFERS}}


def describe_trainable(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter counts by top-level part (what the published freezing leaves trainable)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        key = "lora" if "lora_" in name else (parts[1] if parts[0] == "embedding_layer" and len(parts) > 2 else parts[0])
        if key == "lang_model" or parts[0] == "lang_model":
            key = "lora" if "lora_" in name else "lang_model"
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    """constant_with_warmup (published), cosine_with_warmup, linear_with_warmup or constant."""
    from transformers import (get_constant_schedule, get_constant_schedule_with_warmup,
                              get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

    t = config.train
    if t.scheduler == "constant_with_warmup":
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    if t.scheduler == "cosine_with_warmup":
        return get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, max(total_steps, 1))
    if t.scheduler == "linear_with_warmup":
        return get_linear_schedule_with_warmup(optimizer, t.warmup_steps, max(total_steps, 1))
    return get_constant_schedule(optimizer)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TrainConfigError(f"{config.source}: nothing to train (every parameter is frozen)")
    # Parameter groups with their own lr (as VLM recipes give the projector its own): the fresh finding
    # head, and the projector between the ViT and the LLM. Everything else trains at train.lr.
    group_lr = {"finding_head": config.train.finding_head_lr, "projector": config.train.projector_lr}
    part_group = {"finding_head": "finding_head", "finding_patch_head": "finding_head", "perceiver": "projector",
                  "fc": "projector", "mask_fc": "projector", "finding_embedding": "projector"}

    def group_of(name: str) -> str | None:
        group = next((part_group[p] for p in name.split(".") if p in part_group), None)
        return group if group_lr.get(group) is not None else None

    groups: dict[str | None, list] = {}
    for name, p in named:
        groups.setdefault(group_of(name), []).append(p)
    param_groups = [{"params": groups.pop(None, [])}]
    param_groups += [{"params": ps, "lr": group_lr[key]} for key, ps in groups.items()]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups, lr=config.train.lr, weight_decay=config.train.weight_decay)


@dataclass
class DataSplits:
    train: list[StudyRecord]
    val: list[StudyRecord]
    skips: SkipLog


def prepare_data(config: TrainConfig, cache=None, workers: int = 1, log: bool = True) -> DataSplits:
    """Index the dataset, split it, and (with a cache) pre-process every study so that bad studies
    are known — and skipped identically on every rank — before the first step."""
    from .cache import build_cache

    d = config.data
    skips = SkipLog(log=log)
    names = sorted(set(scan_volumes(d.root)) | set(read_reports(d.reports)))
    train_names, val_names = resolve_splits(d.train_split, d.val_split, d.split_file, names)
    train = index_studies(d.root, d.reports, train_names, d.mask_root, skips)
    val = index_studies(d.root, d.reports, val_names, d.mask_root, skips)
    if cache is not None:
        records = train + val
        rank, world = _rank(), _world()
        build_cache(cache, records[rank::world], workers=workers)   # ranks share the work
        _barrier()
        train = _usable(train, cache, skips)
        val = _usable(val, cache, skips)
    if not train:
        raise DatasetError(f"{d.root}: no usable training study ({skips.summary()})")
    return DataSplits(train, val, skips)


def _usable(records: list[StudyRecord], cache, skips: SkipLog) -> list[StudyRecord]:
    out = []
    for record in records:
        info = cache.info(record) or cache.build(record)
        if "error" in info:
            skips.add(record.name, f"unreadable: {info['error']}")
        elif not set(info["regions"]) & set(record.reports):
            skips.add(record.name, "empty masks: no region has both a report and a non-empty mask")
        else:
            out.append(record)
    return out


# ---- the trainer -------------------------------------------------------------------------------------

class Trainer:
    """Runs one training job described by a `TrainConfig` (see module docstring)."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        config.validate()
        self.config = config
        self.resume = resume
        self.output = Path(config.output.dir)
        self.state = TrainState()
        self.rank = 0
        self.world = 1
        self.engine = None          # the DeepSpeed engine when used
        self.writer = None
        self.last_checkpoint: Path | None = None
        self._log_rows = 0              # rows in train_log.jsonl (recorded in every checkpoint)

    # -- setup --
    def _init_distributed(self) -> None:
        backend = self.config.distributed.backend
        world = int(os.environ.get("WORLD_SIZE", 1))
        if backend == "none":
            if world > 1:
                raise TrainConfigError(f"{self.config.source}: launched with {world} processes but "
                                       "distributed.backend is 'none'; use --distributed.backend deepspeed")
            return
        if backend == "deepspeed":
            import deepspeed

            if not _dist_ready():
                deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = _rank(), _world()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    def setup(self) -> None:
        cfg = self.config
        self._init_distributed()
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output)
            log = self.output / LOG_FILE
            self._log_rows = len(log.read_text(encoding="utf-8", errors="replace").splitlines()) if log.is_file() else 0
        self.model_config = resolve_model_config(cfg)
        self.tokenizer = load_training_tokenizer(cfg, self.model_config)
        self.device = _device()
        self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

        from .cache import PreprocessCache, UncachedLoader

        input_size, orientation = self.model_config.input_size, self.model_config.orientation
        if cfg.data.use_cache:
            cache_dir = cfg.data.cache_dir or str(self.output / "cache")
            self.loader = PreprocessCache(cache_dir, input_size, orientation)
            self.splits = prepare_data(cfg, self.loader, workers=cfg.data.num_workers, log=self.rank == 0)
        else:
            self.loader = UncachedLoader(input_size, orientation)
            self.splits = prepare_data(cfg, None, log=self.rank == 0)

        self.model = build_model(cfg, self.model_config, self.tokenizer)
        special = self.model.special
        self.features = self._encode_frozen() if self.model_config.frozen_encoders else None
        max_length = min(cfg.data.max_length, self.model_config.max_length)
        # the head's targets: for its loss, and for teacher-forced finding conditioning
        wanted = self.model_config.finding_loss_weight or (self.model_config.finding_conditioning
                                                           and self.model_config.finding_teacher_forcing)
        findings = self.model_config.finding_labels if wanted else ()
        self.train_set = RegionReportDataset(self.splits.train, self.tokenizer, special, self.loader,
                                             max_length, seed=cfg.train.seed, finding_labels=findings,
                                             features=self.features)
        if self.model.embedding_layer.finding_latent_weight is not None:
            self._fit_finding_detector()
        self.val_set = RegionReportDataset(self.splits.val[: cfg.data.val_samples], self.tokenizer, special,
                                           self.loader, max_length, seed=cfg.train.seed + 1,
                                           finding_labels=self.model_config.finding_labels, features=self.features)
        per_epoch = self.micro_batches_per_epoch() // cfg.train.grad_accum
        if per_epoch < 1:
            raise DatasetError(
                f"{cfg.data.root}: {len(self.splits.train)} usable training studies give "
                f"{self.micro_batches_per_epoch()} micro-batches per rank, fewer than train.grad_accum "
                f"({cfg.train.grad_accum})")
        self.steps_per_epoch = per_epoch
        self.total_steps = per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:       # 0: fit what the frozen encoders' output needs, export, no step
            self.total_steps = min(self.total_steps, int(cfg.train.max_steps)) if cfg.train.epochs else int(cfg.train.max_steps)

        optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        if cfg.distributed.backend == "deepspeed":
            import deepspeed

            ds_config = deepspeed_config_dict(cfg, self.world, self.use_bf16)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                model_parameters=[p for p in self.model.parameters() if p.requires_grad])
            self.device = self.engine.device
        else:
            self.model.to(self.device)
            self.optimizer, self.scheduler = optimizer, scheduler
        self.state.world_size = self.world

        if self.resume:
            self._load_checkpoint()
        if self.rank == 0:
            logger.info("data: %d training and %d validation studies; %s", len(self.splits.train),
                        len(self.val_set), self.splits.skips.summary())
            logger.info("trainable parameters: %s", describe_trainable(self.model))
            if cfg.output.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output / "tensorboard"))

    def _encode_frozen(self):
        """Frozen encoders (`Reg2RGConfig.frozen_encoders`): their output of every study, computed once (see
        train.features), and ``projector_norm``'s statistics fitted on the training studies when the starting
        model has none."""
        from .features import encode_studies, fit_projector_statistics

        t0 = time.perf_counter()
        records = list(self.splits.train) + list(self.splits.val[: self.config.data.val_samples])
        features = encode_studies(self.model, records, self.loader)
        if self.model.embedding_layer.projector_mean is not None and not self.model.embedding_layer.projector_statistics_fitted:
            volumes = fit_projector_statistics(self.model, features, [r.name for r in self.splits.train])
            if self.rank == 0:
                logger.info("projector statistics fitted on %d training volumes", volumes)
        if self.rank == 0:
            logger.info("frozen encoders: %d studies encoded once in %.0f s", len(features), time.perf_counter() - t0)
        return features

    def _fit_finding_detector(self) -> None:
        """``finding_head_input="latents"``: fit the per-region detector on the training studies' encoder output
        when the starting model has none (a resumed run restores it from the checkpoint), and write what it
        can call to ``finding_detector.json`` in the output folder."""
        from .features import fit_finding_detector

        if self.model.embedding_layer.finding_detector_fitted:
            return
        if self.features is None:
            raise RuntimeError("the finding detector is fitted on the frozen encoders' output")
        labeller = RegionReportDataset(self.splits.train, self.tokenizer, self.model.special, self.loader, 8,
                                       finding_labels=self.model_config.finding_labels)
        by_name = {r.name: r for r in self.splits.train}
        t0 = time.perf_counter()
        report = fit_finding_detector(self.model, self.features, list(by_name),
                                      lambda name: labeller.finding_targets(by_name[name]), seed=self.config.train.seed,
                                      min_precision=float(self.config.model.detector_min_precision))
        if self.rank == 0:
            enabled = [f"{row['region']}/{row['label']} ({row['held_out_f1']:.2f})" for row in report if row["enabled"]]
            logger.info("finding detector fitted in %.0f s; it may call: %s", time.perf_counter() - t0,
                        ", ".join(enabled) or "nothing")
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "finding_detector.json", "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)

    def micro_batches_per_epoch(self) -> int:
        n = len(self.splits.train) // self.world
        return math.ceil(n / self.config.train.micro_batch_size)

    # -- checkpoints --
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically and keep only the newest ``output.keep_last``."""
        from safetensors.torch import save_file

        root = self.output / CHECKPOINT_DIR
        final = root / f"{CHECKPOINT_PREFIX}{self.state.global_step:07d}"
        tmp = root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        else:
            save_file(checkpoint_tensors(self.model), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / f"rng_rank{self.rank}.pt")
        with open(tmp / f"rng_rank{self.rank}.json", "w", encoding="utf-8") as f:
            json.dump(_rng_state(), f)
        _barrier()
        if self.rank == 0:
            self.state.log_rows = self._log_rows
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
                json.dump(asdict(self.state), f, indent=2)
            write_manifest(tmp)                              # last: the digests of everything above
            # never remove before replacing: a re-saved checkpoint waits aside until its successor is in
            aside = root / f"{_REPLACED_PREFIX}{final.name}"
            if final.exists():
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
            os.replace(tmp, final)
            if aside.exists():
                shutil.rmtree(aside)
            for old in list_checkpoints(self.output)[: -self.config.output.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self.last_checkpoint = final
        return final

    def _choose_checkpoint(self) -> Path | None:
        """Rank 0 picks the newest intact checkpoint (saying why newer ones were passed over); every
        rank resumes from the same one."""
        choice: list = [None, []]
        if self.rank == 0:
            _recover_checkpoint_folders(self.output)
            path, damaged = newest_intact_checkpoint(self.output)
            choice = [None if path is None else str(path), damaged]
        if _dist_ready() and self.world > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        path, damaged = choice
        if damaged and path is None:
            raise TrainConfigError(f"{self.output / CHECKPOINT_DIR}: no intact checkpoint to resume from "
                                   f"({'; '.join(damaged)}); move the damaged checkpoints away to start over")
        if damaged and self.rank == 0:
            for line in damaged:
                logger.warning("--resume: %s; not resuming from it", line)
            logger.warning("--resume: falling back to %s, the newest intact checkpoint", path)
        return None if path is None else Path(path)

    def _load_checkpoint(self) -> None:
        path = self._choose_checkpoint()
        if path is None:
            if self.rank == 0:
                logger.info("--resume: no checkpoint in %s, starting from scratch", self.output / CHECKPOINT_DIR)
            return
        while True:
            try:
                self._restore(path)
                break
            except TrainConfigError:
                raise                                 # not damage: e.g. another number of processes
            except Exception as err:  # noqa: BLE001 - an unreadable file: the checkpoint is damaged
                problem = f"{path}: cannot be restored ({type(err).__name__}: {err})"
                older = [p for p in reversed(list_checkpoints(self.output))
                         if p.name < path.name and verify_checkpoint(p) is None]
                if self.world > 1 or not older:
                    raise TrainConfigError(problem + ("" if older else "; no older checkpoint to fall back to")) from err
                path = older[0]
                logger.warning("--resume: %s; falling back to %s", problem, path)
        if self.rank == 0:
            self._log_rows = trim_log(self.output, self.state)

    def _restore(self, path: Path) -> None:
        from safetensors.torch import load_file

        with open(path / STATE_FILE, encoding="utf-8") as f:
            state = TrainState(**json.load(f))
        if state.world_size != self.world:
            raise TrainConfigError(f"{path}: saved with {state.world_size} processes, resumed with {self.world}; "
                                   "the data position would not match")
        if self.engine is not None:
            self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        else:
            weights = load_file(str(path / "trainable.safetensors"))
            missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in weights]
            if missing:
                raise TrainConfigError(f"{path}: checkpoint lacks trainable parameters {missing[:5]}")
            with torch.no_grad():
                tensors = restorable_tensors(self.model)
                for name, value in weights.items():
                    tensors[name].copy_(value)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_pt = path / f"rng_rank{self.rank}.pt"
        if rng_pt.is_file():
            rng = torch.load(rng_pt, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
            with open(path / f"rng_rank{self.rank}.json", encoding="utf-8") as f:
                _set_rng_state(json.load(f))
        self.state = state
        self.last_checkpoint = path
        if self.rank == 0:
            logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.global_step, state.epoch,
                        state.batch_in_epoch)

    # -- steps --
    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k].to(self.device) for k in MODEL_INPUT_KEYS + OPTIONAL_INPUT_KEYS if k in batch}
        if self.use_bf16:
            for key in ("images", "region_images", "region_masks", "global_latents", "region_latents", "mask_features"):
                if key in inputs:
                    inputs[key] = inputs[key].to(torch.bfloat16)
        return inputs

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss touching every trainable parameter: keeps ranks (and DeepSpeed's accumulation
        counter) in step when a whole micro-batch was skipped."""
        module = self.engine.module if self.engine is not None else self.model
        return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros((), device=self.device))

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[float, float, int]:
        """One micro-batch: returns (loss, token accuracy, samples); NaN loss for an empty batch."""
        model = self.engine if self.engine is not None else self.model
        self._batch_digest.update(json.dumps([batch.get("names"), batch.get("regions")]).encode())
        if "input_ids" not in batch:
            loss, acc, n = self._zero_loss(), float("nan"), 0
        else:
            out = model(**self._to_device(batch))
            loss, acc, n = out.loss, float(out.token_accuracy), len(batch["names"])
            if out.finding_loss is not None:
                self._finding_losses.append((float(out.lm_loss.detach()), float(out.finding_loss.detach())))
        value = float(loss.detach())
        finite = _all_min(1.0 if math.isfinite(value) else 0.0)
        if finite < 1.0:
            where = self.last_checkpoint or "none yet"
            raise NonFiniteLossError(
                f"loss is {value} at step {self.state.global_step + 1} (epoch {self.state.epoch}) on "
                f"{'this' if not math.isfinite(value) else 'another'} rank; training stopped. "
                f"Last good checkpoint: {where}. Try a lower train.lr or check the data.")
        if self.engine is not None:
            # DeepSpeed counts micro-batches itself: step() after every backward, it only updates
            # the weights (and the scheduler) at the accumulation boundary.
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.config.train.grad_accum).backward()
        return (value if n else float("nan")), acc, n

    def _optimizer_step(self) -> float:
        """Clip, step, schedule; returns the gradient norm before clipping."""
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.output / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._log_rows += 1
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def _loader(self, batches: list[list[int]]):
        cfg = self.config
        workers = cfg.data.num_workers if cfg.data.num_workers and len(batches) > 1 and self.features is None else 0
        pad_id = self.tokenizer.pad_token_id or 0
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=batches, num_workers=workers,
            collate_fn=functools.partial(collate_regions, pad_id=pad_id),
            multiprocessing_context="spawn" if workers else None, persistent_workers=False)

    # -- the loop --
    def train(self) -> Path:
        """Run to the end (or to ``train.max_steps``); returns the final engine-format model folder."""
        from tqdm.auto import tqdm

        cfg = self.config
        accum = cfg.train.grad_accum
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=self.rank != 0,
                   desc="reg2rg-train", unit="step", dynamic_ncols=True)
        module = self.engine.module if self.engine is not None else self.model
        module.train()
        while self.state.global_step < self.total_steps and self.state.epoch < cfg.train.epochs:
            epoch = self.state.epoch
            self.train_set.set_epoch(epoch)
            batches = epoch_batches(len(self.train_set), cfg.train.micro_batch_size, cfg.train.seed, epoch,
                                    self.rank, self.world)
            batches = batches[: self.steps_per_epoch * accum]
            window: list[tuple[float, float, int]] = []
            self._finding_losses: list[tuple[float, float]] = []
            self._batch_digest = hashlib.sha1()
            t0 = time.perf_counter()
            for batch in self._loader(batches[self.state.batch_in_epoch:]):
                for name, reason in batch.get("skipped", []):
                    self.splits.skips.add(name, reason)
                window.append(self._forward_backward(batch))
                self.state.batch_in_epoch += 1
                if len(window) < accum:
                    continue
                grad_norm = self._optimizer_step()
                self.state.global_step += 1
                losses = [l for l, _, n in window if n]
                accs = [a for _, a, n in window if n]
                samples = sum(n for _, _, n in window)
                # Mean over this rank's micro-batches, then over ranks.
                loss_sum, acc_sum, count, total = _all_sum([sum(losses), sum(accs), len(losses), samples])
                self.state.samples_seen += int(total)
                elapsed = time.perf_counter() - t0
                record = {"step": self.state.global_step, "epoch": epoch,
                          "loss": loss_sum / max(count, 1), "token_accuracy": acc_sum / max(count, 1),
                          "lr": self._current_lr(), "grad_norm": grad_norm,
                          "samples_per_s": total / max(elapsed, 1e-9), "time": time.time(),
                          # which studies, in which region order, made this step (rank 0's share)
                          "batch_digest": self._batch_digest.hexdigest()[:12]}
                if self.model_config.finding_loss_weight:   # the two parts of the loss with a finding head
                    lm, fl, k = _all_sum([sum(x for x, _ in self._finding_losses),
                                          sum(y for _, y in self._finding_losses), len(self._finding_losses)])
                    if k:
                        record.update(lm_loss=lm / k, finding_loss=fl / k)
                window, t0, self._finding_losses = [], time.perf_counter(), []
                self._batch_digest = hashlib.sha1()
                if self.state.global_step % max(cfg.output.log_steps, 1) == 0 or self.state.global_step == 1:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.3f}")
                if cfg.output.save_steps and self.state.global_step % int(cfg.output.save_steps) == 0:
                    self.save_checkpoint()
                if self.state.global_step >= self.total_steps:
                    break
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if cfg.train.validate_every_epoch and len(self.val_set):
                    self._log({"step": self.state.global_step, "epoch": epoch, **self.validate()})
                    module.train()
                if cfg.output.save_every_epoch:
                    self.save_checkpoint()   # (re)written: the state now points at the next epoch
        bar.close()
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.state.global_step:07d}"):
            self.save_checkpoint()
        final = self.export()
        if self.rank == 0:
            logger.info("done: %d steps, %s; model in %s", self.state.global_step, self.splits.skips.summary(), final)
            if self.writer is not None:
                self.writer.close()
        return final

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss and token accuracy over (a subset of) the validation set, all ranks together."""
        module = self.engine.module if self.engine is not None else self.model
        module.eval()
        model = self.engine if self.engine is not None else self.model
        pad_id = self.tokenizer.pad_token_id or 0
        indices = list(range(len(self.val_set)))[self.rank::self.world]
        loss_sum = acc_sum = count = 0.0
        hits = [0.0, 0.0, 0.0]     # finding head, all volumes, threshold 0.5: true/false positives, false negatives
        for i in indices:
            batch = collate_regions([self.val_set[i]], pad_id)
            if "input_ids" not in batch:
                continue
            out = model(**self._to_device(batch))
            loss_sum += float(out.lm_loss)   # the language-model loss (comparable with the published runs)
            acc_sum += float(out.token_accuracy)
            count += 1
            if out.finding_logits is not None:
                predicted = out.finding_logits > 0
                target = torch.cat([batch["global_finding_targets"], batch["finding_targets"]]).to(predicted.device) > 0.5
                hits[0] += float((predicted & target).sum())
                hits[1] += float((predicted & ~target).sum())
                hits[2] += float((~predicted & target).sum())
        loss_sum, acc_sum, count, *hits = _all_sum([loss_sum, acc_sum, count, *hits])
        result = {"val_loss": loss_sum / max(count, 1), "val_token_accuracy": acc_sum / max(count, 1)}
        if self.model_config.finding_labels:
            result["val_finding_f1"] = 2 * hits[0] / max(2 * hits[0] + hits[1] + hits[2], 1.0)
        if self.config.train.val_metrics:
            result.update(self._generation_metrics())
        if self.rank == 0:
            logger.info("validation after epoch %d: loss %.4f, token accuracy %.4f", self.state.epoch - 1,
                        result["val_loss"], result["val_token_accuracy"])
        return result

    @torch.no_grad()
    def _generation_metrics(self) -> dict[str, float]:
        """Draft the validation reports (greedy decoding, reproducible) on rank 0 and score them with
        reg2rg-eval's metrics and the region prediction accuracy. Skipped under ZeRO-3, where no rank
        holds the whole model."""
        stage = self.engine.zero_optimization_stage() if self.engine is not None else 0
        out: dict[str, float] = {}
        if stage == 3:
            if self.rank == 0:
                logger.info("validation metrics skipped: ZeRO-3 shards the model (validation loss only)")
            return out
        if self.rank == 0:
            import warnings

            from reg2rg.engine.errors import StudyWarning
            from reg2rg.engine.generation import GenerationSettings, ReportEngine
            from reg2rg.engine.sections import strip_region_prefixes
            from reg2rg.engine.studyio import read_study

            from .metrics import compute_metrics

            module = self.engine.module if self.engine is not None else self.model
            engine = ReportEngine(module, self.tokenizer)
            refs, preds, region_acc = [], [], []
            for record in self.val_set.records:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", StudyWarning)
                    study = read_study(record.volume, record.masks)
                chosen = [r for r in engine.select_regions(study) if r in record.reports]
                if not chosen:
                    continue
                result = engine.draft(study, chosen, GenerationSettings(max_new_tokens=self.model_config.max_length))
                reference = "".join(f"The region {j} is {area}: {record.reports[area]} "
                                    for j, area in sorted(result.slot_regions.items()))
                refs.append(strip_region_prefixes(reference))
                preds.append(strip_region_prefixes(result.text))
                if result.region_accuracy is not None:
                    region_acc.append(result.region_accuracy)
            if refs:
                scores = compute_metrics(refs, preds)
                out = {f"val_{name}": value["mean"] for name, value in scores.items()}
            if region_acc:
                out["val_region_accuracy"] = sum(region_acc) / len(region_acc)
        _barrier()
        return out

    def export(self) -> Path:
        """Write the trained model in the engine's checkpoint format (``<output>/final``)."""
        from reg2rg.engine.checkpoint import save_pretrained

        final = self.output / FINAL_DIR
        module = self.engine.module if self.engine is not None else self.model
        stage = self.engine.zero_optimization_stage() if self.engine is not None else 0
        if stage == 3:
            import deepspeed

            # ZeRO-3 shards every parameter: gather them (on every rank) before rank 0 writes.
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    save_pretrained(module, self.tokenizer, final)
        elif self.rank == 0:
            save_pretrained(module, self.tokenizer, final)
        _barrier()
        return final


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      checkpoint: str | os.PathLike | None = None) -> Path:
    """Write a single-process checkpoint of a run (default: its newest) in the engine's format.

    Lets a model be used (viewer, ``reg2rg-generate``) while its run is still training. The model is
    rebuilt from the run's resolved config with the same seed, so frozen parts match, then the
    checkpoint's trainable parameters are loaded.
    """
    from safetensors.torch import load_file

    from reg2rg.engine.checkpoint import save_pretrained

    from .config import RESOLVED_CONFIG_NAME, load_train_config

    run_dir = Path(run_dir)
    config = load_train_config(str(run_dir / RESOLVED_CONFIG_NAME))
    if checkpoint:
        path = Path(checkpoint)
        problem = verify_checkpoint(path)
        if problem:
            raise TrainConfigError(f"{path}: {problem}")
    else:
        path, damaged = newest_intact_checkpoint(run_dir)
        for line in damaged:
            logger.warning("%s; exporting an older checkpoint", line)
    if path is None or not (path / "trainable.safetensors").is_file():
        raise TrainConfigError(f"{run_dir}: no single-process checkpoint to export "
                               "(DeepSpeed runs export their final model themselves)")
    model_config = resolve_model_config(config)
    tokenizer = load_training_tokenizer(config, model_config)
    model = build_model(config, model_config, tokenizer)
    weights = load_file(str(path / "trainable.safetensors"))
    params = restorable_tensors(model)
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise TrainConfigError(f"{path}: parameters {unknown[:5]} are not in the model of {run_dir}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return Path(save_pretrained(model.eval(), tokenizer, out_dir))
