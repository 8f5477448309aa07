"""The fast NIfTI reader gives exactly nibabel's voxels, and masks that cost memory only where they are."""

from __future__ import annotations

import gzip
import mmap

import nibabel as nib
import numpy as np
import pytest

from reg2rg.engine import niftiread
from reg2rg.engine.errors import StudyError
from reg2rg.engine.studyio import read_study


def _save(path, data, affine=None, **header):
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", "u1"])
def test_raw_voxels_equal_nibabel(tmp_path, name, dtype):
    rng = np.random.default_rng(3)
    data = rng.integers(-1024, 2000, size=(23, 17, 9)).astype(dtype)
    path = _save(tmp_path / name, data)
    img = nib.load(str(path))
    raw = niftiread.read_raw_voxels(img, path)
    ref = np.asarray(img.dataobj.get_unscaled())
    assert raw.dtype == ref.dtype and raw.shape == ref.shape
    assert np.array_equal(raw, ref)
    assert raw.flags.f_contiguous and raw.flags.writeable


def test_raw_voxels_of_a_4d_image_with_one_volume(tmp_path):
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3, 1)
    path = _save(tmp_path / "one.nii.gz", data)
    assert np.array_equal(niftiread.read_raw_voxels(nib.load(str(path)), path), data[..., 0])


def test_plain_gzip_fallback_reads_the_same(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(-1000, 1000, size=(30, 20, 7)).astype(np.int16)
    path = _save(tmp_path / "ct.nii.gz", data)
    fast = niftiread.read_raw_voxels(nib.load(str(path)), path)
    monkeypatch.setattr(niftiread, "_gzip", gzip)             # as without python-isal installed
    slow = niftiread.read_raw_voxels(nib.load(str(path)), path)
    assert np.array_equal(fast, data) and np.array_equal(slow, data)


def test_binary_mask_is_read_sparse_and_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(niftiread, "CHUNK_BYTES", 40 * 30 * 3)   # several slabs, a short last one
    mask = np.zeros((40, 30, 20), np.uint8)
    mask[5:9, 10:12, 3:7] = 1
    mask[30, 29, 19] = 1
    path = _save(tmp_path / "lung.nii.gz", mask)
    out = niftiread.read_binary_mask(nib.load(str(path)), path)
    assert out.dtype == bool and out.shape == mask.shape
    assert np.array_equal(out, mask.astype(bool))
    out[0, 0, 0] = True                                           # an ordinary writable array


@pytest.mark.parametrize("values, header", [
    (np.array([0, 1, 2], np.uint8), {}),                          # a label map, not a mask
    (np.array([0, -1, 1], np.int16), {}),
    (np.array([0.0, 0.5, 1.0], np.float32), {}),                  # probabilities
    (np.array([0, 1, 1], np.uint8), {"scl_slope": 2.0, "scl_inter": 0.0}),   # scaled values
])
@pytest.mark.parametrize("shape", [(6, 5, 4), (16, 5, 4)])          # rows of whole 8-byte words or not
def test_binary_mask_declines_what_needs_the_general_path(tmp_path, values, header, shape):
    data = np.zeros(shape, values.dtype)
    data[1, 1, :3] = values
    path = _save(tmp_path / "m.nii.gz", data, **header)
    assert niftiread.read_binary_mask(nib.load(str(path)), path) is None


def test_lazy_zeros_is_a_zero_writable_fortran_array():
    a = niftiread.lazy_zeros((256, 64, 80), bool)                 # 1.3 MB: memory-mapped
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap)                            # pages allocated on first write only
    assert a.shape == (256, 64, 80) and a.flags.f_contiguous and not a.any()
    a[3, 4, 5] = True
    assert a.sum() == 1


def test_truncated_mask_file_is_a_clear_error(tmp_path):
    ct = np.full((20, 20, 10), -1024, np.int16)
    ct[5:15, 5:15, 2:8] = 40
    ct_path = _save(tmp_path / "ct.nii.gz", ct)
    seg = tmp_path / "seg"
    seg.mkdir()
    good = _save(tmp_path / "whole.nii.gz", (ct > 0).astype(np.uint8))
    (seg / "lung.nii.gz").write_bytes(good.read_bytes()[:-30])
    with pytest.raises(StudyError, match="lung.nii.gz: cannot read the mask file"):
        read_study(ct_path, seg)
