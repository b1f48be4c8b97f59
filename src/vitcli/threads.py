"""`train.threads: -1` (auto): one CPU thread, half or all of the cores, whichever trains fastest on the machine as
it is now.

On a quiet 2-core machine a small model's step runs ~1.7x faster on both cores; when another process keeps one
core busy, two OpenMP threads that wait on each other run it 2-3x slower than one thread does. No one setting
is right everywhere, so a run times them: a few forward/backward passes of a copy of the model on a random
batch in eval mode (the real weights, optimiser and random streams are untouched), before the first step and
again when epochs slow down (or, below every core, every few epochs: the other process may have ended). The
thread count changes the order of floating-point sums, so runs that must repeat bit for bit give a number
instead. OMP_NUM_THREADS, when set, is the user's choice and auto keeps it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import TYPE_CHECKING

from vitcli.console import info
from vitcli.device import cpu_count

if TYPE_CHECKING:
    from vitcli.config import Config

AUTO = -1  # the config value that asks for the choice
PROBE_S = 0.5  # seconds each timed stretch of a probe aims for (~4 s a probe for the CIFAR-10 model)
MAX_PROBE_STEPS = 16  # steps in one timed stretch at most (tiny models)
GAIN = 1.1  # a larger count must be at least this much faster per step than the smaller one kept
SLOWER = 0.7  # re-probe when an epoch runs below this share of the fastest epoch since the last probe
RECHECK_EPOCHS = 4  # below every core by a probe: probe again after this many epochs


class ThreadTuner:
    """Chooses among `candidates(cpu_count())` thread counts for training `model`; see the module docstring."""

    def __init__(self, model, cfg: Config, device, precision: str):
        self.model, self.cfg, self.device, self.precision, self.many = model, cfg, device, precision, cpu_count()
        self.threads = 0  # the chosen count (0: not probed yet)
        self.best_ips = 0.0  # fastest epoch (images/s) since the last probe
        self.since = 0  # epochs since the last probe

    def probe(self, why: str = "") -> None:
        """Time each candidate count on a copy of the model and keep the fastest (a larger count only when it is
        GAIN times faster than the smaller one kept); print the choice and its reason."""
        import torch

        step = _prober(self.model, self.cfg, self.device, self.precision)
        counts = candidates(self.many)
        times = dict.fromkeys(counts, math.inf)
        step(self.many)  # warm: first-call allocations
        reps = max(2, min(MAX_PROBE_STEPS, math.ceil(PROBE_S / max(_timed(step, self.many, 1), 1e-4))))
        for th in counts + counts[::-1]:  # interleaved: a load that changes midway hits all alike
            times[th] = min(times[th], _timed(step, th, reps))
        chosen = counts[0]
        for th in counts[1:]:
            if times[th] * GAIN < times[chosen]:
                chosen = th
        torch.set_num_threads(chosen)
        self.threads, self.best_ips, self.since = chosen, 0.0, 0
        took = ", ".join(f"{times[th] * 1000:.0f} ms on {th}" + (" thread" if th == 1 else "") for th in counts)
        info(f"[bold]threads[/] {chosen} (auto{why}: a step took {took} here)")

    def after_epoch(self, images_per_s: float) -> None:
        """Probe again when this epoch was much slower than the fastest since the last probe, or after a few
        epochs below every core."""
        self.since += 1
        if self.best_ips and images_per_s < SLOWER * self.best_ips:
            self.probe(f"; epochs slowed to {images_per_s:.0f} img/s from {self.best_ips:.0f}")
        elif self.threads < self.many and self.since >= RECHECK_EPOCHS:
            self.probe(f"; checked again after {self.since} epochs")
        else:
            self.best_ips = max(self.best_ips, images_per_s)


def candidates(many: int) -> list[int]:
    """Thread counts a probe compares: 1, every core, and half of them on a machine with more than 2 cores (a
    small model often runs best on a few of many cores)."""
    return sorted({1, max(1, many // 2), many})


def tuner_for(model, cfg: Config, device, precision: str, world: int) -> ThreadTuner | None:
    """A ThreadTuner when `train.threads` is auto on a CPU with more than one core, one process and no
    OMP_NUM_THREADS; otherwise the thread count is fixed (auto keeps torch's own, or OMP_NUM_THREADS)."""
    if cfg.train.threads != AUTO or device.type != "cpu" or world > 1 or cpu_count() < 2:
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return ThreadTuner(model, cfg, device, precision)


def _prober(model, cfg: Config, device, precision: str):
    """th -> one forward/backward pass of a copy of `model` on a random batch of the run's shape."""
    import torch

    from vitcli.device import autocast

    model = copy.deepcopy(model).eval()  # eval: dropout and drop path draw no random numbers
    d = cfg.data
    x = torch.randn(d.batch_size, 3, d.img_size, d.img_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)  # (B, 3, H, W); its own generator: the run's random streams are not advanced

    def step(th: int) -> None:
        torch.set_num_threads(th)
        with autocast(device, precision):
            out = model(x)  # (B, C), or a tuple of heads while distilling
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def _timed(step, th: int, reps: int) -> float:
    """Seconds per call of `step(th)`, over `reps` calls after one untimed."""
    step(th)
    t0 = time.perf_counter()
    for _ in range(reps):
        step(th)
    return (time.perf_counter() - t0) / reps
