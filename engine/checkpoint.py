"""Reg2RG checkpoints: our own folder format, the published checkpoint and the RadFM files.

Our format (one folder, loadable with `load_pretrained`)::

    config.json            Reg2RGConfig (vocab_size filled in)
    vision.safetensors     embedding_layer's own parameters (encoders, perceiver, fc, mask_fc, marker weights)
    adapter/               standard PEFT adapter folder (train_llm="lora")
    llm/                   full HF LLaMA folder, unless the base LLM is an external local LLaMA
    tokenizer/             the tokenizer with Reg2RG's special tokens

Pickled files (the published ``.pth``/``.bin``) are only read with ``torch.load(weights_only=True)``:
a file that needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .model.config import CONFIG_NAME, Reg2RGConfig
from .model.llm import base_llama
from .model.reg2rg import Reg2RG
from .tokens import TokenizerError, load_tokenizer

VISION_FILE = "vision.safetensors"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
TIED_TEXT_EMBEDDING = "weight"     # embedding_layer.weight IS the LLM input embedding; saved with the LLM


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used. The message names the path and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@dataclass
class ImportReport:
    """Keys of the model that the file did not provide, and keys of the file the model does not have.

    ``buffers`` are file keys that name buffers the model computes itself (the LLaMA's rotary
    ``inv_freq``, which transformers 4.28 saved in every state dict); they are ignored, never an error.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def describe(self, limit: int = 20) -> str:
        """The mismatch in one paragraph: counts, then the keys (at most ``limit`` of each kind)."""
        def listing(keys: list[str]) -> str:
            more = f", … (+{len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} model weight(s) missing from the file: {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} key(s) in the file that the model does not have: "
                         f"{listing(self.unexpected)}")
        return "; ".join(parts)


# ---- reading weight files safely ----------------------------------------------------------------
def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle read with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "weights file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(path, "contains pickled objects other than tensors; refusing to unpickle it "
                                    "(only weights_only=True loading is allowed). Convert it to safetensors "
                                    "in an environment you trust.") from err
    except Exception as err:
        raise CheckpointError(path, f"not a readable torch weights file ({type(err).__name__}: {err})") from err
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(data).__name__}")
    return dict(data)


# ---- our format ------------------------------------------------------------------------------
def vision_state_dict(model: Reg2RG) -> dict[str, torch.Tensor]:
    """embedding_layer's own parameters (everything but the tied text embedding)."""
    return {k: v for k, v in model.embedding_layer.state_dict().items() if k != TIED_TEXT_EMBEDDING}


def _bundles_llm(config: Reg2RGConfig) -> bool:
    """The base LLM goes into the folder unless it is an unchanged external LLaMA (LoRA/frozen on llm_path)."""
    return config.train_llm == "full" or config.llm_path is None


def _save_base_llm(model: Reg2RG, out_dir: str) -> None:
    from safetensors.torch import save_file

    llm = base_llama(model.lang_model)
    # Strip the LoRA injection so the folder is a plain LLaMA that any HF loader reads.
    state = {k.replace(".base_layer.", "."): v.detach().to("cpu").clone().contiguous()
             for k, v in llm.state_dict().items() if "lora_" not in k}
    os.makedirs(out_dir, exist_ok=True)
    llm.config.save_pretrained(out_dir)
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def save_pretrained(model: Reg2RG, tokenizer, out_dir: str | os.PathLike) -> str:
    """Write ``model`` and ``tokenizer`` as one folder (see module docstring); returns the folder.

    The folder is written under a temporary name beside ``out_dir`` and replaces it as a whole only
    when complete (`fileio.atomic_folder`): an interrupted or failed save (full disk) leaves the previous
    model folder as it was. A non-empty folder that is not a model folder is refused rather than replaced.
    """
    from safetensors.torch import save_file

    from .fileio import OutputError, atomic_folder

    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, CONFIG_NAME)):
        raise OutputError(out_dir, "the folder is not empty and is not a model folder (no config.json); "
                                   "choose a new folder so nothing in it is replaced")
    with atomic_folder(out_dir) as tmp:
        model.config.save(tmp)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in vision_state_dict(model).items()},
                  os.path.join(tmp, VISION_FILE), metadata={"format": "pt"})
        if model.config.train_llm == "lora":
            model.lang_model.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        if _bundles_llm(model.config):
            _save_base_llm(model, os.path.join(tmp, LLM_DIR))
        tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
    return out_dir


def _require(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CheckpointError(path, f"missing from the checkpoint folder ({what})")


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, llm_path: str | os.PathLike | None = None,
                    vision_dtype: torch.dtype | None = None):
    """Load a folder written by `save_pretrained` -> ``(model, tokenizer)``, in eval mode.

    ``llm_path`` overrides the external LLaMA folder recorded in the config (for a LoRA checkpoint
    whose base LLaMA lives elsewhere on this machine). ``vision_dtype`` (default: ``dtype``) is the
    dtype of the vision path when it differs from the LLM's (`Reg2RG.set_precision`).
    """
    from peft import set_peft_model_state_dict

    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(model_dir, "checkpoint folder not found")
    _require(os.path.join(model_dir, CONFIG_NAME), "model config")
    _require(os.path.join(model_dir, VISION_FILE), "vision weights")
    _require(os.path.join(model_dir, TOKENIZER_DIR), "tokenizer folder")
    config = Reg2RGConfig.load(model_dir)
    bundled = os.path.join(model_dir, LLM_DIR)
    if llm_path is None:
        if os.path.isdir(bundled):
            llm_path = bundled
        elif config.llm_path is None:
            _require(bundled, "LLM folder")
        elif not os.path.isdir(config.llm_path):
            raise CheckpointError(config.llm_path, "the base LLaMA folder named in config.json is not on this "
                                                   "machine; pass llm_path=")
    if config.train_llm == "lora":
        _require(os.path.join(model_dir, ADAPTER_DIR, "adapter_model.safetensors"), "LoRA adapter")
    # Every weight file is checked before anything is built: a truncated or corrupt file is one message
    # naming it, not a traceback from deep inside transformers (safetensors checks the header covers
    # the whole file, reading only the header).
    vision_file = os.path.join(model_dir, VISION_FILE)
    check_safetensors(vision_file, "the vision weights")
    if llm_path is not None:
        for name in sorted(os.listdir(llm_path)):
            if name.endswith(".safetensors"):
                check_safetensors(os.path.join(llm_path, name), "the language model's weights")
    try:
        tokenizer = load_tokenizer(os.path.join(model_dir, TOKENIZER_DIR))
    except TokenizerError as err:
        raise CheckpointError(None, str(err)) from err
    try:
        model = Reg2RG.from_config(config, tokenizer, llm_path=None if llm_path is None else os.fspath(llm_path))
    except (RuntimeError, ValueError, OSError) as err:
        if "out of memory" in str(err).lower():
            raise
        raise CheckpointError(os.path.join(model_dir, CONFIG_NAME),
                              f"the model cannot be built from this config ({_first_line(err)})") from err

    vision = read_safetensors(vision_file, "the vision weights")
    try:
        result = model.embedding_layer.load_state_dict(vision, strict=False)
    except RuntimeError as err:       # shapes: the config's dimensions are not the ones the weights were saved with
        raise CheckpointError(vision_file, "does not fit config.json (a dimension differs): "
                                           f"{_size_mismatches(err)}") from err
    missing = [k for k in result.missing_keys if k != TIED_TEXT_EMBEDDING]
    if missing or result.unexpected_keys:
        raise CheckpointError(vision_file,
                              f"does not fit the config: missing {missing}, unexpected {result.unexpected_keys}")
    if config.train_llm == "lora":
        adapter_file = os.path.join(model_dir, ADAPTER_DIR, "adapter_model.safetensors")
        try:
            result = set_peft_model_state_dict(model.lang_model, read_safetensors(adapter_file, "the LoRA adapter"))
        except RuntimeError as err:
            raise CheckpointError(adapter_file, f"does not fit config.json: {_size_mismatches(err)}") from err
        if result.unexpected_keys:
            raise CheckpointError(adapter_file, f"unexpected adapter keys {result.unexpected_keys}")
    model.set_precision(dtype, vision_dtype or dtype, device).eval()
    return model, tokenizer


def check_safetensors(path: str | os.PathLike, what: str) -> None:
    """Raise `CheckpointError` unless ``path`` is a complete safetensors file (header only, no tensor read)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), "pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors has its own error types; all mean "unusable"
        raise CheckpointError(path, f"{what}: the file is truncated or corrupt (not a complete safetensors file: "
                                    f"{_first_line(err)})") from err


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a truncated or corrupt file as `CheckpointError` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - as in check_safetensors
        raise CheckpointError(path, f"{what}: the file is truncated or corrupt ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _size_mismatches(err: BaseException, limit: int = 3) -> str:
    """The 'size mismatch for X: … shape A … shape B' lines of a load_state_dict error, shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
    if not lines:
        return _first_line(err)
    more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


# ---- the published checkpoint and RadFM files -----------------------------------------------------
def _normalise_published_keys(state: Mapping[str, torch.Tensor], ours: set[str]) -> dict[str, torch.Tensor]:
    """Map published names onto ours: drop a DDP ``module.`` prefix and bridge the PEFT versions that
    wrote LoRA-wrapped layers with or without ``base_layer``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name not in ours:
            head, _, leaf = name.rpartition(".")
            with_base = f"{head}.base_layer.{leaf}"
            without_base = name.replace(".base_layer.", ".")
            if with_base in ours:
                name = with_base
            elif without_base in ours:
                name = without_base
        out[name] = value
    return out


def import_published(model: Reg2RG, source: str | os.PathLike | Mapping[str, torch.Tensor],
                     strict: bool = True) -> ImportReport:
    """Load the published Reg2RG checkpoint (a full ``state_dict`` of embedding_layer + lang_model) into
    ``model`` and return what did not match.

    Strict by default, as the reference loads it (docs/reproduction.md §1): a model weight missing from
    the file, or a file key the model does not have (other than a buffer the model computes itself),
    raises `CheckpointError` listing them and leaves ``model`` untouched — a wrong file must not load as
    partly random weights. ``strict=False`` loads what matches and reports the rest.
    """
    path = None if isinstance(source, Mapping) else os.fspath(source)
    state = load_weights_file(path) if path is not None else dict(source)
    ours = model.state_dict()
    mapped = _normalise_published_keys(state, set(ours))
    buffer_leaves = {name.rpartition(".")[2] for name, _ in model.named_buffers()}
    extra = sorted(set(mapped) - set(ours))
    report = ImportReport(missing=sorted(set(ours) - set(mapped)),
                          unexpected=[k for k in extra if k.rpartition(".")[2] not in buffer_leaves],
                          buffers=[k for k in extra if k.rpartition(".")[2] in buffer_leaves])
    if strict and not report.complete:
        raise CheckpointError(path, f"does not match the published Reg2RG model: {report.describe()}. "
                                    "Check that this is the published checkpoint for this model size; "
                                    "--non-strict loads it anyway (missing weights stay random).")
    known = {k: v for k, v in mapped.items() if k in ours}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in known.items() if v.shape != ours[k].shape]
    if wrong:
        raise CheckpointError(path, f"shapes do not match the model config: {wrong[:5]}"
                                    + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    model.load_state_dict(known, strict=False)
    return report


def import_radfm(model: Reg2RG, vit_path: str | os.PathLike | None = None,
                 perceiver_fc_path: str | os.PathLike | None = None) -> None:
    """Load RadFM's ``RadFM_vit3d.pth`` (vision encoder, strict) and ``RadFM_perceiver_fc.pth``
    (its ``perceiver`` entry, strict) as the reference initialises Reg2RG."""
    layer = model.embedding_layer
    if vit_path is not None:
        _load_strict(layer.vision_encoder, load_weights_file(vit_path), vit_path)
    if perceiver_fc_path is not None:
        data = load_weights_file(perceiver_fc_path)
        if "perceiver" not in data or not isinstance(data["perceiver"], Mapping):
            raise CheckpointError(perceiver_fc_path, "expected a dict with a 'perceiver' state dict entry")
        _load_strict(layer.perceiver, data["perceiver"], perceiver_fc_path)


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(path, f"does not match the model: {err}") from err
