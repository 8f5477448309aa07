"""reg2rg-train's config: presets, --key value overrides, validation, the resolved file, DeepSpeed JSON."""

from __future__ import annotations

import json

import pytest
import yaml

from reg2rg.train.config import (TrainConfigError, deepspeed_config_dict, load_train_config, parse_overrides,
                                 preset_path, read_config_file)


def test_published_preset_holds_the_published_recipe():
    cfg = load_train_config("radgenome-7b")
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.lr, t.weight_decay) == (1, 8, 5e-5, 0.0)
    assert (t.scheduler, t.warmup_steps, t.epochs, t.seed) == ("constant_with_warmup", 20, 10, 42)
    assert cfg.model.train_vit is False and cfg.model.preset == "reg2rg-7b"
    assert cfg.distributed.backend == "deepspeed" and cfg.distributed.deepspeed_config == "zero2"
    assert cfg.output.save_every_epoch and cfg.output.keep_last == 3


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_train_config("demo", ["--train.lr", "3e-4", "--train.epochs=7", "--data.use_cache", "false",
                                     "--model.overrides.train_llm", "lora", "--output.dir", str(tmp_path)])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.data.use_cache is False
    assert cfg.model.overrides == {"train_llm": "lora"}
    assert cfg.output.dir == str(tmp_path)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads "5e-5" as a string; the config must still see a float.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-5\n  warmup_steps: '3'\n")
    cfg = load_train_config(str(path))
    assert cfg.train.lr == pytest.approx(5e-5) and cfg.train.warmup_steps == 3


def test_unknown_key_names_the_section():
    with pytest.raises(TrainConfigError, match=r"section 'train'.*unknown keys \['lrr'\]"):
        load_train_config("demo", ["--train.lrr", "1"])
    with pytest.raises(TrainConfigError, match="no value"):
        parse_overrides(["--train.lr"])


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(TrainConfigError, match="bad.yaml: cannot parse"):
        load_train_config(str(bad))
    with pytest.raises(TrainConfigError, match="no packaged config named 'nope'"):
        load_train_config("nope")


def test_validate_requires_data(tmp_path):
    cfg = load_train_config("demo")
    with pytest.raises(TrainConfigError, match="data.root is not set"):
        cfg.validate()


@pytest.mark.parametrize("floor", ["high", 1.5, -0.1, True])
def test_a_detector_precision_floor_outside_0_1_is_one_clear_error(floor):
    cfg = load_train_config("demo", ["--data.root", "/x", "--data.reports", "/x.csv"])
    cfg.model.detector_min_precision = floor
    with pytest.raises(TrainConfigError, match="model.detector_min_precision must be a number within 0..1"):
        cfg.validate()
    cfg.model.detector_min_precision = 0.8
    cfg.validate()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_train_config("demo", ["--train.lr", "0.002", "--data.root", "/x", "--data.reports", "/x.csv"])
    path = cfg.save(tmp_path)
    again = load_train_config(path)
    assert again.to_dict() | {"source": ""} == cfg.to_dict() | {"source": ""}
    assert yaml.safe_load(open(path))["train"]["lr"] == 0.002


def test_zero2_is_the_published_file_and_autos_are_filled():
    published = read_config_file(preset_path("zero2"))
    z = published["zero_optimization"]
    assert z["stage"] == 2 and z["allgather_bucket_size"] == 1e9 and z["reduce_bucket_size"] == 1e9
    assert z["overlap_comm"] and z["contiguous_gradients"] and "offload_optimizer" not in z
    cfg = load_train_config("radgenome-7b")
    ds = deepspeed_config_dict(cfg, world_size=2, use_bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 16           # 2 GPUs x 1 x 8, as published
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    cpu = deepspeed_config_dict(cfg, world_size=2, use_bf16=False)
    assert cpu["bf16"]["enabled"] is False        # fp32 on CPU
    z3 = deepspeed_config_dict(load_train_config("radgenome-7b", ["--distributed.deepspeed_config", "zero3"]), 4, True)
    assert z3["zero_optimization"]["stage"] == 3 and z3["train_batch_size"] == 32
    assert json.dumps(z3)                          # plain JSON for deepspeed.initialize


def test_finding_head_and_projector_get_their_own_learning_rates_when_asked():
    import torch

    from reg2rg.train.trainer import build_optimizer

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(4, 4)
            self.embedding_layer = torch.nn.Module()
            self.embedding_layer.finding_head = torch.nn.Linear(4, 2)

    model = Model()
    model.embedding_layer.fc = torch.nn.Linear(4, 4)
    model.embedding_layer.perceiver = torch.nn.Linear(4, 4)
    head = {id(p) for p in model.embedding_layer.finding_head.parameters()}
    projector = {id(p) for m in (model.embedding_layer.fc, model.embedding_layer.perceiver) for p in m.parameters()}
    plain = build_optimizer(model, load_train_config("demo", {"train.lr": 1e-4}))
    assert [g["lr"] for g in plain.param_groups] == [1e-4]
    split = build_optimizer(model, load_train_config("demo", {"train.lr": 1e-4, "train.finding_head_lr": 1e-2}))
    assert [g["lr"] for g in split.param_groups] == [1e-4, 1e-2]
    assert {id(p) for p in split.param_groups[1]["params"]} == head
    assert not head & {id(p) for p in split.param_groups[0]["params"]}
    both = build_optimizer(model, load_train_config("demo", {"train.lr": 1e-4, "train.finding_head_lr": 1e-2,
                                                              "train.projector_lr": 1e-3}))
    assert len(both.param_groups) == 3                   # the projector's parts share one group
    lrs = {g["lr"]: {id(p) for p in g["params"]} for g in both.param_groups}
    assert lrs[1e-2] == head and lrs[1e-3] == projector
    assert lrs[1e-4] == {id(p) for p in model.encoder.parameters()}
