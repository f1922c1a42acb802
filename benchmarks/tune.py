"""Does `tlserve tune` find a better configuration than the defaults, and how long does a study take?

    nice -n 5 .venv/bin/python benchmarks/tune.py [--trials 40] [--seeds 0,1,2] [--data folder:...]

1. One study (`tlserve tune`, a fresh SQLite study) of --trials trials over MobileNetV2@128, frozen, with
   the real ImageNet weights, on banana-leaf: wall time, the search's CPU time, and the load average
   (the machine is shared; timings taken under load read high).
2. The best configuration (the study's best.yaml) and the default one (the same options without the
   space) trained as runs with each training seed in --seeds, on the split the study searched (the
   data seed stays 0): test accuracy of each, measured once per run, mean and spread.

Runs and the study go to TLSERVE_HOME (default benchmarks/.work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base import storage  # noqa: E402

# shared/ beside the repository (a helper's worktree sits one folder deeper)
SHARED = next((p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared")
WEIGHTS = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
SPACE = ("lr=1e-4..3e-2:log,weight_decay=0..1e-3,dropout=0..0.5,label_smoothing=0..0.2,head=gap|gap-dense,"
         "epochs=3..40,class_weight=none|balanced")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{SHARED / 'datasets' / 'banana-leaf'}")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--space", default=SPACE)
    args = parser.parse_args()
    base = ["--data", args.data, "--image-size", "128", "--input-size", "128", "-b", "mobilenetv2", "-s", "frozen",
            "--weights", str(WEIGHTS)]
    study = "bench-tune"
    folder = storage.home() / "tune" / study
    shutil.rmtree(folder, ignore_errors=True)
    tlserve = Path(sys.executable).with_name("tlserve")
    command = [str(tlserve), "tune", *base, "--space", args.space, "--trials", str(args.trials), "--study", study,
               "--no-final"]
    print("study: " + " ".join(command[1:]))
    print(f"before: {load()}", flush=True)
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run(command, check=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    summary = json.loads((folder / "summary.json").read_text())
    print(f"after: {load()}")
    print(f"whole study (process start to exit, data loading and feature extraction included): {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU; the search itself {summary['search']['seconds']:.1f} s wall, "
          f"{summary['search']['cpu_seconds']:.1f} s CPU (features {summary['search']['extract_seconds']:.1f} s); "
          f"trials {summary['trials']}")
    print(f"best trial {summary['best_trial']['number']}: val accuracy {summary['best_trial']['val_accuracy']:.4f}, "
          f"{summary['best_trial']['params']}", flush=True)
    final(folder / "best.yaml", base, [int(s) for s in args.seeds.split(",")])


def final(recipe: Path, base: list[str], seeds: list[int]) -> None:
    """Best and default configurations, one run per training seed, on the study's split."""
    from training.fit import recipes  # noqa: PLC0415
    from training.fit.train import train  # noqa: PLC0415

    best = recipes.train_config(_as_params(recipes.read(recipe)))
    default = recipes.train_config(_as_params(_options(base)))
    scores: dict[str, list[float]] = {"best": [], "default": []}
    print("| training seed | configuration | test accuracy | val accuracy | epochs | s |")
    print("|---:|---|---:|---:|---:|---:|")
    for seed in seeds:
        for label, cfg in (("best", best), ("default", default)):
            name = f"bench-tune-{label}-s{seed}"
            t0 = time.perf_counter()
            run = train(dataclasses.replace(cfg, seed=seed, name=name, overwrite=True), log=lambda _line: None,
                        progress=False)
            vals = [r["val_accuracy"] for r in run.record.history if r.get("val_accuracy") is not None]
            scores[label].append(run.record.test.accuracy)
            print(f"| {seed} | {label} | {run.record.test.accuracy:.4f} | {vals[-1]:.4f} | {run.record.epochs} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    for label, values in scores.items():
        print(f"{label}: test accuracy mean {np.mean(values):.4f}, sd {np.std(values):.4f}, "
              f"range {min(values):.4f}-{max(values):.4f} over {len(values)} seeds")
    print(f"best - default: {np.mean(scores['best']) - np.mean(scores['default']):+.4f} test accuracy; {load()}")


def _options(argv: list[str]) -> dict[str, str]:
    """['--data', 'x', '-b', 'y', ...] as {option: value}."""
    short = {"-b": "backbone", "-s": "strategy"}
    return {short.get(k, k.lstrip("-").replace("-", "_")): v for k, v in zip(argv[::2], argv[1::2])}


def _as_params(options: dict) -> dict:
    """Recipe keys as `tlserve train` parameter names, with numbers as numbers."""
    out = {}
    for key, value in options.items():
        key = str(key).replace("-", "_")
        if key in ("image_size", "input_size") and value is not None:
            value = int(value)
        out[key] = value
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
