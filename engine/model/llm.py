"""The language model: LLaMA from a local folder (offline) or from a small config, LoRA via PEFT."""

from __future__ import annotations

import os

import torch

from .config import ConfigError, Reg2RGConfig


def build_llama(config: Reg2RGConfig, vocab_size: int, dtype: torch.dtype | None = None,
                llm_path: str | os.PathLike | None = None):
    """A ``LlamaForCausalLM``: loaded from ``llm_path`` or ``config.llm_path`` (``local_files_only``) or
    freshly built from ``config.llm_config`` with ``vocab_size`` rows (pad 0, bos 1, eos 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_path = llm_path if llm_path is not None else config.llm_path
    if llm_path is not None:
        path = os.fspath(llm_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{path}: not a local LLaMA folder (config.json missing)")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True,
                                                 attn_implementation=config.attn_implementation, **kwargs)
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != vocab_size:
            raise ConfigError(f"{path}: the LLM has {rows} embedding rows, the tokenizer's text vocabulary "
                              f"has {vocab_size}")
        return model
    if config.llm_config is None:
        raise ConfigError(f"model config {config.name!r}: set llm_path or llm_config")
    args = dict(config.llm_config)
    args.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_config = LlamaConfig(**args)
    llama_config._attn_implementation = config.attn_implementation
    model = LlamaForCausalLM(llama_config)
    return model if dtype is None else model.to(dtype)


def lora_config(config: Reg2RGConfig):
    """PEFT ``LoraConfig`` as published (CAUSAL_LM, r 8, alpha 32, dropout 0.1, default targets)."""
    from peft import LoraConfig, TaskType

    s = config.lora
    return LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=s.r, lora_alpha=s.alpha,
                      lora_dropout=s.dropout, target_modules=s.target_modules)


def build_language_model(config: Reg2RGConfig, vocab_size: int, dtype: torch.dtype | None = None,
                         llm_path: str | os.PathLike | None = None):
    """The LLM as Reg2RG trains it: LoRA-wrapped (``train_llm="lora"``), fully trainable (``"full"``)
    or frozen; gradient checkpointing with input-embedding gradients when configured."""
    model = build_llama(config, vocab_size, dtype, llm_path)
    if config.train_llm == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(config))
    elif config.train_llm == "frozen":
        model.requires_grad_(False)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        # The LLM receives inputs_embeds, so the checkpointed blocks need inputs that require grad.
        model.enable_input_require_grads()
    return model


def base_llama(lang_model):
    """The underlying ``LlamaForCausalLM`` (through a PEFT wrapper if there is one)."""
    return lang_model.get_base_model() if hasattr(lang_model, "get_base_model") else lang_model
