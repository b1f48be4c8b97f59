"""Training and evaluation loops: AdamW + warmup-cosine, AMP, EMA, mixup, resume, signals, torchrun.

`train(cfg, data_dir)` reads top to bottom: set up -> epochs of (train steps, validation, checkpoints).
All randomness lives in the main process (seeded batch order, a dedicated augmentation generator, the global
RNGs for dropout and mixup) and is saved in last.pt, so a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import csv
import io
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcli import __version__
from vitcli.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from vitcli.config import Config, config_from_dict, to_dict, to_yaml
from vitcli.console import console, esc, info
from vitcli.errors import VitcliError

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving last.pt; `code` is the exit code (130 / 143)."""

    def __init__(self, code: int, run_dir: Path):
        super().__init__(f"interrupted, exit code {code}")
        self.code, self.run_dir = code, run_dir


@dataclass
class TrainResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- helpers
def new_run_dir(output: str | Path, name: str) -> Path:
    """<output>/<name>, or <name>-2, -3, ... : an existing run is never overwritten."""
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        cand = root / (name if i == 1 else f"{name}-{i}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
    raise VitcliError(f"too many runs named '{name}' under '{root}'")


def lr_at(step: int, total: int, warmup: int, o) -> float:
    """Linear warmup from lr * warmup_lr_ratio, then cosine down to lr * min_lr_ratio (per step)."""
    if warmup > 0 and step < warmup:
        return o.lr * (o.warmup_lr_ratio + (1 - o.warmup_lr_ratio) * step / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def param_groups(model, o) -> list[dict]:
    """No weight decay on biases, norms and tokens; layer-wise lr decay when o.layer_decay > 0."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = len(getattr(model, "blocks", []))

    def layer_id(name: str) -> int:
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip or name.endswith(".bias")
        lid = layer_id(name) if o.layer_decay > 0 else 0
        scale = o.layer_decay ** (depth + 1 - lid) if o.layer_decay > 0 else 1.0
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else o.weight_decay,
                                             "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


class EMA:
    """Exponential moving average of weights (fp32), updated every optimiser step."""

    def __init__(self, model, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def update(self, model) -> None:
        import torch

        with torch.no_grad():
            for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
                if e.dtype.is_floating_point:
                    e.lerp_(m, 1.0 - self.decay)
                else:
                    e.copy_(m)


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and exits with 130 / 143."""

    def __init__(self):
        self.code = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            try:
                self._old[sig] = signal.signal(sig, self._make(code))
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _make(self, code: int):
        def handler(signum, frame):
            if self.code:  # a second signal: stop now
                raise KeyboardInterrupt
            self.code = code

        return handler

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def class_counts(labels: list[int], n: int) -> list[int]:
    counts = [0] * n
    for y in labels:
        counts[y] += 1
    return counts


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class EvalOutput:
    logits: Any  # float (N, C) on CPU
    labels: Any  # long (N,) on CPU
    loss_sum: float
    correct: int
    count: int


def run_eval(model, store, pre: dict, device, precision: str, batch_size: int, loss_fn=None,
             rank: int = 0, world: int = 1, keep_logits: bool = False) -> EvalOutput:
    """Forward every image of `store` (this rank's shard) with the eval transform."""
    import torch

    from vitcli.data import eval_transform, sequential_batches
    from vitcli.device import autocast

    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for x, y in store.batches(sequential_batches(len(store), batch_size, rank, world)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(eval_transform(x, pre)).float()  # (B, C)
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
            if keep_logits:
                all_logits.append(logits.cpu())
                all_labels.append(y.cpu())
    logits = torch.cat(all_logits) if all_logits else torch.empty(0, 0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0)
    return EvalOutput(logits, labels.long(), loss_sum, correct, count)


def all_reduce_sums(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def write_metrics(path: Path, history: list[dict]) -> None:
    from vitcli.checkpoint import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_FIELDS})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_split(path: Path, ds) -> None:
    """split.csv: which image went to train and which to val (relative to the dataset folder)."""
    from vitcli.checkpoint import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "class", "path"])
    for name, split in (("train", ds.train), ("val", ds.val)):
        for p, y in zip(split.paths, split.labels, strict=True):
            w.writerow([name, ds.classes[y], p.relative_to(ds.root).as_posix()])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


# ----------------------------------------------------------------------------------------------- training
def resolve_resume(resume: str | Path) -> tuple[Path, dict | None]:
    """--resume RUN|last.pt -> (run folder, last.pt contents or None when the run never saved one)."""
    p = Path(resume)
    run_dir = p.parent if p.is_file() else p
    if not run_dir.is_dir():
        raise VitcliError(f"--resume '{p}': no such run folder")
    for tmp in run_dir.glob(".*.tmp"):  # left by a kill -9 during an atomic write (checkpoint, csv, png)
        tmp.unlink(missing_ok=True)
    last = p if p.is_file() else p / "last.pt"
    if last.is_file():
        ckpt = load_checkpoint(last)
        if "train_state" not in ckpt:
            raise VitcliError(f"--resume '{last}' holds weights only, not the training state; resume from the "
                              "run folder (its last.pt)")
        return run_dir, ckpt
    if (run_dir / "config.yaml").is_file():
        return run_dir, None  # killed before its first save: start that run again from the beginning
    raise VitcliError(f"--resume '{p}': the folder holds neither last.pt nor config.yaml of a vitcli run")


def train(cfg: Config, data_dir: str | Path | None, resume: str | Path | None = None,
          epochs_override: int | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Train a model on `data_dir` per `cfg`; with `resume`, continue the run in that folder."""
    import torch

    from vitcli import data as D
    from vitcli.console import progress_bar
    from vitcli.device import (
        autocast,
        init_distributed,
        pick_attention,
        pick_device,
        pick_precision,
        refine_auto_precision,
        rng_state,
        seed_everything,
        set_fused_attention,
        set_rng_state,
    )
    from vitcli.models import build_model
    from vitcli.defaults import DataFacts
    from vitcli.recipes import apply_recipe, freeze_backbone

    t_start = time.time()
    ckpt = None
    if resume is not None:
        run_dir, ckpt = resolve_resume(resume)
        if ckpt is not None:
            cfg = config_from_dict(ckpt["config"])
            data_dir = data_dir or ckpt.get("data_dir")
        else:
            from vitcli.config import load_config

            cfg = load_config(run_dir / "config.yaml")
            data_dir = data_dir or (cfg_data_dir(run_dir))
        if epochs_override:
            cfg.train.epochs = epochs_override
        if data_dir is None:
            raise VitcliError(f"--resume '{resume}': give the dataset folder too (vitcli train DATA --resume RUN)")
    d, t, o = cfg.data, cfg.train, cfg.optim

    device = pick_device(t.device)
    dist_i = init_distributed(device)
    rank, world, main = dist_i.rank, dist_i.world_size, dist_i.is_main
    precision, why = pick_precision(t.precision, device)
    seed_everything(t.seed + rank)

    ds = D.scan_dataset(data_dir, d.val_fraction, t.seed)
    if len(ds.val) == 0:
        raise VitcliError(f"'{data_dir}': no validation images; raise 'data.val_fraction' or add a val/ folder")
    n_cls = len(ds.classes)
    if resume is None:
        facts = DataFacts(len(ds.train), D.probe_sizes(ds.train.paths, seed=t.seed), device.type, str(data_dir))
        apply_recipe(cfg, n_train=len(ds.train), world=world, quiet=not main, facts=facts)  # keys the user did not set
        run_dir = new_run_dir(t.output, t.name) if main else Path(t.output) / t.name
        if world > 1:
            run_dir = Path(_broadcast_str(str(run_dir), device))
    if t.threads:
        torch.set_num_threads(t.threads)
    if main:
        from vitcli.checkpoint import atomic_write  # a kill mid-write must not leave a half config to resume

        text = f"# vitcli {__version__}; data: {Path(data_dir).resolve()}\n" + to_yaml(cfg)
        atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
        if ds.split_made:
            write_split(run_dir / "split.csv", ds)

    counts = class_counts(ds.train.labels, n_cls)
    info(f"[bold]data[/] {esc(str(data_dir))}: {n_cls} classes, {len(ds.train)} train / {len(ds.val)} val images"
         + (" (seeded split of the class folders)" if ds.split_made else ""))
    info("  per class: " + ", ".join(f"{esc(c)} {k}" for c, k in zip(ds.classes, counts, strict=True)))

    # ---- data
    pre = D.preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std)
    size = pre["resize_size"]
    total_imgs = len(ds.train) + len(ds.val)
    est_gb = total_imgs * 3 * size * size / 2**30
    cache = d.cache == "on" or (d.cache == "auto" and est_gb <= d.cache_max_gb)
    workers = d.num_workers if d.num_workers >= 0 else (0 if cache else min(8, max(1, _cpus() - 1)))
    info(f"[bold]images[/] decoded once to {size}x{size} uint8"
         + (f", cached in memory ({est_gb * 1024:.0f} MiB)" if cache else f", not cached, {workers} workers"))
    bad = D.BadImageLog(total=total_imgs, max_fraction=d.max_bad_fraction, data_dir=data_dir)
    train_store = D.ImageStore(ds.train, size, d.interpolation, cache, workers, bad.add, "decoding train")
    val_store = D.ImageStore(ds.val, size, d.interpolation, cache, workers, bad.add, "decoding val")
    bad.check()  # uncached: files that only fail while decoding are checked again as they turn up
    if len(train_store) == 0 or len(val_store) == 0:
        empty = "train" if not len(train_store) else "val"
        raise VitcliError(f"'{data_dir}': no readable images left in the {empty} split")
    if cache and device.type != "cpu":
        train_store.to(device)
        val_store.to(device)

    # ---- model, optimiser, loss
    model, spec = build_model(cfg.model, n_cls, d.img_size)
    if cfg.model.name.startswith("timm/") and (cfg.model.pretrained or cfg.model.pretrained_file):
        info(f"[bold]model[/] {esc(cfg.model.name)} from pretrained weights")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    info(f"[bold]model[/] {esc(cfg.model.name)} ({spec['backend']}), {n_params / 1e6:.2f} M parameters")
    if t.precision == "auto":
        precision, why = refine_auto_precision(precision, why, model, device, d.img_size, d.batch_size)
    fused_attn, attn_why = pick_attention(device, precision)
    set_fused_attention(model, fused_attn)
    info(f"[bold]device[/] {device}, precision {precision} ({why})" + (f", {world} processes" if world > 1 else "")
         + ("" if fused_attn else f"; attention: {attn_why}"))
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    fused = device.type in ("cuda", "cpu")  # one fused kernel: 3x faster than the per-tensor loop on a CPU
    optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    class_w = None
    if d.class_weights == "auto":
        class_w = torch.tensor([sum(counts) / (n_cls * max(1, c)) for c in counts], device=device)
        info("  class weights: " + ", ".join(f"{w:.2f}" for w in class_w.tolist()))
    mixup = None
    if d.mixup > 0 or d.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=t.label_smoothing,
                      num_classes=n_cls)
    ce = torch.nn.CrossEntropyLoss(weight=class_w, label_smoothing=t.label_smoothing)
    eval_ce = torch.nn.CrossEntropyLoss()

    def loss_fn(logits, target):
        if target.ndim == 2:  # soft targets from mixup / cutmix
            logp = logits.log_softmax(-1)
            if class_w is not None:
                return -(target * logp * class_w).sum(-1).mean()
            return -(target * logp).sum(-1).mean()
        return ce(logits, target)

    fwd_model = model
    if t.channels_last:
        fwd_model = model.to(memory_format=torch.channels_last)
    if world > 1:  # DDP broadcasts rank 0's weights; the EMA copy starts from them too
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
        if ema is not None:
            ema.module.load_state_dict(unwrap(model).state_dict())
    if t.compile:  # after DDP, as torch recommends
        fwd_model = torch.compile(fwd_model)

    aug_gen = torch.Generator().manual_seed(t.seed * 7919 + rank)
    augment = D.TrainAugment(cfg.data, aug_gen)
    sample_w = None
    if d.balanced_sampler:
        sample_w = [1.0 / counts[y] for y in train_store.labels.tolist()]
    n_batches = len(D.epoch_batches(len(train_store), d.batch_size, 0, t.seed, rank, world, sample_w))
    steps_per_epoch = max(1, n_batches // t.accum_steps)
    total_steps = steps_per_epoch * t.epochs
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)

    # ---- resume
    start_epoch, skip_batches, step = 0, 0, 0
    best_acc, best_epoch, since_best = -1.0, 0, 0
    history: list[dict] = []
    partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
    if ckpt is not None:
        ts = ckpt["train_state"]
        unwrap(model).load_state_dict(ts.get("model", ckpt["model"]))
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ts["optimizer"])
        if "scaler" in ts and ts["scaler"]:
            scaler.load_state_dict(ts["scaler"])
        pr = ts["progress"]
        start_epoch, skip_batches, step = pr["epoch"], pr["batch"], pr["step"]
        best_acc, best_epoch, since_best = pr["best_acc"], pr["best_epoch"], pr["since_best"]
        history, partial = list(pr["history"]), dict(pr["partial"])
        set_rng_state(ts["rng"])
        aug_gen.set_state(ts["aug_rng"])
        metrics_csv = run_dir / "metrics.csv"  # a kill between last.pt and metrics.csv: bring it in line
        if main and history and (not metrics_csv.is_file()
                                 or metrics_csv.read_text().count("\n") != len(history) + 1):
            write_metrics(metrics_csv, history)
            _curves(run_dir, history)
        info(f"[bold]resumed[/] {esc(str(run_dir))} at epoch {start_epoch + 1}, step {step}")
        if start_epoch >= t.epochs:
            info(f"the run already trained {start_epoch} epochs; pass --epochs N (> {start_epoch}) to extend it")

    def checkpoint(eval_model, epoch: int, metrics: dict, progress: dict | None) -> dict:
        c = {"format": FORMAT, "vitcli_version": __version__, "model_spec": spec, "classes": ds.classes,
             "preprocess": pre, "config": to_dict(cfg), "data_dir": str(Path(data_dir).resolve()),
             "epoch": epoch, "step": step, "metrics": metrics,
             "model": {k: v.detach().cpu() for k, v in unwrap(eval_model).state_dict().items()}}
        if progress is not None:
            c["train_state"] = {
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": rng_state(), "aug_rng": aug_gen.get_state(), "progress": progress}
            if ema is not None:
                c["train_state"]["model"] = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
        return c

    def progress_state(epoch: int, batch: int) -> dict:
        return {"epoch": epoch, "batch": batch, "step": step, "best_acc": best_acc, "best_epoch": best_epoch,
                "since_best": since_best, "history": history, "partial": dict(partial)}

    # ---- epochs
    eval_model = ema.module if ema is not None else model
    result = TrainResult(run_dir, best_acc, best_epoch, 0, history)
    stop = StopFlag()
    with stop, progress_bar(extra=True) as bar:
        epoch_task = bar.add_task("epochs", total=t.epochs, completed=start_epoch, stats="")
        for epoch in range(start_epoch, t.epochs):
            batches = D.epoch_batches(len(train_store), d.batch_size, epoch, t.seed, rank, world, sample_w)
            batches = batches[: steps_per_epoch * t.accum_steps]
            first = skip_batches if epoch == start_epoch else 0
            batch_task = bar.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(batches), completed=first,
                                      stats="")
            if t.freeze_epochs:
                freeze_backbone(model, frozen=epoch < t.freeze_epochs)  # head-only warm-up, then everything
            model.train()
            t0 = time.time() - partial["seconds"]
            for bi, (x, y) in enumerate(train_store.batches(batches[first:]), start=first):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if bi % t.accum_steps == 0:
                    lr = lr_at(step, total_steps, warmup_steps, o)
                    for g in optimizer.param_groups:
                        g["lr"] = lr * g["lr_scale"]
                xb = augment(x)  # (B, 3, img_size, img_size)
                if t.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                target = y
                if mixup is not None and len(y) % 2 == 0:
                    xb, target = mixup(xb, y)
                try:
                    with autocast(device, precision):
                        logits = fwd_model(xb).float()  # (B, C)
                        loss = loss_fn(logits, target)
                except torch.OutOfMemoryError:
                    raise VitcliError(f"out of memory at batch size {d.batch_size} on {device}; try "
                                      f"--batch-size {max(1, d.batch_size // 2)} (or train.accum_steps "
                                      f"{t.accum_steps * 2} to keep the effective batch)") from None
                if not torch.isfinite(loss):
                    raise VitcliError(f"loss became {loss.item()} at epoch {epoch + 1}, step {bi + 1}; lower "
                                      f"'optim.lr' (now {o.lr:g})"
                                      + (" or use 'train.precision: fp32'" if precision != "fp32" else "")
                                      + ("; best.pt holds the last good weights"
                                         if (run_dir / "best.pt").is_file() else ""))
                if world > 1 and (bi + 1) % t.accum_steps:  # accumulate locally, all-reduce on the last one
                    with fwd_model.no_sync():
                        scaler.scale(loss / t.accum_steps).backward()
                else:
                    scaler.scale(loss / t.accum_steps).backward()
                if (bi + 1) % t.accum_steps == 0:
                    if o.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if ema is not None:
                        ema.update(unwrap(model))
                partial["loss"] += float(loss.detach()) * len(y)
                hard = target.argmax(1) if target.ndim == 2 else y  # mixup/cutmix: the dominant label
                partial["correct"] += float((logits.detach().argmax(1) == hard).sum())
                partial["count"] += len(y)
                elapsed = time.time() - t0
                n_seen = partial["count"]
                bar.update(batch_task, advance=1, stats=(
                    f"loss {partial['loss'] / n_seen:.4f} acc {partial['correct'] / n_seen:.3f}"
                    f" lr {optimizer.param_groups[0]['lr']:.2e} {n_seen * world / max(elapsed, 1e-9):.0f} img/s"))
                stopping = _any_rank(stop.code, device, world) if world > 1 else stop.code
                if stop_after_steps is not None and step >= stop_after_steps:
                    stopping = stopping or -1
                if stopping or (t.save_every_steps and main and step % t.save_every_steps == 0
                                and (bi + 1) % t.accum_steps == 0):
                    partial["seconds"] = time.time() - t0
                    if main:
                        save_checkpoint(run_dir / "last.pt",
                                        checkpoint(eval_model, epoch, {}, progress_state(epoch, bi + 1)))
                    if stopping:
                        bar.stop()
                        code = stop.code or (stopping if stopping > 0 else 130)  # another rank's signal
                        if stopping != -1:
                            info(f"[yellow]stopped[/] at epoch {epoch + 1}, step {bi + 1}; last.pt saved. Resume "
                                 f"with: vitcli train {esc(str(data_dir))} --resume {esc(str(run_dir))}")
                            _barrier(world)  # no rank exits (and gets torchrun to kill the rest) before the save
                            raise Interrupted(code, run_dir)
                        return result
            bar.remove_task(batch_task)
            seconds = time.time() - t0
            tr = all_reduce_sums([partial["loss"], partial["correct"], partial["count"]], device)
            ev = run_eval(eval_model, val_store, pre, device, precision, d.batch_size * 2, eval_ce, rank, world)
            vl, vc, vn = all_reduce_sums([ev.loss_sum, ev.correct, ev.count], device)
            row = {"epoch": epoch + 1, "train_loss": tr[0] / max(tr[2], 1), "train_acc": tr[1] / max(tr[2], 1),
                   "val_loss": vl / max(vn, 1), "val_acc": vc / max(vn, 1), "lr": optimizer.param_groups[0]["lr"],
                   "seconds": seconds, "images_per_s": tr[2] / max(seconds, 1e-9)}
            history.append(row)
            partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
            improved = row["val_acc"] > best_acc and _finite(eval_model)
            if improved:
                best_acc, best_epoch, since_best = row["val_acc"], epoch + 1, 0
            else:
                since_best += 1
            metrics = {k: float(v) for k, v in row.items()}
            if main:
                if improved:
                    save_checkpoint(run_dir / "best.pt", checkpoint(eval_model, epoch + 1, metrics, None))
                save_checkpoint(run_dir / "last.pt", checkpoint(eval_model, epoch + 1, metrics,
                                                                progress_state(epoch + 1, 0)))
                write_metrics(run_dir / "metrics.csv", history)
                _curves(run_dir, history, force=epoch + 1 == t.epochs)
            info(
                f"epoch {epoch + 1:>3}/{t.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{' *' if improved else ''}  "
                f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {seconds:.1f}s")
            bar.update(epoch_task, advance=1)
            if t.patience and since_best >= t.patience:
                info(f"early stop: val accuracy did not improve for {t.patience} epochs (best {best_acc:.4f} "
                     f"at epoch {best_epoch})")
                break
    if main and history and t.patience and since_best >= t.patience:
        _curves(run_dir, history)  # early stop: the skipped drawings, now
    result = TrainResult(run_dir, best_acc, best_epoch, len(history), history, time.time() - t_start)
    if world > 1:
        _check_replicas(eval_model, world)
    if main:
        _summary(result, ds.classes, bad)
    return result


def cfg_data_dir(run_dir: Path) -> str | None:
    """The dataset path recorded in the first line of config.yaml."""
    try:
        first = (run_dir / "config.yaml").read_text().splitlines()[0]
        return first.split("data: ", 1)[1] if "data: " in first else None
    except (OSError, IndexError):
        return None


def _finite(model) -> bool:
    import torch

    return all(torch.isfinite(p).all() for p in model.parameters())


def _any_rank(flag: int, device, world: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()


def _check_replicas(model, world: int) -> None:
    """Every process must end with the same weights; rank 0 prints the shared digest."""
    import torch.distributed as dist

    from vitcli.device import weights_digest

    digests: list = [None] * world
    dist.all_gather_object(digests, weights_digest(unwrap(model).state_dict()))
    if len(set(digests)) != 1:
        raise VitcliError(f"the {world} processes ended with different weights (sha256 per rank: "
                          f"{', '.join(d[:12] for d in digests)}); please report this")
    info(f"[bold]distributed[/] all {world} processes hold identical weights (sha256 {digests[0][:16]})")


def _broadcast_str(s: str, device) -> str:
    import torch.distributed as dist

    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_CURVES_DRAWN: dict[str, tuple[float, float]] = {}  # run folder -> (end of the last drawing, its seconds)


def _curves(run_dir: Path, history: list[dict], force: bool = True) -> None:
    """curves.png: loss and accuracy per epoch, train and val. Unless forced, an epoch's redraw is skipped
    while the last one is more recent than 10x its cost (drawing takes ~0.3-0.8 s), so with epochs of a few
    seconds the figure costs at most a tenth of the run; the last epoch is always drawn."""
    from vitcli.report import plot_curves

    last, cost = _CURVES_DRAWN.get(str(run_dir), (0.0, 0.0))
    if not force and time.time() - last < 10 * cost:
        return
    t0 = time.time()
    try:
        plot_curves(history, run_dir / "curves.png")
    except ImportError:
        pass
    _CURVES_DRAWN[str(run_dir)] = (time.time(), time.time() - t0)


def _summary(res: TrainResult, classes: list[str], bad: list[str]) -> None:
    from rich.table import Table

    tab = Table(title="training summary", show_header=False)
    last = res.history[-1] if res.history else {}
    tab.add_row("run folder", esc(str(res.run_dir)))
    tab.add_row("best val accuracy", f"{res.best_acc:.4f} (epoch {res.best_epoch})")
    if last:
        tab.add_row("last epoch", f"{last['epoch']}: val acc {last['val_acc']:.4f}, val loss {last['val_loss']:.4f}")
    tab.add_row("classes", str(len(classes)))
    if bad:
        tab.add_row("unreadable images skipped", str(len(bad)))
    tab.add_row("wall time", f"{res.seconds:.1f} s")
    console.print(tab)
