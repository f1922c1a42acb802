"""Progress on every long step: a rich bar on a terminal, exactly one line per step elsewhere,
never both. The long steps are real ones: decoding a folder, feature extraction, the test
evaluation, and export's conversions, accuracy checks and int8 calibration."""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
from collections import Counter

from PIL import Image

BAR = re.compile("[\u2500-\u257f\r]|\x1b\\[")  # rich's bar glyphs, carriage returns, terminal escapes


def _lines(err: str) -> Counter:
    """Step lines (`<step>: <count or done> ... in N s`) by step name."""
    return Counter(m.group(1) for m in re.finditer(r"^(.+?): (?:[\d,/]+ images|done) in [\d.]+ s$", err, re.M))


def test_step_is_a_bar_on_a_terminal_and_one_line_elsewhere():
    from training import progress

    for bar in (True, False):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            with progress.step("counting", 10, bar=bar) as advance:
                for _ in range(10):
                    advance(1)
        text = err.getvalue()
        if bar:
            assert "\u2501" in text and "counting: 10 images in" not in text  # the bar only
        else:
            assert re.fullmatch(r"counting: 10 images in \d+\.\d s\n", text), text  # the line only
            assert not BAR.search(text)


def test_train_and_export_print_one_line_per_long_step(run_cli, tlserve_bin, tmp_path):
    from training.data.sources import make_synthetic

    x, y, names = make_synthetic(60, seed=5)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / "images" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    frozen = run_cli("train", "--data", f"folder:{tmp_path / 'images'}", "-b", "mobilenetv2", "-s", "frozen",
                     "--weights", "none", "--input-size", "32", "--epochs", "1", "--name", "frozen",
                     "--runs-dir", tmp_path / "runs")
    assert frozen.code == 0, frozen.err
    assert _lines(frozen.err) == {"decoding images from images": 1, "extracting features": 1, "test evaluation": 1}
    assert not BAR.search(frozen.err)

    cnn = run_cli("train", "--data", "synthetic", "--limit", "64", "--epochs", "1", "--name", "cnn",
                  "--runs-dir", tmp_path / "runs")
    assert cnn.code == 0, cnn.err
    # A separate process whose stderr is a pipe, as in CI or `2> log`.
    export = subprocess.run([str(tlserve_bin), "export", "cnn", "--int8", "--no-register", "--runs-dir",
                             str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")],
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    assert _lines(export.stderr) == {"OOD reference: training features": 1, "OOD threshold: validation features": 1,
                                     "writing the SavedModel": 1, "converting to ONNX": 1, "test accuracy of model.onnx": 1,
                                     "int8 calibration": 1, "test accuracy of model.int8.onnx (every convolution int8)": 1,
                                     "timing int8 against fp32": 1}
    assert not BAR.search(export.stderr)
