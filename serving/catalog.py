"""`tlserve models`: the exported models a user can serve, in models/ and the BentoML model store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from serving import storage
from serving.manifest import MANIFEST, VARIANTS, list_local, load_manifest


def list_models(models_dir: Path | None = None) -> list[dict[str, Any]]:
    """Exported models in models/ and, for those not there, in the BentoML model store."""
    rows = []
    seen = set()
    root = storage.models_dir(models_dir)
    for name in list_local(models_dir):
        manifest = load_manifest(root / name)
        rows.append(_row(manifest, str(root / name)))
        seen.add(manifest.get("bentoml_tag"))
    try:
        import bentoml  # noqa: PLC0415  (seconds to import; only this command needs the store)

        for model in bentoml.models.list():
            path = Path(model.path)
            if str(model.tag) in seen or not (path / MANIFEST).is_file():
                continue
            rows.append(_row(load_manifest(path), f"bentoml:{model.tag}"))
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


def _variants(artifacts: dict[str, Any]) -> str:
    """'savedmodel,fp32,int8': what a model folder can be served or benchmarked as, in a few letters."""
    names = ["savedmodel"] if "saved_model" in artifacts else []
    return ",".join(names + [v for v, file in VARIANTS.items() if file in artifacts])


def _row(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    artifacts = manifest.get("artifacts", {})
    return {"name": manifest["name"], "version": manifest["version"], "backbone": manifest["backbone"],
            "strategy": manifest["strategy"], "test_accuracy": manifest["test_accuracy"],
            "onnx_mb": round(artifacts.get("model.onnx", {}).get("bytes", 0) / 1e6, 2),
            "formats": ",".join(sorted(artifacts)), "variants": _variants(artifacts),
            "bentoml_tag": manifest.get("bentoml_tag"), "where": where}
