"""Would calibration's cross-check have kept each run's temperature, and did the temperature help the
test split? For finished runs that baked a temperature in:

    .venv/bin/python benchmarks/calibration_cv.py runs/NAME [runs/NAME ...]

The saved model has T baked in; softmax(z / T) with temperature 1/T applied gives back the
uncalibrated probabilities exactly, so the validation split's raw probabilities are recovered and put
through training.fit.calibration.cross_check's rule (5-fold, improvement of at least two standard
errors), beside the test log-loss before and after T.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.fit import calibration  # noqa: E402
from training.record import metrics  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data.sources import load_dataset  # noqa: E402
from training.model.build import load_model  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402


def main(paths: list[str]) -> None:
    print("| run | val images | T | test NLL before -> after | cross-check |")
    print("|---|---:|---:|---|---|")
    for run in map(Path, paths):
        record = RunRecord.load(run / RECORD)
        t = record.calibration.temperature if record.calibration is not None else None
        if t is None:
            print(f"| {run.name} | | | | no temperature baked in |")
            continue
        data = load_dataset(DataConfig(**record.config["data"]))
        model = load_model(run / "model.keras")
        raw_val = metrics.apply_temperature(model.predict(data.val.x.astype(np.float32), verbose=0), 1 / t)
        raw_test = metrics.apply_temperature(model.predict(data.test.x.astype(np.float32), verbose=0), 1 / t)
        verdict = calibration.cross_check(data.val.y, raw_val) or "keep"
        print(f"| {run.name} | {len(data.val.y)} | {t:.3f} | {metrics.nll(data.test.y, raw_test):.4f} -> "
              f"{metrics.nll(data.test.y, metrics.apply_temperature(raw_test, t)):.4f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
