"""GPU generation benchmark at the published dimensions with random bf16 weights.

Builds Reg2RG at the published sizes (LLaMA-2-7B shape: hidden 4096, 32 layers, vocab 32000; RadFM ViT;
perceiver) with random weights in bfloat16 — no checkpoint needed — and a synthetic study with 10
regions. Measures, for our engine and for the published procedure (sequential encoding, one-hot
embedding, HF ``generate(inputs_embeds=…)``) in the same run:

* time to first token (pre-processing excluded, it is the same for both),
* decode ms/token, and that figure against the memory-bandwidth bound: every decode step reads all
  LLM weights once, so ms/token >= weight bytes / copy bandwidth (measured here with a device copy).

Exits with a message (status 0) when no CUDA device is present.

    .venv/bin/python bench/gpu.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_generation import reference_embeds, stack_inputs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reg2RG generation on a GPU at the published dimensions (random bf16 weights)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per run (eos is disabled)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--layers", type=int, default=32, help="LLM layers (32 = LLaMA-2-7B)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("bf16", "reference"),
                   help="bf16 everywhere, or the published run's split: LLM fp16, vision path fp32")
    return p.parse_args(argv)


def copy_bandwidth(device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s measured by a large device-to-device copy (read + write)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * a.element_size() * repeats / (time.perf_counter() - t)


def build(layers: int, device, precision: str = "bf16"):
    from reg2rg.engine.generation import ReportEngine
    from reg2rg.engine.model.config import Reg2RGConfig
    from reg2rg.engine.model.reg2rg import Reg2RG
    from reg2rg.engine.presets import resolve_precision
    from reg2rg.engine.tokens import PROMPT_INSTRUCTION, train_tokenizer

    config = Reg2RGConfig.preset("reg2rg-7b")
    config.llm_config = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5)
    config.gradient_checkpointing = False
    # a LLaMA-sized text vocabulary: the one-hot product of the reference scales with it
    tok = train_tokenizer([PROMPT_INSTRUCTION] * 4 + [f"w{i} x{i * 13} y{i * 31}" for i in range(40000)], 32000)
    torch.manual_seed(0)
    with torch.device(device):
        p = resolve_precision(precision, device)
        model = Reg2RG.from_config(config, tok, dtype=p.llm_dtype).set_precision(p.llm_dtype, p.vision_dtype)
    return ReportEngine(model.to(device).eval(), tok)


def timed(fn, device):
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a machine with a GPU (nothing measured).")
        return 0
    from reg2rg.engine.generation import Decoder, GenerationSettings
    from reg2rg.engine.phantom import make_study

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    engine = build(args.layers, device, args.precision)
    engine.eos_token_id = -1
    study = make_study(0, [])
    keep = study.regions_present[: args.regions]
    study.masks = {r: m for r, m in study.masks.items() if r in keep}
    lm = engine.model.lang_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    weight_bytes = sum(p.numel() * p.element_size() for p in base.model.layers.parameters())
    weight_bytes += base.lm_head.weight.numel() * base.lm_head.weight.element_size()
    bound_ms = weight_bytes / bandwidth * 1e3

    def ours():
        prepared = engine.prepare(study)
        dec = iter(Decoder(lm, lm.get_input_embeddings(), prepared.prompt_embeds,
                           GenerationSettings(max_new_tokens=args.tokens), -1))
        next(dec)
        torch.cuda.synchronize(device)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in dec)
        torch.cuda.synchronize(device)
        return prepared, first, time.perf_counter() - first, n

    def reference(prepared):
        tensors = stack_inputs(prepared.inputs, prepared.slot_regions, device, engine.dtype)
        t = time.perf_counter()
        with torch.no_grad():
            embeds = reference_embeds(engine.model, prepared.prompt_ids, *tensors)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=1, top_k=30, pad_token_id=0)
            torch.cuda.synchronize(device)
            ttft = time.perf_counter() - t
            t2 = time.perf_counter()
            lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=args.tokens, top_k=30,
                        eos_token_id=-1, pad_token_id=0)
            torch.cuda.synchronize(device)
            full = time.perf_counter() - t2
        # decode per token: the full run minus its own prefill (= the 1-token run's generate part)
        return ttft, full

    rows = {"ours_ttft": [], "ours_ms": [], "ref_ttft": [], "ref_ms": []}
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        prepared, first, decode_s, n = ours()
        ours_ttft = first - t0
        ref_ttft, ref_full = reference(prepared)
        if i == 0:
            continue
        rows["ours_ttft"].append(ours_ttft)
        rows["ours_ms"].append(decode_s / max(n - 1, 1) * 1e3)
        rows["ref_ttft"].append(ref_ttft)
        # prefill of the full run is about the 1-token run minus the embedding; take it off
        rows["ref_ms"].append(max(ref_full - ref_ttft, 0) / max(args.tokens - 1, 1) * 1e3)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, LLM weights "
          f"{weight_bytes / 2**30:.2f} GiB -> bound {bound_ms:.2f} ms/token; prompt {len(prepared.prompt_ids)} tokens, "
          f"{len(prepared.slot_regions)} regions, {args.tokens} new tokens, {args.repeats} repeats")
    print(f"ours      : first token {med['ours_ttft'] * 1e3:.0f} ms, decode {med['ours_ms']:.2f} ms/token "
          f"({med['ours_ms'] / bound_ms:.2f}x the bound)")
    print(f"reference : first token {med['ref_ttft'] * 1e3:.0f} ms, decode {med['ref_ms']:.2f} ms/token "
          f"({med['ref_ms'] / bound_ms:.2f}x the bound)")
    print(f"ratio reference/ours: first token {med['ref_ttft'] / med['ours_ttft']:.2f}x, "
          f"decode {med['ref_ms'] / med['ours_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
