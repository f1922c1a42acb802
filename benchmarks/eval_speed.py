"""`tlserve eval` against `tlserve bench`: is scoring a labelled set as fast as the model runs?

    .venv/bin/python benchmarks/eval_speed.py MODEL [--data folder:../shared/datasets/cifar10-jpg]
                                              [--variants fp32,int8] [--limit N] [--rounds 1]

For each variant, on the same files (the --split of --data, default the 10,000 CIFAR-10 test JPEGs):
  - eval's images/s: tlserve eval's in-process scoring (training.exported.evaluation.score_inprocess: decode in
    threads one chunk ahead, onnxruntime at evaluation.BATCH), decoding included, wall clock;
  - bench's batch-32 images/s: serving.timing's timing loop (time_calls, images/s = 32 x 1000 / mean ms)
    on a session loaded as bench loads it, over a batch of 32 of those images decoded beforehand, as
    `tlserve bench --runtimes onnx,onnx-int8 --batch-sizes 32` runs it.
Prints both and their ratio (target: eval at >= 80% of bench's batch-32 images/s). Writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import timing as bench  # noqa: E402
from serving.base.machine import cpu_model  # noqa: E402
from serving.base.manifest import Manifest, resolve_model  # noqa: E402
from serving.sessions import OnnxClassifier  # noqa: E402
from training.exported import evaluation  # noqa: E402

DEFAULT_DATA = f"folder:{ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--variants", default="fp32,int8")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (quick runs)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of bench timing per variant")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    manifest = Manifest.load(model_dir)
    hw, interpolation = manifest.input.hw, manifest.input.interpolation
    data = evaluation.load_labelled(args.data, args.split, manifest.class_names, hw, ignore_unknown=True)
    if args.limit:
        keep = slice(0, args.limit)
        data = evaluation.Labelled(data.names[keep], data.labels[keep], data.source,
                                   data.paths[keep] if data.paths else None,
                                   data.arrays[keep] if data.arrays is not None else None)
    batch32 = np.stack([a for a in (data.pixels(i, hw, interpolation) for i in range(64)) if a is not None][:32])
    batch32 = batch32.astype(np.float32)
    print(f"machine: {cpu_model()}; model {manifest.name} ({manifest.backbone}, input {hw[0]}x{hw[1]}); "
          f"{len(data):,} images from {data.source}; best of {args.rounds} round(s)", flush=True)
    for variant in evaluation.load_variants(model_dir, manifest, "onnx", args.variants):
        # bench's own session (serving.sessions.load: default spinning, default threads)
        benched = OnnxClassifier.load(model_dir, variant=variant.name)
        evals, benches = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same neighbours on a shared machine
            scored = evaluation.score_inprocess(data, [variant], hw, interpolation, manifest.num_classes,
                                                log=lambda line: None)
            evals.append(int(scored.kept.sum()) / scored.wall_seconds)
            samples = bench.time_calls(lambda: benched.predict(batch32), warmup=5, iterations=None,
                                       duration=args.duration)
            benches.append(32 * 1000 / bench.percentiles(samples)["mean_ms"])
        print(f"{variant.name}: eval {max(evals):,.1f} images/s (decoding included; rounds: "
              f"{', '.join(f'{r:,.1f}' for r in evals)}), bench batch 32 {max(benches):,.1f} images/s (rounds: "
              f"{', '.join(f'{r:,.1f}' for r in benches)}) -> eval at {max(evals) / max(benches):.0%} of bench",
              flush=True)

if __name__ == "__main__":
    main()
