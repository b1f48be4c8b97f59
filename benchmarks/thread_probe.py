"""The thread probe (`train.threads: -1`, threads.py) against fixed counts, on a quiet machine and with a
busy-loop process holding one core.

For the no-flags CIFAR-10 model (32 px, width 128, 4 blocks, conv stem, batch 64, bf16 where the CPU has it):
the train step's images/s at each count the probe compares, then what the probe chooses, in two conditions:
quiet, and while a child process spins on one core (started before and stopped after, bounded in time).

    python benchmarks/thread_probe.py            # needs at least 2 cores
    python benchmarks/thread_probe.py --steps 40
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def model_and_batch():
    import torch

    from vitcli.config import load_config
    from vitcli.device import pick_precision, set_fused_attention
    from vitcli.models import build_model

    cfg = load_config(None, ["model.name=vit-tiny/4", "model.embed_dim=128", "model.depth=4", "model.num_heads=4",
                             "model.stem=conv", "model.global_pool=avg", "model.pos_embed=sincos",
                             "model.pos_conv=true", "data.img_size=32", "data.batch_size=64", "train.threads=-1"])
    model, _ = build_model(cfg.model, 10, 32)
    set_fused_attention(model, False)
    precision, _ = pick_precision("auto", torch.device("cpu"))
    return cfg, model, precision


def step_rate(model, precision: str, threads: int, steps: int) -> float:
    """Training images/s of the real step (forward, backward, AdamW) at `threads`."""
    import torch
    import torch.nn.functional as F

    from vitcli.device import autocast

    torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 64 / (time.perf_counter() - t0)


def measure(label: str, steps: int) -> None:
    import torch

    from vitcli.device import cpu_count
    from vitcli.threads import ThreadTuner, candidates

    cfg, model, precision = model_and_batch()
    rates = {th: step_rate(model, precision, th, steps) for th in candidates(cpu_count())}
    tuner = ThreadTuner(model, cfg, torch.device("cpu"), precision)
    tuner.probe()
    best = max(rates, key=rates.get)
    print(f"{label}: " + ", ".join(f"{th} thread{'s' if th > 1 else ''} {r:.0f} img/s" for th, r in rates.items())
          + f"; the probe chose {tuner.threads} ({rates[tuner.threads] / rates[best]:.2f}x the fastest count, "
          f"{rates[tuner.threads] / rates[1]:.2f}x one thread)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per count (default 30)")
    args = ap.parse_args()
    from vitcli.device import cpu_count

    if cpu_count() < 2:
        print("one core: nothing to choose")
        return 0
    os.environ.pop("OMP_NUM_THREADS", None)  # auto only probes without it
    print(f"{cpu_count()} cores, torch threads by default: ", end="")
    import torch

    print(torch.get_num_threads(), flush=True)
    measure("quiet", args.steps)
    busy = mp.get_context("spawn").Process(target=spin, args=(120.0,), daemon=True)  # bounded: 2 minutes at most
    busy.start()
    time.sleep(1.0)
    try:
        measure("one core busy", args.steps)
    finally:
        busy.terminate()
        busy.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
