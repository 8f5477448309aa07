"""The wire format of a draft request: pre-processed model inputs + regions + decoding settings.

The client pre-processes the study (our code, fast) and sends only what the model reads: the global
volume and each region's crop and soft mask on the model grid, float32, one channel each (the model's
3 channels are one channel repeated). No voxel outside the model grid, no name, no header, no
affine, no identifier leaves the workstation; the geometry stays with the client, which maps
attention maps back onto its CT itself.

Layout (``application/x-reg2rg-study``)::

    b"R2RG-STUDY/1\\n" | uint32 big-endian header length | JSON header | tensor blobs, in header order

The header: ``{"input_size": [H, W, D], "regions": [...], "settings": {...}, "tensors": [{"name",
"dtype", "shape", "codec", "nbytes"}, ...]}``; tensor names are ``image``, ``region:<name>`` and
``mask:<name>``. A relevance request (``POST /v1/drafts/{id}/relevance``) sends the same study again
with ``"token_indices": [...]`` (the selection) in the header: the server keeps no model-grid tensors
after a draft, and checks that the tensors are the draft's by their digest (`DraftRequest.digest`).
Codecs: ``zlib`` (default: zlib level 1 of the float32 bytes, lossless),
``shuffle-zlib`` (byte planes split first) and ``raw``. Measured bytes per study (``bench/serve.py
--wire``, recorded in bench/RESULTS.md) chose zlib: 11.0 MB raw -> 1.24 MB for the demo study at the
demo grid (shuffle-zlib 1.49 MB), 352 MB -> 17.0 MB at the published 256x256x64 grid with 10
regions; float16 would roughly halve that but change the numbers the model reads.

`decode_request` validates everything before any tensor is built (sizes, shapes, dtypes, codec,
region names, exact decompressed lengths, finite values) and raises `WireError` with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..generation import GenerationError, GenerationSettings
from ..preprocess import ModelInputs
from ..regions import REGIONS

MAGIC = b"R2RG-STUDY/1\n"
CONTENT_TYPE = "application/x-reg2rg-study"
CODECS = ("zlib", "shuffle-zlib", "raw")
MAX_HEADER_BYTES = 64 * 1024
MAX_SELECTION = 4096                  # generated-token indices in one explanation request


class WireError(ValueError):
    """A request payload the server cannot use; the message is the one-line reason sent back (4xx)."""


@dataclass
class DraftRequest:
    """A decoded request: inputs (geometry None), the regions in slot order, the settings."""

    inputs: ModelInputs
    regions: list[str]
    settings: GenerationSettings
    digest: str = ""                         # BLAKE2b of the regions, tensor table and encoded bytes: which study
    token_indices: list[int] | None = None   # a relevance request's selection


# ---- codecs ----------------------------------------------------------------------------------------
def _encode_array(arr: np.ndarray, codec: str) -> bytes:
    raw = np.ascontiguousarray(arr, dtype="<f4")
    if codec == "raw":
        return raw.tobytes()
    if codec == "zlib":
        return zlib.compress(raw.tobytes(), 1)
    if codec == "shuffle-zlib":
        planes = raw.view(np.uint8).reshape(-1, 4).T                 # (4, n): byte plane b of every value
        return zlib.compress(np.ascontiguousarray(planes).tobytes(), 1)
    raise WireError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def _decode_array(blob: bytes, codec: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    n = math.prod(shape)
    size = 4 * n
    if codec == "raw":
        data = blob
    elif codec in ("zlib", "shuffle-zlib"):
        d = zlib.decompressobj()
        try:
            data = d.decompress(blob, size)          # never inflate past the declared size (no zip bomb)
        except zlib.error as err:
            raise WireError(f"tensor {name}: not valid {codec} data ({err})") from None
        if d.unconsumed_tail or not d.eof:
            raise WireError(f"tensor {name}: decompresses to more than its shape {list(shape)} holds")
    else:
        raise WireError(f"tensor {name}: unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    if len(data) != size:
        raise WireError(f"tensor {name}: {len(data)} bytes for shape {list(shape)} (float32 needs {size})")
    buf = np.frombuffer(data, dtype=np.uint8)
    if codec == "shuffle-zlib":
        buf = np.ascontiguousarray(buf.reshape(4, n).T)
    arr = np.array(buf.view("<f4").reshape(shape), dtype=np.float32)      # a writable copy
    if not np.isfinite(arr).all():
        raise WireError(f"tensor {name}: contains NaN or infinite values")
    return arr


# ---- encoding (client) -----------------------------------------------------------------------------
def encode_request(inputs: ModelInputs, regions, settings: GenerationSettings, codec: str = "zlib") -> bytes:
    """The request body for ``inputs`` (`preprocess.preprocess` output) drafting ``regions`` (`with_selection`
    makes it a relevance request's)."""
    regions = [r for r in regions if r in inputs.regions]
    tensors, blobs = [], []

    def add(name: str, t: torch.Tensor) -> None:
        arr = t.detach().cpu().numpy()
        blob = _encode_array(arr, codec)
        tensors.append({"name": name, "dtype": "float32", "shape": list(arr.shape), "codec": codec,
                        "nbytes": len(blob)})
        blobs.append(blob)

    add("image", inputs.image[0])                                   # one channel: the others repeat it
    for r in regions:
        add(f"region:{r}", inputs.regions[r][0])
        add(f"mask:{r}", inputs.masks[r][0])
    header = {"input_size": list(inputs.image.shape[1:]), "regions": regions, "settings": asdict(settings),
              "tensors": tensors}
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack(">I", len(head)), head, *blobs])


def with_selection(body: bytes, token_indices) -> bytes:
    """A draft request ``body`` (`encode_request`) with ``token_indices`` in its header: the body of a
    relevance request for that selection of the draft (the tensors' bytes are reused as they are)."""
    pos = len(MAGIC)
    (n,) = struct.unpack(">I", body[pos:pos + 4])
    header = json.loads(body[pos + 4:pos + 4 + n].decode("utf-8"))
    header["token_indices"] = [int(i) for i in token_indices]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack(">I", len(head)), head, memoryview(body)[pos + 4 + n:]])


# ---- decoding (server) -----------------------------------------------------------------------------
_SETTING_TYPES = {f.name: f.type for f in fields(GenerationSettings)}


def _settings(raw, max_new_tokens: int) -> GenerationSettings:
    if not isinstance(raw, dict):
        raise WireError("settings must be an object")
    unknown = sorted(set(raw) - set(_SETTING_TYPES))
    if unknown:
        raise WireError(f"unknown settings {unknown}; known: {sorted(_SETTING_TYPES)}")
    for key, value in raw.items():
        ok = (value is None and key in ("seed", "preset")) or (
            isinstance(value, str) if key in ("strategy", "preset") else
            isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise WireError(f"setting {key}: {value!r} has the wrong type")
    try:
        s = GenerationSettings(**raw)
        s.validate()
    except (TypeError, GenerationError) as err:
        raise WireError(f"settings: {err}") from None
    if s.max_new_tokens > max_new_tokens:
        raise WireError(f"max_new_tokens {s.max_new_tokens} is above this server's limit of {max_new_tokens}")
    if s.strategy == "beam" and s.num_beams > 16:
        raise WireError(f"num_beams {s.num_beams} is above this server's limit of 16")
    return s


def decode_request(body: bytes, input_size, num_regions: int, max_new_tokens: int = 2048) -> DraftRequest:
    """Validate and decode a request body for a model of ``input_size`` with ``num_regions`` slots."""
    if not body.startswith(MAGIC):
        raise WireError(f"not a reg2rg study payload (it must start with {MAGIC[:-1].decode()!r})")
    pos = len(MAGIC)
    if len(body) < pos + 4:
        raise WireError("payload ends before its header")
    (n,) = struct.unpack(">I", body[pos:pos + 4])
    pos += 4
    if n > MAX_HEADER_BYTES or len(body) < pos + n:
        raise WireError(f"header length {n} is too large or past the end of the payload")
    try:
        header = json.loads(body[pos:pos + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not JSON ({err.__class__.__name__}: {err})") from None
    pos += n
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    size = tuple(int(x) for x in input_size)
    if header.get("input_size") != list(size):
        raise WireError(f"input_size {header.get('input_size')} does not match the model's {list(size)}")
    regions = header.get("regions")
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
        raise WireError("regions must be a list of region names")
    bad = [r for r in regions if r not in REGIONS]
    if bad:
        raise WireError(f"unknown regions {bad}; regions are {', '.join(REGIONS)}")
    if len(set(regions)) != len(regions):
        raise WireError("a region is named twice")
    if regions != [r for r in REGIONS if r in regions]:
        raise WireError(f"regions must be in the model's order: {[r for r in REGIONS if r in regions]}")
    if len(regions) > num_regions:
        raise WireError(f"{len(regions)} regions but the model has {num_regions} slots")
    settings = _settings(header.get("settings", {}), max_new_tokens)
    specs = header.get("tensors")
    expected = ["image"] + [f"{k}:{r}" for r in regions for k in ("region", "mask")]
    if not isinstance(specs, list) or [s.get("name") if isinstance(s, dict) else None for s in specs] != expected:
        raise WireError(f"tensors must be exactly {expected} in that order")
    selection = header.get("token_indices")
    if selection is not None and (not isinstance(selection, list) or not 1 <= len(selection) <= MAX_SELECTION
                                  or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in selection)):
        raise WireError(f"token_indices must be a list of 1 to {MAX_SELECTION} generated-token indices (integers >= 0)")
    total = 0
    for s in specs:
        if s.get("dtype") != "float32":
            raise WireError(f"tensor {s['name']}: dtype {s.get('dtype')!r}; the model reads float32")
        if s.get("shape") != list(size):
            raise WireError(f"tensor {s['name']}: shape {s.get('shape')} != the model grid {list(size)}")
        if s.get("codec") not in CODECS:
            raise WireError(f"tensor {s['name']}: unknown codec {s.get('codec')!r}; use one of {', '.join(CODECS)}")
        nb = s.get("nbytes")
        if not isinstance(nb, int) or nb < 0:
            raise WireError(f"tensor {s['name']}: nbytes must be a non-negative integer")
        total += nb
    if total != len(body) - pos:
        raise WireError(f"the tensors declare {total} bytes but {len(body) - pos} follow the header")
    # which study this is: the regions, the tensor table and the encoded bytes (1/9 of the decoded float32 at
    # the demo grid, hashed once per draft; a client re-sends the same bytes, kept or re-encoded identically)
    digest = hashlib.blake2b(json.dumps([regions, specs]).encode(), digest_size=16)
    digest.update(memoryview(body)[pos:])
    arrays = {}
    for s in specs:
        arrays[s["name"]] = torch.from_numpy(_decode_array(body[pos:pos + s["nbytes"]], s["codec"], size, s["name"]))
        pos += s["nbytes"]
    image = arrays["image"][None].expand(3, *size)
    inputs = ModelInputs(image=image,
                         regions={r: arrays[f"region:{r}"][None].expand(3, *size) for r in regions},
                         masks={r: arrays[f"mask:{r}"][None] for r in regions})
    return DraftRequest(inputs, list(regions), settings, digest.hexdigest(), selection)
