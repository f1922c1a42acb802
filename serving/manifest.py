"""Exported model folders: find them, read their manifest, and check every file is the one exported.

No TensorFlow here: the service imports this.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from serving import storage
from serving.errors import UserError, nearest

MANIFEST = "manifest.json"
VARIANTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """One digest over a folder: sorted relative paths and contents (a SavedModel is a folder)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def artifact_digest(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def load_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{model_dir} is not an exported model (no {MANIFEST}); run `tlserve export RUN` first")
    try:
        return storage.read_json(path)
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def verify_artifacts(model_dir: Path, manifest: dict[str, Any], files: list[str] | None = None) -> None:
    """Refuse a model folder whose files differ from what export wrote, naming the file."""
    for name in files or list(manifest.get("artifacts", {})):
        expected = manifest["artifacts"].get(name, {}).get("sha256")
        path = Path(model_dir) / name
        if expected is None:
            raise UserError(f"{name} is not part of the export in {model_dir}")
        if not path.exists():
            raise UserError(f"{path} is missing")
        if artifact_digest(path) != expected:
            raise UserError(f"{path} does not match its sha256 in {MANIFEST}; refusing to load a modified model")


def resolve_model(ref: str, models_dir: Path | None = None) -> Path:
    """A model folder from a path, a name under models/, or a BentoML model tag (name:version)."""
    candidate = Path(ref)
    if (candidate / MANIFEST).is_file():
        return candidate
    local = storage.models_dir(models_dir) / ref
    if (local / MANIFEST).is_file():
        return local
    if ":" in ref or os.environ.get("TLSERVE_MODEL_STORE", "1") != "0":
        path = _from_bento_store(ref)
        if path is not None:
            return path
    known = list_local(models_dir)
    raise UserError(f"no exported model '{ref}' (looked in {storage.models_dir(models_dir)} and the BentoML model store)"
                    f"{nearest(ref, known)}")


def list_local(models_dir: Path | None = None) -> list[str]:
    root = storage.models_dir(models_dir)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / MANIFEST).is_file() and not d.name.startswith("."))


def _from_bento_store(ref: str) -> Path | None:
    try:
        import bentoml  # noqa: PLC0415
        from bentoml.exceptions import BentoMLException, NotFound  # noqa: PLC0415
    except ImportError:
        return None
    try:
        model = bentoml.models.get(ref)
    except (NotFound, BentoMLException, ValueError):
        return None
    path = Path(model.path)
    return path if (path / MANIFEST).is_file() else None
