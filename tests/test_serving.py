"""The BentoML service, started for real on 127.0.0.1: endpoints, client mistakes, batching, the bento."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import bentoml_server, free_port
from serving.predict import predict_files

MAX_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(cnn_model, server_log):
    env = {"TLSERVE_MODEL": str(cnn_model), "TLSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES)}
    with bentoml_server(["serving.service:ImageClassifier"], env, server_log) as url:
        yield url


def _post(url: str, files, data=None, **kw) -> httpx.Response:
    return httpx.post(url, files=files, data=data, timeout=30, **kw)


def _png_bytes(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def test_predict_matches_local_prediction(server, cnn_model, sample_images):
    files = sorted(sample_images.iterdir())
    local, failures = predict_files(cnn_model, files, k=3)
    assert not failures
    for path, expected in zip(files, local):
        r = _post(f"{server}/predict", {"image": (path.name, path.read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cnn" and body["version"]
        assert [t["label"] for t in body["top"]] == [t["label"] for t in expected.top]
        np.testing.assert_allclose([t["probability"] for t in body["top"]], [t["probability"] for t in expected.top],
                                   atol=1e-5)


def test_predict_batch_and_top_k(server, cnn_model, sample_images):
    files = sorted(sample_images.iterdir())[:5]
    local, _ = predict_files(cnn_model, files, k=1)
    r = _post(f"{server}/predict_batch", [("images", (p.name, p.read_bytes())) for p in files], data={"top_k": "1"})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["top"][0]["label"] for p in predictions] == [p.top[0]["label"] for p in local]
    assert all(len(p["top"]) == 1 for p in predictions)


def test_metadata_and_bentoml_endpoints(server, cnn_model):
    meta = httpx.get(f"{server}/metadata", timeout=10).json()
    manifest = json.loads((cnn_model / "manifest.json").read_text())
    assert meta["class_names"] == manifest["class_names"] and meta["input"]["shape"] == [None, 32, 32, 3]
    assert meta["backbone"] == "cnn" and meta["tta"] == "none" and meta["test_accuracy"] == manifest["test_accuracy"]
    assert meta["runtime"] == "onnxruntime" and meta["provider"] == "CPUExecutionProvider"
    assert meta["ort_spin"] == "auto" and isinstance(meta["lone_session"], bool)
    limits = meta["limits"]  # what a client can meet, as the README lists it
    assert limits["max_request_bytes"] == MAX_BYTES and limits["files_per_request"] == 64
    assert {"max_pixels_per_image", "max_pixels_per_request", "body_timeout_s"} <= set(limits)
    assert "images" in limits["fields"] and "top_k" in limits["fields"]
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200


def test_bentoml_client(server, sample_images):
    import bentoml

    path = sorted(sample_images.iterdir())[0]
    with bentoml.SyncHTTPClient(server) as client:
        body = client.predict(image=path)
        batch = client.predict_batch(images=[path, path], top_k=2)
    expected = _post(f"{server}/predict", {"image": (path.name, path.read_bytes())}).json()
    assert body["top"] == expected["top"]
    assert len(batch["predictions"]) == 2 and len(batch["predictions"][0]["top"]) == 2


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb must be refused from this alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_REQUESTS = {
    "empty body": dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}),
    "no body at all": dict(),
    "non-image file": dict(files={"image": ("notes.txt", b"hello, not an image", "text/plain")}),
    "truncated png": dict(files={"image": ("cut.png", _png_bytes()[:60], "image/png")}),
    "zero-byte file": dict(files={"image": ("empty.png", b"", "image/png")}),
    "decompression bomb": dict(files={"image": ("bomb.png", _huge_png_header(20000, 20000), "image/png")}),
    "wrong field name": dict(files={"picture": ("a.png", _png_bytes(), "image/png")}),
    "extra unknown field": dict(files={"image": ("a.png", _png_bytes(), "image/png")}, data={"colour": "blue"}),
    "over the size limit": dict(files={"image": ("big.bin", os.urandom(MAX_BYTES + 10), "image/png")}),
    "json instead of a file": dict(json={"image": "http://127.0.0.1:9/cat.png"}),
    "text field instead of a file": dict(data={"image": "not a file"}),
    "top_k not a number": dict(files={"image": ("a.png", _png_bytes(), "image/png")}, data={"top_k": "many"}),
    "two images on /predict": dict(files=[("image", ("a.png", _png_bytes(), "image/png")),
                                          ("image", ("b.png", _png_bytes(), "image/png"))]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_client_mistakes_are_4xx_json(server, server_log, case):
    r = httpx.post(f"{server}/predict", timeout=30, **BAD_REQUESTS[case])
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = _post(f"{server}/predict", {"image": ("ok.png", _png_bytes())})
    assert ok.status_code == 200  # still serving


def test_odd_but_valid_images_are_served(server):
    tiny = _post(f"{server}/predict", {"image": ("1x1.png", _png_bytes((1, 1)))})
    assert tiny.status_code == 200
    # a PNG declared as JPEG: decoded by content, not by the declared type
    mislabeled = _post(f"{server}/predict", {"image": ("photo.jpg", _png_bytes(), "image/jpeg")})
    assert mislabeled.status_code == 200
    for mode in ("L", "P", "RGBA", "I;16", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (40, 30)).save(buf, "TIFF" if mode == "CMYK" else "PNG")
        assert _post(f"{server}/predict", {"image": (f"{mode}.img", buf.getvalue())}).status_code == 200, mode
    webp, gif, bmp = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(webp, "WEBP")
    Image.new("RGB", (20, 20), "red").save(gif, "GIF")
    Image.new("RGB", (20, 20), "red").save(bmp, "BMP")
    for name, data in (("a.webp", webp), ("a.gif", gif), ("a.bmp", bmp)):
        assert _post(f"{server}/predict", {"image": (name, data.getvalue())}).status_code == 200, name


def test_image_routes_take_post_only(server):
    for route in ("/predict", "/predict_batch", "/infer"):
        r = httpx.get(f"{server}{route}", timeout=30)
        assert r.status_code == 405 and "POST" in r.json()["error"], route


def test_wrong_shape_to_the_batching_api_is_refused(server):
    r = httpx.post(f"{server}/infer", json={"images": np.zeros((1, 8, 8, 3)).tolist()}, timeout=30)
    assert r.status_code == 400 and "shape" in r.json()["error"]


def test_client_mistakes_leave_no_tracebacks(server, server_log):
    for case in ("non-image file", "wrong field name", "json instead of a file"):
        httpx.post(f"{server}/predict", timeout=30, **BAD_REQUESTS[case])
    log = server_log.read_text()
    assert "Traceback" not in log and "[ERROR]" not in log


def _batch_sizes(metrics: str) -> tuple[float, float]:
    """(onnxruntime calls, those that served one request alone) from tlserve's Prometheus histogram."""
    count = sum(float(m) for m in re.findall(r'tlserve_requests_per_call_count(?:\{[^}]*\})? (\S+)', metrics))
    alone = sum(float(m) for m in re.findall(r'tlserve_requests_per_call_bucket\{[^}]*le="1\.0"[^}]*\} (\S+)', metrics))
    return count, alone


def test_concurrent_requests_are_batched(server, sample_images):
    payload = sorted(sample_images.iterdir())[0].read_bytes()
    before = _batch_sizes(httpx.get(f"{server}/metrics", timeout=10).text)

    def client(_: int) -> list[int]:
        with httpx.Client(timeout=30) as http:
            return [http.post(f"{server}/predict", files={"image": ("x.png", payload)}).status_code for _ in range(25)]

    with ThreadPoolExecutor(8) as pool:
        codes = [c for batch in pool.map(client, range(8)) for c in batch]
    assert codes == [200] * 200
    after = _batch_sizes(httpx.get(f"{server}/metrics", timeout=10).text)
    batches, single = after[0] - before[0], after[1] - before[1]
    assert batches > 0 and single < batches, (batches, single)  # some onnxruntime calls served several requests


def test_a_lone_request_uses_the_spinning_session(server, sample_images):
    """One client at a time: every call goes to the session whose threads spin during the call
    (loaded when there is more than one core to spin on)."""
    from serving.sessions import physical_cores

    payload = sorted(sample_images.iterdir())[0].read_bytes()

    def lone_calls() -> float:
        metrics = httpx.get(f"{server}/metrics", timeout=10).text
        return sum(float(m) for m in re.findall(r'^tlserve_lone_calls_total(?:\{[^}]*\})? (\S+)', metrics, re.M))

    before = lone_calls()
    with httpx.Client(timeout=30) as http:
        codes = [http.post(f"{server}/predict", files={"image": ("x.png", payload)}).status_code for _ in range(5)]
    assert codes == [200] * 5
    assert lone_calls() - before == (5 if physical_cores() > 1 else 0)


def test_bento_builds_offline_carries_the_model_and_serves(cnn_model, tmp_path, run_cli, sample_images):
    import bentoml

    result = run_cli("build", cnn_model, "--no-image")
    assert result.code == 0, result.err
    tag = re.search(r"built bento (tlserve-cpu:\S+) \(cpu: onnxruntime\)", result.out).group(1)
    assert f"bentoml containerize {tag}" in result.out
    bento = bentoml.get(tag)
    root = Path(bento.path)
    dockerfile = (root / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "requirements.txt" in dockerfile
    assert "apt-get" not in dockerfile  # no build-essential, no git: nothing in the image compiles
    requirements = (root / "env" / "python" / "requirements.txt").read_text()
    assert "\nonnxruntime==" in requirements and "\nonnxruntime-gpu" not in requirements and "tensorflow" not in requirements
    model_tag = json.loads((cnn_model / "manifest.json").read_text())["bentoml_tag"]
    info = (root / "bento.yaml").read_text()
    assert model_tag in info
    exported = bentoml.export_bento(tag, str(tmp_path / "cnn.bento"))
    with tarfile.open(exported) as tar:
        names = tar.getnames()
    name, version = model_tag.split(":")
    assert any(n.endswith(f"models/{name}/{version}/model.onnx") for n in names)
    env = {k: v for k, v in os.environ.items() if k != "TLSERVE_MODEL"}
    with bentoml_server([tag], {**env, "TLSERVE_MODEL": ""}, tmp_path / "bento.log") as url:
        path = sorted(sample_images.iterdir())[0]
        r = _post(f"{url}/predict", {"image": (path.name, path.read_bytes())})
        assert r.status_code == 200 and r.json()["model"] == "cnn"


def test_http_bench_against_the_running_service(server, cnn_model, run_cli):
    result = run_cli("bench", cnn_model, "--url", server, "--concurrency", "1,4", "--requests", "20", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [r["concurrency"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["errors"] == 0 and row["requests"] == 20
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] and row["requests_per_sec"] > 0
        assert row["overhead_ms_p50"] == pytest.approx(row["p50_ms"] - report["inprocess_onnx_p50_ms"])
    assert Path(report["path"]).parent == cnn_model / "bench" and report["machine"]["cpu"]
    assert report["server"]["provider"] == "CPUExecutionProvider" and report["server"]["ort_spin"] == "auto"
    refused = run_cli("bench", "--url", "http://192.0.2.1:3000")
    assert refused.code == 2 and "not a loopback address" in refused.err


def test_endpoints_called_in_process_answer_like_http(cnn_model, server, sample_images):
    """Over HTTP the request guard answers the image routes; the endpoints themselves still serve
    in-process callers (BentoML's composition, tests) with the same answers."""
    path = sorted(sample_images.iterdir())[0]
    script = f"""
import asyncio, json
from pathlib import Path
from serving.service import ImageClassifier

async def main():
    svc = ImageClassifier.inner()
    one = await svc.predict(Path({str(path)!r}), top_k=2)
    many = await svc.predict_batch([Path({str(path)!r})] * 3, top_k=1)
    try:
        await svc.predict(Path({str(cnn_model / 'manifest.json')!r}))
        refused = ""
    except Exception as exc:
        refused = type(exc).__name__
    mixed = await svc.predict_batch([Path({str(path)!r}), Path({str(cnn_model / 'manifest.json')!r})], errors="per-file")
    print(json.dumps({{"one": one, "many": many, "refused": refused, "mixed": mixed}}))

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TLSERVE_MODEL": str(cnn_model)}, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    over_http = _post(f"{server}/predict", {"image": (path.name, path.read_bytes())}, data={"top_k": "2"}).json()
    assert [t["label"] for t in answers["one"]["top"]] == [t["label"] for t in over_http["top"]]
    np.testing.assert_allclose([t["probability"] for t in answers["one"]["top"]],
                               [t["probability"] for t in over_http["top"]], atol=1e-5)
    assert len(answers["many"]["predictions"]) == 3 and all(len(p["top"]) == 1 for p in answers["many"]["predictions"])
    assert answers["refused"] == "InvalidArgument"
    mixed = answers["mixed"]
    assert mixed["failed"] == 1 and [("top" in p, p["file"]) for p in mixed["predictions"]] == \
        [(True, path.name), (False, "manifest.json")]


@pytest.mark.fast
def test_service_settings_come_from_the_environment():
    from serving.settings import ServiceSettings

    assert ServiceSettings.from_env({}) == ServiceSettings()
    custom = ServiceSettings.from_env({"TLSERVE_MAX_BATCH": "8", "TLSERVE_ORT_SPIN": "0", "TLSERVE_DEVICE": "cpu"})
    assert (custom.max_batch, custom.ort_spin, custom.device, custom.max_latency_ms) == (8, "0", "cpu", 1000)


@pytest.mark.parametrize("name, value, message", [
    ("TLSERVE_MAX_BATCH", "lots", "TLSERVE_MAX_BATCH must be a positive whole number, not 'lots'"),
    ("TLSERVE_MAX_LATENCY_MS", "0", "TLSERVE_MAX_LATENCY_MS must be a positive whole number"),
    ("TLSERVE_ORT_SPIN", "yes", "TLSERVE_ORT_SPIN must be one of auto, 1, 0, not 'yes'"),
    ("TLSERVE_DEVICE", "tpu", "TLSERVE_DEVICE must be one of auto, cpu, cuda"),
])
def test_serve_refuses_a_bad_setting_in_one_line(cnn_model, run_cli, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    result = run_cli("serve", cnn_model, "--port", str(free_port()))
    assert result.code == 2 and message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_serve_refuses_a_port_in_use_in_one_line(cnn_model, run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", cnn_model, "--port", str(port))
    assert result.code == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.err
    assert len(result.err.strip().splitlines()) == 1
    unknown = run_cli("serve", cnn_model, "--host", "no-such-host.invalid", "--port", "3000")
    assert unknown.code == 2 and "cannot listen on no-such-host.invalid" in unknown.err


def test_the_edges_answer_json_with_one_rule(server, server_log):
    """An unknown route, a repeated field of any kind, a truncated form and a wrong /infer key: each
    a 4xx JSON answer that says what was wrong (issue 29)."""
    png = _png_bytes()
    unknown = httpx.get(f"{server}/no-such-route", timeout=30)
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/json")
    assert "GET /no-such-route" in unknown.json()["error"] and "POST /predict" in unknown.json()["error"]
    for route, files, data, name in [
        ("/predict", {"image": ("a.png", png)}, {"top_k": ["1", "2"]}, "top_k"),
        ("/predict", [("image", ("a.png", png)), ("image", ("b.png", png))], None, "image"),
        ("/predict_batch", {"images": ("a.png", png)}, {"min_confidence": ["0.5", "0.6"]}, "min_confidence"),
    ]:
        r = _post(f"{server}{route}", files, data)
        assert r.status_code == 400 and f"field '{name}' given 2 times" in r.json()["error"], (route, r.text)
    whole = httpx.Request("POST", f"{server}/predict", files={"image": ("a.png", png)})
    body = whole.read()
    cut = httpx.post(f"{server}/predict", content=body[: len(body) - 30], timeout=30,
                     headers={"content-type": whole.headers["content-type"]})
    assert cut.status_code == 400 and "truncated" in cut.json()["error"], cut.text
    infer = httpx.post(f"{server}/infer", json={"imgs": [[1]]}, timeout=30)
    assert infer.status_code == 400 and "'imgs'" in infer.json()["error"] and "'images'" in infer.json()["error"]
    assert "Traceback" not in server_log.read_text()


def test_predict_batch_can_answer_each_file(server, sample_images):
    good = sorted(sample_images.iterdir())[0].read_bytes()
    files = [("images", ("a.png", good)), ("images", ("notes.txt", b"not an image")), ("images", ("c.png", good))]
    assert _post(f"{server}/predict_batch", files).status_code == 400  # the default stays all-or-nothing
    r = _post(f"{server}/predict_batch", files, data={"errors": "per-file", "top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["failed"] == 1 and body["model"] == "cnn"
    assert [p["file"] for p in body["predictions"]] == ["a.png", "notes.txt", "c.png"]
    bad = body["predictions"][1]
    assert bad["status"] == 400 and "notes.txt" in bad["error"] and "top" not in bad
    assert body["predictions"][0]["top"] == body["predictions"][2]["top"] and len(body["predictions"][0]["top"]) == 2
