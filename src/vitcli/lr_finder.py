"""Learning-rate finder: a short exponential lr sweep (Smith, 2017), a loss-vs-lr plot and a suggested lr.

The sweep trains a fresh model with the run's config (recipe, augmentation, parameter groups) and raises
the learning rate every step from `lr_min` to `lr_max`, stopping early once the loss diverges. The
suggestion is the lr where the smoothed loss falls fastest, which sits safely below the minimum.
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
    import torch

    from vitcli import data as D
    from vitcli.console import esc, info, progress_bar
    from vitcli.device import autocast, pick_device, pick_precision, seed_everything
    from vitcli.engine import class_counts, new_run_dir, param_groups
    from vitcli.models import build_model
    from vitcli.recipes import apply_recipe

    if not (0 < lr_min < lr_max):
        raise VitcliError(f"lr finder: need 0 < lr_min < lr_max, got lr_min {lr_min:g}, lr_max {lr_max:g}")
    if steps < 5:
        raise VitcliError(f"lr finder: need at least 5 steps, got {steps}")
    d, t, o = cfg.data, cfg.train, cfg.optim
    device = pick_device(t.device)
    precision, _ = pick_precision(t.precision, device)
    seed_everything(t.seed)
    ds = D.scan_dataset(data_dir, d.val_fraction, t.seed)
    n_cls = len(ds.classes)
    apply_recipe(cfg, n_train=len(ds.train))
    run_dir = new_run_dir(t.output, "lr-find")
    info(f"[bold]lr finder[/] {esc(str(data_dir))}: {len(ds.train)} train images, {n_cls} classes, "
         f"lr {lr_min:g} -> {lr_max:g} over {steps} steps")

    pre = D.preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std)
    store = D.ImageStore(ds.train, pre["resize_size"], d.interpolation, True, 0, None, "decoding train")
    if len(store) == 0:
        raise VitcliError(f"'{data_dir}': no readable training images")
    if device.type != "cpu":
        store.to(device)
    model, _ = build_model(cfg.model, n_cls, d.img_size)
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=lr_min, betas=tuple(o.betas))
    counts = class_counts(store.labels.tolist(), n_cls)
    class_w = None
    if d.class_weights == "auto":
        class_w = torch.tensor([sum(counts) / (n_cls * max(1, c)) for c in counts], device=device)
    ce = torch.nn.CrossEntropyLoss(weight=class_w, label_smoothing=t.label_smoothing)
    augment = D.TrainAugment(d, torch.Generator().manual_seed(t.seed))

    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    epoch = 0
    batches: list[list[int]] = []
    with progress_bar() as bar:
        task = bar.add_task("lr sweep", total=steps)
        for i in range(steps):
            if not batches:
                batches = D.epoch_batches(len(store), d.batch_size, epoch, t.seed)
                epoch += 1
            idx = batches.pop(0)
            x, y = next(store.batches([idx]))
            x, y = x.to(device), y.to(device)
            lr = lr_min * (lr_max / lr_min) ** (i / (steps - 1))
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with autocast(device, precision):
                logits = model(augment(x)).float()  # (B, C)
            loss = ce(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
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
    from vitcli.checkpoint import atomic_write
    from vitcli.report import pyplot, save_figure

    rows = "lr,loss,smoothed_loss\n" + "".join(
        f"{lr:.6g},{loss:.6g},{s:.6g}\n" for lr, loss, s in zip(res.lrs, res.losses, res.smoothed, strict=True))
    atomic_write(res.run_dir / "lr_find.csv", lambda f: f.write(rows.encode()))
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
