"""vitcli serve: the real server in a subprocess on a free loopback port, spoken to over HTTP.

Every hostile request gets its 4xx/5xx with a one-line JSON error and a normal request right after succeeds;
answers equal `vitcli predict --format json` on the same files; SIGTERM under load finishes the requests in
flight and exits 0. Loops are bounded in count and time; the server binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli, trained_run

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

HOST = "127.0.0.1"  # the only address these tests bind or talk to
SRC = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, whatever the tests' working folder
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model: Path, *args: str):
    """`vitcli serve MODEL ARGS` as a process; yields (base url, process) once /health answers (<= 60 s)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vitcli", "serve", str(model), "--host", HOST, "--port",
                             str(port), "--device", "cpu", "--precision", "fp32", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up within 60 s"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.stdout.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A calibrated tiny run (temperature and conformal scores stored) and 12 fresh .jpg images."""
    root = tmp_path_factory.mktemp("serve")
    run, _ = trained_run(root, "--epochs", "2")
    images = make_dataset(root / "fresh", per_class=4, size=48, seed=7, ext=".jpg")
    return run, images


@pytest.fixture(scope="module")
def server(model):
    """Small limits, so that each hostile case is cheap to produce."""
    with served(model[0], "--max-body-mb", "1", "--max-pixels", "1000000", "--max-files", "4",
                "--read-timeout", "1", "--max-wait-ms", "20") as (url, proc):
        yield url


def jpgs(images: Path) -> list[Path]:
    return sorted(images.rglob("*.jpg"))


def predict_json(run: Path, files: list[Path], *args: str) -> list[dict]:
    res = run_cli("predict", *files, "--model", run, "--format", "json", "--output", "p.json",
                  "--device", "cpu", "--precision", "fp32", *args)
    assert res.exit_code == 0, res.output
    return json.loads(Path("p.json").read_text())


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def assert_ok(url: str, image: bytes) -> None:
    r = httpx.post(f"{url}/predict", content=image, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["class"] in ("red", "green", "blue")


def test_answers_equal_vitcli_predict_on_the_same_files(model, server):
    run, images = model
    files = jpgs(images)
    opts = {"top_k": 3, "min_prob": ["0.9", "red=0.5"], "coverage": 0.9}
    expected = predict_json(run, files, "--top-k", "3", "--min-prob", "0.9", "--min-prob", "red=0.5",
                            "--coverage", "0.9")
    got = []
    for i in range(0, len(files), 4):  # several files per request, named as predict names them
        parts = [("file", (str(f), f.read_bytes(), "image/jpeg")) for f in files[i:i + 4]]
        r = httpx.post(f"{server}/predict", params=opts, files=parts, timeout=30)
        assert r.status_code == 200, r.text
        got += r.json()["predictions"]
    assert got == expected
    assert any("set" in p for p in got) and all(p["class"] in ("red", "green", "blue", "unknown") for p in got)


def test_the_mirror_default_and_no_tta_answer_like_predict(model):
    """The test model trained on mirrored images: the server above averaged with the mirror, as predict does by
    default; `serve --no-tta` answers like `predict --no-tta`, which differs."""
    from vitcli.checkpoint import load_checkpoint

    run, images = model
    assert load_checkpoint(run / "best.pt")["preprocess"]["mirror"] is True
    files = jpgs(images)[:4]
    one_view = predict_json(run, files, "--top-k", "3", "--no-tta")
    assert one_view != predict_json(run, files, "--top-k", "3")
    with served(run, "--no-tta") as (url, proc):
        parts = [("file", (str(f), f.read_bytes(), "image/jpeg")) for f in files]
        r = httpx.post(f"{url}/predict", params={"top_k": 3}, files=parts, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == one_view


def test_ood_answers_and_scores_equal_vitcli_predict_ood(model, server):
    run, images = model
    files = jpgs(images)[:6]
    expected = predict_json(run, files, "--ood")
    parts = [("file", (str(f), f.read_bytes(), "image/jpeg")) for f in files[:4]]
    got = httpx.post(f"{server}/predict", params={"ood": True}, files=parts, timeout=30).json()["predictions"]
    got += httpx.post(f"{server}/predict", params={"ood": True}, files=[
        ("file", (str(f), f.read_bytes(), "image/jpeg")) for f in files[4:]], timeout=30).json()["predictions"]
    assert all("ood_score" in p for p in got)
    assert [p["class"] for p in got] == [p["class"] for p in expected]
    assert [p["ood_score"] for p in got] == pytest.approx([p["ood_score"] for p in expected], abs=1e-5)


def test_info_health_and_the_openapi_docs_describe_the_service(model, server):
    info = httpx.get(f"{server}/info", timeout=10).json()
    assert info["classes"] == ["blue", "green", "red"] and info["input_size"] == 32
    assert info["calibration"]["conformal_scores"] > 0 and info["limits"]["max_files"] == 4
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{server}/docs", timeout=10).status_code == 200
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    params = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert params == {"top_k", "min_prob", "coverage", "ood"}
    assert info["ood"]["score"] == "knn" and info["task"] == "single"
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_an_exported_torchscript_file_is_served_like_predict_runs_it(model):
    run, images = model
    res = run_cli("export", "--model", run, "--format", "torchscript", "--output", "m.pt")
    assert res.exit_code == 0, res.output
    files = jpgs(images)[:3]
    expected = predict_json(Path("m.pt"), files, "--top-k", "2", "--coverage", "0.8")
    with served(Path("m.pt").resolve()) as (url, _):
        parts = [("file", (str(f), f.read_bytes(), "image/jpeg")) for f in files]
        r = httpx.post(f"{url}/predict", params={"top_k": 2, "coverage": 0.8}, files=parts, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == expected
        assert httpx.get(f"{url}/info").json()["kind"] == "torchscript"


def test_concurrent_clients_are_batched_and_all_answered_like_predict(model, server):
    run, images = model
    files = jpgs(images)
    expected = {Path(p["file"]).name: p for p in predict_json(run, files, "--top-k", "2")}
    payload = [(f.name, f.read_bytes()) for f in files]

    def client(i: int) -> list[tuple[str, int, dict]]:
        out = []
        with httpx.Client(timeout=30) as c:
            for j in range(12):  # 16 clients x 12 requests, each one image as the raw body
                name, data = payload[(i + j) % len(payload)]
                r = c.post(f"{server}/predict", params={"top_k": 2, "name": name}, content=data)
                out.append((name, r.status_code, r.json()))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [x for chunk in pool.map(client, range(16), timeout=120) for x in chunk]
    assert len(results) == 192 and all(code == 200 for _, code, _ in results), results[:3]
    for name, _, body in results:
        (p,) = body["predictions"]
        assert p == expected[name] | {"file": name}
    info = httpx.get(f"{server}/info", timeout=10).json()
    assert max(map(int, info["batch_sizes"])) > 1, info["batch_sizes"]  # requests shared forward passes


@pytest.mark.parametrize("case", ["big body", "chunked big body", "bomb", "not an image", "truncated", "empty",
                                  "too many files", "no file field", "broken multipart", "bad option",
                                  "unknown class", "unknown path", "wrong method"])
def test_hostile_request_gets_a_json_error_and_the_next_request_succeeds(model, server, case):
    good = jpgs(model[1])[0].read_bytes()
    post = f"{server}/predict"
    status, request = {
        "big body": (413, lambda: httpx.post(post, content=b"\xff" * (2 << 20))),
        "chunked big body": (413, lambda: httpx.post(post, content=iter([b"\xff" * 65536] * 40))),
        "bomb": (413, lambda: httpx.post(post, content=png_bytes(3000, 3000))),  # 9 MP in a small PNG
        "not an image": (422, lambda: httpx.post(post, content=b"%PDF-1.7 not a picture" * 10)),
        "truncated": (422, lambda: httpx.post(post, content=good[: len(good) // 2])),
        "empty": (400, lambda: httpx.post(post, content=b"")),
        "too many files": (413, lambda: httpx.post(post, files=[("file", (f"{i}.jpg", good)) for i in range(5)])),
        "no file field": (400, lambda: httpx.post(post, files={"x": (None, "text")})),
        "broken multipart": (400, lambda: httpx.post(post, content=b"garbage--xyz",
                                                     headers={"Content-Type": "multipart/form-data; boundary=xyz"})),
        "bad option": (422, lambda: httpx.post(post, params={"top_k": 0}, content=good)),
        "unknown class": (400, lambda: httpx.post(post, params={"min_prob": "cat=0.5"}, content=good)),
        "unknown path": (404, lambda: httpx.get(f"{server}/nothing")),
        "wrong method": (405, lambda: httpx.get(post)),
    }[case]
    r = request()
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and r.json()["error"], r.text
    assert_ok(server, good)


def test_slow_client_gets_408_and_does_not_hold_up_others(model, server):
    good = jpgs(model[1])[0].read_bytes()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
                  + good[:100])  # 100 of 5000 bytes, then nothing
        assert_ok(server, good)  # served while the slow one waits
        reply = b""
        while chunk := s.recv(65536):  # --read-timeout 1 s, then the server answers and closes
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408") and "connection: close" in reply, reply
    assert '"error"' in reply
    assert_ok(server, good)


def test_burst_beyond_the_queue_gets_503_with_retry_after_and_token_guards_the_model(model):
    run, images = model
    good = jpgs(images)[0].read_bytes()
    auth = {"Authorization": "Bearer s3cret"}
    # the first image waits 1.5 s for company, so the queue of 2 images is full while the burst arrives
    with served(run, "--max-queue", "2", "--max-files", "2", "--max-wait-ms", "1500", "--token", "s3cret") as (url, _):
        r = httpx.post(f"{url}/predict", content=good)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no token

        def one(_):
            return httpx.post(f"{url}/predict", content=good, headers=auth, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(one, range(6), timeout=60))
        busy = [r for r in codes if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] == "1" and "--max-queue" in r.json()["error"] for r in busy)
        assert {r.status_code for r in codes} == {200, 503}
        r = httpx.post(f"{url}/predict", content=good, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/info", headers=auth).json()["classes"] == ["blue", "green", "red"]


def test_sigterm_during_load_finishes_requests_in_flight_and_exits_0(model):
    run, images = model
    good = jpgs(images)[0].read_bytes()
    with served(run, "--max-wait-ms", "1000", "--max-batch", "64") as (url, proc):
        with ThreadPoolExecutor(12) as pool:
            futs = [pool.submit(httpx.post, f"{url}/predict", content=good, timeout=30) for _ in range(12)]
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/health").json()["queued"] < 12:  # all 12 are in the batcher
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            replies = [f.result(timeout=30) for f in futs]
        assert [r.status_code for r in replies] == [200] * 12
        code, log = proc.wait(timeout=30), proc.stdout.read()
        assert code == 0, log
        assert "stopped after answering 12 images" in log, log


def test_binding_beyond_loopback_without_a_token_is_refused(model):
    res = run_cli("serve", model[0], "--host", "0.0.0.0")  # refused before the model loads or a socket opens
    assert res.exit_code == 1
    assert "--host 0.0.0.0" in res.output and "--token" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["--max-wait-ms", "-1"], "--max-wait-ms -1.0 must be at least 0"),
    (["--read-timeout", "0"], "--read-timeout 0.0 must be positive"),
    (["--max-files", "300"], "--max-files 300 exceeds --max-queue 256"),
])
def test_bad_serve_options_are_one_line_errors(model, args, message):
    res = run_cli("serve", model[0], *args)
    assert res.exit_code == 1 and message in res.output, res.output


def test_missing_serve_extra_is_one_line(model):
    code = "import sys; sys.modules['fastapi'] = None; from vitcli.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code, "serve", str(model[0])], capture_output=True, text=True,
                         timeout=60, env=ENV | {"COLUMNS": "200"})
    assert res.returncode == 1
    assert (res.stdout + res.stderr).strip() == ("error: vitcli serve needs the 'fastapi' package: pip install "
                                                 "'vitcli[serve]'"), res
