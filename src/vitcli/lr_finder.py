"""Learning-rate finder: a short exponential lr sweep (Smith, 2017), a loss-vs-lr plot and a suggested lr.

The sweep trains a fresh model through the training loop's own phases and `train_step` (recipe, augmentation,
mixup, loss, parameter groups, accumulation) and raises the learning rate every optimiser step from `lr_min`
to `lr_max`, stopping early once the loss diverges. The suggestion is the lr where the smoothed loss falls
fastest, which sits safely below the minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vitcli.config import Config
from vitcli.errors import VitcliError


@dataclass
class LRFindResult:
    run_dir: Path
    lrs: list[float]  # lr of each step
    losses: list[float]  # raw training loss of each step
    smoothed: list[float]  # exponentially smoothed, bias-corrected loss
    suggested: float  # suggested peak lr (optim.lr)
    lr_min: float
    lr_max: float


def suggest_lr(lrs: list[float], smoothed: list[float]) -> float:
    """The lr of steepest descent of the smoothed loss against log(lr), before the loss minimum."""
    if len(lrs) < 3:
        return lrs[0]
    stop = min(range(len(smoothed)), key=smoothed.__getitem__)  # index of the lowest loss
    stop = max(stop, 2)
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, min(stop, len(lrs) - 1))]
    if not slopes or min(slopes) >= 0:  # the loss never fell: a tenth of the lr at the minimum
        return lrs[stop] / 10
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def find_lr(cfg: Config, data_dir: str | Path, *, lr_min: float = 1e-6, lr_max: float = 1.0,
            steps: int = 100, diverge: float = 4.0, beta: float = 0.9) -> LRFindResult:
    """Sweep lr exponentially over `steps` steps; write lr_find.png and lr_find.csv to a new run folder.

    Args:
        cfg: the training config (its recipe is applied as for `vitcli train`).
        data_dir: dataset folder, as for `vitcli train`.
        lr_min: first learning rate of the sweep.
        lr_max: last learning rate of the sweep.
        steps: optimiser steps in the sweep (batches are reused when the training set is smaller).
        diverge: stop once the smoothed loss exceeds this multiple of its lowest value.
        beta: smoothing of the loss curve (exponential moving average factor).
    """
    from vitcli.console import esc, info, progress_bar
    from vitcli.engine import open_run, prepare_data, train_step
    from vitcli.rundir import new_run_dir
    from vitcli.state import EMPTY_PARTIAL, EpochSums, build_state

    if not (0 < lr_min < lr_max):
        raise VitcliError(f"lr finder: need 0 < lr_min < lr_max, got lr_min {lr_min:g}, lr_max {lr_max:g}")
    if steps < 5:
        raise VitcliError(f"lr finder: need at least 5 steps, got {steps}")
    cfg, _, _, _, env = open_run(cfg, data_dir, None, None)
    run_dir = new_run_dir(cfg.train.output, "lr-find")
    cfg.train.ema_decay = 0.0  # the sweep's weights are thrown away: no average to keep
    data, _ = prepare_data(cfg, data_dir, env, run_dir, recipe=True)  # recipe, config.yaml, split.csv as a run
    run = build_state(cfg, data, env, run_dir, wrap=False)
    run.lr_fn = lambda step: lr_min * (lr_max / lr_min) ** (step / (steps - 1))
    d, t = cfg.data, cfg.train
    info(f"[bold]lr finder[/] {esc(str(data_dir))}: {len(data.train)} train images, {len(data.classes)} classes, "
         f"lr {lr_min:g} -> {lr_max:g} over {steps} steps"
         + (f" of {t.accum_steps} batches" if t.accum_steps > 1 else ""))
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    batches = iter(())  # the current epoch's (images, labels) batches; in-memory or streamed shards alike
    epoch, bi, step_loss = 0, 0, 0.0
    run.model.train()
    with progress_bar() as bar:
        task = bar.add_task("lr sweep", total=steps)
        while run.progress.step < steps:
            batch = next(batches, None)
            if batch is None:
                batches = data.train.train_batches(d.batch_size, epoch, t.seed, 0, 1)
                epoch += 1
                batch = next(batches)
            run.sums = EpochSums(EMPTY_PARTIAL, env.device)
            i = run.progress.step
            x, y = batch
            step_loss += float(train_step(run, x, y, bi)) / t.accum_steps  # one sync per batch: a sweep is short
            bi += 1
            if run.progress.step == i:  # still accumulating
                continue
            value, step_loss = step_loss, 0.0
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))
            lrs.append(run.lr_fn(i))
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            bar.update(task, advance=1)
            if i >= 5 and smooth > diverge * best:
                break
    if len(lrs) < 3:
        raise VitcliError(f"lr finder: the loss diverged at once (lr {lr_min:g}); lower the sweep start")
    lr = suggest_lr(lrs, smoothed)
    res = LRFindResult(run_dir, lrs, losses, smoothed, lr, lr_min, lr_max)
    _write(res)
    info(f"[bold]suggested lr[/] {lr:.2g} (steepest fall of the loss); plot: {esc(str(run_dir / 'lr_find.png'))}")
    info(f"  train with: --set optim.lr={lr:.2g}")
    return res


def _write(res: LRFindResult) -> None:
    from vitcli.figures import pyplot, save_figure
    from vitcli.files import atomic_write_text

    rows = "lr,loss,smoothed_loss\n" + "".join(
        f"{lr:.6g},{loss:.6g},{s:.6g}\n" for lr, loss, s in zip(res.lrs, res.losses, res.smoothed, strict=True))
    atomic_write_text(res.run_dir / "lr_find.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(res.lrs, res.losses, color="0.75", lw=1, label="loss")
    ax.plot(res.lrs, res.smoothed, lw=2, label="smoothed")
    ax.axvline(res.suggested, color="C3", ls="--", label=f"suggested {res.suggested:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate finder")
    top = min(max(res.smoothed), 2 * res.smoothed[0])
    ax.set_ylim(min(res.losses) * 0.9, top * 1.1)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, res.run_dir / "lr_find.png")
