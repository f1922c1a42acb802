"""Label issues in `tlserve data check`, `tlserve train --exclude`, and the typed report.json.

The set: three classes told apart by their colour (reddish, greenish, bluish fields with random
shapes), with a few images filed under the wrong class. MobileNetV2 with random weights (`--weights
none`) still separates the colours, so the out-of-fold classifier and cleanlab find the misfiled ones
without the shared ImageNet weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("red", "green", "blue")
SIZE = 48
DATA = Path(__file__).parent / "data"


def coloured_image(rng: np.random.Generator, cls: int) -> Image.Image:
    base = np.full(3, 30.0)
    base[cls] = 220.0
    field = np.clip(base + rng.normal(0, 12, (4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(field).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(2):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - 10, 2))
        grey = int(rng.integers(0, 256))
        draw.ellipse([x0, y0, x0 + 8, y0 + 8], fill=(grey, grey, grey))
    return img


def make_set(root: Path, *, per_class: int = 24, wrong: int = 3, seed: int = 5) -> list[str]:
    """train/ and test/ class folders; returns the misfiled files (relative to root)."""
    rng = np.random.default_rng(seed)
    misfiled = []
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                coloured_image(rng, k).save(root / split / name / f"{i:03d}.png")
    for j in range(wrong):  # a red image filed as green, a green one as blue, ...
        true, given = j % 3, (j + 1) % 3
        rel = f"{'test' if j == wrong - 1 else 'train'}/{CLASSES[given]}/misfiled_{j}.png"
        coloured_image(rng, true).save(root / rel)
        misfiled.append(rel)
    return misfiled


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("labels")
    return root, make_set(root)


@pytest.fixture(scope="module")
def checked(labelled_set, tmp_path_factory, run_cli_module):
    """One full check with --suspects, shared by the tests that read its outputs."""
    from training.audit import embeddings

    root, _ = labelled_set
    out = tmp_path_factory.mktemp("check")
    suspects = out / "suspects.txt"
    with pytest.MonkeyPatch.context() as mp:  # the label pass's larger copies at 96 px, not 224: a test's time
        mp.setattr(embeddings, "LABEL_PIXELS", 100 * 96 * 96)
        res = run_cli_module("data", "check", "--data", f"folder:{root}", "--out", out / "report", "--weights", "none",
                             "--suspects", suspects, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out), out / "report", suspects


def test_the_misfiled_images_are_the_suspects(labelled_set, checked):
    _, misfiled = labelled_set
    report, folder, suspects = checked
    issues = report["label_issues"]
    assert issues["status"] == "done" and issues["folds"] == 5 and "Northcutt" in issues["method"]
    assert "at 96 px" in issues["classifier"] and report["seconds"]["labels"] > 0
    listed = [s["file"] for s in issues["suspects"]]
    assert set(misfiled) <= set(listed), f"missed {set(misfiled) - set(listed)}"
    assert len(listed) <= 2 * len(misfiled), listed        # precision >= 0.5 on a clean-cut set
    for s in issues["suspects"]:
        if s["file"] in misfiled:
            true = CLASSES[(CLASSES.index(s["given"]) - 1) % 3]
            assert s["suggested"] == true and s["score"] == pytest.approx(s["probabilities"][s["given"]], abs=1e-3)
        assert set(s["probabilities"]) == set(CLASSES) and sum(s["probabilities"].values()) == pytest.approx(1, abs=0.01)
    assert set(issues["typical"]) == set(CLASSES)
    # The list for `tlserve train --exclude`, the page's cards (the image, a typical given, a typical suggested).
    assert suspects.read_text().splitlines() == listed
    page = (folder / "index.html").read_text()
    assert page.count("class='pair suspect'") == len(listed) and "Northcutt" in page


def test_report_json_round_trips_and_schema_1_files_load(checked):
    from training.audit.report import SCHEMA, DataCheckReport

    report, folder, _ = checked
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk == report and report["schema"] == SCHEMA
    typed = DataCheckReport.from_dict(on_disk)
    assert typed.to_dict() == on_disk and typed.label_issues.suspects[0].row is None  # rows never reach JSON
    old = json.loads((DATA / "data_check_report_schema1.json").read_text())  # written by the untyped check
    loaded = DataCheckReport.from_dict(old)
    assert loaded.schema == 1 and loaded.label_issues is None
    assert {k: v for k, v in loaded.to_dict().items() if k not in ("schema", "label_issues")} == old


@pytest.mark.parametrize("change, message", [
    ({"schema": 99}, "schema 99 is newer than this tlserve reads"),
    ({"pairs": {"a": 1}}, "report.json: report.pairs should be a list"),
    ({"surprise": 1}, "unknown key 'surprise' in report"),
])
def test_a_broken_report_json_is_one_line(change, message):
    from serving.base.errors import UserError
    from training.audit.report import DataCheckReport

    old = json.loads((DATA / "data_check_report_schema1.json").read_text())
    with pytest.raises(UserError, match=message):
        DataCheckReport.from_dict({**old, **change})


def test_train_exclude_drops_the_listed_training_images_and_records_them(labelled_set, run_cli, tmp_path):
    root, misfiled = labelled_set
    listing = tmp_path / "exclude.txt"
    listing.write_text("# from data check\n" + "\n".join(misfiled + ["train/red/no_such.png"]) + "\n")
    res = run_cli("train", "--data", f"folder:{root}", "--image-size", "32", "--epochs", "1", "--data-check", "off",
                  "--exclude", listing, "--name", "excluded", "--runs-dir", tmp_path / "runs", "--json")
    assert res.code == 0, res.err
    record = json.loads(res.out)
    excluded = record["data"]["excluded"]
    in_train = [f for f in misfiled if f.startswith("train/")]
    assert sorted(excluded["files"]) == sorted(in_train) and excluded["count"] == len(in_train)
    assert (excluded["held_out"], excluded["not_found"], excluded["listed"]) == (1, 1, len(misfiled) + 1)
    assert record["data"]["splits"]["train"] == excluded["train_before"] - len(in_train)
    assert record["config"]["exclude"] == str(listing) and "--exclude: dropped 2 training image(s)" in res.err


@pytest.mark.parametrize("content, message", [
    (None, "--exclude {path}: no such file"),
    ("train/red/nothing.png\n", "none of its 1 path(s) is an image of --data"),
])
def test_a_bad_exclude_list_is_one_line_exit_2(labelled_set, run_cli, tmp_path, content, message):
    root, _ = labelled_set
    path = tmp_path / "list.txt"
    if content is not None:
        path.write_text(content)
    res = run_cli("train", "--data", f"folder:{root}", "--image-size", "32", "--epochs", "1", "--data-check", "off",
                  "--exclude", path, "--runs-dir", tmp_path / "runs")
    errors = [line for line in res.err.splitlines() if line.startswith("error")]
    assert res.code == 2 and len(errors) == 1 and message.format(path=path) in errors[0], res.err
    assert "Traceback" not in res.err and not any((tmp_path / "runs").glob("*/record.json"))


def test_a_class_of_one_image_is_skipped_and_one_class_is_no_label_search(labelled_set):
    from training.audit import labels
    from training.audit.fingerprints import Images

    rng = np.random.default_rng(0)
    n = 40
    y = np.r_[np.zeros(n // 2, int), np.ones(n // 2 - 1, int), [2]]  # class 2: a single image
    features = rng.normal(size=(n, 16)) + y[:, None] * 3.0
    imgs = Images(split=np.zeros(n, np.int8), names=[f"f{i}.png" for i in range(n)], labels=y, exact=[], phash=None,
                  phash_mirror=None, small=None, label_small=None, grey=None, colour=None, facts=[])
    lines: list[str] = []
    issues = labels.find(features, imgs, ["a", "b", "lonely"], side=64, log=lines.append)
    assert issues.status == "done" and issues.skipped_classes == ["lonely"] and issues.images == n - 1
    assert [line for line in lines if "lonely" in line] == [
        "note: label issues: class 'lonely' has 1 image (fewer than 2): no k-fold possible, its images are skipped"]
    lines.clear()
    one = labels.find(features[:20], Images(**{**imgs.__dict__, "labels": y[:20], "split": imgs.split[:20]}),
                      ["a", "b", "lonely"], side=64, log=lines.append)
    assert one.status == "skipped" and "a label can only be doubted against another class" in one.why
    assert len(lines) == 1 and lines[0].startswith("note: label issues skipped:")


def test_a_weak_fold_model_comes_with_a_caution_and_a_strong_one_without():
    """Overlapping classes (the fold model right on about 60%) list mostly its own confusions: say so."""
    from training.audit import labels
    from training.audit.fingerprints import Images

    rng = np.random.default_rng(1)
    n = 300
    y = np.arange(n) % 3
    imgs = Images(split=np.zeros(n, np.int8), names=[f"f{i}.png" for i in range(n)], labels=y, exact=[], phash=None,
                  phash_mirror=None, small=None, label_small=None, grey=None, colour=None, facts=[])
    for separation, cautioned in ((0.8, True), (6.0, False)):
        features = rng.normal(size=(n, 16)) + np.eye(3, 16)[y] * separation
        lines: list[str] = []
        issues = labels.find(features, imgs, ["a", "b", "c"], side=64, log=lines.append)
        assert issues.status == "done"
        assert (issues.out_of_fold_accuracy < labels.WEAK_FOLD_ACCURACY) is cautioned
        assert (issues.caution is not None) is cautioned
        assert [line for line in lines if "right on only" in line] == ([f"note: label issues: {issues.caution}"]
                                                                       if cautioned else [])


def test_the_label_features_are_five_depths_of_equal_variance_ending_in_the_pair_searchs(tmp_path):
    """embeddings(layers=LABEL_LAYERS): one pass, each depth's pooled channels side by side at equal total
    variance, its last block the near-copy search's own features up to a scale (which project ignores)."""
    from training.audit import embeddings as E
    from training.model import backbones

    weights = str(tmp_path / "mobilenetv2.weights.h5")  # one set of random weights for both passes
    backbones.build_pretrained(backbones.get("mobilenetv2"), 32, "none").save_weights(weights)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    last = E.embeddings(x, weights)
    both = E.embeddings(x, weights, layers=E.LABEL_LAYERS)
    assert last.shape == (12, E.POOLED_WIDTH) and both.shape == (12, 192 + 384 + 576 + 960 + 1280)
    edges = np.cumsum([0, 192, 384, 576, 960, 1280])
    spread = [((b - b.mean(axis=0)) ** 2).sum(axis=1).mean() for b in (both[:, i:j] for i, j in zip(edges, edges[1:]))]
    assert spread == pytest.approx([1.0] * 5, rel=1e-3)
    np.testing.assert_allclose(E.project(E.last_layer(both)), E.project(last), atol=1e-4)


def test_without_cleanlab_the_check_goes_on_with_one_line(labelled_set, monkeypatch, tmp_path):
    import sys

    from training.audit import datacheck
    from training.config import DataConfig

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab...` now raises ImportError
    root, _ = labelled_set
    lines: list[str] = []
    report = datacheck.check(DataConfig(spec=f"folder:{root}"), mode="full", weights="none", log=lines.append, bar=False)
    notes = [line for line in lines if "label issues skipped" in line]
    assert len(notes) == 1 and "pip install 'tlserve[labels]'" in notes[0], lines
    assert report.facts.label_issues.status == "skipped" and report.facts.embeddings.startswith("MobileNetV2")


def test_weights_that_do_not_fit_are_one_line_and_nothing_written(labelled_set, run_cli, tmp_path):
    root, _ = labelled_set
    bad = tmp_path / "other.weights.h5"
    import h5py

    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    res = run_cli("data", "check", "--data", f"folder:{root}", "--weights", bad, "--out", tmp_path / "out")
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code == 2 and len(lines) == 1 and f"--weights {bad} does not match mobilenetv2" in lines[0], res.err
    assert not (tmp_path / "out").exists()
