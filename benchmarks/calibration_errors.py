"""How many wrong validation images does a temperature need, and what range do honest temperatures
fall in? The figures behind training.fit.calibration's MIN_ERRORS and T_RANGE (docs/decisions.md).

    .venv/bin/python benchmarks/calibration_errors.py runs/NAME [runs/NAME ...] [--trials 200]

For each finished run it recovers the model's raw probabilities on its validation and test splits
(a baked temperature is undone: softmax(z / T) at temperature 1/T gives back softmax(z)), pools them
(both are held-out images the model never trained on, so a draw from the pool is an honest validation
split), and many times over draws a validation split of N images, the rest being its test split. On
each draw it fits T as calibration does (NLL, golden section over [0.05, 20]), runs the 5-fold
cross-check, and scores the test log-loss before and after T. The rows are grouped by the number of
wrong answers in the drawn validation split: a temperature is only as good as the errors it saw.

Printed: per run, the temperature fitted on its own whole validation split (the range); then per group
of errors, the share of draws the cross-check kept, and of those kept the share that raised the test
log-loss, its median and worst change, and the share that ended on the search's bounds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import DataConfig  # noqa: E402
from training.data.sources import load_dataset  # noqa: E402
from training.fit import calibration  # noqa: E402
from training.model.build import load_model  # noqa: E402
from training.record import metrics  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

GROUPS = [(0, 0), (1, 2), (3, 5), (6, 9), (10, 14), (15, 19), (20, 29), (30, 49), (50, 10**9)]


def raw_outputs(run: Path, cache: Path | None = None) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(name, val y, raw val probabilities, test y, raw test probabilities), kept in `cache` (a folder) if given."""
    record = RunRecord.load(run / RECORD)
    stored = cache / f"{record.name}-{record.created_at}.npz" if cache else None
    if stored is not None and stored.is_file():
        with np.load(stored) as z:
            return record.name, z["vy"], z["vp"], z["ty"], z["tp"]
    data = load_dataset(DataConfig(**record.config["data"]))
    model = load_model(run / "model.keras")
    baked = record.calibration.temperature if record.calibration is not None else None
    undo = (lambda p: metrics.apply_temperature(p, 1 / baked)) if baked else (lambda p: p)
    val = undo(model.predict(data.val.x.astype(np.float32), verbose=0, batch_size=128))
    test = undo(model.predict(data.test.x.astype(np.float32), verbose=0, batch_size=128))
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stored, vy=data.val.y, vp=val, ty=data.test.y, tp=test)
    return record.name, data.val.y, val, data.test.y, test


def draw(y: np.ndarray, p: np.ndarray, n: int, rng: np.random.Generator) -> dict[str, float]:
    order = rng.permutation(len(y))
    v, t = order[:n], order[n:]
    temperature = metrics.fit_temperature(y[v], p[v])
    change, t_stat = calibration.held_out_gain(y[v], p[v])
    before = metrics.nll(y[t], p[t])
    after = metrics.nll(y[t], metrics.apply_temperature(p[t], temperature))
    return {"errors": int(np.sum(p[v].argmax(1) != y[v])), "T": temperature,
            "kept": calibration.cross_check_reason(n, change, t_stat) is None, "rel": after / before - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--trials", type=int, default=200, help="draws per run and validation size")
    parser.add_argument("--sizes", default="30,60,100,200,400,800", help="validation split sizes to draw")
    parser.add_argument("--cache", type=Path, default=None, help="keep each run's raw outputs here (npz)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print("| run | val / test images | val errors | test accuracy | T on its val split | test NLL before -> after |")
    print("|---|---:|---:|---:|---:|---|")
    for run in map(Path, args.runs):
        name, vy, vp, ty, tp = raw_outputs(run, args.cache)
        t_own = metrics.fit_temperature(vy, vp)
        print(f"| {name} | {len(vy)} / {len(ty)} | {int(np.sum(vp.argmax(1) != vy))} | {np.mean(tp.argmax(1) == ty):.4f} | "
              f"{t_own:.3f} | {metrics.nll(ty, tp):.4f} -> {metrics.nll(ty, metrics.apply_temperature(tp, t_own)):.4f} |",
              flush=True)
        y, p = np.concatenate([vy, ty]), np.concatenate([vp, tp])
        for n in (int(s) for s in args.sizes.split(",")):
            if n < len(y) - 50:
                rows += [draw(y, p, n, rng) for _ in range(args.trials)]
    print("\n| val errors | draws | kept by the cross-check | kept and raised test NLL | median change (kept) | "
          "worst change (kept) | T on a bound (kept) | T 5th-95th pct (kept) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for low, high in GROUPS:
        group = [r for r in rows if low <= r["errors"] <= high]
        kept = [r for r in group if r["kept"]]
        if not group:
            continue
        label = f"{low}" if low == high else (f"{low}+" if high > 10**8 else f"{low}-{high}")
        rel = np.array([r["rel"] for r in kept]) if kept else np.zeros(0)
        temps = np.array([r["T"] for r in kept]) if kept else np.zeros(0)
        bound = np.mean((temps <= 0.0501) | (temps >= 19.9)) if kept else 0.0
        print(f"| {label} | {len(group)} | {len(kept) / len(group):.0%} | "
              + (f"{np.mean(rel > 0):.0%} | {np.median(rel):+.1%} | {rel.max():+.1%} | {bound:.0%} | "
                 f"{np.percentile(temps, 5):.2f}-{np.percentile(temps, 95):.2f} |" if kept else "— | — | — | — | — |"))


if __name__ == "__main__":
    main()
