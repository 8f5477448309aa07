"""Provenance of a draft: which model (name, version, weight digest, validation status), which settings,
which engine. The one place that reads a model folder's identity for reports.

A model counts as validated only when its folder holds ``validation.json`` with ``"validated": true``
(and, for the reader, ``scope``, ``by`` and ``date``). The embedded demo model has none: its drafts
always carry the "AI-generated draft — not for clinical use" statement.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .document import Provenance, now_iso, settings_digest

VALIDATION_FILE = "validation.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_DIGESTS: dict[tuple, str] = {}


def engine_version() -> str:
    from reg2rg import __version__

    return __version__


def weights_digest(folder: str | os.PathLike) -> str:
    """sha256 over the weight files under ``folder`` (relative path and bytes, sorted by path), or of the
    file itself; cached per (path, size, mtime). "" when there are no weight files."""
    root = Path(folder)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return ""
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def read_validation(folder: str | os.PathLike | None) -> tuple[bool, str]:
    """(validated, what the record says) from the model folder's ``validation.json``."""
    if folder is None:
        return False, ""
    path = Path(folder) / VALIDATION_FILE
    if not path.is_file():
        return False, "no validation record"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return False, f"{path.name} is unreadable ({exc})"
    if not isinstance(record, dict) or record.get("validated") is not True:
        return False, str(record.get("note", "not validated")) if isinstance(record, dict) else "not validated"
    what = ", ".join(f"{k} {record[k]}" for k in ("scope", "by", "date") if record.get(k))
    return True, what or "validated"


def model_card(folder: str | os.PathLike | None) -> str:
    """The model folder's MODEL_CARD.md ("" when it has none)."""
    if folder is None:
        return ""
    path = Path(folder) / MODEL_CARD_FILE
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else ""
    except OSError:
        return ""


def model_identity(folder: str | os.PathLike | None, config=None) -> dict:
    """Name, version, digest, validation of a model folder (``config``: the loaded `Reg2RGConfig`, if any)."""
    from reg2rg.engine.generation import default_model_dir

    name, version = "", ""
    if folder is not None:
        cfg_path = Path(folder) / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except (OSError, ValueError):
            cfg = {}
        name = str(cfg.get("name") or "")
        version = str(cfg.get("version") or "")
    if not name and config is not None:
        name = str(getattr(config, "name", "") or "")
    demo = False
    if folder is not None:
        try:
            demo = Path(folder).resolve() == default_model_dir().resolve()
        except OSError:
            demo = False
    if demo:
        name = f"Reg2RG {name or 'demo'} (embedded demo model)"
    elif folder is not None and name:
        name = f"Reg2RG {name} ({Path(folder).name})"
    elif folder is not None:
        name = f"Reg2RG ({Path(folder).name})"
    else:
        name = f"Reg2RG {name}".strip() + " (built in memory)"
    digest = weights_digest(folder) if folder is not None and Path(folder).exists() else ""
    if not version:
        version = f"0+{digest[7:19]}" if digest else "unversioned"
    validated, validation = read_validation(folder) if not demo else (False, "demonstration model, synthetic data")
    return {"name": name, "version": version, "digest": digest, "validated": validated, "validation": validation,
            "path": Path(folder).name if folder is not None else ""}


def provenance_for(engine, settings=None) -> Provenance:
    """The provenance of a draft made now by ``engine`` with ``settings`` (`GenerationSettings` or dict).

    ``engine`` may be any object with ``model_dir`` (and optionally ``config``, or ``model_identity()``
    for a remote engine that knows its model better)."""
    from .document import _settings_dict

    if hasattr(engine, "model_identity"):
        ident = dict(engine.model_identity())
    else:
        ident = model_identity(getattr(engine, "model_dir", None), getattr(engine, "config", None))
    s = _settings_dict(settings)
    return Provenance(model_name=ident.get("name", ""), model_version=ident.get("version", ""),
                      model_digest=ident.get("digest", ""), model_path=ident.get("path", ""),
                      validated=bool(ident.get("validated", False)), validation=ident.get("validation", ""),
                      settings=s, settings_digest=settings_digest(s), engine="Reg2RG Viewer engine",
                      engine_version=engine_version(), drafted_at=now_iso())
