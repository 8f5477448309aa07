"""The model's training orientation is named and enforced (issue 17, defect 2).

Before: configs had ``orientation: null``, so an RAS copy of an LPS study reached the model mirrored
(``preprocess(LPS) == preprocess(RAS)[::-1, ::-1]``) and drafted differently, with no message.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from reg2rg.engine.checkpoint import save_pretrained
from reg2rg.engine.cli import main
from reg2rg.engine.generation import GenerationSettings, ReportEngine
from reg2rg.engine.model.config import PUBLISHED_ORIENTATION, ConfigError, Reg2RGConfig, is_axis_code
from reg2rg.engine.phantom import demo_study
from reg2rg.engine.study import Study
from reg2rg.engine.studyio import read_study

from generation_fixtures import box_study, tiny_engine

SETTINGS = GenerationSettings(max_new_tokens=8)


def as_ras(study: Study) -> Study:
    """The same scan stored in RAS voxel order (what a RAS-reorienting converter writes)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(study.voxels, study.affine))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(study.affine), nib.orientations.axcodes2ornt("RAS"))
    masks = {r: nib.orientations.apply_orientation(m, ornt).astype(bool) for r, m in study.masks.items()}
    return Study(voxels=np.asarray(img.dataobj), affine=img.affine, masks=masks, name=study.name, source="ras copy")


@pytest.fixture(scope="module")
def lps_engine():
    torch.set_num_threads(1)
    engine = tiny_engine()
    engine.config.orientation = "LPS"            # as if trained on LPS volumes
    return engine


def lps_study() -> Study:
    """A box study stored LPS (axes 0 and 1 flipped against RAS, world positions unchanged)."""
    ras = box_study()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = ras.shape[0] - 1, ras.shape[1] - 1
    return Study(voxels=ras.voxels[::-1, ::-1].copy(), affine=ras.affine @ flip,
                 masks={r: m[::-1, ::-1].copy() for r, m in ras.masks.items()}, name="lps", source="lps")


def test_an_ras_copy_of_an_lps_study_reaches_the_model_as_the_same_volume(lps_engine):
    lps = lps_study()
    ras = as_ras(lps)
    assert lps.orientation == "LPS" and ras.orientation == "RAS"
    a = lps_engine.prepare(lps, ["heart", "lung"])
    b = lps_engine.prepare(ras, ["heart", "lung"])
    torch.testing.assert_close(a.inputs.image, b.inputs.image)
    for region in ("heart", "lung"):
        torch.testing.assert_close(a.inputs.regions[region], b.inputs.regions[region])
    one, two = lps_engine.draft(lps, ["heart", "lung"], SETTINGS), lps_engine.draft(ras, ["heart", "lung"], SETTINGS)
    assert one.text == two.text
    assert one.to_dict()["input"]["orientation"] == {"model": "LPS", "study": "LPS", "study_orientation_known": True,
                                                     "reoriented": False}
    assert two.to_dict()["input"]["orientation"]["reoriented"] is True
    assert two.to_dict()["input"]["orientation"]["study"] == "RAS"


def test_attention_maps_land_on_the_stored_grid_after_reorientation(lps_engine):
    ras = as_ras(lps_study())
    result = lps_engine.draft(ras, ["heart"], SETTINGS)
    heat = lps_engine.attention_map(result, list(range(len(result.tokens)))).heatmap
    assert heat.shape == ras.shape                                # the CT as stored, not the model's order


def test_every_config_names_its_orientation():
    for name in ("reg2rg-7b", "tiny", "demo"):
        assert is_axis_code(Reg2RGConfig.preset(name).orientation)
    assert Reg2RGConfig.preset("demo").orientation == demo_study().orientation == "LPS"
    assert Reg2RGConfig.preset("reg2rg-7b").orientation == PUBLISHED_ORIENTATION
    shipped = json.loads((Path(__file__).resolve().parents[2] / "resources" / "demo_model" / "config.json").read_text())
    assert shipped["orientation"] == "LPS"
    for bad in (None, "LPX", "LLS", "lp", 3):
        config = Reg2RGConfig.preset("tiny")
        config.orientation = bad
        with pytest.raises(ConfigError, match="orientation"):
            config.validate()


def test_a_model_folder_without_orientation_is_one_clear_line(tmp_path, capsys):
    engine = tiny_engine()
    folder = save_pretrained(engine.model, engine.tokenizer, tmp_path / "model")
    data = json.loads((Path(folder) / "config.json").read_text())
    data["orientation"] = None                           # an old model folder
    (Path(folder) / "config.json").write_text(json.dumps(data))
    assert main(["--demo", "--model", folder, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "orientation" in err[0] and "LPS" in err[0] and "Traceback" not in err[0]


def test_a_volume_without_orientation_in_its_header_is_used_as_stored_with_a_warning(lps_engine, tmp_path):
    study = lps_study()
    img = nib.Nifti1Image(study.voxels, study.affine)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "noorient.nii.gz"))
    with pytest.warns(UserWarning, match="qform and sform"):
        bare = read_study(tmp_path / "noorient.nii.gz")
    bare.masks = study.masks                             # the same voxel grid
    assert bare.metadata["orientation_known"] is False
    result = lps_engine.draft(bare, ["heart"], SETTINGS)
    facts = result.to_dict()["input"]
    assert facts["orientation"]["study_orientation_known"] is False and facts["orientation"]["reoriented"] is False
    assert any("qform and sform" in w for w in facts["warnings"])


def test_the_demo_model_sees_the_phantom_and_its_ras_copy_alike():
    """The shipped demo model with the shipped demo study: the defect as a user met it."""
    torch.set_num_threads(1)
    engine = ReportEngine.load()
    phantom = demo_study()
    copy = as_ras(phantom)
    assert phantom.orientation == "LPS" and copy.orientation == "RAS"
    a, b = engine.prepare(phantom, ["heart", "lung"]), engine.prepare(copy, ["heart", "lung"])
    torch.testing.assert_close(a.inputs.image, b.inputs.image)
    torch.testing.assert_close(a.inputs.regions["lung"], b.inputs.regions["lung"])
