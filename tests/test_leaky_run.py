"""A run whose validation and test splits copy its training images (issue 29, items 1 and 2), trained for
real on a folder set with planted copies: calibration keeps no temperature and says why; the record
scores the test images that are not copies; `compare` marks every figure of the run as leaky and ranks
by leak-free accuracy."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.record.records import RunRecord

from conftest import train_run

SIDE = 32
CLASSES = ("reddish", "bluish")


def _image(rng: np.random.Generator, label: int, tint: float) -> Image.Image:
    """Noise (so no two images look alike to the data check) whose red or blue channel is lifted by `tint`."""
    x = rng.uniform(0, 160, (SIDE, SIDE, 3))
    x[..., 0 if label == 0 else 2] += tint
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_leaky_set(root: Path, seed: int = 3) -> dict[str, int]:
    """train/ (40 per class), validation/ (8 copies of train + 8 new easy images per class), test/ (8 copies
    of train + 12 new images per class with a faint tint, which the model gets partly wrong)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folders = {split: root / split / name for split in ("train", "validation", "test")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        train = [folders["train"] / f"{i:03d}.png" for i in range(40)]
        for path in train:
            _image(rng, label, 95).save(path)
        for split, copies in (("validation", 8), ("test", 8)):
            for i, src in enumerate(rng.choice(train, copies, replace=False)):
                shutil.copy(src, folders[split] / f"copy-{i:02d}.png")
        for i in range(8):
            _image(rng, label, 95).save(folders["validation"] / f"new-{i:02d}.png")
        for i in range(12):
            _image(rng, label, 12).save(folders["test"] / f"new-{i:02d}.png")
    return {"val_copies": 16, "test_copies": 16, "test": 40}


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("leaky")
    planted = make_leaky_set(root / "data")
    run = train_run(root / "runs", "leaky", data=f"folder:{root / 'data'}", backbone="cnn",
                    cnn_layers="c8,p,c16,p,f,d16", epochs=6, batch_size=16, seed=2)
    return run, planted


def test_a_validation_split_of_copies_and_right_answers_keeps_no_temperature(leaky):
    """Today's code fitted T on these 32 validation images, all right: every smaller T "helped", so it baked T in."""
    run, planted = leaky
    cal = RunRecord.load(run / "record.json").calibration
    assert cal.temperature is None and cal.layer is None
    assert cal.val_copies == planted["val_copies"] and cal.val_images == 32 - planted["val_copies"]
    assert cal.val_errors < 20 and f"leaving out the {planted['val_copies']} that copy training images" in cal.skipped
    assert "\n" not in cal.skipped
    # The model as saved is the trained one: its test log-loss is recorded beside the reason.
    assert cal.test_nll_before > 0 and cal.test_nll_after is None


def test_the_record_scores_the_test_images_that_are_not_copies(leaky):
    from training.config import DataConfig
    from training.data.sources import load_dataset
    from training.model.build import load_model

    run, planted = leaky
    record = RunRecord.load(run / "record.json")
    assert record.data_check.leaks["test-in-train"]["images"] == planted["test_copies"]
    test = load_dataset(DataConfig(**record.config["data"])).test
    right = load_model(run / "model.keras").predict(test.x.astype(np.float32), verbose=0).argmax(1) == test.y
    new = np.array(["new-" in str(f) for f in test.files])
    assert record.test.leak_free_images == int(new.sum()) == planted["test"] - planted["test_copies"]
    assert record.test.leak_free_accuracy == pytest.approx(float(right[new].mean()))
    assert record.test.accuracy == pytest.approx(float(right.mean()))
    assert record.test.leak_free_accuracy < record.test.accuracy  # the copies were the easy part


def test_compare_marks_every_figure_of_a_leaky_run(leaky, tmp_path, run_cli):
    run, planted = leaky
    record = RunRecord.load(run / "record.json")
    out = tmp_path / "report"
    result = run_cli("compare", "leaky", "--runs-dir", run.parent, "--models-dir", tmp_path / "models", "--out", out)
    assert result.code == 0, result.err
    free = f"{record.test.leak_free_accuracy:.4f}"
    said = " ".join(result.out.split())
    assert f"Most accurate: leaky at {free} leak-free test accuracy" in said
    assert f"{planted['test_copies']} of {planted['test']} test images copy" in said
    md = (out / "report.md").read_text()
    # every table row of the run that carries its test accuracy carries the leak beside it
    rows = [line for line in md.splitlines() if line.startswith("| leaky") and f"{record.test.accuracy:.4f}" in line]
    assert rows and all("LEAKY" in line and free in line for line in rows)
