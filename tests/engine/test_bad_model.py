"""Damaged model folders and a bad published tokenizer give one clear line (issue 17, defect 3).

Before: a truncated ``vision.safetensors`` or ``llm/model.safetensors`` (``load_pretrained`` bypassed the
guarded loader), a missing ``tokenizer.json``, a config with other dimensions, and a ``TokenizerError``
from ``--published`` all ended in a traceback.
"""

from __future__ import annotations

import json

import pytest
import torch

import bad_inputs
from reg2rg.engine.checkpoint import CheckpointError, save_pretrained
from reg2rg.engine.cli import main
from reg2rg.engine.generation import ReportEngine

from generation_fixtures import tiny_engine


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    torch.set_num_threads(1)
    engine = tiny_engine()
    engine.model.config.train_llm = "full"           # bundle the LLM (llm/model.safetensors) like the demo model
    return save_pretrained(engine.model, engine.tokenizer, tmp_path_factory.mktemp("good") / "model")


@pytest.mark.parametrize("case, file, words", [
    ("truncated_vision_weights", "vision.safetensors", "truncated or corrupt"),
    ("corrupt_llm_weights", "model.safetensors", "truncated or corrupt"),
    ("missing_tokenizer_json", "tokenizer", "no tokenizer.json"),
    ("config_with_wrong_dims", "vision.safetensors", "does not fit config.json"),
])
def test_a_damaged_model_folder_is_one_clear_line(good_model, tmp_path, capsys, case, file, words):
    from pathlib import Path

    folder = getattr(bad_inputs, case)(Path(good_model), tmp_path)
    with pytest.raises(CheckpointError) as err:
        ReportEngine.load(folder, device="cpu")
    assert words in str(err.value) and file in str(err.value) and str(folder) in str(err.value)
    assert main(["--demo", "--model", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("reg2rg-generate: ") and words in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "out" / "report.txt").exists()


def test_a_published_run_with_a_bad_tokenizer_is_one_clear_line(tmp_path, capsys):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (llama / "tokenizer.json").write_text("{ this is not a tokenizer")
    (tmp_path / "Reg2RG.safetensors").write_bytes(b"")
    assert main(["--demo", "--published", str(tmp_path / "Reg2RG.safetensors"), "--llm", str(llama),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "tokenizer cannot be read" in lines[0] and str(llama) in lines[0]
