"""`tlserve eval` on a labelled folder of its own layout (split sub-folders, a class the model does not
know, a broken file, a larger JPEG), in-process for fp32 and int8 and over HTTP against the real
service; every metric recomputed independently from predictions.csv. Then the bad inputs, and the
metrics in the run record, `tlserve runs` and `tlserve compare`."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from training.record.records import RunRecord

from conftest import bentoml_server, free_port

CLASSES = ("circle", "square", "ring", "checker")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """leafish/{train,test}/<class>/ with 4 of the model's 10 classes, an unknown class, a broken PNG,
    a text file and a 64x64 JPEG (decoded down to the model's 32x32)."""
    from training.data.sources import make_synthetic

    root = tmp_path_factory.mktemp("leafish")
    x, y, names = make_synthetic(160, seed=4242)
    count = {}
    for img, label in zip(x, y):
        name = names[label]
        if name not in CLASSES:
            continue
        count[name] = count.get(name, 0) + 1
        split = "train" if count[name] <= 2 else "test"
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{count[name]:03d}.png")
    Image.fromarray(x[0]).resize((64, 64)).save(root / "test" / "ring" / "big.jpg", quality=95)
    (root / "test" / "unicorn").mkdir()
    Image.fromarray(x[1]).save(root / "test" / "unicorn" / "u1.png")
    (root / "test" / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "test" / "circle" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def evaluated(cnn_model, labelled, tmp_path_factory, run_cli_module):
    out = tmp_path_factory.mktemp("evals") / "fp32-int8"
    r = run_cli_module("eval", cnn_model, "--data", f"folder:{labelled}", "--variants", "fp32,int8",
                       "--ignore-unknown", "--out", out, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out), out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _independent(rows: list[dict[str, str]], variant: str) -> dict:
    """Accuracy, per-class precision/recall/F1 and their macro mean, by hand from the CSV, over the
    classes that occur as a true or a predicted label."""
    pairs = [(r["true"], r[f"{variant}_predicted"]) for r in rows]
    labels = sorted({t for t, _ in pairs} | {p for _, p in pairs})
    out = {"accuracy": sum(t == p for t, p in pairs) / len(pairs), "per_class": {}}
    for c in labels:
        tp = sum(t == c and p == c for t, p in pairs)
        predicted = sum(p == c for _, p in pairs)
        actual = sum(t == c for t, _ in pairs)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out["per_class"][c] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    out["macro_f1"] = sum(v["f1"] for v in out["per_class"].values()) / len(labels)
    return out


def test_eval_metrics_match_an_independent_computation_from_predictions_csv(evaluated, labelled):
    result, out = evaluated
    assert json.loads((out / "metrics.json").read_text())["variants"] == result["variants"]
    d = result["data"]
    tested = [p for p in (labelled / "test").rglob("*") if p.suffix in (".png", ".jpg") and "unicorn" not in p.parts]
    assert d["images"] == len(tested) and d["scored"] == len(tested) - 1
    assert list(d["skipped_unreadable"]) == ["square/broken.png"]
    assert d["skipped_unknown_class"] == {"unicorn": 1}
    assert "split 'test'" in d["source"] and d["classes"] == sorted(CLASSES)
    assert result["machine"]["cpu"] and result["versions"]["python"]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == d["scored"] and {r["file"] for r in rows} >= {"ring/big.jpg", "circle/img_003.png"}
    for variant in ("fp32", "int8"):
        mine, theirs = _independent(rows, variant), result["variants"][variant]
        assert theirs["images"] == len(rows)
        assert theirs["accuracy"] == pytest.approx(mine["accuracy"])
        assert theirs["macro_f1"] == pytest.approx(mine["macro_f1"])
        assert set(theirs["per_class"]) == set(mine["per_class"])
        for c, scores in mine["per_class"].items():
            for k, v in scores.items():
                assert theirs["per_class"][c][k] == pytest.approx(v), (variant, c, k)
        assert sum(map(sum, theirs["confusion_matrix"])) == len(rows)
        assert theirs["top5_accuracy"] is not None and theirs["top5_accuracy"] >= theirs["accuracy"]
        assert 0 <= theirs["ece"] <= 1 and sum(b["count"] for b in theirs["reliability_bins"]) == len(rows)
        assert [c["threshold"] for c in theirs["coverage"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
        assert theirs["model_images_per_sec"] > 0 and theirs["provider"] == "CPUExecutionProvider"
        correct = [r for r in rows if r[f"{variant}_correct"] == "1"]
        assert all(r[f"{variant}_predicted"] == r["true"] for r in correct)
    # a model trained on these shapes is far above chance (1/10) on new ones
    assert result["variants"]["fp32"]["accuracy"] > 0.5


def test_eval_writes_figures_and_a_self_contained_page(evaluated):
    _, out = evaluated
    assert {p.name for p in out.iterdir()} == {"metrics.json", "predictions.csv", "confusion-fp32.png",
                                               "confusion-int8.png", "reliability.png", "coverage.png", "index.html"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 5  # 4 figures + at least one mistake thumbnail
    assert 'src="http' not in page and "Most confident mistakes" in page and 'class="gradcam"' in page
    assert "square/broken.png" in page and "unicorn (1 images)" in page
    # every listed mistake carries the Grad-CAM of the class it was wrongly given (the run is still there)
    assert page.count('class="mistake"') >= 1
    assert page.count('alt="Grad-CAM"') == page.count('class="mistake"')


def test_eval_over_http_matches_in_process(cnn_model, labelled, evaluated, tmp_path, run_cli_module):
    result, out = evaluated
    with bentoml_server(["serving.service:ImageClassifier"], {"TLSERVE_MODEL": str(cnn_model)},
                        tmp_path / "server.log") as url:
        r = run_cli_module("eval", cnn_model, "--data", f"folder:{labelled}", "--url", url, "--ignore-unknown",
                           "--out", tmp_path / "http", "--json")
    assert r.code == 0, r.err
    http = json.loads(r.out)
    assert list(http["variants"]) == ["http-fp32"] and http["server"]["name"] == "cnn"
    assert list(http["data"]["skipped_unreadable"]) == ["square/broken.png"]
    local = {row["file"]: row for row in _rows(out / "predictions.csv")}
    remote = _rows(tmp_path / "http" / "predictions.csv")
    assert {row["file"] for row in remote} == set(local)
    for row in remote:  # the service decodes the same files with the same decoder
        assert row["http-fp32_predicted"] == local[row["file"]]["fp32_predicted"]
        assert float(row["http-fp32_confidence"]) == pytest.approx(float(local[row["file"]]["fp32_confidence"]), abs=1e-4)
    assert http["variants"]["http-fp32"]["accuracy"] == pytest.approx(result["variants"]["fp32"]["accuracy"])


def test_eval_savedmodel_and_synthetic_split_default_folder(cnn_model, cnn_run, run_cli_module):
    # synthetic test split of the training seed: the run's own test accuracy, through the SavedModel
    r = run_cli_module("eval", cnn_model, "--data", "synthetic", "--runtime", "savedmodel", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    record = RunRecord.load(cnn_run / "record.json")
    assert result["variants"]["savedmodel"]["accuracy"] == pytest.approx(record.test.accuracy)
    assert result["variants"]["savedmodel"]["macro_f1"] == pytest.approx(record.test.macro_f1)
    assert Path(result["path"]).parent == cnn_model / "eval"


def test_eval_rich_table_and_unknown_class_error(cnn_model, labelled, run_cli_module, tmp_path):
    r = run_cli_module("eval", cnn_model, "--data", f"folder:{labelled}", "--variants", "int8",
                       "--ignore-unknown", "--out", tmp_path / "table")
    assert r.code == 0, r.err
    assert "macro F1" in r.out and "abstaining" in r.out and "square/broken.png" in r.out
    r = run_cli_module("eval", cnn_model, "--data", f"folder:{labelled}", "--out", tmp_path / "unknown")
    assert r.code == 2 and "unicorn" in r.err and "--ignore-unknown" in r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "unknown").exists()


def _bad(run_cli_module, *args):
    r = run_cli_module("eval", *args)
    assert r.code == 2, (args, r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    return r.err


def test_eval_bad_inputs_are_one_line_and_write_nothing(cnn_model, labelled, tmp_path, run_cli_module):
    evals_before = sorted((cnn_model / "eval").glob("*")) if (cnn_model / "eval").exists() else []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class sub-folders" in _bad(run_cli_module, cnn_model, "--data", f"folder:{empty}")
    strangers = tmp_path / "strangers"
    for c in ("apple", "pear"):
        (strangers / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(strangers / c / "a.png")
    assert "is one the model knows" in _bad(run_cli_module, cnn_model, "--data", f"folder:{strangers}",
                                             "--ignore-unknown")
    assert "no val" in _bad(run_cli_module, cnn_model, "--data", f"folder:{labelled}", "--split", "val")
    # a copy of the model exported without int8
    no_int8 = tmp_path / "no-int8"
    shutil.copytree(cnn_model, no_int8, ignore=shutil.ignore_patterns("model.int8.onnx", "eval", "bench"))
    manifest = json.loads((no_int8 / "manifest.json").read_text())
    del manifest["artifacts"]["model.int8.onnx"]
    (no_int8 / "manifest.json").write_text(json.dumps(manifest))
    assert "has no int8 model" in _bad(run_cli_module, no_int8, "--data", f"folder:{labelled}", "--variants", "int8",
                                       "--ignore-unknown")
    assert "unknown variant" in _bad(run_cli_module, cnn_model, "--data", "synthetic", "--variants", "int4")
    port = free_port()
    assert "no tlserve service answering" in _bad(run_cli_module, cnn_model, "--data", "synthetic",
                                                  "--url", f"http://127.0.0.1:{port}")
    assert "no such folder" in _bad(run_cli_module, cnn_model, "--data", f"folder:{tmp_path / 'nowhere'}")
    assert not (no_int8 / "eval").exists()
    after = sorted((cnn_model / "eval").glob("*")) if (cnn_model / "eval").exists() else []
    assert after == evals_before and not list((cnn_model / "eval").glob(".*")) if after else True


# ---- the same metrics in the run record, `runs` and `compare` -----------------------------------

def test_record_has_precision_recall_f1_from_its_confusion_matrix(cnn_run):
    import numpy as np

    record = RunRecord.load(cnn_run / "record.json")
    t = record.test
    m = np.array(t.confusion_matrix)
    names = record.data.class_names
    for i, c in enumerate(names):
        tp, predicted, support = m[i, i], m[:, i].sum(), m[i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        assert t.per_class[c]["precision"] == pytest.approx(p)
        assert t.per_class[c]["recall"] == pytest.approx(r) == pytest.approx(t.per_class_accuracy[c])
        assert t.per_class[c]["support"] == support
    assert t.macro_f1 == pytest.approx(np.mean([t.per_class[c]["f1"] for c in names]))


def test_runs_and_compare_show_f1_and_eval_and_still_read_old_records(cnn_run, cnn_model, runs_root, models_root,
                                                                      evaluated, tmp_path, run_cli_module):
    old_runs = tmp_path / "runs"
    old = old_runs / "old"
    shutil.copytree(cnn_run, old)
    record = json.loads((old / "record.json").read_text())
    record["name"] = "old"
    for key in ("per_class", "macro_f1", "weighted_f1"):
        del record["test"][key]
    (old / "record.json").write_text(json.dumps(record))
    shutil.copytree(cnn_run, old_runs / "cnn")
    r = run_cli_module("runs", "--runs-dir", old_runs)
    assert r.code == 0, r.err
    assert "macro F1" in r.out and "—" in r.out
    # an eval stored under the model folder: the synthetic one above wrote MODEL/eval/<timestamp>/
    r = run_cli_module("eval", cnn_model, "--data", "synthetic", "--variants", "fp32,int8", "--json")
    assert r.code == 0, r.err
    report = tmp_path / "report"
    r = run_cli_module("compare", "--runs-dir", old_runs, "--models-dir", models_root, "--out", report)
    assert r.code == 0, r.err
    md = (report / "report.md").read_text()
    assert "| class | cnn accuracy | precision | recall | F1 | support |" in md
    assert "| class | old accuracy |" in md
    section = md.split("beside their latency")[1].split("##")[0]
    assert "| cnn | fp32 | synthetic (seed 0, test split) | 400 |" in section
    assert "| cnn | int8 |" in section


def test_eval_cifar10_batches_folder(cnn_model, tmp_path, run_cli_module):
    """cifar10:PATH reads the python-pickle batches; its label names (batches.meta) are matched by name,
    here a shuffled order of the model's own classes, so labels must be remapped, not taken as indices."""
    import pickle

    import numpy as np

    from training.data.sources import make_synthetic

    x, y, names = make_synthetic(60, seed=77)
    order = names[::-1]  # the batches' label i is the model's class 9 - i
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    relabelled = [order.index(names[label]) for label in y]
    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({b"data": flat, b"labels": relabelled}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in order]}))
    r = run_cli_module("eval", cnn_model, "--data", f"cifar10:{folder}", "--variants", "fp32",
                       "--out", tmp_path / "out", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 60 and [row["true"] for row in rows] == [names[label] for label in y]
    assert result["variants"]["fp32"]["accuracy"] == pytest.approx(_independent(rows, "fp32")["accuracy"])
    assert result["variants"]["fp32"]["accuracy"] > 0.5 and np.isclose(sum(map(sum, result["variants"]["fp32"]["confusion_matrix"])), 60)
