"""How well the exported OOD score separates in- from out-of-distribution images, and what it costs.

    nice -n 5 .venv/bin/python benchmarks/ood.py [--only far-leaf,far-cifar,near,cost] [--cifar-limit N]

Real data and weights (../shared): MobileNetV2 (ImageNet weights, frozen, gap head) trained with
`training.fit.train.train` and exported with `training.exported.export.export` (the OOD reference and
threshold as `tlserve export` sets them), then scored through the exported ONNX file's second output.

  far-leaf   banana-leaf model (128x128): its test split against CIFAR-10 test images (JPEG copy)
  far-cifar  CIFAR-10 model (32x32 -> 96 inside): its test split against every banana-leaf image
  near       banana-leaf model trained without one disease class, against that class's images
             (each of sigatoka, cordana-leaf-spot, panama-disease in turn)
  cost       onnxruntime batch-1 latency with and without the score (same run exported twice), and
             serving.monitor.Monitor.observe per request under a multiprocess Prometheus registry

Each OOD row prints the AUROC of the exported score (ONNX fp32, and int8 where kept: on MobileNetV2 the
sum of the penultimate term, covariance rank 32, and block_9_add's raw and unit-length terms,
training.exported.ood), of
each term alone (the penultimate one is the score exported before 2026-12-05), of the penultimate
Mahalanobis score with every covariance direction kept, and, from the same Keras features, of the
baselines: max-softmax probability (MSP), max logit, energy (-logsumexp of logits)
and relative Mahalanobis (class distance minus the distance to one background Gaussian, Ren et al.
2021), plus the share of OOD images the exported threshold flags and of ID test images it accepts.
Runs and models are kept under benchmarks/.work and reused (--retrain to train again).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base import images, storage  # noqa: E402
from serving.base.machine import cpu_model  # noqa: E402
from serving.base.manifest import Manifest  # noqa: E402
from serving.sessions import OnnxClassifier  # noqa: E402
from training.config import DataConfig, TrainConfig  # noqa: E402
from training.data.sources import balanced_sample, load_dataset  # noqa: E402
from training.exported import ood  # noqa: E402
from training.exported.export import ExportOptions, export  # noqa: E402

SHARED = Path(os.environ.get("TLSERVE_SHARED", ROOT.parent / "shared"))  # a worktree elsewhere: point it at shared/
WEIGHTS = str(SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5")
CIFAR_DIR = SHARED / "datasets" / "cifar10-jpg"
LEAF_DIR = SHARED / "datasets" / "banana-leaf"
LEAF_CLASSES = ["cordana-leaf-spot", "dead", "healthy", "panama-disease", "sigatoka"]
DISEASES = ["sigatoka", "cordana-leaf-spot", "panama-disease"]


def _load():
    """Late: TensorFlow only after the options are parsed."""
    from training.fit.train import train  # noqa: PLC0415
    from training.model.build import load_model  # noqa: PLC0415

    return train, load_model


def trained(name: str, data: DataConfig, args, int8: bool = False, **options) -> Path:
    """Train (unless a finished run of that name exists) and export ONNX with the OOD score (and int8 when
    asked: it goes through the accuracy gate, and scores only if kept); the model folder."""
    train, _ = _load()
    runs, models = storage.runs_dir(), storage.models_dir()
    retrain = args.retrain
    if retrain or not (runs / name / "record.json").is_file():
        cfg = TrainConfig(data=data, backbone="mobilenetv2", strategy="frozen", weights=WEIGHTS, name=name,
                          overwrite=True, patience=None, **options)
        train(cfg, runs, log=lambda line: print(f"  {line}", flush=True), progress=False)
    if retrain or args.reexport or not (models / name / "manifest.json").is_file():
        export(name, ExportOptions(formats=("onnx",), int8=int8, overwrite=True, register=False), runs_dir=runs,
               models_dir=models,
               log=lambda line: print(f"  {line}", flush=True))
    return models / name


def folder_images(folders: list[Path], hw: tuple[int, int], interpolation: str, limit: int | None,
                  seed: int = 0) -> np.ndarray:
    files = sorted(f for folder in folders for f in folder.rglob("*") if images.is_image_path(f))
    if limit is not None and len(files) > limit:
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), limit, replace=False))]
    return np.stack([images.load_array(f, hw, interpolation=interpolation, name=str(f)) for f in files])


def scores(model_dir: Path, x: np.ndarray, background) -> dict[str, np.ndarray]:
    """Every score (higher = more OOD) of images x: the exported files' own, and the Keras baselines."""
    from scipy.special import logsumexp  # noqa: PLC0415

    _, load_model = _load()
    manifest = Manifest.load(model_dir)
    out = {}
    for variant in ("fp32", "int8"):  # int8 scores only where the gate kept it
        fmt_file = model_dir / ("model.onnx" if variant == "fp32" else "model.int8.onnx")
        if fmt_file.is_file():
            model = OnnxClassifier.load(model_dir, variant=variant, device="cpu")
            out[f"exported ({variant})"] = np.concatenate(
                [model.predict_scored(x[s:s + 64].astype(np.float32))[1] for s in range(0, len(x), 64)])
    keras_model = load_model(manifest.keras_path)
    score = ood.Score.load(model_dir / manifest.ood.file)
    layers, probs = ood.layer_features(keras_model, x, "Keras features", tap=score.tap)
    feats = layers[ood.PENULTIMATE]
    # Each term alone, unweighted: the first is the score exported before 2026-12-05 (same fit, same images).
    for term in score.terms:
        form = "unit" if term.normalized else "raw"
        out[f"term alone: {term.layer or 'penultimate'}, {form}"] = replace(term, weight=1.0).score(layers[term.layer])
    dense = ood.last_dense(keras_model)
    kernel, bias = (w for w in dense.get_weights())
    logits = feats @ kernel + bias
    out["MSP baseline"] = -probs.max(axis=1)
    out["max logit"] = -logits.max(axis=1)
    out["energy"] = -logsumexp(logits, axis=1)
    full, background = background
    out["mahalanobis, full covariance"] = full.score(feats)
    out["relative mahalanobis"] = full.score(feats) - background.score(feats)
    return out


def background_of(model_dir: Path) -> tuple[ood.Reference, ood.Reference]:
    """From (at most 1000 of) the training images the exported reference was fitted on: the same
    Mahalanobis reference with every covariance direction kept (exact), and one Gaussian over all of
    them (relative Mahalanobis's MD_0)."""
    _, load_model = _load()
    manifest = Manifest.load(model_dir)
    from training.record import records  # noqa: PLC0415

    run = records.load_run(manifest.run_path)
    data = load_dataset(DataConfig(**run.record.config["data"]))
    idx = balanced_sample(data.train.y, min(manifest.ood.train_images, 1000), int(run.record.config.get("seed", 0)))
    feats, _ = ood.features_and_probs(load_model(manifest.keras_path), data.train.x[idx], "training features")
    return (ood.fit(feats, data.train.y[idx], manifest.num_classes, rank=None),
            ood.fit(feats, np.zeros(len(feats), np.int64), 1, rank=None))


def row(label: str, model_dir: Path, id_x: np.ndarray, ood_x: np.ndarray) -> None:
    manifest = Manifest.load(model_dir)
    background = background_of(model_dir)
    s_in, s_out = scores(model_dir, id_x, background), scores(model_dir, ood_x, background)
    t = manifest.ood.threshold
    print(f"\n### {label}\n\nmodel {manifest.name} (test accuracy {manifest.test_accuracy:.4f}), {len(id_x)} ID test "
          f"images, {len(ood_x)} OOD images; threshold {t:.4g} (accepts {manifest.ood.val_accepted:.1%} of "
          f"{manifest.ood.val_images} validation images)\n")
    print("| score | AUROC | ID accepted | OOD flagged |\n|---|---:|---:|---:|")
    for name in s_in:
        flag = (f"{np.mean(s_in[name] <= t):.1%} | {np.mean(s_out[name] > t):.1%}" if name.startswith("exported")
                else "— | —")
        print(f"| {name} | {ood.auroc(s_in[name], s_out[name]):.4f} | {flag} |", flush=True)


def test_split(model_dir: Path, limit: int | None = None) -> np.ndarray:
    from training.record import records  # noqa: PLC0415

    run = records.load_run(Manifest.load(model_dir).run_path)
    test = load_dataset(DataConfig(**run.record.config["data"])).test
    idx = balanced_sample(test.y, limit, 0) if limit else np.arange(len(test.y))
    return test.x[idx]


def leaf_data(classes: str | None = None, seed: int = 0) -> DataConfig:
    return DataConfig(spec=f"folder:{LEAF_DIR}", image_size=128, classes=classes, seed=seed)


def far_leaf(args) -> None:
    model = trained("ood-leaf", leaf_data(), args, input_size=128, epochs=10)
    m = Manifest.load(model)
    ood_x = folder_images([CIFAR_DIR / "test"], m.input.hw, m.input.interpolation, args.ood_limit)
    row("far OOD: banana-leaf model, CIFAR-10 test images", model, test_split(model), ood_x)


def far_cifar(args) -> None:
    data = DataConfig(spec=f"folder:{CIFAR_DIR}", limit=args.cifar_limit)
    model = trained("ood-cifar", data, args, input_size=96, epochs=10)
    m = Manifest.load(model)
    ood_x = folder_images([LEAF_DIR], m.input.hw, m.input.interpolation, None)
    row("far OOD: CIFAR-10 model, banana-leaf images", model, test_split(model, args.id_limit), ood_x)


def near(args) -> None:
    for held in DISEASES:
        keep = ",".join(c for c in LEAF_CLASSES if c != held)
        model = trained(f"ood-leaf-without-{held}", leaf_data(keep), args, input_size=128, epochs=10)
        m = Manifest.load(model)
        ood_x = folder_images([LEAF_DIR / held], m.input.hw, m.input.interpolation, None)
        row(f"near OOD: banana-leaf model without {held}, scoring {held}", model, test_split(model), ood_x)


def cost(args) -> None:
    """Batch-1 onnxruntime latency of the same run exported with and without the score, interleaved
    rounds so load changes hit both alike; then the monitor's cost per answer."""
    from serving.timing import time_calls  # noqa: PLC0415

    models = storage.models_dir()
    with_score = models / "ood-leaf"
    if not (models / "ood-leaf-plain" / "manifest.json").is_file():
        export("ood-leaf", ExportOptions(name="ood-leaf-plain", formats=("onnx",), ood=False, overwrite=True,
                                         register=False), runs_dir=storage.runs_dir(), models_dir=models)
    # One intra-op thread that never spins: on a shared 2-core machine CPU time per call is then the
    # work itself, not busy-waiting (--threads to change).
    opts = dict(device="cpu", threads=args.threads, spin="never")
    sessions = {"with score": OnnxClassifier.load(with_score, **opts),
                "without": OnnxClassifier.load(models / "ood-leaf-plain", **opts)}
    h, w = sessions["without"].input_hw
    x = np.random.default_rng(0).uniform(0, 255, (1, h, w, 3)).astype(np.float32)
    samples = {k: [] for k in sessions}
    cpu = {k: 0.0 for k in sessions}
    for _ in range(args.rounds):
        for name, model in sessions.items():
            call = model.predict_scored if name == "with score" else model.predict
            t0 = resource.getrusage(resource.RUSAGE_SELF)
            samples[name] += time_calls(lambda: call(x), warmup=3, iterations=50, duration=None)
            t1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu[name] += (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime)
    n = args.rounds * 50
    print(f"\n### cost of the score: {cpu_model()}, {args.threads} onnxruntime thread(s), load "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| ONNX fp32, batch 1 | p50 ms | mean ms | CPU ms per call | file MB |\n|---|---:|---:|---:|---:|")
    for name, model in sessions.items():
        mb = (model_dir_of(model) / "model.onnx").stat().st_size / 1e6
        print(f"| {name} | {np.percentile(samples[name], 50):.3f} | {np.mean(samples[name]):.3f} | "
              f"{1000 * cpu[name] / n:.3f} | {mb:.2f} |")
    print(f"\nscore's share of batch-1 CPU time: {(cpu['with score'] - cpu['without']) / cpu['without']:+.1%}")
    p50 = {k: np.percentile(v, 50) for k, v in samples.items()}
    print(f"\nscore's share of batch-1 latency (p50): {(p50['with score'] - p50['without']) / p50['without']:+.1%}")
    monitor_cost(Manifest.load(with_score))


def model_dir_of(model: OnnxClassifier) -> Path:
    return storage.models_dir() / model.manifest.name


def monitor_cost(manifest: Manifest, requests: int = 20000) -> None:
    """serving.monitor.Monitor.observe per one-image request, with prometheus_client in multiprocess mode
    (as in a BentoML worker, where every update writes a memory-mapped file)."""
    folder = tempfile.mkdtemp(prefix="tlserve-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before prometheus_client's metrics are created
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from serving.monitor import Monitor  # noqa: PLC0415

    monitor = Monitor(manifest.class_names, manifest.ood, manifest.ood.threshold, 1000, registry=CollectorRegistry())
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(manifest.num_classes), requests).astype(np.float32)
    scores = rng.gamma(2.0, manifest.ood.threshold / 3, requests).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(requests):
        monitor.observe(probs[i:i + 1], scores[i:i + 1])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\nMonitor.observe, one-image requests, multiprocess registry: {1e6 * wall / requests:.1f} us wall, "
          f"{1e6 * cpu / requests:.1f} us CPU per request ({requests} requests, load {os.getloadavg()[0]:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="far-leaf,far-cifar,near,cost")
    p.add_argument("--cifar-limit", type=int, default=3000, help="CIFAR-10 images per split for the CIFAR model")
    p.add_argument("--id-limit", type=int, default=2000, help="CIFAR-10 test images scored as in-distribution")
    p.add_argument("--ood-limit", type=int, default=2000, help="CIFAR-10 test images scored as OOD")
    p.add_argument("--rounds", type=int, default=10, help="cost: interleaved rounds of 50 calls each")
    p.add_argument("--threads", type=int, default=1, help="cost: onnxruntime intra-op threads")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--reexport", action="store_true", help="export the runs again (keep the training)")
    args = p.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load at start {os.getloadavg()[0]:.2f}")
    steps = {"far-leaf": far_leaf, "far-cifar": far_cifar, "near": near, "cost": cost}
    for name in args.only.split(","):
        steps[name](args)


if __name__ == "__main__":
    main()
