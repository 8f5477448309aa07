"""Display geometry without a display: reorientation to RAS+, exact mapping back, outlines, region colours."""

import nibabel as nib
import numpy as np
import pytest

from reg2rg.app.display import build_display_volume, orientation_letters, outline_bits
from reg2rg.engine.regions import REGIONS
from reg2rg.engine.study import Study

from conftest import make_chest_study


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PIL", "ASR"])
def test_display_axes_point_right_anterior_superior(codes):
    """Whatever the stored orientation, display axis 0/1/2 grows towards R/A/S and maps back exactly."""
    rng = np.random.default_rng(0)
    vox = rng.integers(-1000, 1000, size=(7, 5, 4)).astype(np.int16)
    ornt = nib.orientations.axcodes2ornt(tuple(codes))           # stored axis -> RAS axis, sign
    affine = np.eye(4)
    for s_axis, (ras_axis, flip) in enumerate(ornt):
        affine[:3, s_axis] = 0
        affine[int(ras_axis), s_axis] = flip * (1.0 + s_axis)   # distinct spacing per stored axis
    study = Study(voxels=vox, affine=affine, masks={"heart": vox > 500})
    assert study.orientation == codes
    vol = build_display_volume(study)
    assert vol.ct.flags.f_contiguous and vol.labels.flags.f_contiguous
    for d_axis in range(3):
        a = [1, 1, 1]
        b = list(a)
        b[d_axis] += 1
        step = vol.world_mm(b) - vol.world_mm(a)
        assert step[d_axis] > 0 and np.count_nonzero(np.abs(step) > 1e-9) == 1  # only along R, A or S
        assert step[d_axis] == pytest.approx(vol.spacing[d_axis])
    for ijk in np.ndindex(vol.shape):
        stored = vol.to_stored(ijk)
        assert vol.from_stored(stored) == ijk
        assert vol.ct[ijk] == vox[stored]
        assert vol.regions_at(ijk) == (["heart"] if vox[stored] > 500 else [])


def test_region_centre_is_inside_a_curved_region():
    study = make_chest_study()
    vol = build_display_volume(study)
    for region in ("lung", "heart", "bone"):
        c = vol.region_centre(region)
        assert c is not None and region in vol.regions_at(c)
    assert vol.region_centre("thyroid") is None


def test_outline_bits_keep_only_the_boundary():
    s = np.zeros((8, 8), dtype=np.uint16)
    s[2:6, 2:6] |= 1 << 4                          # a 4x4 square of region 4
    s[3:5, 3:5] |= 1 << 1                          # a 2x2 square of region 1 inside it
    out = outline_bits(s)
    ring = np.zeros((8, 8), bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False
    np.testing.assert_array_equal((out >> 4) & 1, ring.astype(np.uint16))
    assert ((out >> 1) & 1).sum() == 4           # a 2x2 square is all boundary


def test_radiological_letters():
    assert orientation_letters(2) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_letters(0)["left"] == "A"


def test_region_lookup_table_composites_visible_regions():
    from reg2rg.app.document import default_region_styles
    from reg2rg.app.slice_view import region_lookup_table

    styles = default_region_styles()
    lut = region_lookup_table(styles, outline=False)
    heart, lung = 1 << REGIONS.index("heart"), 1 << REGIONS.index("lung")
    assert lut[0, 3] == 0                                          # no region: transparent
    assert tuple(lut[heart, :3]) == styles["heart"].color
    a = styles["heart"].fill_opacity
    assert lut[heart | lung, 3] == pytest.approx(255 * (1 - (1 - a) ** 2), abs=1)
    from dataclasses import replace

    styles["heart"] = replace(styles["heart"], visible=False)
    lut2 = region_lookup_table(styles, outline=False)
    assert lut2[heart, 3] == 0 and tuple(lut2[heart | lung]) == tuple(lut2[lung])
