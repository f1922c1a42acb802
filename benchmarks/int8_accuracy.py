"""Does `tlserve export --int8` keep accuracy and pay in speed on real models? (issue 30's targets)

    nice -n 5 .venv/bin/python benchmarks/int8_accuracy.py [--models mnv2-cifar,mnv2-banana,resnet9,resnet50v2,vgg16]
                                                            [--seeds 3] [--retrain] [--rounds 20]

Trains each model once (a finished run and its export are reused; --retrain redoes both), exports it with
`--int8` and the default gate (1.0 point overall, 5 points on any class), and prints per model: fp32 and
int8 test accuracy, the worst class's recall drop, whether the gate kept the file and how many of its
first convolutions the fallback kept float, and the int8 file's p50 latency against fp32 at batch 1
and 32 (interleaved rounds, onnxruntime CPU provider, the kernels tlserve's sessions choose).

- mnv2-cifar: MobileNetV2 @96 frozen (real ImageNet weights) on CIFAR-10 (the JPEG copy), --limit 3000.
- mnv2-banana: MobileNetV2 @128 frozen (real weights) on banana-leaf, --seeds seeds (its test split is small).
- resnet9: a ResNet-9 (preset resnet9-s) from scratch on CIFAR-10, a short training (RESNET9_ARGS).
- resnet50v2, vgg16: @96 with random weights (none are available offline): speed only, never accuracy;
  the int8 file timed is the plain recipe (every convolution int8), whatever the gate made of it.

Runs and models land in benchmarks/.work (TLSERVE_HOME).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from benchmarks.int8_ablation import interleaved_cpu_ms, interleaved_p50  # noqa: E402
from serving.base.machine import cpu_model, has_vnni  # noqa: E402
from serving.base.manifest import Manifest  # noqa: E402
from serving.sessions import make_session  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
for candidate in (Path("/work/shared/datasets"), ROOT / ".." / "shared" / "datasets"):
    if candidate.is_dir():
        DATA = candidate.resolve()
WEIGHTS = DATA.parent / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CIFAR = f"folder:{DATA / 'cifar10-jpg'}"
BANANA = f"folder:{DATA / 'banana-leaf'}"
# A short ResNet-9 training: 10,000 training images, 8 epochs of the fast records' recipe, float32.
RESNET9_ARGS = ["--data", CIFAR, "--config", str(ROOT / "recipes" / "cifar-resnet9s.yaml"), "--limit", "10000",
                "--epochs", "8", "--precision", "float32", "--data-check", "off"]


@dataclass
class Model:
    name: str
    args: list[str]
    accuracy: bool = True  # False: random weights, speed only


def models(seeds: int) -> dict[str, list[Model]]:
    mnv2 = ["-b", "mobilenetv2", "-s", "frozen", "--weights", str(WEIGHTS)]
    random_96 = ["--data", CIFAR, "--limit", "600", "-s", "frozen", "--weights", "none", "--input-size", "96",
                 "--epochs", "1", "--data-check", "off"]
    return {
        "mnv2-cifar": [Model("i8-mnv2-cifar96", ["--data", CIFAR, *mnv2, "--input-size", "96", "--limit", "3000"])],
        "mnv2-banana": [Model(f"i8-mnv2-banana128-s{s}", ["--data", BANANA, *mnv2, "--input-size", "128",
                                                          "--image-size", "128", "--seed", str(s)])
                        for s in range(seeds)],
        "resnet9": [Model("i8-resnet9s-cifar", RESNET9_ARGS)],
        "resnet50v2": [Model("i8-resnet50v2-96", [*random_96, "-b", "resnet50v2"], accuracy=False)],
        "vgg16": [Model("i8-vgg16-96", [*random_96, "-b", "vgg16"], accuracy=False)],
    }


def tlserve(*args: str) -> None:
    exe = Path(sys.executable).with_name("tlserve")
    result = subprocess.run(["nice", "-n", "5", str(exe), *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"tlserve {' '.join(args[:2])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def prepare(model: Model, retrain: bool) -> tuple[Path, float]:
    """(the exported model folder, seconds spent training it here, 0 if reused)."""
    home = Path(os.environ["TLSERVE_HOME"])
    started = time.monotonic()
    trained = 0.0
    if retrain or not (home / "runs" / model.name / "record.json").is_file():
        tlserve("train", *model.args, "--name", model.name, "--overwrite")
        trained = time.monotonic() - started
    folder = home / "models" / model.name
    if trained or not (folder / "manifest.json").is_file():
        tlserve("export", model.name, "--int8", "--no-register", "--overwrite")
    return folder, trained


def measure(model: Model, folder: Path, rounds: int, trained: float) -> dict:
    manifest = Manifest.load(folder)
    fp32 = manifest.artifacts["model.onnx"]
    int8 = manifest.artifacts.get("model.int8.onnx") or manifest.rejected["model.int8.onnx"]
    x = np.random.default_rng(0).uniform(0, 255, (32, *manifest.input.hw, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = folder / "model.int8.onnx"
        if not model.accuracy or not path.is_file():  # speed of the plain recipe
            from training.exported.int8 import quantize_int8  # noqa: PLC0415

            path = Path(tmp) / "plain.onnx"
            quantize_int8(folder / "model.onnx", path, x)
        sessions = {"fp32": make_session(folder / "model.onnx", device="cpu")[0],
                    "int8": make_session(path, device="cpu")[0]}
        b1 = interleaved_p50(sessions, x[:1], rounds, 10)
        b32 = interleaved_p50(sessions, x, max(3, rounds // 4), 2)
        single = {k: make_session(p, device="cpu", threads=1)[0]
                  for k, p in (("fp32", folder / "model.onnx"), ("int8", path))}
        cpu1 = interleaved_cpu_ms(single, x[:1], rounds, 10)
        cpu32 = interleaved_cpu_ms(single, x, max(3, rounds // 4), 1)
    return {"model": model.name, "accuracy": model.accuracy, "trained_s": trained,
            "fp32": fp32.test_accuracy, "int8": int8.test_accuracy, "kept": int8.sha256 is not None,
            "worst": int8.gate["worst_class_drop_points"], "worst_class": int8.gate["worst_class"],
            "float_convs": (int8.kept_float or {}).get("convolutions"), "convs": (int8.kept_float or {}).get("of_convolutions"),
            "tries": len(int8.int8_tries or []), "b1": b1, "b32": b32, "cpu1": cpu1, "cpu32": cpu32, "test_images": manifest.export.gate.test_images}


def print_table(rows: list[dict]) -> None:
    load = os.getloadavg()
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    print(f"\nmachine: {cpu_model()} (VNNI: {has_vnni()}), {os.cpu_count()} CPUs; load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; user CPU time {cpu:.0f} s")
    print("wall: p50 ms, default threads, interleaved; cpu: median CPU ms per call of a one-thread session")
    print("| model | test images | fp32 acc | int8 acc | drop (pt) | worst class drop (pt) | gate | float convs | "
          "tries | b1 wall fp32 / int8 | b1 wall speedup | b32 wall fp32 / int8 | b32 wall speedup | "
          "b1 cpu fp32 / int8 | b1 cpu speedup | b32 cpu fp32 / int8 | b32 cpu speedup |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = " | ".join(f"{r[k]['fp32']:.2f} / {r[k]['int8']:.2f} | {r[k]['fp32'] / r[k]['int8']:.2f}x"
                           for k in ("b1", "b32", "cpu1", "cpu32"))
        if not r["accuracy"]:
            print(f"| {r['model']} (random weights) | — | — | — | — | — | speed only | 0 | — | {speed} |")
            continue
        print(f"| {r['model']} | {r['test_images']} | {r['fp32']:.4f} | {r['int8']:.4f} | "
              f"{100 * (r['fp32'] - r['int8']):.2f} | {r['worst']:.1f} ({r['worst_class']}) | "
              f"{'kept' if r['kept'] else 'NOT KEPT'} | {r['float_convs']} of {r['convs']} | {r['tries']} | {speed} |")
    for r in rows:
        if r["trained_s"]:
            print(f"{r['model']}: trained here in {r['trained_s'] / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mnv2-cifar,mnv2-banana,resnet9,resnet50v2,vgg16")
    parser.add_argument("--seeds", type=int, default=3, help="banana-leaf seeds")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds at batch 1")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    table = models(args.seeds)
    rows = []
    for key in (k.strip() for k in args.models.split(",")):
        for model in table[key]:
            folder, trained = prepare(model, args.retrain)
            rows.append(measure(model, folder, args.rounds, trained))
            print(f"done: {model.name}", flush=True)
            print_table(rows)  # after each model: a long run shows what it has so far


if __name__ == "__main__":
    main()
