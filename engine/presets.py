"""Named run presets: how to decode and in which precision to run each part of Reg2RG.

They exist so that the published run can be reproduced on purpose (docs/reproduction.md §5) and so that
a draft records which of them made it.

Decoding presets (`decoding_preset`):

* ``greedy`` — the engine's default: the most probable token at every step, so the same study always
  gives the same draft. The published call decodes greedily only when its LLaMA folder has no
  ``generation_config.json`` that turns sampling on; for Llama-2-7b-chat-hf it does not.
* ``published`` — what the reference's ``generate(inputs_embeds=…, max_new_tokens=500, top_k=30)`` does
  with a given LLaMA folder: that folder's ``generation_config.json`` decides whether to sample and with
  which temperature and top-p (HF's defaults where the file is silent or absent), ``top_k=30``, at most
  500 new tokens, and the reference's seed 20.

Precisions (`resolve_precision`): ``fp32``; ``bf16`` (every part in bfloat16); ``reference`` (the
published run: the LLM in float16, the vision path — ViT, perceiver, ``fc``, mask encoder, ``mask_fc``,
marker weights — in float32). ``fp16`` is the same split as ``reference``: float16's narrow range is not
safe for the vision encoder's activations, so no precision casts the vision path to it. ``auto`` picks
fp32 on the CPU, and on CUDA ``reference`` for the published checkpoint and bf16 for our own models.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("reg2rg.engine.presets")

DECODING_PRESETS = ("greedy", "published")
PUBLISHED_SEED = 20                 # the reference test script's setup_seed(20)
PUBLISHED_TOP_K = 30                # its generate(..., top_k=30)
PUBLISHED_MAX_NEW_TOKENS = 500      # its generate(..., max_new_tokens=500)
GENERATION_CONFIG = "generation_config.json"

# generation_config.json keys that do not change how tokens are chosen, or that the published call
# overrides (top_k, the length limits)
_NOT_DECODING = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                 "_from_model_config", "max_length", "max_new_tokens", "top_k", "use_cache", "output_attentions",
                 "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
                 "num_return_sequences", "cache_implementation"}
# keys our decoder does not implement, with the value at which they do nothing (HF's defaults)
_NO_OP = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
          "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
          "min_p": None, "min_length": 0, "min_new_tokens": None, "diversity_penalty": 0.0, "num_beam_groups": 1,
          "bad_words_ids": None, "force_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
          "suppress_tokens": None, "begin_suppress_tokens": None, "renormalize_logits": False,
          "exponential_decay_length_penalty": None, "sequence_bias": None, "guidance_scale": None,
          "penalty_alpha": None, "constraints": None, "early_stopping": False}


def llm_folder_of(model_dir: str | os.PathLike | None = None, llm_path: str | os.PathLike | None = None) -> Path | None:
    """The LLaMA folder a model decodes with: ``llm_path`` when given (the published checkpoint's
    folder, or an override), else the model folder's bundled ``llm/``, else the external folder its
    ``config.json`` names. ``model_dir`` None is the embedded demo model. None when there is none."""
    if llm_path is not None:
        return Path(llm_path)
    if model_dir is None:
        from .generation import default_model_dir

        model_dir = default_model_dir()
    bundled = Path(model_dir) / "llm"
    if bundled.is_dir():
        return bundled
    try:
        external = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("llm_path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(external) if external else None


def read_generation_config(llm_folder: str | os.PathLike | None) -> dict:
    """The folder's ``generation_config.json`` as a dict ({} when the folder has none)."""
    from .generation import GenerationError

    if llm_folder is None:
        return {}
    path = Path(llm_folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise GenerationError(f"{path}: not a readable JSON generation config ({err})") from err
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def decoding_preset(name: str, llm_folder: str | os.PathLike | None = None):
    """`GenerationSettings` of the named preset (see the module docstring); ``llm_folder`` is the
    LLaMA folder whose ``generation_config.json`` the ``published`` preset follows."""
    from .generation import GenerationError, GenerationSettings

    if name == "greedy":
        return GenerationSettings(strategy="greedy", preset="greedy")
    if name != "published":
        raise GenerationError(f"unknown decoding preset {name!r}; use one of {', '.join(DECODING_PRESETS)}")
    cfg = read_generation_config(llm_folder)
    where = Path(llm_folder) / GENERATION_CONFIG if llm_folder is not None else GENERATION_CONFIG
    unsupported = [f"{k}={v!r}" for k, v in sorted(cfg.items())
                   if k in _NO_OP and v is not None and v != _NO_OP[k]]
    unknown = sorted(k for k in cfg if k not in _NO_OP and k not in _NOT_DECODING
                     and k not in ("do_sample", "temperature", "top_p", "num_beams"))
    sample = bool(cfg.get("do_sample", False))
    beams = int(cfg.get("num_beams", 1) or 1)
    if sample and beams > 1:
        unsupported.append(f"do_sample=true with num_beams={beams} (beam sampling)")
    if unsupported:
        raise GenerationError(f"{where}: sets {', '.join(unsupported)}, which this engine's decoder does not "
                              "implement, so the published decoding cannot be reproduced; choose another preset")
    if unknown:
        logger.warning("%s: ignoring settings the published preset does not know: %s", where, ", ".join(unknown))
    temperature = float(cfg.get("temperature", 1.0) or 1.0)
    top_p = float(cfg.get("top_p", 1.0) if cfg.get("top_p") is not None else 1.0)
    strategy = "beam" if beams > 1 else ("sample" if sample else "greedy")
    beam_options = {"num_beams": beams, "length_penalty": float(cfg.get("length_penalty", 1.0))} if beams > 1 else {}
    settings = GenerationSettings(strategy=strategy, max_new_tokens=PUBLISHED_MAX_NEW_TOKENS, temperature=temperature,
                                  top_k=PUBLISHED_TOP_K, top_p=top_p, seed=PUBLISHED_SEED, preset="published",
                                  **beam_options)
    settings.validate()
    return settings


# ---- precision ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """The dtypes of the two halves of Reg2RG: the LLM (with the tied text embedding) and the vision path."""

    name: str
    llm_dtype: torch.dtype
    vision_dtype: torch.dtype

    def describe(self) -> str:
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        if self.llm_dtype == self.vision_dtype:
            return f"{self.name} (all {short[self.llm_dtype]})"
        return f"{self.name} (LLM {short[self.llm_dtype]}, vision {short[self.vision_dtype]})"


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, torch.float32),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16),
    "reference": Precision("reference", torch.float16, torch.float32),
}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "fp16": "reference", "float16": "reference",
            torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "reference"}


def resolve_precision(precision: str | torch.dtype | None, device: torch.device, published: bool = False) -> Precision:
    """A `Precision` from a name (``fp32``, ``bf16``, ``reference``/``fp16``, ``auto``/None) or a
    torch dtype. ``auto`` on CUDA: ``reference`` for the published checkpoint (it was run that way),
    bf16 for our own models; on the CPU: fp32."""
    from .generation import GenerationError

    if precision is None or precision == "auto":
        if torch.device(device).type != "cuda":
            return PRECISIONS["fp32"]
        return PRECISIONS["reference" if published else "bf16"]
    key = precision.lower() if isinstance(precision, str) else precision
    key = _ALIASES.get(key, key)
    if key not in PRECISIONS:
        names = ", ".join(["auto", *PRECISIONS, "fp16"])
        raise GenerationError(f"unknown precision {precision!r}; use one of {names}")
    return PRECISIONS[key]


def precision_of(model) -> Precision:
    """The precision a loaded Reg2RG model runs in, read from its parameters."""
    llm = model.lang_model.get_input_embeddings().weight.dtype
    vision = model.embedding_layer.fc.weight.dtype
    for p in PRECISIONS.values():
        if (p.llm_dtype, p.vision_dtype) == (llm, vision):
            return p
    return Precision("mixed", llm, vision)
