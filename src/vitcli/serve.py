"""`vitcli serve`: the model behind an HTTP endpoint (FastAPI on uvicorn, the optional `serve` extra).

Requests are decoded in a thread pool (off the event loop) and their images gathered by a `Batcher` into one
forward pass (up to `max_batch` images, waiting at most `max_wait_ms` for company). Answers are built exactly as
`vitcli predict` builds them: same decoding, calibrated probabilities, conformal sets and abstention. Hostile
traffic gets a one-line JSON error (`{"error": ...}`) with a 4xx/5xx status and the server keeps serving: a body
or image over its limit, a non-image or truncated upload, too many files, a client that sends too slowly, and
a full queue (503 with Retry-After instead of unbounded memory). SIGTERM / Ctrl-C stop accepting connections,
finish the requests in flight and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

from vitcli.errors import VitcliError, at_least

try:
    import python_multipart  # noqa: F401  (starlette parses multipart bodies with it)
    import uvicorn
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
except ImportError as _missing:
    raise VitcliError(f"vitcli serve needs the '{_missing.name}' package: pip install 'vitcli[serve]'") from None

TOKEN_ENV = "VITCLI_SERVE_TOKEN"  # environment variable holding the bearer token (instead of --token)
TOO_LARGE = "image too large"  # start of data.load_rgb's decompression-bomb message (-> 413)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address to bind; anything but loopback requires a token
    port: int = 8000  # TCP port
    max_batch: int = 32  # images per forward pass (1 = no batching: one request at a time)
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others, milliseconds
    max_queue: int = 256  # images accepted and not yet answered; beyond it requests get 503 + Retry-After
    max_files: int = 16  # images per request
    max_body_mb: float = 20.0  # request body size limit, MiB
    max_pixels: int = 40_000_000  # decoded pixels per image (decompression bombs), width * height
    read_timeout_s: float = 10.0  # a request body must arrive within this many seconds (slow clients)
    max_connections: int = 200  # concurrent connections; beyond them uvicorn answers 503
    threads: int = 0  # decoding threads; 0 = min(4, CPU count)
    token: str | None = None  # bearer token required on /predict and /info; None = no authentication
    tta: bool | None = None  # average the TTA views (augment.tta_views); None: the model's default (mirror-trained: on)

    def check(self) -> None:
        for flag in ("port", "threads", "max_batch", "max_queue", "max_files", "max_pixels", "max_connections"):
            at_least(f"--{flag.replace('_', '-')}", getattr(self, flag), 0 if flag in ("port", "threads") else 1)
        for flag, low in (("max_wait_ms", 0.0), ("max_body_mb", 1e-3), ("read_timeout_s", 1e-3)):
            if not getattr(self, flag) >= low:  # also refuses nan
                raise VitcliError(f"--{flag.removesuffix('_s').replace('_', '-')} {getattr(self, flag)} must be "
                                  + ("at least 0" if low == 0 else "positive"))
        if self.max_files > self.max_queue:
            raise VitcliError(f"--max-files {self.max_files} exceeds --max-queue {self.max_queue}: such a "
                              "request could never be admitted")
        if not is_loopback(self.host) and not self.token:
            raise VitcliError(f"--host {self.host} is reachable from other machines: give --token (or set "
                              f"{TOKEN_ENV}) so that only clients holding it can use the model")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refused(Exception):
    """A request answered with an error status and a one-line JSON message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ----------------------------------------------------------------------------------------------- batching
class Batcher:
    """Gathers the images of concurrent requests into one forward pass, on one worker thread.

    `held_for` bounds the images held (being decoded, waiting or in a forward pass) to `max_queue`; `probs`
    hands images to the worker and waits for their calibrated probabilities."""

    def __init__(self, pred, max_batch: int, max_wait_ms: float, max_queue: int):
        self.pred, self.max_batch, self.max_wait, self.max_queue = pred, max_batch, max_wait_ms / 1000, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.held = 0  # images admitted and not yet answered
        self.lock = threading.Lock()
        self.sizes: Counter[int] = Counter()  # batch size -> forward passes of that size
        from vitcli.ood import check_score

        # the out-of-distribution score every forward pass also gives (None: the model has none)
        self.ood = None if pred.ood is None else check_score("auto", pred.ood, pred.gives_features, str(pred.path))
        self.thread = threading.Thread(target=self._work, name="vitcli-batcher", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def held_for(self, n: int):
        """Hold `n` images' places in the queue while the block runs; none left: 503 with Retry-After."""
        with self.lock:
            if self.held + n > self.max_queue:
                raise Refused(503, f"busy: {self.max_queue} images already queued (--max-queue); retry shortly",
                              {"Retry-After": "1"})
            self.held += n
        try:
            yield
        finally:
            with self.lock:
                self.held -= n

    async def probs(self, imgs: list) -> list:
        """uint8 images (3, S, S), whose places are held -> their probability rows (C,), in order."""
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in imgs]
        for img, fut in zip(imgs, futs, strict=True):
            self.jobs.put((img, fut, loop))
        return list(await asyncio.gather(*futs))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            batch = [job]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(job)
            self._forward(batch)

    def _forward(self, batch: list) -> None:
        import torch

        self.sizes[len(batch)] += 1
        from vitcli.inference import scored_probs

        try:
            full, scores = scored_probs(self.pred, torch.stack([img for img, _, _ in batch]), self.ood)
            rows = list(zip(full, scores if scores is not None else [None] * len(full), strict=True))  # (C,), score
        except Exception as e:  # the model failed: every request of this batch gets a 500, the server goes on
            rows = [e] * len(batch)
        for (_, fut, loop), row in zip(batch, rows, strict=True):
            loop.call_soon_threadsafe(_settle, fut, row)


def _settle(fut: asyncio.Future, row) -> None:
    if fut.done():  # the client went away
        return
    if isinstance(row, Exception):
        fut.set_exception(Refused(500, f"the model failed on this batch: {type(row).__name__}: {row}"))
    else:
        fut.set_result(row)


# ----------------------------------------------------------------------------------------------- requests
class Service:
    """What the endpoints share: the predictor, the batcher, the decoding pool and the limits."""

    def __init__(self, pred, cfg: ServeConfig):
        from concurrent.futures import ThreadPoolExecutor

        self.pred, self.cfg = pred, cfg
        self.batcher = Batcher(pred, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=cfg.threads or min(4, os.cpu_count() or 1),
                                       thread_name_prefix="vitcli-decode")
        self.served = 0  # images answered

    def authorise(self, request: Request) -> None:
        if self.cfg.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.token}".encode()):
            raise Refused(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The whole body, refused as soon as it passes the size limit or stops arriving in time."""
        limit = int(self.cfg.max_body_mb * 2**20)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"body of {int(declared)} bytes exceeds the limit of {limit} (--max-body-mb "
                               f"{self.cfg.max_body_mb:g})")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"body exceeds the limit of {limit} bytes (--max-body-mb "
                                       f"{self.cfg.max_body_mb:g})")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, f"the body did not arrive within {self.cfg.read_timeout_s:g} s "
                               "(--read-timeout)", {"Connection": "close"}) from None
        request._body = body  # starlette's form parser reads it from here
        return body

    async def uploads(self, request: Request) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each image: multipart file fields, or the raw body as one image."""
        body = await self.read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            if not body:
                raise Refused(400, "empty body: send an image as the body or as multipart file fields")
            return [(request.query_params.get("name", "upload"), body)]
        try:
            form = await request.form(max_files=self.cfg.max_files, max_fields=self.cfg.max_files)
        except HTTPException as e:
            if "Too many" in str(e.detail):
                raise Refused(413, f"more than {self.cfg.max_files} files in one request (--max-files)") from None
            raise Refused(400, f"multipart body: {e.detail}") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if not isinstance(v, str)]
        if not files:
            raise Refused(400, "the multipart body holds no file field: send images as files, e.g. "
                               "curl -F file=@photo.jpg")
        return files

    def decode(self, uploads: list[tuple[str, bytes]]) -> list:
        """Uploaded bytes -> uint8 images (3, S, S), decoded as `vitcli predict` decodes files."""
        from vitcli.decode import BadImage, decode_square

        pre = self.pred.preprocess
        try:
            return [decode_square(name, pre["resize_size"], pre["interpolation"], data=data, draft=True)
                    for name, data in uploads]
        except BadImage as e:
            raise Refused(413 if TOO_LARGE in str(e) else 422, str(e)) from None


def options(svc: Service, top_k: int, min_prob: list[str] | None, coverage: float | None):
    """The request's query options -> (k, per-class thresholds or None, conformal threshold or None)."""
    from vitcli.calibrate import parse_min_prob

    try:
        thresholds = parse_min_prob(min_prob, svc.pred.classes)
        threshold = svc.pred.conformal_threshold(coverage) if coverage is not None else None
    except VitcliError as e:
        raise Refused(400, str(e).replace("--min-prob", "min_prob").replace("--coverage", "coverage")) from None
    return max(1, min(top_k, len(svc.pred.classes))), thresholds, threshold


async def predict_route(request: Request,
                        top_k: int = Query(1, ge=1, description="classes per image, most likely first"),
                        min_prob: list[str] | None = Query(None, description="answer 'unknown' below P; CLASS=P "
                                                                             "for one class (repeatable)"),
                        coverage: float | None = Query(None, gt=0, lt=1, description="add the conformal "
                                                       "prediction set holding the true class this often"),
                        ood: bool = Query(False, description="answer 'unknown' for images unlike the training "
                                                             "data (the model's out-of-distribution threshold)")):
    """Classify one image (the raw body) or several (multipart file fields); answers as `vitcli predict`."""
    import torch

    from vitcli.inference import answers

    svc: Service = request.app.state.service
    svc.authorise(request)
    k, thresholds, threshold = options(svc, top_k, min_prob, coverage)
    if ood and svc.batcher.ood is None:
        raise Refused(400, "ood: this model has no out-of-distribution thresholds (retrain with vitcli to fit them)")
    files = await svc.uploads(request)
    with svc.batcher.held_for(len(files)):
        imgs = await asyncio.get_running_loop().run_in_executor(svc.pool, svc.decode, files)
        rows = await svc.batcher.probs(imgs)
    scores = torch.tensor([score for _, score in rows]) if ood else None  # (B,)
    preds = answers(svc.pred, [n for n, _ in files], torch.stack([p for p, _ in rows]), k, thresholds, threshold,
                    scores, svc.batcher.ood if ood else None)
    svc.served += len(preds)
    return JSONResponse({"predictions": [p.as_dict() for p in preds]})  # as is: no re-encoding by FastAPI


async def health_route(request: Request):
    """Liveness: always answers while the server runs (no token needed)."""
    svc: Service = request.app.state.service
    return {"status": "ok", "queued": svc.batcher.held}


async def info_route(request: Request):
    """The model: classes, file, input size, preprocessing, calibration, and the server's limits."""
    from vitcli import __version__

    svc: Service = request.app.state.service
    svc.authorise(request)
    p, cfg = svc.pred, svc.cfg
    scores = p.task.conformal_scores
    ood = None if p.ood is None else {"score": svc.batcher.ood, "threshold": p.ood["thresholds"][svc.batcher.ood],
                                      "keep": p.ood["keep"]}
    return {"version": __version__, "model": str(p.path), "kind": p.kind, "classes": p.classes,
            "task": p.task.name, "input_size": p.preprocess["img_size"], "preprocess": p.preprocess,
            "calibration": {"temperature": p.task.temperature,
                            "conformal_scores": 0 if scores is None else len(scores)}, "ood": ood,
            "limits": {k: v for k, v in asdict(cfg).items() if k not in ("token", "host", "port")},
            "served": svc.served, "batch_sizes": dict(sorted(svc.batcher.sizes.items()))}


# ----------------------------------------------------------------------------------------------- app
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(pred, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app over `pred`; its batcher and decoding pool stop with the app's lifespan."""
    from vitcli import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.service.pool.shutdown(wait=True)
        app.state.service.batcher.close()

    app = FastAPI(title="vitcli serve", version=__version__, lifespan=lifespan,
                  description=f"{pred.kind} model '{pred.path.name}', classes: {', '.join(pred.classes[:20])}")
    app.state.service = Service(pred, cfg)
    body = {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    app.add_api_route("/predict", predict_route, methods=["POST"], openapi_extra={"requestBody": body})
    app.add_api_route("/health", health_route, methods=["GET"])
    app.add_api_route("/info", info_route, methods=["GET"])
    app.add_exception_handler(Refused, lambda _, e: _error(e.status, e.message, e.headers))
    app.add_exception_handler(HTTPException, lambda _, e: _error(e.status_code, str(e.detail), e.headers))
    app.add_exception_handler(RequestValidationError, lambda _, e: _error(422, "; ".join(
        f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())))
    app.add_exception_handler(Exception, lambda _, e: _error(500, f"internal error: {type(e).__name__}: {e}"))
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, except that a graceful stop on SIGTERM / SIGINT is a normal exit (code 0): uvicorn
    re-raises the signal once it has shut down, which would end the process as killed. `ready` is printed
    once the socket listens."""

    ready = ""

    async def startup(self, sockets=None) -> None:
        from vitcli.console import info

        await super().startup(sockets)
        if self.started:
            info(self.ready)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def run_serve(model: str | None, cfg: ServeConfig, device: str = "auto", precision: str = "auto") -> int:
    """The `vitcli serve` command: load the model, serve it until SIGTERM / Ctrl-C; returns the exit code."""
    from PIL import Image

    from vitcli.console import info
    from vitcli.device import check_device_args
    from vitcli.inference import load_predictor, passive_omp_threads

    cfg.token = cfg.token or os.environ.get(TOKEN_ENV) or None
    cfg.check()
    check_device_args(device, precision)
    passive_omp_threads()
    pred = load_predictor(model, device, precision)
    if line := pred.set_tta(cfg.tta):
        info(line)
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # load_rgb turns Pillow's bomb warning into BadImage
    app = build_app(pred, cfg)
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                    limit_concurrency=cfg.max_connections, timeout_graceful_shutdown=30,
                                    timeout_keep_alive=5))
    server.ready = (f"serving on http://{cfg.host}:{cfg.port} (API docs at /docs; batches of up to "
                    f"{cfg.max_batch}, waiting up to {cfg.max_wait_ms:g} ms){'; token required' if cfg.token else ''}")
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (it has logged why)
        pass
    if not server.started:
        raise VitcliError(f"--host {cfg.host} --port {cfg.port}: could not start listening (address in use or "
                          "not available?)")
    info(f"stopped after answering {app.state.service.served} images")
    return 0
