"""The training configuration: one YAML/JSON file with every setting, ``--key value`` overrides on top.

``load_train_config("demo", ["--train.lr", "3e-4"])`` reads the packaged preset ``configs/demo.yaml``
(or any YAML/JSON path), applies dotted overrides, checks every key against the dataclasses below and
returns a `TrainConfig`. `TrainConfig.save` writes the resolved config into the run's output folder so
the run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

PRESETS: tuple[str, ...] = ("radgenome-7b", "demo")
DEEPSPEED_PRESETS: tuple[str, ...] = ("zero2", "zero3")
RESOLVED_CONFIG_NAME = "train_config.yaml"


class TrainConfigError(ValueError):
    """A training config file or override is invalid; the message names the file/key and the problem."""


@dataclass
class ModelSection:
    preset: str = "demo"                          # Reg2RGConfig preset, or a folder/JSON with config.json
    overrides: dict[str, Any] = field(default_factory=dict)   # Reg2RGConfig fields to change
    vision_weights: str | None = None             # RadFM_vit3d.pth
    perceiver_weights: str | None = None          # RadFM_perceiver_fc.pth
    init_from: str | None = None                  # engine checkpoint folder to start from
    refit_detector: bool = False                  # init_from's fitted finding detector is fitted again on this run's studies
    detector_min_precision: float = 0.0           # held-out precision a detector label's calls also need (0: the F1 bar only)
    train_vit: bool = False                       # published: the ViT stays frozen


@dataclass
class DataSection:
    root: str | None = None
    mask_root: str | None = None
    reports: str | list[str] | None = None       # one CSV, or several (merged)
    train_split: str | None = None
    val_split: str | None = None
    split_file: str | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    num_workers: int = 2
    max_length: int = 2048
    val_samples: int = 16


@dataclass
class TrainSection:
    seed: int = 42
    epochs: int = 1
    max_steps: int | None = None                  # optimizer steps; stops early when reached (0: fit, export)
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 5e-5
    finding_head_lr: float | None = None     # lr of the finding head (a fresh linear layer); None: lr
    projector_lr: float | None = None        # lr of the perceiver, fc and mask_fc (the projector); None: lr
    weight_decay: float = 0.0
    scheduler: str = "constant_with_warmup"       # constant_with_warmup | cosine_with_warmup | linear_with_warmup
    warmup_steps: int = 20
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    validate_every_epoch: bool = False
    val_metrics: bool = False                     # also generate and score with reg2rg-eval's metrics
    threads: int | None = None                    # torch.set_num_threads for CPU runs


@dataclass
class DistributedSection:
    backend: str = "none"                         # deepspeed | none
    deepspeed_config: str = "zero2"               # zero2 | zero3 | a DeepSpeed JSON path


@dataclass
class OutputSection:
    dir: str = "runs/train"
    save_steps: int | None = None
    save_every_epoch: bool = True
    keep_last: int = 3
    log_steps: int = 10
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str | None = None
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    output: OutputSection = field(default_factory=OutputSection)
    source: str = ""                              # where the config came from (file or preset name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> str:
        """Write the resolved config as YAML into ``directory``; returns the file path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, RESOLVED_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path

    def validate(self) -> None:
        """Raise `TrainConfigError` for settings that cannot work, before any data or model is touched."""
        t = self.train
        floor = self.model.detector_min_precision
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise TrainConfigError(f"{self.source}: model.detector_min_precision must be a number within 0..1, "
                                   f"got {floor!r}")
        if t.micro_batch_size < 1 or t.grad_accum < 1:
            raise TrainConfigError(f"{self.source}: train.micro_batch_size and train.grad_accum must be >= 1")
        if t.max_steps is not None and t.max_steps < 0:
            raise TrainConfigError(f"{self.source}: train.max_steps must be >= 0 (0: fit and export, no step)")
        if t.epochs < 1 and not t.max_steps:
            raise TrainConfigError(f"{self.source}: train.epochs must be >= 1 (or set train.max_steps)")
        if t.scheduler not in ("constant_with_warmup", "cosine_with_warmup", "linear_with_warmup", "constant"):
            raise TrainConfigError(f"{self.source}: unknown train.scheduler {t.scheduler!r}")
        if self.distributed.backend not in ("deepspeed", "none"):
            raise TrainConfigError(
                f"{self.source}: distributed.backend must be deepspeed or none, got {self.distributed.backend!r}")
        if self.output.keep_last < 1:
            raise TrainConfigError(f"{self.source}: output.keep_last must be >= 1")
        if not self.data.root:
            raise TrainConfigError(f"{self.source}: data.root is not set (the RadGenome-layout volume folder)")
        if not self.data.reports:
            raise TrainConfigError(f"{self.source}: data.reports is not set (CSV with Volumename, Anatomy, Sentence)")


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection,
             "distributed": DistributedSection, "output": OutputSection}


def preset_path(name: str) -> str:
    """Path of a packaged file in ``reg2rg.train/configs`` (``demo`` -> ``configs/demo.yaml``)."""
    folder = resources.files("reg2rg.train") / "configs"
    for candidate in (name, f"{name}.yaml", f"{name}.json"):
        path = folder / candidate
        if path.is_file():
            return str(path)
    raise TrainConfigError(f"no packaged config named {name!r}; presets: {', '.join(PRESETS)}")


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping, with a clear error naming the file."""
    if not os.path.isfile(path):
        raise TrainConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise TrainConfigError(f"{path}: cannot parse ({err})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--output.dir=runs/x"]`` -> ``{"train.lr": 1e-4, "output.dir": "runs/x"}``.

    Values are parsed as YAML scalars, so numbers, booleans and ``null`` get their types.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise TrainConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise TrainConfigError(f"override --{key} has no value")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        # YAML reads "5e-5" as a string (it wants a dot); numbers written that way are numbers here.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TrainConfigError(f"override --{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build_section(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise TrainConfigError(f"{where}: must be a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TrainConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def config_from_dict(data: dict[str, Any], source: str = "") -> TrainConfig:
    """Build a `TrainConfig` from a nested mapping, rejecting unknown keys."""
    unknown = sorted(set(data) - set(_SECTIONS) - {"tokenizer", "source"})
    if unknown:
        raise TrainConfigError(f"{source}: unknown top-level keys {unknown}")
    kwargs: dict[str, Any] = {"source": source, "tokenizer": data.get("tokenizer")}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build_section(cls, data.get(name) or {}, f"{source}: section {name!r}")
    config = TrainConfig(**kwargs)
    _coerce_numbers(config)
    return config


def _coerce_numbers(config: TrainConfig) -> None:
    """YAML leaves ``5e-5`` as a string; make the float/int fields numbers (and say which one is bad)."""
    for section in (config.train, config.data, config.output):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, str) and f.type in ("float", "float | None", "int", "int | None"):
                try:
                    setattr(section, f.name, float(value) if "float" in f.type else int(value))
                except ValueError as err:
                    raise TrainConfigError(f"{config.source}: {f.name} = {value!r} is not a number") from err


def load_train_config(config: str, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read a preset name or a YAML/JSON path, apply ``--key value`` overrides, return the `TrainConfig`."""
    path = config if os.path.isfile(config) else preset_path(config)
    data = read_config_file(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return config_from_dict(data, source=path)


def deepspeed_config_dict(config: TrainConfig, world_size: int, use_bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with the ``"auto"`` fields filled from the training config (as HF Trainer does)."""
    name = config.distributed.deepspeed_config
    path = preset_path(name) if name in DEEPSPEED_PRESETS else name
    ds = read_config_file(path)
    t = config.train
    fill = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm else 0.0,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key in ("bf16", "fp16"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = bool(use_bf16) if key == "bf16" else False
    # Our own torch AdamW is passed to deepspeed.initialize (the published "adamw_torch"); DeepSpeed only
    # trusts its own optimizers under ZeRO unless told otherwise.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds
