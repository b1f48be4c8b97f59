"""Load on `vitcli serve`: many concurrent clients, with dynamic batching on and off.

    python benchmarks/serve_load.py [--requests 1000] [--clients 32] [--model RUN_OR_FILE]

For each server setting (batching on: up to 32 images per forward pass, waiting up to 5 ms; off: one request
per forward pass) it starts `vitcli serve` on a free 127.0.0.1 port, sends --requests single-image POSTs from
--clients concurrent keep-alive connections (a bare asyncio client), and prints requests/s, p50/p99 latency,
errors, and the batch sizes the server ran (from GET /info). Every answer is compared with `vitcli predict
--format json` on the same files, and the server is stopped with SIGTERM (it must exit 0). Without --model,
the model is the digits example's architecture (examples/digits.yaml: vit-tiny/4, width 64, depth 4, 16 px;
untrained weights: speed does not depend on them) and the images are examples/digits/val.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"batching on": ["--max-batch", "32", "--max-wait-ms", "5"],
            "one at a time": ["--max-batch", "1", "--max-wait-ms", "0"]}


def digits_model(root: Path) -> Path:
    """examples/digits.yaml's model, freshly initialised, saved as a vitcli checkpoint."""
    import torch

    from vitcli.checkpoint import make_checkpoint, save_checkpoint
    from vitcli.config import load_config, to_dict
    from vitcli.data import preprocess_info
    from vitcli.models import build_model

    cfg = load_config(ROOT / "examples" / "digits.yaml", [], {})
    d = cfg.data
    torch.manual_seed(0)
    model, spec = build_model(cfg.model, 10, d.img_size)
    ckpt = make_checkpoint(model_spec=spec, classes=[str(i) for i in range(10)],
                           preprocess=preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std),
                           config=to_dict(cfg), state_dict=model.eval().state_dict())
    path = root / "runs" / "digits" / "best.pt"
    save_checkpoint(path, ckpt)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vitcli", "serve", str(model), "--port", str(port),
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to 60 s
        if proc.poll() is not None:
            sys.exit(f"server failed:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    sys.exit("server did not start within 60 s")


async def post(reader, writer, name: str, data: bytes) -> tuple[int, dict]:
    """One POST /predict on a keep-alive connection: (status, JSON body)."""
    writer.write(f"POST /predict?name={quote(name)} HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                 f"application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return int(head.split(b" ", 2)[1]), json.loads(await reader.readexactly(length))


async def load(url: str, images: list[tuple[str, bytes]], requests: int, clients: int) -> tuple[list, list, float]:
    """(latencies in s, responses as (name, status, json), wall s) of `requests` POSTs from `clients`
    keep-alive connections. A bare asyncio HTTP/1.1 client: on two shared cores, a full client library's own
    CPU time (httpx: ~1 ms a request) would be measured as much as the server."""
    host, port = url.removeprefix("http://").split(":")
    todo = iter(range(requests))
    lat: list[float] = []
    got: list[tuple[str, int, dict]] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in todo:
            name, data = images[i % len(images)]
            t = time.perf_counter()
            try:
                got.append((name, *await post(reader, writer, name, data)))
            except (OSError, asyncio.IncompleteReadError, ValueError, AttributeError) as e:
                got.append((name, 0, {"error": repr(e)}))
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
            lat.append(time.perf_counter() - t)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return lat, got, time.perf_counter() - t0


def run_setting(model: Path, args: list[str], images, expected: dict, requests: int, clients: int) -> dict:
    proc, url = start(model, args)
    try:
        asyncio.run(load(url, images, min(100, requests), clients))  # warm-up, not counted
        before = httpx.get(f"{url}/info", timeout=10).json()["batch_sizes"]
        lat, got, wall = asyncio.run(load(url, images, requests, clients))
        after = httpx.get(f"{url}/info", timeout=10).json()["batch_sizes"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    errors = sum(s != 200 for _, s, _ in got)
    wrong = sum(s == 200 and b["predictions"][0] != expected[n] for n, s, b in got)
    ms = sorted(x * 1000 for x in lat)
    return {"req/s": requests / wall, "p50": statistics.median(ms), "p99": ms[int(0.99 * (len(ms) - 1))],
            "errors": errors, "differ from predict": wrong, "exit code": code,
            "mean batch": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())),
            "largest batch": max(sizes, default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--model", help="run folder, checkpoint or export (default: the digits example's model)")
    ap.add_argument("--images", type=Path, default=ROOT / "examples" / "digits" / "val")
    args = ap.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:200]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; python "
          f"{sys.version.split()[0]}; {args.requests} requests from {args.clients} clients, {len(files)} images")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else digits_model(Path(tmp))
        out = Path(tmp) / "p.json"
        subprocess.run([sys.executable, "-m", "vitcli", "predict", *map(str, files), "--model", str(model),
                        "--device", "cpu", "--format", "json", "--output", str(out)], check=True,
                       capture_output=True)
        expected = {p["file"]: p for p in json.loads(out.read_text())}
        images = [(str(f), f.read_bytes()) for f in files]
        rows = {name: run_setting(model, a, images, expected, args.requests, args.clients)
                for name, a in SETTINGS.items()}
    cols = list(next(iter(rows.values())))
    print("| server | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    ratio = rows["batching on"]["req/s"] / rows["one at a time"]["req/s"]
    print(f"batching: {ratio:.2f}x the requests/s of one at a time (target >= 3x); load average "
          f"{os.getloadavg()[0]:.1f} at the end (other processes on the machine skew all timings)")


if __name__ == "__main__":
    main()
