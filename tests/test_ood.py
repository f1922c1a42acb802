"""The OOD score (issue 33): in every exported file, in every answer of the service, on /metrics, in
`tlserve eval --ood`; and TFLite files. The unit tests are fast; the rest reuse the shared `cnn_model`
export (conftest) and add one TFLite and one pre-OOD (--no-ood) export of the same run."""
from __future__ import annotations

import io
import json
import shutil
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import bentoml_server, cli_call


def _noise(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# ---- the reference, drift and settings (fast) -------------------------------------------------

@pytest.mark.fast
def test_the_score_is_the_squared_mahalanobis_distance_to_the_nearest_class():
    from training.exported import ood

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20)) * rng.uniform(0.1, 3, 20)
    y = np.arange(60) % 3
    x[y == 1] += 2.0
    probe = rng.normal(size=(5, 20)) * 3

    def explicit(x, y, probe):
        means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
        inverse = np.linalg.inv(ood.ledoit_wolf(x - means[y])[0])
        return np.min([np.einsum("nd,de,ne->n", probe - m, inverse, probe - m) for m in means], axis=0) / x.shape[1]

    ref = ood.fit(x, y, 3, rank=None, normalized=False)  # every direction but one kept apart: exact
    assert 0 < ref.shrinkage < 1  # 60 images in 20 dimensions: shrinkage is needed and partial
    np.testing.assert_allclose(ref.score(probe), explicit(x, y, probe), rtol=1e-4)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(ood.fit(x, y, 3, rank=None).score(probe), explicit(unit(x), y, unit(probe)), rtol=1e-4)
    # fewer images than features: the directions past the sample's rank share one variance, so a
    # reference keeping only the sample's rank is still exact
    few = np.concatenate([x[:, :15], rng.normal(size=(60, 25))], axis=1)[:24]
    wide_probe = rng.normal(size=(5, 40)) * 3
    np.testing.assert_allclose(ood.fit(few, y[:24], 3, rank=21, normalized=False).score(wide_probe),
                               explicit(few, y[:24], wide_probe), rtol=1e-4)
    assert ood.fit(few, y[:24], 3, rank=21).project.shape == (40, 21)
    assert ood.auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert ood.auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    assert len(ood.fit(x[y < 2], y[y < 2], 3).means) == 2  # a class without images has no mean to be near


@pytest.mark.fast
def test_a_mid_level_term_is_summed_in_the_graph_as_in_numpy(tmp_path):
    """A nested backbone's mid-level layer (BackboneSpec.ood_layer) adds a term: the exported graph gives
    the numpy score, the probabilities stay the model's, the file round-trips, and an old one-term file
    still loads."""
    from training.env import keras
    from training.exported import ood

    K = keras()
    K.utils.set_random_seed(0)
    inner_in = K.Input((8, 8, 3))
    mid = K.layers.Conv2D(4, 3, padding="same", activation="relu", name="mid")(inner_in)
    backbone = K.Model(inner_in, K.layers.Conv2D(6, 3, padding="same", activation="relu")(mid), name="backbone")
    image = K.Input((8, 8, 3), name="image")
    x = K.layers.GlobalAveragePooling2D(name="head_pool")(backbone(image, training=False))
    model = K.Model(image, K.layers.Dense(3, activation="softmax", name="probabilities")(x))
    rng = np.random.default_rng(0)
    tx, vx = rng.uniform(0, 1, (60, 8, 8, 3)), rng.uniform(0, 1, (30, 8, 8, 3))
    ty, vy = np.arange(60) % 3, np.arange(30) % 3
    probe = np.concatenate([vx[:3], rng.uniform(0, 4, (3, 8, 8, 3))]).astype(np.float32)
    fitted, scored = ood.fit_for_export(model, (tx, ty), (vx, vy), probe, ["a", "b", "c"], accept=0.9, images=60,
                                        seed=0, tap="mid")
    score = fitted.reference
    assert [t.layer for t in score.terms] == [ood.PENULTIMATE, "mid", "mid"] and fitted.entry.terms[1]["dims"] == 4
    assert [t.normalized for t in score.terms] == [True, *ood.MID_FORMS]   # the mid layer raw and unit length
    feats, probs = ood.layer_features(model, probe, "probe", tap="mid")
    np.testing.assert_allclose(fitted.keras_scores, score.score(feats), rtol=1e-4)
    for term in score.terms:  # the graph's basis (kept directions + the class means' rest) stays orthonormal
        basis = ood._term_constants(term)["basis"].astype(np.float64)
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(scored(probe)[0]), model.predict(probe, verbose=0), atol=1e-6)
    val_feats, _ = ood.layer_features(model, vx, "val", tap="mid")
    assert np.mean(score.score(val_feats)) == pytest.approx(1.0)  # weights scaled so validation averages 1
    score.save(tmp_path / "s.npz")
    np.testing.assert_allclose(ood.Score.load(tmp_path / "s.npz").score(feats), score.score(feats))
    one = score.terms[0]
    np.savez(tmp_path / "old.npz", means=one.means, project=one.project, floor=one.floor, shrinkage=one.shrinkage)
    assert ood.Score.load(tmp_path / "old.npz").terms[0].weight == 1.0
    plain, _ = ood.fit_for_export(model, (tx, ty), (vx, vy), probe, ["a", "b", "c"], accept=0.9, images=60, seed=0,
                                  tap="no_such_layer")
    assert len(plain.reference.terms) == 1 and plain.entry.terms is None


@pytest.mark.fast
def test_the_fused_graph_layer_gives_each_terms_numpy_score_summed(monkeypatch):
    """The exported layer runs all terms as one set of ops (_fused_constants): the per-term numpy scores
    summed, whether a term keeps a rest outside its basis or spans its dims, when the terms have different
    class counts, and with one term."""
    from training.exported import ood

    rng = np.random.default_rng(1)
    n, y = 90, np.arange(90) % 3
    pen = np.abs(rng.normal(size=(n, 40)) * rng.uniform(0.2, 2, 40)) + (y[:, None] == np.arange(40) % 3)
    tap = rng.normal(size=(n, 2, 2, 12)) * rng.uniform(0.5, 3, 12) + y[:, None, None, None]
    pooled = tap.mean(axis=(1, 2))
    probe_pen = np.concatenate([pen[:4], np.abs(rng.normal(size=(4, 40))) * 3]).astype(np.float32)
    probe_tap = np.concatenate([tap[:4], rng.normal(size=(4, 2, 2, 12)) * 4]).astype(np.float32)
    feats = {ood.PENULTIMATE: probe_pen, "mid": probe_tap.mean(axis=(1, 2))}
    scores = {
        # both terms keep a rest (rank 8 of 40, 4 of 12), two classes in the second term
        "two rests": ood.Score([replace_weight(ood.fit(pen, y, 3, rank=8), 0.6),
                                replace_weight(ood.fit(pooled[y < 2], y[y < 2], 3, rank=4, normalized=False,
                                                       layer="mid"), 0.3)]),
        # the mid-level term spans its dims (as MobileNetV2's block_9_add): no rest for it
        "one rest": ood.Score([replace_weight(ood.fit(pen, y, 3, rank=8), 0.6),
                               replace_weight(ood.fit(pooled, y, 3, rank=None, normalized=False, layer="mid"), 0.3)]),
        "one term": ood.Score([ood.fit(pen, y, 3, rank=8)]),
    }
    layer_class = ood.score_layer_class()
    # FOLD_LIMIT 1: no scale folded into a constant, each applied by a node of its own
    for limit, folded in ((ood.FOLD_LIMIT, True), (1.0, False)):
        monkeypatch.setattr(ood, "FOLD_LIMIT", limit)
        for name, score in scores.items():
            fused = ood._fused_constants(score)
            assert fused["folded"] == folded and len(fused["rest"]) == {"two rests": 2, "one rest": 1, "one term": 1}[name]
            assert (fused["scale_after"][0] is None) == folded, name  # the penultimate term's scale: in its norm
            inputs = [probe_pen, probe_tap] if len(score.terms) > 1 else probe_pen
            got = np.asarray(layer_class(score, name=ood.OUTPUT)(inputs), np.float64)
            np.testing.assert_allclose(got, score.score(feats), rtol=2e-5, err_msg=f"{name}, folded {folded}")


def replace_weight(reference, weight: float):
    from dataclasses import replace

    return replace(reference, weight=weight)


@pytest.mark.fast
def test_psi_window_and_metrics_parse_with_prometheus_client():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serving.base.manifest import OodReference
    from serving.monitor import MIN_ANSWERS, Monitor, Window, psi

    assert psi([0.5, 0.5], [0.5, 0.5]) == 0 and psi([0.9, 0.1], [0.5, 0.5]) > 0.25
    w = Window(3, 4)
    w.add(np.array([0, 1, 2, 3, 3]))
    assert w.counts.tolist() == [0, 0, 1, 2] and w.filled == 3
    ref = OodReference(method="mahalanobis", output="ood_score", feature_layer="d:input", dims=4, threshold=1.0,
                       accept=0.95, val_accepted=0.95, train_images=10, val_images=10, shrinkage=0.1,
                       score_bins=[0.5], score_reference=[0.5, 0.5], class_reference={"a": 0.5, "b": 0.5})
    registry = CollectorRegistry()
    monitor = Monitor(["a", "b"], ref, 1.0, 100, registry=registry)
    probs = np.tile([[0.9, 0.1]], (MIN_ANSWERS, 1)).astype(np.float32)
    monitor.observe(probs, np.full(MIN_ANSWERS, 5.0, np.float32))  # all class a, all far out
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    drift = {s.labels["signal"]: s.value for s in families["tlserve_drift_psi"].samples}
    assert drift["class_mix"] == pytest.approx(psi([1, 0], [0.5, 0.5])) and drift["ood_score"] > 1
    counts = {s.labels["label"]: s.value for s in families["tlserve_predictions"].samples if s.name.endswith("_total")}
    assert counts == {"a": MIN_ANSWERS, "b": 0}
    verdicts = {s.labels["in_distribution"]: s.value for s in families["tlserve_ood_answers"].samples
                if s.name.endswith("_total")}
    assert verdicts == {"true": 0, "false": MIN_ANSWERS}
    assert any(s.name == "tlserve_confidence_count" and s.value == MIN_ANSWERS for s in families["tlserve_confidence"].samples)
    assert any(s.name == "tlserve_ood_score_bucket" and s.labels["le"] == "+Inf" for s in families["tlserve_ood_score"].samples)


@pytest.mark.fast
@pytest.mark.parametrize("env, message", [({"TLSERVE_ABSTAIN_OOD": "maybe"}, "TLSERVE_ABSTAIN_OOD"),
                                          ({"TLSERVE_OOD_THRESHOLD": "0"}, "TLSERVE_OOD_THRESHOLD"),
                                          ({"TLSERVE_OOD_THRESHOLD": "nan"}, "TLSERVE_OOD_THRESHOLD"),
                                          ({"TLSERVE_DRIFT_WINDOW": "0"}, "TLSERVE_DRIFT_WINDOW")])
def test_bad_ood_settings_are_one_line(env, message):
    from serving.base.errors import UserError
    from serving.settings import ServiceSettings

    with pytest.raises(UserError, match=message):
        ServiceSettings.from_env(env)
    ok = ServiceSettings.from_env({"TLSERVE_ABSTAIN_OOD": "true", "TLSERVE_OOD_THRESHOLD": "2.5"})
    assert ok.abstain_ood and ok.ood_threshold == 2.5


# ---- exports -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_model(cnn_run, runs_root, models_root) -> Path:
    """The shared run exported as before the OOD score (one output, no manifest.ood)."""
    cli_call("export", "cnn", "--runs-dir", runs_root, "--models-dir", models_root, "--name", "cnn-pre-ood", "--no-ood",
             "--formats", "onnx", "--no-register")
    yield models_root / "cnn-pre-ood"
    # a second export of run cnn in the shared models folder would change which one compare reports
    shutil.rmtree(models_root / "cnn-pre-ood", ignore_errors=True)


def test_every_file_gives_the_score_beside_the_probabilities(cnn_model):
    import onnx

    from serving.base.manifest import Manifest, sha256_file
    from serving.sessions import OnnxClassifier
    from training.exported import ood
    from training.exported.loader import load
    from training.model.build import load_model

    m = Manifest.load(cnn_model)
    assert m.ood.method == "mahalanobis" and m.ood.val_accepted >= m.ood.accept
    assert sha256_file(cnn_model / m.ood.file) == m.ood.sha256
    x = np.stack(_noise(4) + [np.full((32, 32, 3), 128, np.uint8)] * 2).astype(np.float32)
    feats, keras_probs = ood.layer_features(load_model(m.keras_path), x, "features")
    expected = ood.Score.load(cnn_model / m.ood.file).score(feats)
    for variant, tolerance in (("fp32", 1e-4), ("fp16", 2e-2), ("int8", 2e-1)):
        file = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[variant]
        assert [o.name for o in onnx.load(str(cnn_model / file)).graph.output] == ["probabilities", "ood_score"]
        probs, scores = OnnxClassifier.load(cnn_model, variant=variant).predict_scored(x)
        np.testing.assert_allclose(scores, expected, rtol=tolerance, atol=tolerance * m.ood.threshold)
        artifact = m.artifacts[file]
        assert artifact.ood_verdict_agreement is not None and artifact.top1_agreement is not None
    probs, scores = load(cnn_model, "savedmodel").scored(x)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    np.testing.assert_allclose(probs, keras_probs, atol=1e-5)
    assert np.all(scores[:4] > m.ood.threshold)  # uniform noise is far from the synthetic shapes


def test_tflite_files_agree_with_keras_and_run_everywhere(cnn_model, runs_root, models_root, run_cli, sample_images,
                                                         tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from serving.base.manifest import Manifest
    from training.model.build import load_model

    # its own models folder: a benchmarked second export of run cnn beside cnn_model changes compare's picks
    result = run_cli("export", "cnn", "--runs-dir", runs_root, "--models-dir", tmp_path / "models", "--name", "cnn-tflite",
                     "--formats", "tflite", "--no-register", "--max-accuracy-drop", "100", "--max-class-drop", "100")
    assert result.code == 0, result.err
    model = tmp_path / "models" / "cnn-tflite"
    m = Manifest.load(model)
    assert set(m.artifacts) == {"model.tflite", "model.fp16.tflite", "model.int8.tflite"}
    assert m.artifacts["model.tflite"].max_abs_diff <= 1e-4 and m.artifacts["model.int8.tflite"].gate is not None
    # a separate interpreter, the file alone: same probabilities as Keras, the score as a second output
    x = np.stack(_noise(3)).astype(np.float32)
    runner = Interpreter(model_path=str(model / "model.tflite")).get_signature_runner("serving_default")
    out = runner(image=x)
    np.testing.assert_allclose(out["probabilities"], load_model(m.keras_path).predict(x, verbose=0), atol=1e-4)
    assert np.all(out["ood_score"] > m.ood.threshold)
    int8 = Interpreter(model_path=str(model / "model.int8.tflite")).get_signature_runner("serving_default")
    assert np.all(int8(image=x)["ood_score"] > m.ood.threshold)  # the score is not clipped by int8 calibration
    predicted = run_cli("predict", model, sample_images, "--runtime", "tflite-int8", "--json")
    assert predicted.code == 0 and all("ood_score" in json.loads(line) for line in predicted.out.splitlines())
    evaluated = run_cli("eval", model, "--data", "synthetic", "--runtime", "tflite", "--no-gradcam", "--json",
                        "--out", tmp_path / "eval")
    assert evaluated.code == 0 and json.loads(evaluated.out)["variants"]["tflite"]["accuracy"] is not None
    bench = run_cli("bench", model, "--runtimes", "tflite,tflite-int8", "--batch-sizes", "1", "--iterations", "3",
                    "--json")
    assert bench.code == 0 and {r["runtime"] for r in json.loads(bench.out)["results"]} == {"tflite", "tflite-int8"}


def test_eval_reports_the_scores_auroc_and_refuses_bad_folders(cnn_model, plain_model, runs_root, run_cli, tmp_path):
    folder = tmp_path / "ood" / "nested"
    folder.mkdir(parents=True)
    for i, a in enumerate(_noise(12, seed=1)):
        (folder / f"{i}.png").write_bytes(_png(a))
    result = run_cli("eval", cnn_model, "--data", "synthetic", "--ood", folder.parent, "--variants", "fp32,int8",
                     "--no-gradcam", "--json", "--out", tmp_path / "eval")
    assert result.code == 0, result.err
    report = json.loads(result.out)["ood"]
    assert report["scored"] == 12 and set(report["variants"]) == {"fp32", "int8"}
    assert report["variants"]["fp32"]["auroc"] > 0.95 and 0 <= report["variants"]["fp32"]["msp_auroc"] <= 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for model, ood_folder, words in ((cnn_model, tmp_path / "empty", "no image files"),
                                     (cnn_model, tmp_path / "missing", "no such folder"),
                                     (plain_model, folder, "exported before")):
        bad = run_cli("eval", model, "--data", "synthetic", "--ood", ood_folder)
        assert bad.code == 2 and words in bad.err and len(bad.err.strip().splitlines()) == 1
    bad = run_cli("export", "cnn", "--runs-dir", runs_root, "--name", "never", "--ood-accept", "1.5")
    assert bad.code == 2 and "--ood-accept" in bad.err


# ---- the service --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(cnn_model, tmp_path_factory):
    env = {"TLSERVE_MODEL": str(cnn_model), "TLSERVE_DRIFT_WINDOW": "100"}
    with bentoml_server(["serving.service:ImageClassifier"], env, tmp_path_factory.mktemp("log") / "s.log") as url:
        yield url


def test_answers_carry_the_score_and_abstain_when_asked(server, cnn_model, sample_images, run_cli, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from serving.base.manifest import Manifest

    threshold = Manifest.load(cnn_model).ood.threshold
    meta = httpx.get(f"{server}/metadata", timeout=30).json()["ood"]
    assert meta["available"] and meta["threshold"] == threshold and meta["method"] == "mahalanobis"
    shapes = [("images", (p.name, p.read_bytes())) for p in sorted(sample_images.glob("0*.png"))[:4]]
    noise = [("images", (f"n{i}.png", _png(a))) for i, a in enumerate(_noise(4, seed=2))]
    plain = httpx.post(f"{server}/predict_batch", files=shapes + noise, timeout=30).json()["predictions"]
    assert all(isinstance(a["ood_score"], float) and a["in_distribution"] == (a["ood_score"] <= threshold)
               for a in plain)
    assert not any(a["in_distribution"] or a["abstained"] for a in plain[4:])  # noise: out, but no abstention asked
    asked = httpx.post(f"{server}/predict_batch", files=shapes + noise, data={"abstain_ood": "true"},
                       timeout=30).json()["predictions"]
    assert all(a["abstained"] and "out_of_distribution" in a["abstained_for"] for a in asked[4:])
    assert [a["top"] for a in asked] == [a["top"] for a in plain]
    loose = httpx.post(f"{server}/predict", files={"image": noise[0][1]},
                       data={"abstain_ood": "1", "ood_threshold": "1e9"}, timeout=30).json()
    assert loose["in_distribution"] and not loose["abstained"]
    for data, field in (({"ood_threshold": "-1"}, "ood_threshold"), ({"ood_threshold": "inf"}, "ood_threshold"),
                        ({"abstain_ood": "maybe"}, "abstain_ood")):
        r = httpx.post(f"{server}/predict", files={"image": noise[0][1]}, data=data, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]
    # 50 more far-out answers fill the drift window past its minimum: the score's PSI is large
    httpx.post(f"{server}/predict_batch", files=[("images", (f"{i}.png", _png(a))) for i, a in enumerate(_noise(50))],
               timeout=60).raise_for_status()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=30).text)}
    drift = {s.labels["signal"]: s.value for s in families["tlserve_drift_psi"].samples}
    assert drift["ood_score"] > 0.25 and not math.isnan(drift["class_mix"])
    answered = sum(s.value for s in families["tlserve_predictions"].samples if s.name.endswith("_total"))
    assert answered == 8 + 8 + 1 + 50
    assert any(s.name == "tlserve_ood_score_count" and s.value == answered for s in families["tlserve_ood_score"].samples)
    # eval over HTTP takes the score from the answers
    (tmp_path / "ood").mkdir()
    for i, a in enumerate(_noise(8, seed=3)):
        (tmp_path / "ood" / f"{i}.png").write_bytes(_png(a))
    result = run_cli("eval", cnn_model, "--data", "synthetic", "--url", server, "--ood", tmp_path / "ood", "--no-gradcam",
                     "--json", "--out", tmp_path / "eval")
    assert result.code == 0, result.err
    assert json.loads(result.out)["ood"]["variants"]["http-fp32"]["auroc"] > 0.95


def test_a_model_exported_before_the_score_says_so(plain_model, tmp_path, run_cli, monkeypatch):
    env = {"TLSERVE_MODEL": str(plain_model)}
    with bentoml_server(["serving.service:ImageClassifier"], env, tmp_path / "s.log") as url:
        meta = httpx.get(f"{url}/metadata", timeout=30).json()["ood"]
        assert meta["available"] is False and "exported before" in meta["reason"]
        image = _png(_noise(1)[0])
        answer = httpx.post(f"{url}/predict", files={"image": image}, timeout=30).json()
        assert "ood_score" not in answer and "in_distribution" not in answer and answer["abstained"] is False
        r = httpx.post(f"{url}/predict", files={"image": image}, data={"abstain_ood": "true"}, timeout=30)
        assert r.status_code == 400 and "exported before" in r.json()["error"]
        assert "tlserve_predictions_total" in httpx.get(f"{url}/metrics", timeout=30).text
    monkeypatch.setenv("TLSERVE_ABSTAIN_OOD", "1")
    result = run_cli("serve", plain_model, "--port", "1")
    assert result.code == 2 and "TLSERVE_ABSTAIN_OOD" in result.err and len(result.err.strip().splitlines()) == 1
