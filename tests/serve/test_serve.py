"""The REST service: answers, micro-batching, and a named 4xx JSON error for every kind of bad request."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vqakit.inference.predict import VQAPredictor  # noqa: E402
from vqakit.serve.app import VQAService, create_app  # noqa: E402
from vqakit.serve.batching import MicroBatcher, QueueFull  # noqa: E402
from vqakit.serve.config import ServeConfig  # noqa: E402

LABELS = {"yes", "no", "red", "circle", "2"}


def png(size=(48, 40), seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "1":
        image = Image.new("1", size)
    else:
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")


@pytest.fixture
def make_client(predictor):
    clients = []

    def make(**config) -> TestClient:
        client = TestClient(create_app(VQAService(predictor, ServeConfig(**config))), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


# -- answers ---------------------------------------------------------------------------------------------------------


def test_health_and_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "torch" and health["answers"] == 5
    assert health["sources"] == {"image_base64": True, "image_path": False, "image_url": False}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/upload", "/health"} <= set(spec["paths"])


def test_predict_json_matches_the_predictor(client, predictor):
    image = png(seed=1)
    r = client.post("/predict", json={"questions": ["what is the color?", "is there a circle?"],
                                      "image_base64": b64(image), "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 48, "height": 40} and body["backend"] == "torch"
    direct = predictor.predict(image, ["what is the color?", "is there a circle?"], top_k=3)
    for got, ref in zip(body["predictions"], direct):  # one preprocessing path: same answers, same scores
        assert got["answer"] == ref.answer and got["answer"] in LABELS
        assert abs(got["score"] - ref.score) < 1e-5 and len(got["top_k"]) == 3 and "heatmap" not in got
    one = client.post("/predict", json={"question": "how many?", "image_base64": "data:image/png;base64," + b64(image)})
    assert one.status_code == 200 and len(one.json()["predictions"]) == 1
    assert len(one.json()["predictions"][0]["top_k"]) == 5


def test_heatmap_in_the_response(client):
    r = client.post("/predict", json={"question": "is there a red circle?", "image_base64": b64(png()),
                                      "heatmap": True})
    heat = r.json()["predictions"][0]["heatmap"]
    assert np.array(heat["grid"]).shape == (4, 4)
    overlay = Image.open(io.BytesIO(base64.b64decode(heat["png_base64"])))
    assert overlay.format == "PNG" and min(overlay.size) >= 256


def test_upload_multipart(client):
    files = {"file": ("img.png", png(seed=2), "image/png")}
    r = client.post("/predict/upload", files=files, data={"question": ["what color?", "how many?"], "top_k": "2"})
    assert r.status_code == 200, r.text
    assert [p["question"] for p in r.json()["predictions"]] == ["what color?", "how many?"]
    assert all(len(p["top_k"]) == 2 for p in r.json()["predictions"])


# -- bad requests: 4xx JSON naming the problem -----------------------------------------------------------------------


@pytest.mark.parametrize("body, status, message", [
    ({"question": "q", "questions": ["q"], "image_base64": "AA=="}, 422, "exactly one of question, questions"),
    ({"image_base64": "AA=="}, 422, "exactly one of question, questions"),
    ({"question": "q"}, 422, "exactly one of image_base64, image_path, image_url; got 0"),
    ({"question": "q", "image_base64": "AA==", "image_path": "a.png"}, 422, "got 2 (image_base64, image_path)"),
    ({"question": "q", "image_base64": "not base64!"}, 400, "image_base64 is not valid base64"),
    ({"question": "q", "image_base64": b64(b"<html>not found</html>")}, 400, "image: not a recognised image format"),
    ({"question": "q" * 513, "image_base64": "AA=="}, 422, "question: String should have at most 512 characters"),
    ({"question": "   ", "image_base64": b64(png())}, 422, "question 0 is empty"),
    ({"questions": [], "image_base64": "AA=="}, 422, "questions: List should have at least 1 item"),
    ({"questions": ["q"] * 17, "image_base64": "AA=="}, 422, "questions: List should have at most 16 items"),
    ({"question": "q", "image_base64": "AA==", "top_k": 0}, 422, "top_k: Input should be greater than or equal to 1"),
    ({"question": "q", "image_base64": "AA==", "top_k": 21}, 422, "top_k: Input should be less than or equal to 20"),
    ({"question": "q", "image_base64": "AA==", "colour": 1}, 422, "colour: Extra inputs are not permitted"),
    ({"question": 3, "image_base64": "AA=="}, 422, "question: Input should be a valid string"),
    ({"question": "q", "image_path": "a.png"}, 403, "image_path is disabled on this server"),
    ({"question": "q", "image_url": "http://example.com/a.png"}, 403, "image_url is disabled on this server"),
])  # fmt: skip
def test_bad_json_requests(client, body, status, message):
    assert message in error_of(client.post("/predict", json=body), status)


def test_malformed_bodies(client):
    assert "JSON decode error" in error_of(client.post("/predict", content=b"{not json",
                                                       headers={"content-type": "application/json"}), 422)
    assert "invalid request" in error_of(client.post("/predict", content=b"[1, 2]",
                                                     headers={"content-type": "application/json"}), 422)
    assert "Not Found" in error_of(client.get("/nothing"), 404)
    assert "Method Not Allowed" in error_of(client.get("/predict"), 405)
    surrogate = b'{"question": "\\ud800?", "image_base64": "' + b64(png()).encode() + b'"}'
    assert "question: Input should be a valid string, unable to parse raw data as a unicode string" in error_of(
        client.post("/predict", content=surrogate, headers={"content-type": "application/json"}), 422)


def test_size_limits(make_client):
    client = make_client(max_upload_bytes=5000, max_pixels=60 * 60)
    big = png(size=(80, 80), seed=3)  # random pixels: ~19 kB
    assert "more than max_upload_bytes=5,000" in error_of(
        client.post("/predict", json={"question": "q", "image_base64": b64(big)}), 413)
    assert "exceeds max_pixels=3,600" in error_of(
        client.post("/predict", json={"question": "q", "image_base64": b64(png(size=(61, 61), mode="1"))}), 413)
    # a decompression bomb: 12 kB that decode to 100 million pixels, refused before decoding
    bomb = png(size=(10_000, 10_000), mode="1")
    assert len(bomb) < 20_000
    assert "exceeds max_pixels=16,777,216" in error_of(
        make_client(max_upload_bytes=20_000).post("/predict", json={"question": "q", "image_base64": b64(bomb)}), 413)
    # the whole body is capped before it is parsed: by Content-Length, and while a chunked body streams in
    limit = ServeConfig(max_upload_bytes=5000).max_request_bytes
    huge = b'{"question": "q", "image_base64": "' + b"A" * limit + b'"}'
    assert "request body of" in error_of(client.post("/predict", content=huge,
                                                     headers={"content-type": "application/json"}), 413)
    chunks = (huge[i:i + 4096] for i in range(0, len(huge), 4096))
    assert f"more than {limit:,} bytes" in error_of(
        client.post("/predict", content=chunks, headers={"content-type": "application/json"}), 413)
    files = {"file": ("big.png", big, "image/png")}
    assert "file is more than max_upload_bytes" in error_of(
        client.post("/predict/upload", files=files, data={"question": "q"}), 413)


def test_bad_uploads(client):
    assert "file is empty" in error_of(
        client.post("/predict/upload", files={"file": ("e.png", b"", "image/png")}, data={"question": "q"}), 400)
    assert "question: Field required" in error_of(
        client.post("/predict/upload", files={"file": ("a.png", png(), "image/png")}), 422)
    assert "file: Field required" in error_of(client.post("/predict/upload", data={"question": "q"}), 422)
    assert "image: the file is truncated" in error_of(
        client.post("/predict/upload", files={"file": ("t.png", png()[:200], "image/png")}, data={"question": "q"}),
        400)


# -- image_path: inside the root only -------------------------------------------------------------------------------


def test_image_path_stays_inside_the_root(make_client, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "ok.png").write_bytes(png(seed=4))
    (outside / "secret.png").write_bytes(png(seed=5))
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "escape-dir")
    os.symlink(root / "sub" / "ok.png", root / "inside-link.png")
    client = make_client(image_root=str(root))

    def ask(path):
        return client.post("/predict", json={"question": "what color?", "image_path": path})

    assert ask("sub/ok.png").status_code == 200
    assert ask(str(root / "sub" / "ok.png")).status_code == 200  # absolute, but inside
    assert ask("inside-link.png").status_code == 200  # a symlink that stays inside
    for path in ("../outside/secret.png", "sub/../../outside/secret.png", str(outside / "secret.png"),
                 "escape.png", "escape-dir/secret.png", "/etc/passwd"):
        assert "outside the server's image root" in error_of(ask(path), 403), path
    assert "not a file" in error_of(ask("sub/missing.png"), 404)
    assert "not a file" in error_of(ask("sub"), 404)
    assert "NUL byte" in error_of(ask("a\x00.png"), 400)


# -- image_url: allow-listed hosts, public addresses, same-host redirects, size and time limits ----------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    image = png(seed=6)

    def do_GET(self):  # noqa: N802 - the http.server API
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):  # the server under test hung up, as it should
            pass

    def _route(self):
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {"Content-Type": "image/png"}, self.image),
            "/same": (302, {"Location": "/img.png"}, b""),
            "/other": (302, {"Location": f"http://localhost:{port}/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {"Content-Type": "image/png"}, b"\x89PNG" + b"0" * 20_000),
        }
        if self.path == "/slow":
            time.sleep(4)
        if self.path == "/stream":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"0" * 4096)
            return
        status, headers, body = routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_image_url_limits(make_client, image_host):
    client = make_client(allowed_url_hosts=["127.0.0.1"], allow_private_urls=True, max_upload_bytes=10_000,
                         url_timeout_s=2.0)

    def ask(url):
        return client.post("/predict", json={"question": "what shape?", "image_url": url})

    assert ask(f"{image_host}/img.png").status_code == 200
    assert ask(f"{image_host}/same").status_code == 200  # a redirect on the same host is followed
    assert "redirected from '127.0.0.1' to another host 'localhost'" in error_of(ask(f"{image_host}/other"), 403)
    assert "more than max_url_redirects=3" in error_of(ask(f"{image_host}/loop"), 400)
    assert "image_url content is 20004 bytes" in error_of(ask(f"{image_host}/big"), 413)
    assert "image_url content is more than" in error_of(ask(f"{image_host}/stream"), 413)
    assert "url_timeout_s=2.0" in error_of(ask(f"{image_host}/slow"), 408)
    assert "answered HTTP 404" in error_of(ask(f"{image_host}/nothing"), 400)
    assert "must be an http:// or https:// URL" in error_of(ask("ftp://127.0.0.1/img.png"), 400)
    assert "not one of the allowed hosts" in error_of(ask(image_host.replace("127.0.0.1", "localhost") + "/img.png"),
                                                      403)
    strict = make_client(allowed_url_hosts=["127.0.0.1", "localhost", "10.1.2.3"])  # private addresses refused
    for url, kind in ((f"{image_host}/img.png", "loopback"), ("http://localhost/img.png", "loopback"),
                      ("http://10.1.2.3/img.png", "private")):
        assert f"resolves to a {kind} address" in error_of(
            strict.post("/predict", json={"question": "q", "image_url": url}), 403)


def test_address_checks():
    import ipaddress

    from vqakit.serve.sources import address_forbidden, host_allowed

    assert address_forbidden(ipaddress.ip_address("8.8.8.8")) is None
    for ip, kind in (("127.0.0.1", "loopback"), ("10.0.0.1", "private"), ("169.254.169.254", "link-local"),
                     ("::1", "loopback"), ("::ffff:192.168.0.1", "private"), ("0.0.0.0", "unspecified")):
        assert address_forbidden(ipaddress.ip_address(ip)) in (kind, "private"), ip
    assert host_allowed("Example.COM.", ["example.com"]) and not host_allowed("example.com.evil", ["example.com"])


# -- micro-batching --------------------------------------------------------------------------------------------------


def _slow_run(log):
    def run(images, questions, top_k, heatmap):
        log.append((len(images), sum(len(q) for q in questions), heatmap))
        if any(q[0] == "boom" for q in questions):
            raise RuntimeError("model failed")
        time.sleep(0.05)
        return [[type("P", (), {"top_k": [("a", 1.0)] * top_k, "q": q})() for q in qs] for qs in questions]

    return run


def test_concurrent_requests_share_a_forward_pass():
    log = []
    batcher = MicroBatcher(_slow_run(log), max_batch_size=8, max_wait_ms=0)
    futures = [batcher.submit(i, [f"q{i}"], top_k=1 + i % 3) for i in range(20)]
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [r[0].q for r in results] == [f"q{i}" for i in range(20)]  # each caller gets its own answer
    assert [len(r[0].top_k) for r in results] == [1 + i % 3 for i in range(20)]  # and its own top-k
    assert len(log) < 20 and max(n for _, n, _ in log) == 8  # batched, never above max_batch_size
    assert batcher.stats["requests"] == 20 and batcher.stats["questions"] == 20


def test_workers_run_batches_at_once_and_answer_every_caller():
    running, peak, lock = [0], [0], threading.Lock()

    def run(images, questions, top_k, heatmap):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [[type("P", (), {"top_k": [("a", 1.0)], "q": q})() for q in qs] for qs in questions]

    batcher = MicroBatcher(run, max_batch_size=2, max_wait_ms=0, workers=2)
    futures = [batcher.submit(i, [f"q{i}"]) for i in range(12)]
    assert [f.result(timeout=10)[0].q for f in futures] == [f"q{i}" for i in range(12)]
    batcher.close()
    assert peak[0] == 2 and batcher.workers == 2  # two batches ran at the same time
    assert batcher.stats["requests"] == 12 and batcher.stats["questions"] == 12
    with pytest.raises(ValueError, match="workers=0"):
        MicroBatcher(run, workers=0)


def test_batcher_waits_for_announced_requests_only():
    log = []
    batcher = MicroBatcher(_slow_run(log), max_batch_size=8, max_wait_ms=500)
    start = time.monotonic()
    batcher.submit(0, ["alone"]).result(timeout=5)
    assert time.monotonic() - start < 0.3  # nothing announced: no waiting
    with batcher.expect() as ticket:
        first = batcher.submit(1, ["first"])
        time.sleep(0.1)  # still decoding the second request
        second = batcher.submit(2, ["second"], ticket=ticket)
    first.result(timeout=5), second.result(timeout=5)
    batcher.close()
    assert log[-1][1] == 2  # the first request waited for the announced one


def test_a_failing_request_fails_alone_and_the_worker_survives():
    log = []
    batcher = MicroBatcher(_slow_run(log), max_batch_size=8, max_wait_ms=0)
    blocker = batcher.submit(0, ["warm"])  # keeps the worker busy while the next three queue up
    time.sleep(0.02)
    futures = [batcher.submit(1, ["fine"]), batcher.submit(2, ["boom"]), batcher.submit(3, ["also fine"])]
    blocker.result(timeout=5)
    assert futures[0].result(timeout=5)[0].q == "fine" and futures[2].result(timeout=5)[0].q == "also fine"
    with pytest.raises(RuntimeError, match="model failed"):
        futures[1].result(timeout=5)
    assert batcher.submit(4, ["after"]).result(timeout=5)[0].q == "after"
    batcher.close()


def test_heatmap_requests_run_in_their_own_group_and_the_queue_is_bounded():
    log = []
    batcher = MicroBatcher(_slow_run(log), max_batch_size=8, max_wait_ms=0, max_queue=3)
    blocker = batcher.submit(0, ["warm"])
    time.sleep(0.02)  # the worker has taken it
    futures = [batcher.submit(1, ["a"]), batcher.submit(2, ["b"], heatmap=True), batcher.submit(3, ["c"])]
    with pytest.raises(QueueFull, match="max_queue=3"):
        batcher.submit(4, ["d"])
    blocker.result(timeout=5)
    [f.result(timeout=5) for f in futures]
    batcher.close()
    assert log[1:] == [(2, 2, False), (1, 1, True)]


def test_http_requests_are_batched(make_client):
    client = make_client(max_batch_size=16, max_wait_ms=20)
    body = {"question": "what color?", "image_base64": b64(png(seed=7))}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/predict", json=body), range(24)))
    assert all(r.status_code == 200 for r in responses)
    scores = [r.json()["predictions"][0]["score"] for r in responses]
    assert max(scores) - min(scores) < 1e-5  # the same answer whatever batch it was in
    stats = client.get("/health").json()["batching"]
    assert stats["requests"] == 24 and stats["batches"] < 24 and stats["largest_batch"] > 1


def test_a_model_failure_is_a_json_500_and_the_server_keeps_serving(make_client, predictor, monkeypatch):
    client = make_client()
    original = predictor.predict_prepared
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return original(*args, **kwargs)

    service = client.app.state.service
    monkeypatch.setattr(service.batcher, "run", flaky)
    body = {"question": "what color?", "image_base64": b64(png())}
    assert "internal error: RuntimeError: CUDA out of memory" in error_of(client.post("/predict", json=body), 500)
    assert client.post("/predict", json=body).status_code == 200


def test_config_is_validated():
    with pytest.raises(ValueError, match="--server.max_batch_size=0 must be positive"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="--server.backend='tensorrt'"):
        ServeConfig(backend="tensorrt")
    assert ServeConfig(allowed_url_hosts=[" Example.com. ", ""]).allowed_url_hosts == ["example.com"]


def test_vqakit_serve_command(tiny_checkpoint, tmp_path):
    """`vqakit serve` end to end: a real uvicorn process on loopback answers /health and /predict."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vqakit.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                               "--port", str(port), "--ui", "false", "--server.backend", "torch",
                               "--server.max_wait_ms", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        assert health["backend"] == "torch" and health["sources"]["image_path"] is False
        r = httpx.post(f"http://127.0.0.1:{port}/predict/upload", files={"file": ("a.png", png(), "image/png")},
                       data={"question": "what color?"}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["answer"] in LABELS
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    assert f"serving {tiny_checkpoint}" in (tmp_path / "server.log").read_text()
