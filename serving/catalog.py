"""`tlserve models`: the exported models a user can serve, in models/ and the BentoML model store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.base import formats, storage
from serving.base.manifest import Manifest, ModelFolder, local_folders


def list_models(models_dir: Path | None = None) -> list[dict[str, Any]]:
    """Exported models in models/ and, for those not there, in the BentoML model store."""
    rows = []
    seen = set()
    for folder in local_folders(models_dir):
        manifest = folder.manifest()
        rows.append(_row(manifest, str(folder.path)))
        seen.add(manifest.bentoml_tag)
    try:
        import bentoml  # noqa: PLC0415  (seconds to import; only this command needs the store)

        for model in bentoml.models.list():
            folder = ModelFolder(Path(model.path))
            if str(model.tag) in seen or not folder.is_export():
                continue
            rows.append(_row(folder.manifest(), f"bentoml:{model.tag}"))
    except ImportError:
        pass
    return rows


def remove_stale(models_dir: Path | None = None) -> list[Path]:
    """Remove the staging folders of exports that were killed; returns what it removed."""
    return storage.remove_stale_staging(storage.models_dir(models_dir))


def shown_tag(row: dict[str, Any]) -> str | None:
    """The BentoML tag worth printing beside a model's folder (none when the row is the store entry itself)."""
    tag = row["bentoml_tag"]
    return tag if tag and not row["where"].startswith("bentoml:") else None


def _variants(manifest: Manifest) -> str:
    """'savedmodel,fp32,int8': what a model folder can be served or benchmarked as, in a few letters."""
    return ",".join(f.variant or f.runtime for f in formats.FORMATS if f.in_export and f.present(manifest))


def _row(manifest: Manifest, where: str) -> dict[str, Any]:
    fp32 = manifest.artifacts.get(formats.BY_VARIANT["fp32"].file)
    return {"name": manifest.name, "version": manifest.version, "backbone": manifest.backbone,
            "strategy": manifest.strategy, "test_accuracy": manifest.test_accuracy,
            "onnx_mb": round((fp32.bytes if fp32 else 0) / 1e6, 2),
            "formats": ",".join(sorted(manifest.artifacts)), "variants": _variants(manifest),
            "bentoml_tag": manifest.bentoml_tag, "where": where}
