"""Abstention over HTTP: below the confidence threshold (TLSERVE_MIN_CONFIDENCE, or a request's
min_confidence) an answer says "abstained": true and still lists its top-k; a threshold outside
(0, 1) is a 400 JSON answer per request and one line at startup for the setting."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import bentoml_server, cli_call, train_run

DEFAULT_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("abstain")
    train_run(root / "runs", "ab", backbone="cnn", cnn_layers="c16,p,c32,p,f,d32", epochs=3, limit=200, seed=3)
    cli_call("export", "ab", "--runs-dir", root / "runs", "--models-dir", root / "models", "--formats", "onnx",
             "--no-register")
    return root / "models" / "ab"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    env = {"TLSERVE_MODEL": str(model), "TLSERVE_MIN_CONFIDENCE": str(DEFAULT_THRESHOLD)}
    with bentoml_server(["serving.service:ImageClassifier"], env, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def _upload(sample_images: Path, n: int) -> list[tuple[str, tuple[str, bytes]]]:
    files = sorted(p for p in sample_images.iterdir() if p.suffix == ".png")[:n]
    return [("images", (p.name, p.read_bytes())) for p in files]


def test_answers_abstain_below_the_threshold_and_keep_their_top_k(server, model, sample_images):
    files = _upload(sample_images, 4)
    meta = httpx.get(f"{server}/metadata", timeout=30).json()
    manifest = json.loads((model / "manifest.json").read_text())
    assert meta["min_confidence"] == DEFAULT_THRESHOLD and meta["temperature"] == manifest["calibration"]["temperature"]
    default = httpx.post(f"{server}/predict_batch", files=files, data={"top_k": "3"}, timeout=30).json()["predictions"]
    for answer in default:  # the setting applies when the request names no threshold
        assert answer["min_confidence"] == DEFAULT_THRESHOLD
        assert answer["abstained"] == (answer["top"][0]["probability"] < DEFAULT_THRESHOLD) and len(answer["top"]) == 3
    high = httpx.post(f"{server}/predict_batch", files=files, data={"top_k": "2", "min_confidence": "0.999999"},
                      timeout=30).json()["predictions"]
    assert all(a["abstained"] and len(a["top"]) == 2 and a["min_confidence"] == 0.999999 for a in high)
    assert [a["top"] for a in high] == [[t for t in d["top"][:2]] for d in default]
    one = files[0][1]
    low = httpx.post(f"{server}/predict", files={"image": one}, data={"min_confidence": "0.000001"}, timeout=30).json()
    assert low["abstained"] is False and low["top"][0]["label"] == default[0]["top"][0]["label"]


@pytest.mark.parametrize("value", ["1", "0", "1.5", "-0.2", "nan", "high"])
def test_a_threshold_outside_zero_one_is_a_400(server, sample_images, value):
    r = httpx.post(f"{server}/predict", files={"image": _upload(sample_images, 1)[0][1]},
                   data={"min_confidence": value}, timeout=30)
    assert r.status_code == 400 and "min_confidence" in r.json()["error"]


@pytest.mark.parametrize("value", ["1", "0", "2", "x"])
def test_a_bad_setting_is_one_line_at_startup(model, run_cli, monkeypatch, value):
    from serving.base.errors import UserError
    from serving.settings import ServiceSettings

    with pytest.raises(UserError, match="TLSERVE_MIN_CONFIDENCE"):
        ServiceSettings.from_env({"TLSERVE_MIN_CONFIDENCE": value})
    monkeypatch.setenv("TLSERVE_MIN_CONFIDENCE", value)
    result = run_cli("serve", model, "--port", "1")
    assert result.code == 2 and "TLSERVE_MIN_CONFIDENCE" in result.err and len(result.err.strip().splitlines()) == 1


def test_bentomls_client_calls_with_and_without_a_threshold(server, sample_images):
    import bentoml

    path = sorted(p for p in sample_images.iterdir() if p.suffix == ".png")[0]
    with bentoml.SyncHTTPClient(server) as client:
        plain = client.predict(image=path)
        strict = client.predict_batch(images=[path, path], top_k=2, min_confidence=0.999999)
    assert plain["min_confidence"] == DEFAULT_THRESHOLD
    assert all(a["abstained"] and len(a["top"]) == 2 for a in strict["predictions"])
