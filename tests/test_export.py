"""Export: SavedModel and ONNX files that agree with Keras, load anywhere, and refuse tampering."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from conftest import cli_call, train_run
from serving.base.manifest import sha256_file
from serving.sessions import OnnxClassifier
from serving.base.errors import UserError


def _manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def backbone_models(runs_root, models_root) -> dict[str, Path]:
    """Tiny runs of every pretrained backbone (random weights, input 32), exported once."""
    out = {}
    for backbone in ("mobilenetv2", "vgg16", "resnet50v2"):
        name = f"exp-{backbone}"
        train_run(runs_root, name, limit=48, backbone=backbone, strategy="frozen", weights="none", input_size=32,
                  epochs=1, batch_size=16)
        cli_call("export", name, "--runs-dir", runs_root, "--models-dir", models_root, "--no-register")
        out[backbone] = models_root / name
    return out


def _check_onnx_everywhere(model_dir: Path, run_dir: Path) -> None:
    from training.model.build import load_model

    path = model_dir / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["probabilities", "ood_score"]  # the OOD score: test_ood.py
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim0.HasField("dim_value")  # dynamic batch
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    keras_probs = load_model(run_dir / "model.keras").predict(x, verbose=0)
    ort_probs = OnnxClassifier.load(model_dir).predict(x)
    ref_probs = ReferenceEvaluator(proto).run(None, {"image": x})[0]
    np.testing.assert_allclose(ort_probs, keras_probs, atol=1e-4)
    np.testing.assert_allclose(ref_probs, keras_probs, atol=1e-4)
    facts = _manifest(model_dir)["artifacts"]["model.onnx"]
    assert facts["max_abs_diff"] <= 1e-4 and facts["top1_agreement"] == 1.0


def test_cnn_export_agrees_everywhere(cnn_model, cnn_run):
    _check_onnx_everywhere(cnn_model, cnn_run)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "vgg16", "resnet50v2"])
def test_backbone_exports_agree_everywhere(backbone_models, runs_root, backbone):
    _check_onnx_everywhere(backbone_models[backbone], runs_root / f"exp-{backbone}")


def test_manifest_contract(cnn_model, cnn_run):
    m = _manifest(cnn_model)
    record = json.loads((cnn_run / "record.json").read_text())
    assert m["name"] == "cnn" and m["run"] == "cnn" and m["class_names"] == record["data"]["class_names"]
    assert m["input"] == {"name": "image", "shape": [None, 32, 32, 3], "dtype": "float32", "range": [0, 255],
                          "layout": "NHWC", "interpolation": "bilinear"}
    assert m["output"] == {"name": "probabilities", "shape": [None, 10]}
    assert m["backbone"] == "cnn" and m["strategy"] == "scratch" and m["tta"] == "none"
    assert m["test_accuracy"] == record["test"]["accuracy"]
    assert m["export"]["opset"] == 17 and m["export"]["versions"]["tf2onnx"]
    for file in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert m["artifacts"][file]["sha256"] == sha256_file(cnn_model / file)
        assert m["artifacts"][file]["bytes"] == (cnn_model / file).stat().st_size
    assert set(m["artifacts"]) == {"saved_model", "model.onnx", "model.fp16.onnx", "model.int8.onnx"}


def test_quantized_variants_are_smaller_and_measured(cnn_model):
    a = _manifest(cnn_model)["artifacts"]
    fp32 = a["model.onnx"]
    for variant in ("model.fp16.onnx", "model.int8.onnx"):
        facts = a[variant]
        assert facts["bytes"] < fp32["bytes"]
        assert facts["accuracy_delta"] == pytest.approx(facts["test_accuracy"] - fp32["test_accuracy"])
        assert facts["test_accuracy"] > 0.5
    int8 = onnx.load(str(cnn_model / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ, not dynamic
    assert "DynamicQuantizeLinear" not in ops
    assert a["model.int8.onnx"]["calibration_images"] > 0
    assert a["model.int8.onnx"]["top1_agreement"] >= 0.9


def test_int8_keeps_pixels_and_probabilities_float(cnn_model):
    graph = onnx.load(str(cnn_model / "model.int8.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    assert producer[graph.output[0].name].op_type == "Softmax"  # float softmax: no 1/255 steps, no argmax ties
    rescale = next(n for n in graph.node if n.op_type == "Mul")  # the model's own 1/255 rescaling
    assert producer.get(rescale.input[0]) is None or producer[rescale.input[0]].op_type != "DequantizeLinear"
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    assert producer[first_conv.input[1]].op_type == "DequantizeLinear"  # the network itself is int8


def test_int8_weights_use_all_eight_bits(cnn_model):
    """7-bit weights (reduce_range) cost MobileNetV2 21 points on CIFAR-10 (docs/decisions.md); the file
    uses the full int8 range, and CPUs without VNNI run it on exact kernels (serving.sessions)."""
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(cnn_model / "model.int8.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) > 64


def test_savedmodel_loads_without_tlserve(cnn_model, tmp_path):
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(cnn_model / 'saved_model')!r})\n"
        f"p = m.signatures['serving_default'](image=tf.constant(np.load({str(tmp_path / 'x.npy')!r})))['probabilities']\n"
        f"np.save({str(tmp_path / 'p.npy')!r}, p.numpy())\n"
        "assert not any(k in sys.modules for k in ('training', 'serving', 'cli'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), OnnxClassifier.load(cnn_model).predict(x), atol=1e-4)


def test_predict_same_top1_through_every_runtime(cnn_model, sample_images, run_cli):
    tops = {}
    for runtime in ("onnx", "savedmodel", "keras"):
        result = run_cli("predict", cnn_model, sample_images, "--runtime", runtime, "--json", "-k", "2")
        assert result.code == 0, result.err
        lines = [json.loads(line) for line in result.out.splitlines() if line.startswith("{")]
        assert len(lines) == 12
        tops[runtime] = [(line["path"], line["top"][0]["label"]) for line in lines]
    assert tops["onnx"] == tops["savedmodel"] == tops["keras"]
    labels = dict(tops["onnx"])
    correct = sum(Path(p).stem.split("-", 1)[1] == label for p, label in labels.items() if Path(p).stem[:2] < "08")
    assert correct >= 6  # 8 clean generated images, a model at ~95% test accuracy


def test_predict_names_bad_files_and_exits_nonzero(cnn_model, sample_images, run_cli, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run_cli("predict", cnn_model, sample_images, bad, "--json")
    assert result.code == 2
    assert "notes.png" in result.err and "Traceback" not in result.err
    assert len([line for line in result.out.splitlines() if line.startswith("{")]) == 12


def test_tampered_model_is_refused(cnn_model, tmp_path, run_cli, sample_images):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(cnn_model, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.onnx does not match its sha256"):
        OnnxClassifier.load(copy)
    result = run_cli("predict", copy, sample_images, "--json")
    assert result.code == 2 and "sha256" in result.err


def test_registered_in_bentoml_store(cnn_model, run_cli):
    import bentoml

    m = _manifest(cnn_model)
    stored = bentoml.models.get(m["bentoml_tag"])
    assert (Path(stored.path) / "model.onnx").is_file()
    assert stored.info.metadata["backbone"] == "cnn"
    # the tag resolves as a model reference too
    from serving.base.manifest import resolve_model

    assert (resolve_model(m["bentoml_tag"]) / "manifest.json").is_file()
    result = run_cli("models", "--models-dir", cnn_model.parent, "--json")
    assert result.code == 0 and any(r["name"] == "cnn" for r in json.loads(result.out))


def test_failed_export_keeps_the_earlier_one(cnn_model, runs_root, run_cli):
    before = (cnn_model / "manifest.json").read_bytes()
    result = run_cli("export", "cnn", "--runs-dir", runs_root, "--models-dir", cnn_model.parent)
    assert result.code == 2 and "already exists" in result.err
    result = run_cli("export", "cnn", "--runs-dir", runs_root, "--models-dir", cnn_model.parent, "--overwrite",
                     "--formats", "savedmodel,tensorrt")
    assert result.code == 2 and "unknown format 'tensorrt'" in result.err
    assert (cnn_model / "manifest.json").read_bytes() == before
    assert not [p for p in cnn_model.parent.iterdir() if p.name.startswith(".")]


def test_bad_runs(run_cli, runs_root, tmp_path):
    result = run_cli("export", "no-such-run", "--runs-dir", runs_root, "--models-dir", tmp_path)
    assert result.code == 2 and "no run named 'no-such-run'" in result.err
    (runs_root / "half").mkdir()
    result = run_cli("export", "half", "--runs-dir", runs_root, "--models-dir", tmp_path)
    assert result.code == 2 and "did not finish" in result.err
    result = run_cli("predict", "nothing-here", tmp_path, "--models-dir", tmp_path)
    assert result.code == 2 and "no exported model" in result.err


def test_flip_tta_model_is_mirror_invariant_in_every_format(runs_root, models_root, run_cli):
    """--tta flip: the saved model averages each image with its mirror, so an image and its mirror get the same
    answer from Keras, ONNX fp32 and ONNX int8; --from-run still sees one flat model."""
    from training.model.build import load_model

    common = ["--data", "synthetic", "--limit", "96", "--batch-size", "32", "--runs-dir", runs_root]
    cli_call("train", *common, "-b", "cnn-bn", "--cnn-layers", "c8,p,r8,gm", "--logit-scale", "0.125",
             "--tta", "flip", "--augment", "--augment-policy", "flip-crop", "--epochs", "1", "--name", "tta")
    cli_call("export", "tta", "--runs-dir", runs_root, "--models-dir", models_root, "--int8", "--no-register",
             "--max-accuracy-drop", "100", "--max-class-drop", "100")
    record = json.loads((runs_root / "tta" / "record.json").read_text())
    assert record["config"]["tta"] == "flip" and _manifest(models_root / "tta")["tta"] == "flip"
    x = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    mirrored = x[:, :, ::-1].copy()
    model = load_model(runs_root / "tta" / "model.keras")
    keras_probs = model.predict(x, verbose=0)
    assert keras_probs.shape == (5, 10)
    np.testing.assert_allclose(model.predict(mirrored, verbose=0), keras_probs, atol=1e-5)
    for variant, atol in (("fp32", 1e-5), ("int8", 2e-3)):  # int8: equal within its rounding noise (1.5e-4 seen)
        sess = OnnxClassifier.load(models_root / "tta", variant=variant)
        np.testing.assert_allclose(sess.predict(mirrored), sess.predict(x), atol=atol)
    np.testing.assert_allclose(OnnxClassifier.load(models_root / "tta").predict(x), keras_probs, atol=1e-4)

    cli_call("train", *common, "--from-run", "tta", "--classes", "0-4", "--epochs", "1", "--name", "tta-transfer")
    transfer = load_model(runs_root / "tta-transfer" / "model.keras")
    assert transfer.predict(x, verbose=0).shape == (5, 5)
    assert "unknown --tta" in run_cli("train", *common, "--tta", "rotate").err


def test_session_spin_settings_reach_onnxruntime():
    from serving.sessions import session_options

    assert session_options(spin="never").get_session_config_entry("session.intra_op.allow_spinning") == "0"
    in_run = session_options(spin="in-run")
    assert in_run.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError):  # allow_spinning left at onnxruntime's default: it spins during the call
        in_run.get_session_config_entry("session.intra_op.allow_spinning")
    with pytest.raises(UserError, match="spin must be one of"):
        session_options(spin="sometimes")
