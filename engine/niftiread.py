"""Fast, lean reading of NIfTI voxels: inflated straight into the final array, masks kept sparse in memory.

nibabel reads a ``.nii.gz`` through Python's gzip module into a buffer it then wraps; for one chest
CT with ten region masks that is about 1 GB of inflated bytes and most of the time spent opening a
study. Here nibabel still parses the header (shape, dtype, offset, affine, scaling: the same
numbers), but the voxel bytes are inflated by ISA-L (``isal.igzip``, several times faster than zlib;
plain ``gzip`` when it is not installed) in a few MB at a time straight into the array that is
returned. Binary masks are read slice by slice into a zero-filled anonymous memory map whose
untouched pages the OS never allocates, so a region costs memory only around where it is.

Every function returns None when a file is not the plain case (an .hdr/.img pair, a mask that is not
0/1 integers, scaled mask values); callers then use nibabel's general path.
"""

from __future__ import annotations

import gzip
import mmap
import os
from pathlib import Path

import numpy as np

try:  # python-isal: ISA-L inflate, same gzip format and errors on truncated/corrupt files
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _gzip = gzip

#: Inflate this many bytes per read: large enough to amortise the call, small enough to stay in cache.
CHUNK_BYTES = 4 << 20
#: Arrays at least this large are allocated as lazily zeroed memory maps (smaller ones: np.zeros).
_LAZY_MIN_BYTES = 1 << 20
#: Bits that no byte equal to 0 or 1 has, in each byte of a 64-bit word.
_HIGH_BITS = 0xFEFEFEFEFEFEFEFE


def open_voxel_stream(path: str | os.PathLike):
    """A binary file object over the (inflated) bytes of a .nii or .nii.gz file."""
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        return _gzip.open(path, "rb")
    return open(path, "rb")


def _read_exactly(stream, view: memoryview, done: int = 0) -> None:
    """Fill ``view`` from ``stream``; EOFError when the file ends first (a truncated file)."""
    total = len(view)
    while done < total:
        n = stream.readinto(view[done:min(total, done + CHUNK_BYTES)])
        if not n:
            raise EOFError(f"the file ends after {done} of {total} voxel bytes")
        done += n


def _skip(stream, nbytes: int) -> None:
    if nbytes > 0:
        _read_exactly(stream, memoryview(bytearray(nbytes)))


def _plain_layout(img, path: Path):
    """(offset, dtype, shape) when ``img`` is a single-file NIfTI whose voxels are one F-ordered block."""
    import nibabel as nib

    if not isinstance(img, nib.Nifti1Image):   # Nifti2Image subclasses it
        return None
    proxy = img.dataobj
    try:  # the array proxy knows where the voxels are (img.header is a copy with the offset reset)
        fname = proxy.file_like
        if not isinstance(fname, (str, os.PathLike)) or Path(fname).resolve() != path.resolve():
            return None
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        order = proxy.order
    except Exception:  # noqa: BLE001 - any surprise in nibabel's proxy: use the general reader
        return None
    if order != "F":
        return None
    if dtype.fields is not None or dtype.kind not in "biuf" or offset < 0:
        return None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return None
    return offset, dtype, shape


def read_raw_voxels(img, path: str | os.PathLike) -> np.ndarray | None:
    """The stored (unscaled) voxels of a loaded NIfTI image as nibabel's ``dataobj.get_unscaled()``
    gives them (same dtype, byte order, F order), inflated straight into the returned array.

    None when the file is not a single-file NIfTI with a plain voxel block. Raises EOFError / OSError
    / zlib errors on a truncated or corrupt file, like nibabel does.
    """
    path = Path(path)
    layout = _plain_layout(img, path)
    if layout is None:
        return None
    offset, dtype, shape = layout
    flat = np.empty(int(np.prod(shape)), dtype=dtype)                  # (N,) in file order
    with open_voxel_stream(path) as stream:
        _skip(stream, offset)
        _read_exactly(stream, memoryview(flat).cast("B"))
    return flat.reshape(shape, order="F")                               # (X, Y, Z), a view


def lazy_zeros(shape, dtype=bool) -> np.ndarray:
    """A zero-filled F-ordered array whose pages cost memory only once written.

    Large arrays live in a private anonymous memory map: the OS hands out pages on first write, and
    reading untouched ones maps the shared zero page. A sparse mask on a CT grid thus costs about
    its bounding box, not the grid. A plain ndarray in every respect (writable, picklable).
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = count * dtype.itemsize
    if nbytes < _LAZY_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype=dtype, order="F")
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order="F")


def read_binary_mask(img, path: str | os.PathLike) -> np.ndarray | None:
    """A 0/1 integer NIfTI mask as a bool (X, Y, Z) array, read slab by slab into `lazy_zeros`.

    Only rows holding a voxel of the mask are written, so memory follows the mask's extent. Returns
    None (read nothing more) when the file needs the general path: not a plain single-file NIfTI,
    non-integer voxels, a scaling other than identity, or any value other than 0 and 1.
    """
    path = Path(path)
    layout = _plain_layout(img, path)
    if layout is None:
        return None
    offset, dtype, shape = layout
    if dtype.kind not in "biu":
        return None
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    if not (np.isnan(slope) or slope == 1.0) or not (np.isnan(inter) or inter == 0.0):
        return None
    X, Y, Z = shape
    out = lazy_zeros(shape, bool)                                       # (X, Y, Z)
    per_slice = X * Y
    k = max(1, CHUNK_BYTES // max(1, per_slice * dtype.itemsize))       # slices per read
    buf = np.empty(per_slice * min(k, max(Z, 1)), dtype=dtype)
    signed = dtype.kind == "i"
    words = dtype.itemsize == 1 and X % 8 == 0 and buf.ctypes.data % 8 == 0
    with open_voxel_stream(path) as stream:
        _skip(stream, offset)
        for z0 in range(0, Z, k):
            kk = min(k, Z - z0)
            chunk = buf[: per_slice * kk]
            _read_exactly(stream, memoryview(chunk).cast("B"))
            slab = chunk.reshape((X, Y, kk), order="F")                 # (X, Y, kk)
            if words:
                # bytes seen 8 at a time: a 0/1 byte has no bit of 0xFE, and a row holds the mask
                # iff the OR of its words is non-zero
                w = chunk.view(np.uint64).reshape((X // 8, Y, kk), order="F")
                rows = np.bitwise_or.reduce(w, axis=0)                  # (Y, kk)
                if rows.size and int(np.bitwise_or.reduce(rows, axis=None)) & _HIGH_BITS:
                    return None                                         # not a 0/1 mask
            else:
                rows = slab.max(axis=0)                                 # (Y, kk): which rows hold the mask
                if (rows.size and rows.max() > 1) or (signed and slab.min() < 0):
                    return None                                         # not a 0/1 mask
                if dtype.kind == "b":
                    rows = rows.astype(np.uint8)
            inside = slab.view(bool) if dtype.itemsize == 1 else slab != 0
            for j in np.flatnonzero(rows.any(axis=0)):
                ys = np.flatnonzero(rows[:, j])
                y0, y1 = int(ys[0]), int(ys[-1]) + 1
                out[:, y0:y1, z0 + j] = inside[:, y0:y1, j]
    return out
