"""Candidate OOD scores measured on cached Keras features of benchmarks/ood.py's five settings.

    nice -n 10 .venv/bin/python benchmarks/ood_candidates.py [--refresh]

Needs benchmarks/ood.py's models (benchmarks/.work/models/ood-*). For each setting it caches, once, under
benchmarks/.work/ood-features/: the penultimate features, logits, and global-average-pooled outputs of
earlier MobileNetV2 blocks of the training sample the exported reference is fitted on, of the validation
sample its threshold is set on, of the ID test images and of the OOD images. Every candidate is fitted on
the training sample (and standardised on the validation sample) only; OOD images are only scored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ood as bench  # noqa: E402  (sets TLSERVE_HOME)
from serving.base import storage  # noqa: E402
from serving.base.manifest import Manifest  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data.sources import balanced_sample, load_dataset  # noqa: E402
from training.exported import ood  # noqa: E402

CACHE = ROOT / "benchmarks" / ".work" / "ood-features"
# Earlier MobileNetV2 outputs (Lee et al. 2018's feature ensemble), global-average pooled.
BLOCKS = ["block_5_add", "block_9_add", "block_12_add", "block_15_add", "block_16_project_BN", "out_relu"]
SETTINGS = {  # label -> (model, OOD images)
    "far-leaf": "ood-leaf",
    "far-cifar": "ood-cifar",
    "near-sigatoka": "ood-leaf-without-sigatoka",
    "near-cordana": "ood-leaf-without-cordana-leaf-spot",
    "near-panama": "ood-leaf-without-panama-disease",
}


def ood_images(label: str, manifest: Manifest) -> np.ndarray:
    hw, interp = manifest.input.hw, manifest.input.interpolation
    if label == "far-leaf":
        return bench.folder_images([bench.CIFAR_DIR / "test"], hw, interp, 2000)
    if label == "far-cifar":
        return bench.folder_images([bench.LEAF_DIR], hw, interp, None)
    held = {"near-sigatoka": "sigatoka", "near-cordana": "cordana-leaf-spot", "near-panama": "panama-disease"}[label]
    return bench.folder_images([bench.LEAF_DIR / held], hw, interp, None)


def extractor(model):
    """pixels -> {penultimate, probs, logits-free: every BLOCKS output pooled}, one pass."""
    from training.env import keras  # noqa: PLC0415

    K = keras()
    backbone = next(layer for layer in model.layers if hasattr(layer, "layers"))
    inner = K.Model(backbone.input, [backbone.get_layer(n).output for n in BLOCKS])
    pre = K.Model(model.input, model.layers[model.layers.index(backbone) - 1].output)  # resize + preprocess
    both = ood.feature_model(model)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for s in range(0, len(x), 64):
            b = x[s:s + 64].astype(np.float32)
            f, p = both(b, training=False)
            maps = inner(pre(b, training=False), training=False)
            out.setdefault("penultimate", []).append(np.asarray(f))
            out.setdefault("probs", []).append(np.asarray(p))
            for n, m in zip(BLOCKS, maps):
                m = np.asarray(m)
                out.setdefault(n, []).append(m.mean(axis=(1, 2)))
                if n == "out_relu":
                    out.setdefault("out_relu_max", []).append(m.max(axis=(1, 2)))
        return {k: np.concatenate(v) for k, v in out.items()}

    return run


def cache(label: str, refresh: bool) -> dict[str, np.ndarray]:
    path = CACHE / f"{label}.npz"
    if path.is_file() and not refresh:
        with np.load(path) as d:
            return dict(d)
    from training.model.build import load_model  # noqa: PLC0415
    from training.record import records  # noqa: PLC0415

    model_dir = storage.models_dir() / SETTINGS[label]
    manifest = Manifest.load(model_dir)
    run = records.load_run(manifest.run_path)
    data = load_dataset(DataConfig(**run.record.config["data"]))
    seed = int(run.record.config.get("seed", 0))
    tidx = balanced_sample(data.train.y, manifest.ood.train_images, seed)
    vidx = balanced_sample(data.val.y, manifest.ood.val_images, seed)
    test_idx = balanced_sample(data.test.y, 2000, 0) if label == "far-cifar" else np.arange(len(data.test.y))
    model = load_model(manifest.keras_path)
    run_ = extractor(model)
    dense = ood.last_dense(model)
    kernel, bias = dense.get_weights()
    out = {"kernel": kernel, "bias": bias, "train_y": data.train.y[tidx], "val_y": data.val.y[vidx]}
    for part, x in (("train", data.train.x[tidx]), ("val", data.val.x[vidx]), ("test", data.test.x[test_idx]),
                    ("ood", ood_images(label, manifest))):
        print(f"  {label} {part}: {len(x)} images", flush=True)
        for k, v in run_(x).items():
            out[f"{part}_{k}"] = v
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refresh", action="store_true")
    p.add_argument("--only", default=",".join(SETTINGS))
    args = p.parse_args()
    for label in args.only.split(","):
        cache(label, args.refresh)


if __name__ == "__main__":
    main()
