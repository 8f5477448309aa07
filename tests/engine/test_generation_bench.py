"""The benchmark scripts import, parse their arguments, and bench/gpu.py exits cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_bench_parses_args_and_exits_cleanly_without_cuda(capsys):
    gpu = _load("gpu")
    args = gpu.parse_args(["--tokens", "16", "--repeats", "1", "--layers", "2"])
    assert (args.tokens, args.repeats, args.layers) == (16, 1, 2)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    assert gpu.main(["--tokens", "4"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_reference_procedure_equals_the_engine_prompt(tmp_path):
    """The benchmark's published procedure (sequential encoding, one-hot product) embeds the same prompt."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_fixtures import box_study, tiny_engine

    ref = _load("reference_generation")
    engine = tiny_engine()
    prepared = engine.prepare(box_study())
    tensors = ref.stack_inputs(prepared.inputs, prepared.slot_regions, engine.device, engine.dtype)
    embeds = ref.reference_embeds(engine.model, prepared.prompt_ids, *tensors)
    torch.testing.assert_close(embeds, prepared.prompt_embeds, rtol=1e-4, atol=1e-5)
