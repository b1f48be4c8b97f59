"""Speed choices measured on the machine at hand: the matmul limit, torch.compile with a fallback, and the
per-machine cache (VITCLI_CACHE_DIR, else $XDG_CACHE_HOME/vitcli or ~/.cache/vitcli) that remembers them.

Each choice is made by a quick probe or from what an earlier run measured here, and printed with its reason.
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_COLD_S = 75.0  # CPU: compile + first step of a fresh inductor cache, s (66-76 s for a 32 px ViT, 2 cores)
COMPILE_GAIN = {"cpu": 0.15, "cuda": 0.3}  # steps/s gained by compiling: 1.07-1.26x on a 2-core CPU (32 px ViT)
STEP_EFFICIENCY = 0.4  # share of the matmul limit a training step reaches eagerly (~0.5 measured, 32 px ViT)
MATMUL_SIDE = 2048  # side of the square matmul the benchmark times for the limit
PROBE_SIDE = 1024  # side of the quicker one a run times (once per machine) to guess its step time
CACHE_VERSION = 1  # bump when an entry's meaning changes


def cache_dir() -> Path:
    """Where the per-machine speed cache lives."""
    if os.environ.get("VITCLI_CACHE_DIR"):
        return Path(os.environ["VITCLI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitcli"


@lru_cache(maxsize=1)
def machine_key() -> str:
    """This machine as the cache knows it: CPU model and flags, cores, torch version (a GPU adds its name)."""
    import hashlib

    import torch

    cpu, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    text = f"{cpu}|{flags}|{os.cpu_count()}|{torch.__version__}|{gpu}|{CACHE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path() -> Path:
    return cache_dir() / f"speed-{machine_key()}.json"


def cached(key: str) -> Any:
    """What an earlier run measured on this machine under `key`, or None."""
    try:
        return json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def remember(key: str, value: Any) -> None:
    """Store a measurement for later runs on this machine; a cache that cannot be written is skipped."""
    from vitcli.errors import VitcliError
    from vitcli.files import atomic_write_text

    path = cache_path()
    try:
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = value
    try:
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True))
    except VitcliError:
        pass


def matmul_gflops(precision: str, device=None, side: int = MATMUL_SIDE, runs: int = 6) -> float:
    """Measured GFLOP/s of a square `side` matmul in bf16 / fp16 / fp32 on `device` (best of `runs`) with torch's
    threads: the limit a training step is held against."""
    import torch

    device = torch.device("cpu") if device is None else device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    best = 0.0
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * side**3 / max(time.perf_counter() - t, 1e-9) / 1e9)
    return best


def matmul_limit(precision: str, device) -> float:
    """matmul_gflops, measured once per machine, precision and thread count (cached)."""
    import torch

    key = f"matmul/{device.type}/{precision}/{torch.get_num_threads()}"
    value = cached(key)
    if not isinstance(value, (int, float)) or value <= 0:
        value = matmul_gflops(precision, device, PROBE_SIDE)
        remember(key, value)
    return float(value)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def signature(spec: dict[str, Any], batch: int, img_size: int, precision: str, device, what: str = "train"
              ) -> str:
    """The cache key of a compiled step (`what`: train or predict): the model, batch, input, precision, device
    and threads."""
    import hashlib

    import torch

    kw = json.dumps([spec.get("backend"), spec.get("name"), spec.get("kwargs", {})], sort_keys=True, default=str)
    model = hashlib.sha256(kw.encode()).hexdigest()[:12]
    return f"compile/{what}/{model}/b{batch}/s{img_size}/{precision}/{device.type}/t{torch.get_num_threads()}"


def decide_compile(setting: str, device, expected_s: float, sig: str) -> tuple[bool, str]:
    """(compile?, why) for `train.compile`: on / off as set; auto when the steps saved over a run of
    `expected_s` seconds of eager steps outweigh the compile time (measured here before, else a cold guess)."""
    if setting != "auto":
        return setting == "on", "set in the config"
    if device.type not in COMPILE_GAIN:
        return False, f"auto: not on {device.type}"
    gain = COMPILE_GAIN[device.type]
    cost = cached(sig)
    known = isinstance(cost, (int, float)) and cost > 0
    cost = float(cost) if known else COMPILE_COLD_S
    saved = expected_s * gain / (1 + gain)
    where = "measured here before" if known else "a first compile here"
    if saved > cost:
        return True, f"auto: ~{saved:.0f} s saved over ~{expected_s:.0f} s of steps, compile ~{cost:.0f} s ({where})"
    return False, (f"auto: ~{saved:.0f} s saved over ~{expected_s:.0f} s of steps does not pay for a compile of "
                   f"~{cost:.0f} s ({where})")


def step_seconds_guess(macs_per_image: float, batch: int, precision: str, device) -> float:
    """Seconds one eager training step takes: 3x the forward multiply-adds against the measured matmul limit."""
    return 3 * 2 * macs_per_image * batch / (matmul_limit(precision, device) * 1e9 * STEP_EFFICIENCY)


_ATEN_GELU = None


def _aten_gelu_module():
    """nn.GELU whose forward is `vitcli::gelu`: aten's exact GELU as one opaque op (forward and backward) that
    inductor calls, not fuses. Registered once, on the first swap: registering inside a compiled forward would
    break the graph at every GELU."""
    global _ATEN_GELU
    if _ATEN_GELU is None:
        import torch
        import torch.nn.functional as F
        from torch import nn

        # schemas spelt out: this module's annotations are strings (from __future__), which torch cannot read here
        @torch.library.custom_op("vitcli::gelu", mutates_args=(), schema="(Tensor x) -> Tensor")
        def gelu(x):
            return F.gelu(x)

        @torch.library.custom_op("vitcli::gelu_backward", mutates_args=(), schema="(Tensor grad, Tensor x) -> Tensor")
        def gelu_backward(grad, x):
            return torch.ops.aten.gelu_backward(grad, x)

        gelu.register_fake(torch.empty_like)
        gelu_backward.register_fake(lambda grad, x: torch.empty_like(x))
        gelu.register_autograd(lambda ctx, grad: gelu_backward(grad, ctx.saved_tensors[0]),
                               setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))

        class AtenGELU(nn.GELU):
            def forward(self, x):
                return gelu(x)

        _ATEN_GELU = AtenGELU
    return _ATEN_GELU


def aten_gelu(module) -> int:
    """Swap every exact `nn.GELU` in `module` for one that calls aten's kernel through an opaque op; returns how
    many. For a compiled graph on CPU: inductor's C++ erf is ~2x slower than aten's vectorised GELU (ViT-Ti/16,
    224 px, bf16, AMX: 6.7 ms against 4.0 ms a block, forward and backward), more than fusing it saves. Eager
    results are bit-identical (the same kernel); state dicts are unchanged (GELU has no weights)."""
    from torch import nn

    cls = _aten_gelu_module()
    swapped = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.GELU and child.approximate == "none":
                setattr(parent, name, cls())
                swapped += 1
    return swapped


class Compiled:
    """A torch.compile'd module for batches of one size, the first it is called with; other sizes (an epoch's
    last, partial batch) run eagerly: a second shape would compile the graph again with symbolic sizes (~40 s
    for the 32 px CIFAR-10 model's step on 2 cores, where its one eager step takes 0.1 s). It turns back into the
    eager module, with one printed line, when compiling fails (at the warm-up step or later); attributes other
    than calling are the eager module's."""

    def __init__(self, module, what: str, frozen: bool = False):
        import torch

        self.eager, self.what, self.failed, self.batch = module, what, False, None
        cpu = next(module.parameters()).device.type == "cpu"
        if cpu:
            aten_gelu(module)
        # `frozen` (prediction: the weights never change): inductor folds the weights into the graph as constants
        # and prepacks them for oneDNN; forwards under no_grad on CPU run 1.3x (ViT-Ti/16 224 px bf16 on AMX:
        # 177 against 138 img/s; the 32 px CIFAR-10 model 1,700 against 1,295)
        self.compiled = torch.compile(module, options={"freezing": True} if frozen and cpu else None)

    def __call__(self, x, *args, **kwargs):
        self.batch = len(x) if self.batch is None else self.batch
        if not self.failed and len(x) == self.batch:
            try:
                return self.compiled(x, *args, **kwargs)
            except Exception as e:  # inductor needs a C++ compiler and more; any failure: run eagerly
                self.fail(e)
        return self.eager(x, *args, **kwargs)

    def fail(self, e: BaseException) -> None:
        from vitcli.console import warn
        from vitcli.errors import first_line

        self.failed = True
        warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)[:160]}); {self.what} runs without it")

    def __getattr__(self, name: str):
        if name in ("eager", "compiled", "what", "failed", "batch"):  # not set yet: no recursion through self.eager
            raise AttributeError(name)
        return getattr(self.eager, name)


def warm_up(fwd: Compiled, model, x, autocast_ctx, backward: bool = True) -> float:
    """Compile now with one forward (and backward) on `x`, leaving weights, buffers, grads and RNG states as
    they were; a failure turns `fwd` eager. Returns the seconds it took."""
    import torch

    t = time.perf_counter()
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            with autocast_ctx:
                out = fwd(x)  # compiled for this batch size; eagerly, with the one line, if that fails
            if backward:
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.float().sum().backward()
    except Exception as e:  # the compiled backward; an eager step's own error, after a failed compile, is the
        if not fwd.failed:  # first training step's to raise
            fwd.fail(e)
    finally:
        with torch.no_grad():
            for b, saved in buffers:  # BatchNorm statistics of the conv stem
                b.copy_(saved)
        for p in model.parameters():
            p.grad = None
    _sync(x.device)
    return time.perf_counter() - t
