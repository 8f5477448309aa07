"""reg2rg-train end to end on phantom studies (one process): learning, bad samples, kill + resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from phantom_dataset import add_bad_samples, read_report_texts, write_phantom_dataset
from reg2rg.engine.tokens import train_tokenizer
from reg2rg.train.config import load_train_config
from reg2rg.train.trainer import LOG_FILE, Trainer, list_checkpoints, verify_checkpoint

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    csv_path, names = write_phantom_dataset(root / "data", [1, 2, 3], mask_root=root / "data" / "masks")
    train_tokenizer(read_report_texts(csv_path) + ["The region 0 is lung: global information"], 400, root / "tok")
    return root, csv_path, names


def _overrides(root: Path, csv_path: Path, out: Path, **extra) -> dict:
    values = {
        "model.preset": "tiny", "model.overrides.train_llm": "full", "model.train_vit": True,
        "tokenizer": str(root / "tok"), "data.root": str(root / "data"), "data.reports": str(csv_path),
        "data.num_workers": 0, "data.cache_dir": str(root / "cache"), "output.dir": str(out),
        "train.epochs": 1000, "train.micro_batch_size": 3, "train.lr": 3e-3, "train.warmup_steps": 3,
        "train.weight_decay": 0.0, "train.scheduler": "constant_with_warmup", "train.threads": 2,
        "output.log_steps": 1, "output.save_steps": None, "output.save_every_epoch": False,
        "output.tensorboard": False,
    }
    values.update(extra)
    return values


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_tiny_model_overfits_a_few_phantoms_and_exports_for_the_engine(phantoms, tmp_path):
    from reg2rg.engine.checkpoint import load_pretrained

    root, csv_path, _ = phantoms
    out = tmp_path / "run"
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, out, **{"train.max_steps": 24})))
    trainer.setup()
    final = trainer.train()
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(losses) == 24
    assert losses[-1] <= 0.5 * losses[0], losses            # the loss falls by at least half
    assert (out / "train_config.yaml").is_file()             # the resolved config is kept with the run
    model, tokenizer = load_pretrained(final)                # the engine's own format
    trained = dict(trainer.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name].detach()), name


def test_bad_samples_are_skipped_and_reported(phantoms, tmp_path):
    root, csv_path, names = phantoms
    data = tmp_path / "data"
    import shutil

    shutil.copytree(root / "data", data)
    bad = add_bad_samples(data, data / "reports.csv", data / "masks", names[0])
    cmd = _train_cmd(root, data / "reports.csv", tmp_path / "run", **{
        "data.root": str(data), "data.cache_dir": str(tmp_path / "cache"), "train.max_steps": 2,
        "train.micro_batch_size": 1})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, reason in bad.items():
        lines = [l for l in proc.stderr.splitlines() if f"skipped {name}: {reason}" in l]
        assert len(lines) == 1, (name, proc.stderr[-3000:])  # one line per bad sample
    assert "5 samples skipped (1 empty masks, 1 no masks, 1 no report, 1 no volume, 1 unreadable)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def _train_cmd(root, csv_path, out, **extra):
    args = [str(BIN / "reg2rg-train"), "--config", "demo", "--resume"]
    for key, value in _overrides(root, csv_path, out, **extra).items():
        args += [f"--{key}", "null" if value is None else str(value)]
    return args


@pytest.mark.slow
def test_kill_and_resume_continues_at_the_right_step_with_the_same_data(phantoms, tmp_path):
    root, csv_path, _ = phantoms
    # micro-batch 1 over 3 studies: the data order and the region shuffles differ every epoch
    common = {"train.max_steps": 6, "train.micro_batch_size": 1, "output.save_steps": 2, "output.keep_last": 2,
              "model.overrides.train_llm": "full"}
    env = dict(os.environ, OMP_NUM_THREADS="2")
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(root, csv_path, straight, **common), check=True, capture_output=True, timeout=300, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(root, csv_path, killed, **common), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.endswith("0000002") for p in list_checkpoints(killed)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)                       # a kill mid-step, no clean-up
    proc.wait()
    done_before = len(_log(killed))
    assert list_checkpoints(killed), "no checkpoint was written before the kill"
    newest = list_checkpoints(killed)[-1]
    resumed_from = int(newest.name.split("-")[1])
    assert done_before < 6 and 2 <= resumed_from <= done_before

    subprocess.run(_train_cmd(root, csv_path, killed, **common), check=True, capture_output=True, timeout=300, env=env)
    log = _log(killed)
    steps = [r["step"] for r in log]
    # the log was cut back to the checkpoint, the steps after it repeated once: every step logged once
    assert steps == list(range(1, 7))
    reference = {r["step"]: r for r in _log(straight)}
    assert len({r["batch_digest"] for r in reference.values()}) == 6     # every step saw other data
    for record in log[resumed_from:]:
        ref = reference[record["step"]]
        # same studies in the same region order, same weights: the uninterrupted run's loss (up to
        # the float noise of multi-threaded CPU kernels)
        assert record["batch_digest"] == ref["batch_digest"], record["step"]
        assert record["loss"] == pytest.approx(ref["loss"], rel=1e-3), record["step"]
        assert record["lr"] == pytest.approx(ref["lr"])
    assert len(list_checkpoints(killed)) == 2               # keep_last


# Kill the run at the moment the epoch-end re-save of checkpoint-<step> is about to move its new folder
# into place (the checkpoint was already saved at that step by save_steps): os.replace is wrapped so that
# the second move of ".tmp-checkpoint-<step>" SIGKILLs the process instead.
KILL_DURING_RESAVE = """
import os, signal, sys
from pathlib import Path

target, moves, real_replace = ".tmp-checkpoint-" + sys.argv[1], [], os.replace

def replace(src, dst, *args, **kwargs):
    if Path(os.fspath(src)).name == target:
        moves.append(src)
        if len(moves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from reg2rg.train.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_and_a_damaged_checkpoint_still_resume(phantoms, tmp_path):
    """Issue 17, defect 4: (1) a kill while a checkpoint is re-saved loses neither it nor its older copy,
    and the resumed log has each step once; (2) a corrupt file in the newest checkpoint is found by its
    manifest: one message naming it, then the run resumes from the newest intact checkpoint and repeats
    the same steps with the same losses; (3) with no intact checkpoint left, one clear line and rc 2."""
    root, csv_path, _ = phantoms
    # 3 studies, micro-batch 1: 3 steps per epoch; saves at 2, 3 (epoch end), 4, 6 and 6 again (epoch end), 8
    common = {"train.max_steps": 8, "train.micro_batch_size": 1, "output.save_steps": 2, "output.keep_last": 3,
              "output.save_every_epoch": True, "model.overrides.train_llm": "full"}
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = tmp_path / "run"
    script = tmp_path / "kill_during_resave.py"
    script.write_text(KILL_DURING_RESAVE)
    cmd = _train_cmd(root, csv_path, out, **common)
    killed = subprocess.run([sys.executable, str(script), "0000006", *cmd[1:]], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in _log(out)] == list(range(1, 7))          # killed after step 6 was logged
    # the checkpoint being re-saved is still on disk, complete (moved aside or in place), never removed first
    ckpts = out / "checkpoints"
    assert (ckpts / "checkpoint-0000006").is_dir() or (ckpts / ".replaced-checkpoint-0000006").is_dir()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 9))                # every step once, none repeated
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000004", "checkpoint-0000006",
                                                       "checkpoint-0000008"]
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]     # no leftovers
    for path in list_checkpoints(out):
        assert (path / "manifest.json").is_file() and verify_checkpoint(path) is None

    # damage the newest checkpoint (same size, one byte in the middle of the weights)
    weights = ckpts / "checkpoint-0000008" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = {r["step"]: r for r in log}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint-0000008: trainable.safetensors: its content differs from the manifest (damaged)" in again.stderr
    assert "falling back to" in again.stderr and "checkpoint-0000006, the newest intact checkpoint" in again.stderr
    assert "Traceback" not in again.stderr
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    for step in (7, 8):                                 # the same data and weights as before the damage
        assert log[step - 1]["batch_digest"] == before[step]["batch_digest"]
        assert log[step - 1]["loss"] == pytest.approx(before[step]["loss"], rel=1e-3)
    assert verify_checkpoint(ckpts / "checkpoint-0000008") is None      # written anew

    # every checkpoint damaged: one clear line, rc 2, nothing started from scratch
    for path in list_checkpoints(out):
        (path / "optimizer.pt").write_bytes(b"broken")
    broken = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert broken.returncode == 2 and "no intact checkpoint to resume from" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(phantoms, tmp_path):
    root, csv_path, _ = phantoms
    out = tmp_path / "run"
    cmd = _train_cmd(root, csv_path, out, **{"train.max_steps": 6, "train.lr": 1e30, "train.warmup_steps": 0,
                                             "train.max_grad_norm": None, "output.save_steps": 1,
                                             "train.micro_batch_size": 1})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "reg2rg-train: stopped: loss is" in proc.stderr and "Last good checkpoint:" in proc.stderr
    assert "Traceback" not in proc.stderr
    kept = list_checkpoints(out)
    assert kept, "the last good checkpoint must be kept"
    step = int(kept[-1].name.split("-")[1])
    assert f"checkpoint-{step:07d}" in proc.stderr
    assert not (out / "final").exists()


def test_export_writes_a_checkpoint_the_engine_loads(phantoms, tmp_path):
    from safetensors.torch import load_file

    from reg2rg.engine.checkpoint import load_pretrained

    root, csv_path, _ = phantoms
    out = tmp_path / "run"
    cmd = _train_cmd(root, csv_path, out, **{"train.max_steps": 2, "output.save_steps": 1})
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    first = list_checkpoints(out)[0]
    assert first.name == "checkpoint-0000001"
    proc = subprocess.run([str(BIN / "reg2rg-train"), "export", str(out), str(tmp_path / "exported"),
                           "--checkpoint", str(first)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = load_pretrained(tmp_path / "exported")
    saved = load_file(str(first / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert saved and all(torch.equal(params[name], value) for name, value in saved.items())
    final, _ = load_pretrained(out / "final")               # step 2 differs from step 1
    assert any(not torch.equal(p, params[n]) for n, p in final.named_parameters())


def _val_split(tmp_path: Path, name: str) -> Path:
    """A validation split CSV holding one volume."""
    val_csv = tmp_path / "val.csv"
    val_csv.write_text(f"Volumename\n{name}.nii.gz\n")
    return val_csv


def test_validation_each_epoch_with_reg2rg_eval_metrics(phantoms, tmp_path):
    root, csv_path, names = phantoms
    val_csv = _val_split(tmp_path, names[2])
    out = tmp_path / "run"
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, out, **{
        "data.val_split": str(val_csv), "train.epochs": 1, "train.micro_batch_size": 2,
        "train.validate_every_epoch": True, "train.val_metrics": True,
        "model.overrides.max_length": 600})))
    trainer.setup()
    assert [r.name for r in trainer.val_set.records] == [names[2]]
    assert names[2] not in {r.name for r in trainer.train_set.records}   # held out of training
    trainer.train()
    val = [r for r in _log(out) if "val_loss" in r]
    assert len(val) == 1 and val[0]["epoch"] == 0
    assert val[0]["val_loss"] > 0 and 0 <= val[0]["val_region_accuracy"] <= 1
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= val[0][f"val_{name}"] <= 10, name


FINDINGS = ["Lung nodule", "Pleural effusion", "Cardiomegaly"]


def test_finding_head_targets_come_from_each_regions_own_sentence(phantoms, tmp_path):
    import dataclasses

    from reg2rg.train.data import RegionReportDataset, collate_regions

    root, csv_path, _ = phantoms
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, tmp_path / "run", **{
        "model.overrides.finding_labels": FINDINGS, "model.overrides.finding_loss_weight": 1.0})))
    trainer.setup()
    record = trainer.train_set.records[0]
    reports = {region: "Normal appearance." for region in record.reports}
    reports.update(lung="A 12 mm nodule is seen in the right upper lobe. No pleural effusion.",
                   pleura="There is a small left pleural effusion.", heart="The heart size is normal.")
    record = dataclasses.replace(record, reports=reports)
    ds = RegionReportDataset([record] * 3, trainer.tokenizer, trainer.model.special, trainer.loader, 1024,
                             finding_labels=FINDINGS)
    expected = {"lung": [1, 0, 0], "pleura": [0, 1, 0]}
    for index in range(3):                       # regions are shuffled per draw: targets follow their slots
        sample = ds[index]
        for slot, region in enumerate(sample["regions"]):
            assert sample["finding_targets"][slot].tolist() == expected.get(region, [0, 0, 0]), region
        assert sample["global_finding_targets"].tolist() == [1, 1, 0]
    batch = collate_regions([ds[0], ds[1]])
    n = sum(len(r) for r in batch["regions"])
    assert batch["finding_targets"].shape == (n, 3) and batch["global_finding_targets"].shape == (2, 3)
    # the side pseudo-labels: the sides named by the region's abnormal sentences only
    sided = RegionReportDataset([record], trainer.tokenizer, trainer.model.special, trainer.loader, 1024,
                                finding_labels=FINDINGS + ["Left side", "Right side"])
    sample = sided[0]
    expected = {"lung": [1, 0, 0, 0, 1], "pleura": [0, 1, 0, 1, 0]}
    for slot, region in enumerate(sample["regions"]):
        assert sample["finding_targets"][slot].tolist() == expected.get(region, [0] * 5), region


@pytest.mark.slow
def test_finding_head_trains_with_the_report_and_is_exported(phantoms, tmp_path):
    from reg2rg.engine.checkpoint import load_pretrained

    root, csv_path, names = phantoms
    val_csv = _val_split(tmp_path, names[2])
    out = tmp_path / "run"
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, out, **{
        "model.overrides.finding_labels": FINDINGS, "model.overrides.finding_loss_weight": 2.0,
        "data.val_split": str(val_csv), "train.epochs": 12, "train.micro_batch_size": 2,
        "train.validate_every_epoch": True, "model.overrides.max_length": 600})))
    trainer.setup()
    final = trainer.train()
    steps = [r for r in _log(out) if "finding_loss" in r]
    assert len(steps) == 12
    for r in steps:                              # what is optimised: the LM loss + 2 x the head's BCE
        assert r["loss"] == pytest.approx(r["lm_loss"] + 2.0 * r["finding_loss"], rel=1e-4)
    assert steps[-1]["finding_loss"] < 0.5 * steps[0]["finding_loss"]   # the head learns
    val = [r for r in _log(out) if "val_loss" in r]
    assert len(val) == 12 and all(0.0 <= r["val_finding_f1"] <= 1.0 for r in val)
    model, _ = load_pretrained(final)
    assert model.config.finding_labels == tuple(FINDINGS)
    assert torch.equal(model.embedding_layer.finding_head.weight,
                       trainer.model.embedding_layer.finding_head.weight.detach())


@pytest.mark.slow
def test_projector_norm_fits_statistics_on_frozen_encoders_and_keeps_them_through_resume_and_export(phantoms, tmp_path):
    """model.overrides.projector_norm "region" (issue 12): the encoders run once per study, the statistics are the
    per-region mean / std of the training volumes' latents (computed again here from the encoders), the encoders
    stay frozen, and the statistics travel in every checkpoint, through a resume and into the exported model."""
    from safetensors.torch import load_file

    from reg2rg.engine.checkpoint import load_pretrained
    from reg2rg.engine.generation import GenerationSettings, ReportEngine
    from reg2rg.engine.regions import REGIONS
    from reg2rg.engine.studyio import read_study

    root, csv_path, names = phantoms
    out = tmp_path / "run"
    settings = {"model.overrides.projector_norm": "region", "model.train_vit": False, "train.max_steps": 4,
                "output.save_steps": 2, "train.micro_batch_size": 1}
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, out, **settings)))
    trainer.setup()
    layer = trainer.model.embedding_layer
    assert sorted(trainer.features) == sorted(names)
    # the statistics, independently: each study through the encoders, latents grouped by region
    by_row: dict[int, list[torch.Tensor]] = {}
    layer.eval()
    with torch.no_grad():
        for record in trainer.splits.train:
            t = trainer.loader(record)
            present = [r for r in REGIONS if r in t.regions]
            glob = layer.perceiver(layer.vision_encoder(t.image[None]))[0]
            by_row.setdefault(0, []).append(glob)
            for r in present:
                lat = layer.perceiver(layer.vision_encoder(t.regions[r][None]))[0]
                by_row.setdefault(1 + REGIONS.index(r), []).append(lat)
    layer.train()
    assert len(by_row) > 2
    for row, lats in by_row.items():
        stack = torch.stack(lats)
        if len(lats) >= 2:
            assert torch.allclose(layer.projector_mean[row], stack.mean(dim=0), atol=1e-4), row
            assert torch.allclose(layer.projector_std[row], stack.std(dim=0).clamp(min=float(stack.std(dim=0).mean()) * 1e-3),
                                  atol=1e-4), row
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if n.startswith(("vision_encoder", "perceiver", "mask_encoder"))}
    mean = layer.projector_mean.detach().clone()
    fc_before = layer.fc.weight.detach().clone()
    env = dict(os.environ, OMP_NUM_THREADS="2")
    # first two steps in a subprocess that is then resumed by another: the buffers come back from the checkpoint
    subprocess.run(_train_cmd(root, csv_path, out, **{**settings, "train.max_steps": 2}), check=True,
                   capture_output=True, timeout=300, env=env)
    saved = load_file(str(list_checkpoints(out)[-1] / "trainable.safetensors"))
    assert torch.equal(saved["embedding_layer.projector_mean"], mean)
    assert not any(k.startswith("embedding_layer.vision_encoder") for k in saved)      # frozen: not in it
    proc = subprocess.run(_train_cmd(root, csv_path, out, **settings), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in _log(out) if "loss" in r] == [1, 2, 3, 4]
    model, tok = load_pretrained(out / "final")
    emb = model.embedding_layer
    assert model.config.projector_norm == "region"
    assert torch.equal(emb.projector_mean, mean)
    for n, p in emb.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n                      # the encoders did not move
    assert not torch.equal(emb.fc.weight, fc_before)                 # the projection did
    # the engine drafts with it (region_ids passed through the whole path)
    volume = next((root / "data").rglob(f"{names[0]}.nii.gz"))
    study = read_study(volume, root / "data" / "masks" / f"seg_{names[0]}")
    result = ReportEngine(model, tok).draft(study, settings=GenerationSettings(max_new_tokens=12))
    assert result.tokens


@pytest.mark.slow
def test_finding_detector_is_fitted_on_frozen_encoders_and_travels_in_checkpoints_and_export(phantoms, tmp_path,
                                                                                            monkeypatch):
    """model.overrides.finding_head_input "latents" (issue 12): reg2rg-train encodes every study once, fits the
    per-region detector on the training studies (what it may call: finding_detector.json), keeps the encoders
    frozen, and the fitted detector is in every checkpoint and in the exported model the engine drafts with."""
    from safetensors.torch import load_file

    from reg2rg.engine.checkpoint import load_pretrained
    from reg2rg.engine.generation import GenerationSettings, ReportEngine
    from reg2rg.engine.studyio import read_study
    from reg2rg.train import features as features_module

    # three phantoms: let every label with a positive study be tried and enabled (the real bars need hundreds)
    monkeypatch.setattr(features_module, "DETECTOR_MIN_POSITIVES", 1)
    monkeypatch.setattr(features_module, "DETECTOR_MIN_F1", 0.0)
    root, csv_path, names = phantoms
    out = tmp_path / "run"
    labels = ["Lung nodule", "Pleural effusion", "Cardiomegaly", "Left side", "Right side"]
    settings = {"model.overrides.finding_labels": labels, "model.overrides.finding_head_input": "latents",
                "model.overrides.finding_conditioning": True, "model.overrides.finding_conditioning_tokens": "mask",
                "model.overrides.finding_teacher_forcing": 1.0, "model.train_vit": False, "train.max_steps": 2,
                "output.save_steps": 2, "train.micro_batch_size": 1}
    trainer = Trainer(load_train_config("demo", _overrides(root, csv_path, out, **settings)))
    trainer.setup()
    layer = trainer.model.embedding_layer
    assert sorted(trainer.features) == sorted(names)
    report = json.loads((out / "finding_detector.json").read_text())
    tried = {(row["region"], row["label"]) for row in report}
    assert tried and all(row["enabled"] for row in report)
    enabled = torch.isfinite(layer.finding_threshold)
    assert enabled.sum() == len(tried) and not enabled[0].any()
    # every enabled label has positives in its region's training sentences (the labeller's targets)
    from reg2rg.engine.regions import REGIONS
    from reg2rg.train.labeller import finding_sides, label_report
    for region, label in tried:
        sentences = [r.reports.get(region, "") for r in trainer.splits.train]
        found = [{**label_report(s), **finding_sides(s)}[label] for s in sentences]
        assert any(found), (region, label)
        assert enabled[1 + REGIONS.index(region), labels.index(label)]
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters()
              if n.startswith(("vision_encoder", "perceiver", "mask_encoder"))}
    assert not any(p.requires_grad for n, p in layer.named_parameters() if n in frozen)
    weight = layer.finding_latent_weight.detach().clone()
    trainer.train()
    saved = load_file(str(list_checkpoints(out)[-1] / "trainable.safetensors"))
    assert torch.equal(saved["embedding_layer.finding_latent_weight"], weight)
    assert "embedding_layer.finding_embedding" in saved                # the calls' embeddings train
    model, tok = load_pretrained(out / "final")
    emb = model.embedding_layer
    assert model.config.finding_head_input == "latents"
    assert torch.equal(emb.finding_latent_weight, weight)
    assert torch.equal(emb.finding_threshold, layer.finding_threshold.cpu())
    for n, p in emb.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    volume = next((root / "data").rglob(f"{names[0]}.nii.gz"))
    study = read_study(volume, root / "data" / "masks" / f"seg_{names[0]}")
    result = ReportEngine(model, tok).draft(study, settings=GenerationSettings(max_new_tokens=12))
    assert result.tokens and set(result.prepared.finding_probabilities) >= {"global"}

    # the densitometry switched on (model.finding_density, stage 4e of scripts/train_demo_model.sh): from the
    # exported model, the detector reads other features, so it is fitted again; train.max_steps 0 takes no step
    from reg2rg.engine.model.density import DENSITY_FEATURES
    refit_out = tmp_path / "refit"
    refit = Trainer(load_train_config("demo", _overrides(
        root, csv_path, refit_out, **{**settings, "model.init_from": str(out / "final"), "train.max_steps": 0,
                                      "model.overrides.finding_density": True, "output.save_steps": None})))
    refit.setup()
    assert refit.total_steps == 0
    rows = json.loads((refit_out / "finding_detector.json").read_text())
    assert rows and {row["features"] for row in rows} <= {"encoders", "densitometry", "both"}
    assert refit.model.embedding_layer.finding_latent_weight.shape[-1] == weight.shape[-1] + DENSITY_FEATURES
    refitted, _ = load_pretrained(refit.train())
    assert refitted.config.finding_density and refitted.embedding_layer.finding_detector_fitted
    before = dict(model.named_parameters())
    for n, p in refitted.named_parameters():                       # nothing trained: every weight is the start's
        assert torch.equal(p, before[n]), n
    result = ReportEngine(refitted, tok).draft(study, settings=GenerationSettings(max_new_tokens=12))
    assert result.tokens and result.prepared.finding_probabilities

    # from that fitted model, same inputs: carried over as it is (no fit, no finding_detector.json), unless
    # model.refit_detector asks for a fit on this run's studies (stage 4e on more phantoms)
    for refit_flag in (False, True):
        again_out = tmp_path / f"again_{refit_flag}"
        again = Trainer(load_train_config("demo", _overrides(
            root, csv_path, again_out, **{**settings, "model.init_from": str(refit_out / "final"), "train.max_steps": 0,
                                          "model.refit_detector": refit_flag, "output.save_steps": None})))
        again.setup()
        assert (again_out / "finding_detector.json").exists() == refit_flag
        assert again.model.embedding_layer.finding_detector_fitted
