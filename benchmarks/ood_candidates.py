"""Candidate OOD scores measured on cached Keras features of benchmarks/ood.py's five settings.

    nice -n 10 .venv/bin/python benchmarks/ood_candidates.py [--refresh]

Needs benchmarks/ood.py's models (benchmarks/.work/models/ood-*). For each setting it caches, once, under
benchmarks/.work/ood-features/: the penultimate features, logits, and global-average-pooled outputs of
earlier MobileNetV2 blocks of the training sample the exported reference is fitted on, of the validation
sample its threshold is set on, of the ID test images and of the OOD images. Every candidate is fitted on
the training sample (and standardised on the validation sample) only; OOD images are only scored. Then
prints every candidate's AUROC in every setting (docs/decisions.md, "An OOD score in the model").
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
    """pixels -> {penultimate, probs, every BLOCKS output pooled (and out_relu max-pooled)}, one pass."""
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


# ---- candidates: each maps a setting's cached features to {part: scores} for val, test and ood --------

Scores = dict[str, np.ndarray]
PARTS = ("val", "test", "ood")


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def mahalanobis(layer: str, normalized: bool = True, rank: int | None = ood.RANK):
    """Lee et al. (2018) on one layer's (pooled) features, fitted on the training sample."""
    def make(d: dict) -> Scores:
        ref = ood.fit(d[f"train_{layer}"], d["train_y"], d["kernel"].shape[1], rank=rank, normalized=normalized)
        return {p: ref.score(d[f"{p}_{layer}"]) for p in PARTS}
    return make


def energy(d: dict) -> Scores:
    from scipy.special import logsumexp  # noqa: PLC0415

    return {p: -logsumexp(d[f"{p}_penultimate"] @ d["kernel"] + d["bias"], axis=1) for p in PARTS}


def msp(d: dict) -> Scores:
    return {p: -d[f"{p}_probs"].max(axis=1) for p in PARTS}


def feature_norm(d: dict) -> Scores:
    """The norm unit-length features discard; low norm taken as OOD (Sun et al.'s observation)."""
    return {p: -np.linalg.norm(d[f"{p}_penultimate"], axis=1) for p in PARTS}


def knn(k: int):
    """Sun et al. (ICML 2022): minus the cosine similarity to the k-th nearest training feature."""
    def make(d: dict) -> Scores:
        train = _unit(d["train_penultimate"])
        return {p: -np.sort(_unit(d[f"{p}_penultimate"]) @ train.T, axis=1)[:, -k] for p in PARTS}
    return make


def summed(*makers, how: str = "z"):
    """Scores each standardised on the ID validation sample, then summed (z) or the largest taken (max);
    'median': each divided by its validation median, then summed."""
    def make(d: dict) -> Scores:
        parts = [m(d) for m in makers]
        if how == "median":
            scaled = [{p: s[p] / np.median(s["val"]) for p in PARTS} for s in parts]
        else:
            scaled = [{p: (s[p] - s["val"].mean()) / s["val"].std() for p in PARTS} for s in parts]
        agg = np.max if how == "max" else np.sum
        return {p: agg([s[p] for s in scaled], axis=0) for p in PARTS}
    return make


def candidates() -> dict[str, object]:
    pen, pen128, pen64 = (mahalanobis("penultimate", rank=r) for r in (256, 128, 64))
    b9, b9raw = mahalanobis("block_9_add", rank=None), mahalanobis("block_9_add", False, rank=None)
    out = {"mahalanobis, unit features, rank 256 (exported until 2026-12-05)": pen,
           "same, rank 128": pen128, "same, rank 64": pen64, "max-softmax": msp, "energy": energy, "feature norm (low = OOD)": feature_norm,
           "kNN k=1": knn(1), "kNN k=10": knn(10)}
    for layer in ("block_5_add", "block_9_add", "block_12_add", "block_15_add", "block_16_project_BN"):
        out[f"mahalanobis {layer}, unit"] = mahalanobis(layer, rank=None)
        out[f"mahalanobis {layer}, raw"] = mahalanobis(layer, False, rank=None)
    out["z-sum: penultimate + energy"] = summed(pen, energy)
    out["z-sum: penultimate + block_9_add unit"] = summed(pen, b9)
    out["max z: penultimate + block_9_add unit"] = summed(pen, b9, how="max")
    out["median-scaled sum: penultimate + block_9_add unit"] = summed(pen, b9, how="median")
    out["z-sum: penultimate + block_9_add raw"] = summed(pen, b9raw)
    out["z-sum: penultimate + block_9_add unit + raw"] = summed(pen, b9, b9raw)
    out["z-sum: penultimate rank 128 + block_9_add raw"] = summed(pen128, b9raw)
    out["z-sum: penultimate rank 64 + block_9_add raw (exported since 2026-12-05)"] = summed(pen64, b9raw)
    out["z-sum: penultimate rank 64 + block_9_add unit + raw"] = summed(pen64, b9, b9raw)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refresh", action="store_true")
    p.add_argument("--only", default=",".join(SETTINGS))
    args = p.parse_args()
    labels = args.only.split(",")
    data = {label: cache(label, args.refresh) for label in labels}
    print("\n| candidate (AUROC) | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels))
    for name, make in candidates().items():
        row = []
        for label in labels:
            s = make(data[label])
            row.append(f"{ood.auroc(s['test'], s['ood']):.4f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
