"""Does a small CNN learn more from a MobileNetV2 teacher than from the labels alone, at its own latency?

    nice -n 5 .venv/bin/python benchmarks/distill.py [--seeds 0,1,2] [--data folder:...] [--image-size 64]

Per seed (the seed also draws the split, so each seed has its own teacher, trained on that split):
  teacher  MobileNetV2@128, frozen, the real ImageNet weights (the data loaded at 128x128)
  alone    the small CNN at --image-size, labels only
  student  the same CNN, same options, with --teacher (its probabilities computed at 128x128)
Test accuracy of each (mean, sd over seeds). Then seed 0's three are exported (ONNX) and benchmarked at
batch 1 (`tlserve bench --runtimes onnx`), and `tlserve compare` puts them side by side.
Runs and models go to TLSERVE_HOME (default benchmarks/.work).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base import storage  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

# shared/ beside the repository (a helper's worktree sits one folder deeper)
SHARED = next((p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared")
WEIGHTS = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CNN = "c16,p,c32,p,c64,p,g,d64,dr0.3"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{SHARED / 'datasets' / 'banana-leaf'}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--image-size", type=int, default=64, help="the CNN's image size")
    parser.add_argument("--cnn-layers", default=CNN)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--weight", type=float, default=0.7)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    data = ["--data", args.data, "--json"]
    teacher = [*data, "--image-size", "128", "--input-size", "128", "-b", "mobilenetv2", "-s", "frozen",
               "--weights", str(WEIGHTS), "--epochs", "30", "--patience", "8", "--head", "gap-dense", "--dropout", "0.3"]
    cnn = [*data, "--image-size", str(args.image_size), "-b", "cnn", "--cnn-layers", args.cnn_layers,
           "--epochs", str(args.epochs), "--patience", "12"]
    tlserve = Path(sys.executable).with_name("tlserve")
    print(f"teacher: tlserve train {' '.join(teacher)} --seed S")
    print(f"CNN:     tlserve train {' '.join(cnn)} --seed S [--teacher T --distill-temperature {args.temperature} "
          f"--distill-weight {args.weight}]")
    print(f"before: {load()}", flush=True)
    scores: dict[str, list[float]] = {"teacher": [], "alone": [], "student": []}
    print("| seed | model | test accuracy | epochs | train s (wall) |")
    print("|---:|---|---:|---:|---:|")
    cpu0, t_all = _children_cpu(), time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        runs = {"teacher": teacher, "alone": cnn,
                "student": [*cnn, "--teacher", f"distill-teacher-s{seed}", "--distill-temperature", str(args.temperature),
                            "--distill-weight", str(args.weight)]}
        for label, options in runs.items():
            name = f"distill-{label}-s{seed}"
            t0 = time.perf_counter()
            subprocess.run([str(tlserve), "train", *options, "--seed", str(seed), "--name", name, "--overwrite"],
                           check=True, stdout=subprocess.DEVNULL)
            record = RunRecord.load(storage.runs_dir() / name / RECORD)
            scores[label].append(record.test.accuracy)
            print(f"| {seed} | {label} | {record.test.accuracy:.4f} | {record.epochs} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    print(f"training: {time.perf_counter() - t_all:.0f} s wall, {_children_cpu() - cpu0:.0f} s CPU; {load()}")
    for label, values in scores.items():
        print(f"{label}: test accuracy mean {np.mean(values):.4f}, sd {np.std(values):.4f}, "
              f"range {min(values):.4f}-{max(values):.4f} over {len(values)} seeds")
    gain = np.mean(scores["student"]) - np.mean(scores["alone"])
    spread = max(np.std(scores["student"]), np.std(scores["alone"]))
    paired = np.array(scores["student"]) - np.array(scores["alone"])
    print(f"student - alone: {gain:+.4f} (per seed {', '.join(f'{d:+.4f}' for d in paired)}); larger sd of the two "
          f"{spread:.4f}: {'beats' if gain > spread else 'does NOT beat'} the spread")
    if not args.no_latency:
        latency(tlserve, [f"distill-{label}-s{int(args.seeds.split(',')[0])}" for label in scores])


def latency(tlserve: Path, names: list[str]) -> None:
    """Export (ONNX) and batch-1 onnxruntime latency of each, then the compare report."""
    print(f"latency (onnxruntime, batch 1), {load()}", flush=True)
    for name in names:
        subprocess.run([str(tlserve), "export", name, "--formats", "onnx", "--no-register", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
        out = subprocess.run([str(tlserve), "bench", name, "--runtimes", "onnx", "--batch-sizes", "1",
                              "--duration", "5", "--threads", "1", "--json"], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout)["results"][0]
        print(f"{name}: p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms (1 onnxruntime thread)", flush=True)
    folder = storage.home() / "report-distill"
    subprocess.run([str(tlserve), "compare", *names, "--out", str(folder)], check=True)
    print(f"after: {load()}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
