"""CPU generation benchmark at small dimensions: our engine vs the published procedure, same weights.

Ours: batched encoding of all volumes, gather embedding, own KV-cache decode loop with per-token
confidence (streaming). Reference: sequential encoding, one-hot embedding, HF ``generate(inputs_embeds=…)``
with default settings. Both start from the same pre-processed study (pre-processing is timed once and
added to both). Prints tokens/s of both and the end-to-end ratio.

    .venv/bin/python bench/generate.py [--preset demo] [--tokens 200] [--regions 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_generation import reference_generate, stack_inputs  # noqa: E402


def build(preset: str, vocab: int):
    from reg2rg.engine.generation import ReportEngine
    from reg2rg.engine.model.config import Reg2RGConfig
    from reg2rg.engine.model.reg2rg import Reg2RG
    from reg2rg.engine.regions import REGIONS
    from reg2rg.engine.tokens import PROMPT_INSTRUCTION, train_tokenizer

    torch.manual_seed(0)
    words = [f"The region {i} is {r}: no {r} abnormality, normal size and shape." for i, r in enumerate(REGIONS)]
    tok = train_tokenizer(words * 5 + [PROMPT_INSTRUCTION] + [f"w{i}x{i * 7}" for i in range(3000)], vocab)
    model = Reg2RG.from_config(Reg2RGConfig.preset(preset), tok).eval()
    return ReportEngine(model, tok)


def study_with_all_regions(input_size, n_regions: int):
    from reg2rg.engine.phantom import make_study

    study = make_study(0, [])
    keep = study.regions_present[:n_regions]
    study.masks = {r: m for r, m in study.masks.items() if r in keep}
    return study


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--regions", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from reg2rg.engine.generation import GenerationSettings
    from reg2rg.engine.preprocess import preprocess

    engine = build(args.preset, args.vocab)
    # eos is never emitted by a random model in practice; make sure both run the full length
    engine.eos_token_id = -1
    study = study_with_all_regions(engine.config.input_size, args.regions)
    t = time.perf_counter()
    preprocess(study, engine.config.input_size, engine.config.orientation, study.regions_present)
    pre_s = time.perf_counter() - t
    settings = GenerationSettings(max_new_tokens=args.tokens)

    ours_s, ref_s, ttft = [], [], []
    ours_ids = ref_ids = None
    for i in range(args.repeats + 1):            # the first round warms both up and is not counted
        t = time.perf_counter()
        first = None
        for ev in engine.generate(study, settings=settings):
            if first is None and type(ev).__name__ == "TokenEvent":
                first = time.perf_counter() - t
            if type(ev).__name__ == "Finished":
                result = ev.result
        ours_s.append(time.perf_counter() - t)
        ttft.append(first)
        if i == 0:
            ours_s.clear()
            ttft.clear()
        ours_ids = result.token_ids

        t = time.perf_counter()
        prepared = preprocess(study, engine.config.input_size, engine.config.orientation, study.regions_present)
        tensors = stack_inputs(prepared, result.slot_regions, engine.device, engine.dtype)
        ref_ids = reference_generate(engine.model, result.prompt_ids, *tensors, args.tokens, eos_token_id=-1)
        ref_s.append(time.perf_counter() - t)
        if i == 0:
            ref_s.clear()

    o, r = statistics.median(ours_s), statistics.median(ref_s)
    cfg = engine.config
    hidden = engine.model.lang_model.get_input_embeddings().weight.shape[1]
    print(f"preset={args.preset} input={cfg.input_size} hidden={hidden} vocab={cfg.vocab_size} "
          f"regions={len(result.slot_regions)} prompt={len(result.prompt_ids)} tokens={args.tokens} "
          f"threads={args.threads} repeats={args.repeats} (pre-processing {pre_s:.2f}s, in both)")
    print(f"ours      : {o:.3f} s end-to-end, {len(ours_ids) / o:.1f} tokens/s, first token {statistics.median(ttft):.3f} s")
    print(f"reference : {r:.3f} s end-to-end, {len(ref_ids) / r:.1f} tokens/s")
    print(f"ratio reference/ours = {r / o:.2f}x   identical tokens: {ours_ids == ref_ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
