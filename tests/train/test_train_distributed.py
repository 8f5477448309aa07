"""torchrun --nproc_per_node 2 + DeepSpeed ZeRO-2 on CPU (gloo): a few steps on phantoms, checkpoint,
resume, and the exported model loads in the engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phantom_dataset import read_report_texts, write_phantom_dataset
from reg2rg.engine.tokens import train_tokenizer
from reg2rg.train.trainer import LOG_FILE, list_checkpoints

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(root: Path, csv_path: Path, out: Path, steps: int, resume: bool = False) -> subprocess.CompletedProcess:
    args = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "reg2rg.train.cli", "--config", "demo",
            "--distributed.backend", "deepspeed", "--distributed.deepspeed_config", "zero2",
            "--model.preset", "tiny", "--tokenizer", str(root / "tok"),
            "--data.root", str(root / "data"), "--data.reports", str(csv_path), "--data.num_workers", "0",
            "--data.cache_dir", str(root / "cache"), "--output.dir", str(out),
            "--train.max_steps", str(steps), "--train.micro_batch_size", "1", "--train.grad_accum", "2",
            "--train.lr", "1e-3", "--train.warmup_steps", "1", "--train.threads", "1",
            "--output.save_steps", "1", "--output.log_steps", "1", "--output.keep_last", "2",
            "--output.tensorboard", "true"]
    if resume:
        args.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.slow
def test_torchrun_deepspeed_zero2_on_cpu_trains_checkpoints_resumes_and_exports(tmp_path):
    from reg2rg.engine.checkpoint import load_pretrained

    root = tmp_path
    # 5 studies over 2 ranks: 2 each (the fifth is dropped so ranks stay in step), 1 step per epoch
    csv_path, _ = write_phantom_dataset(root / "data", [21, 22, 23, 24, 25], mask_root=root / "data" / "masks")
    train_tokenizer(read_report_texts(csv_path) + ["The region 0 is lung: global information"], 400, root / "tok")
    out = root / "run"
    first = _torchrun(root, csv_path, out, steps=2)
    assert first.returncode == 0, first.stderr[-4000:]
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in log)
    assert log[0]["lr"] > 0
    # ZeRO-2 checkpoint: partitioned optimizer states of both ranks, RNG of both ranks
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == "checkpoint-0000002"
    assert len(list(ckpt.glob("deepspeed/*optim_states.pt"))) == 2
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert list((out / "tensorboard").glob("events.*"))

    # resume for one more step: continues at step 3 from the newest checkpoint
    second = _torchrun(root, csv_path, out, steps=3, resume=True)
    assert second.returncode == 0, second.stderr[-4000:]
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "resumed from" in second.stderr and "checkpoint-0000002" in second.stderr

    model, tokenizer = load_pretrained(out / "final")
    assert model.config.name == "tiny" and model.special.vocab_size == len(tokenizer) - model.config.num_visual_tokens
    assert all(torch.isfinite(p).all() for p in model.parameters())
