"""Training: `train(cfg, data_dir)` is a short driver over named phases, each a function a reader (or the lr
finder) can call alone:

    open_run      resume lookup, device and processes, seeding
    prepare_data  scan the dataset, choose the recipe, write the run folder, decode the images
    build_state   model, optimiser, schedule, EMA, scaler, loss, augmentation  (-> RunState)
    restore       a resumed run's weights, optimiser, RNGs and progress
    per epoch:    train_epoch (train_step per batch) -> evaluate_epoch -> end_epoch (best, checkpoints, log)
    finish        replica check, summary

All mutable training state lives in one `RunState`; its `progress` is what last.pt saves. Callbacks (the
metrics files, loggers) are called at the phase boundaries. All randomness lives in the main process (seeded
batch order, a dedicated augmentation generator, the global RNGs for dropout and mixup) and is saved in
last.pt, so a resumed run continues bit-for-bit on CPU. The step loop does not wait for the device: loss,
accuracy and loss finiteness are summed on it and read once every LOG_EVERY batches.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.config import Config
from vitcli.console import console, esc, info, warn
from vitcli.errors import VitcliError
from vitcli.multilabel import task_line

if TYPE_CHECKING:
    import torch

    from vitcli.data import BadImageLog, Dataset, ImageStore
    from vitcli.defaults import DataFacts

LOG_EVERY = 25  # batches between reads of the on-device loss / accuracy sums (one host-device sync each)


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


class Callback:
    """Hooks at the phase boundaries of `train`; every method is optional. Only the main process calls them."""

    def on_open(self, cfg: Config) -> None: ...  # the run's config is known; before any data work

    def on_start(self, run: RunState, data: TrainData) -> None: ...

    def on_log(self, run: RunState, stats: dict[str, float]) -> None: ...  # every LOG_EVERY batches

    def on_epoch(self, run: RunState, row: dict[str, float]) -> None: ...  # after the epoch's checkpoints

    def on_end(self, run: RunState, result: TrainResult) -> None: ...

    def on_stop(self, run: RunState) -> None: ...  # ended early: a signal, an error, stop_after_steps


class MetricsFiles(Callback):
    """metrics.csv after every epoch; curves.png when drawing is cheap enough, and always at the end."""

    def on_start(self, run: RunState, data: TrainData) -> None:
        from vitcli.rundir import draw_curves, metrics_in_line, write_metrics

        history = run.progress.history  # a kill between last.pt and metrics.csv: bring them in line
        if history and not metrics_in_line(run.run_dir, history):
            write_metrics(run.run_dir / "metrics.csv", history)
            draw_curves(run.run_dir, history)

    def on_epoch(self, run: RunState, row: dict[str, float]) -> None:
        from vitcli.rundir import draw_curves, write_metrics

        write_metrics(run.run_dir / "metrics.csv", run.progress.history)
        draw_curves(run.run_dir, run.progress.history, force=row["epoch"] == run.cfg.train.epochs)

    def on_end(self, run: RunState, result: TrainResult) -> None:
        from vitcli.rundir import draw_curves

        if result.history and result.epochs_run < run.cfg.train.epochs:
            draw_curves(run.run_dir, result.history)  # early stop: the skipped drawings, now


# ----------------------------------------------------------------------------------------------- state
@dataclass
class Env:
    """Where the run executes."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    why: str  # the reason for the precision, printed
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainData:
    """The dataset as training uses it: decoded stores, preprocessing and class counts."""

    data_dir: str | Path
    ds: Dataset
    train: ImageStore
    val: ImageStore
    pre: dict[str, Any]  # eval preprocessing, stored in checkpoints
    counts: list[int]  # training images per class
    bad: BadImageLog
    val_counts: list[int] = field(default_factory=list)  # validation images per class

    @property
    def classes(self) -> list[str]:
        return self.ds.classes

    @property
    def multilabel(self) -> bool:
        return self.ds.multilabel


@dataclass
class Progress:
    """Where the run is; saved in last.pt (as a plain dict) and restored on resume."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimiser steps taken
    best_acc: float = -1.0
    best_epoch: int = 0
    since_best: int = 0  # epochs without a better val best_metric
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows
    partial: dict[str, float] = field(default_factory=lambda: dict(EMPTY_PARTIAL))  # the current epoch's sums
    best_score: float = -math.inf  # train.best_metric of the best epoch, higher is better (loss negated)
    plan: dict[str, int] | None = None  # epochs and schedule a time budget fitted (budget.py), kept on resume


EMPTY_PARTIAL = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}


class EpochSums:
    """The running epoch's training loss and accuracy sums, kept on the device (float64) so a step never waits
    for it; also remembers the first non-finite loss (its batch and value) without a sync."""

    def __init__(self, partial: dict[str, float], device: torch.device):
        import torch

        self.loss = torch.tensor(partial["loss"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(partial["correct"], dtype=torch.float64, device=device)
        self.count = partial["count"]  # known on the host
        self.bad_batch = torch.tensor(-1, device=device)  # first batch whose loss was not finite
        self.bad_loss = torch.tensor(0.0, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, hard: torch.Tensor, batch: int) -> None:
        import torch

        loss = loss.detach()
        first_bad = ~torch.isfinite(loss) & (self.bad_batch < 0)
        self.bad_batch = torch.where(first_bad, batch, self.bad_batch)
        self.bad_loss = torch.where(first_bad, loss.float(), self.bad_loss)
        self.loss += loss.double() * len(hard)
        from vitcli.evaluation import hits

        self.correct += hits(logits.detach(), hard).sum()  # multi-label: hard is the (B, C) label vector
        self.count += len(hard)

    def read(self) -> tuple[float, float, float, int, float]:
        """(loss sum, correct, count, first bad batch or -1, its loss): the one sync."""
        return float(self.loss), float(self.correct), float(self.count), int(self.bad_batch), float(self.bad_loss)


@dataclass
class RunState:
    """Everything the epoch loop reads and changes."""

    cfg: Config
    env: Env
    run_dir: Path
    spec: dict[str, Any]  # the model's self-description, stored in checkpoints
    model: Any  # the plain module (weights that train)
    fwd_model: Any  # what the step calls: the model, or its DDP / compiled wrapper
    ema: Any  # optim.EMA or None
    optimizer: Any
    scaler: Any
    loss_fn: Any  # optim.TrainLoss
    eval_loss: Any  # plain cross-entropy for validation
    mixup: Any  # timm Mixup or None
    augment: Any  # data.TrainAugment
    aug_gen: Any  # torch.Generator of the augmentation (saved for resume)
    sample_w: list[float] | None  # per-image sampling weights (balanced sampler) or None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    progress: Progress = field(default_factory=Progress)
    sums: Any = None  # EpochSums of the running epoch
    lr_fn: Any = None  # step -> peak-relative lr; the warmup-cosine schedule unless replaced (lr finder)
    thresholds: list[float] | None = None  # multi-label: per-class thresholds tuned at the last validation
    callbacks: list[Callback] = field(default_factory=list)
    log_every: int = LOG_EVERY  # batches between reads of the sums (and on_log calls)
    budget: Any = None  # budget.TimeBudget while `train.time` fits the epochs, else None
    distiller: Any = None  # distill.Distiller while `train.teacher` is set: the loss with the teacher

    @property
    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_schedule(self, total: int, warmup: int) -> None:
        """The one place the warmup-cosine schedule is (re)planned: at build time and by the time budget."""
        from vitcli.optim import warmup_cosine

        self.total_steps, self.warmup_steps = total, warmup
        self.lr_fn = warmup_cosine(total, warmup, self.cfg.optim)


# ----------------------------------------------------------------------------------------------- phases
def open_run(cfg: Config, data_dir: str | Path | None, resume: str | Path | None, epochs: int | None,
             hold: contextlib.ExitStack | None = None):
    """Resolve --resume (its config and dataset; the run folder locked into `hold`), check that no output lands
    inside the dataset, then the device, processes, seeds and threads.

    Returns (cfg, data_dir, run_dir or None for a new run, last.pt contents or None, Env)."""
    import torch

    from vitcli.config import config_from_dict, load_config, validate
    from vitcli.device import pick_device, pick_precision, seed_everything
    from vitcli.distributed import init_distributed
    from vitcli.rundir import cfg_data_dir, refuse_output_in_data, resolve_resume

    run_dir = ckpt = None
    if resume is not None:
        run_dir, ckpt = resolve_resume(resume, hold)
        if ckpt is not None:
            cfg = config_from_dict(ckpt["config"])
            data_dir = data_dir or ckpt.get("data_dir")
        else:
            cfg = load_config(run_dir / "config.yaml")
            data_dir = data_dir or cfg_data_dir(run_dir)
        if epochs is not None:
            cfg.train.epochs = epochs
        validate(cfg)  # --epochs, and a shared checkpoint's config, are checked like a config file
        if data_dir is None:
            raise VitcliError(f"--resume '{resume}': give the dataset folder too (vitcli train DATA --resume RUN)")
    refuse_output_in_data(cfg, data_dir, run_dir)
    t = cfg.train
    device = pick_device(t.device)
    dist_i = init_distributed(device)
    precision, why = pick_precision(t.precision, device)
    seed_everything(t.seed + dist_i.rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    return cfg, data_dir, run_dir, ckpt, Env(device, precision, why, dist_i.rank, dist_i.world_size)


def prepare_data(cfg: Config, data_dir: str | Path, env: Env, run_dir: Path | None, recipe: bool,
                 hold: contextlib.ExitStack | None = None, resumed_classes: list[str] | None = None
                 ) -> tuple[TrainData, Path]:
    """Scan the dataset, fill the recipe (`recipe`: not for a resumed run, whose config is final), write
    config.yaml / split.csv, decode (and cache) the images. Returns the data and the run folder (created when
    `run_dir` is None, and locked into `hold`). A resumed run's classes must match its checkpoint's
    (`resumed_classes`), checked before anything is written; its split.csv stays as the record it is."""
    from vitcli import data as D
    from vitcli.defaults import DataFacts
    from vitcli.rundir import check_resumed_data, write_split
    from vitcli.shards import is_shard_source

    d, t = cfg.data, cfg.train
    if is_shard_source(data_dir):
        return prepare_shards(cfg, data_dir, env, run_dir, recipe, hold, resumed_classes)
    ds = D.scan_dataset(data_dir, d.val_fraction, t.seed, d.val_csv or None)
    D.check_val_split(ds, d.val_fraction)
    resumed = run_dir is not None and (run_dir / "config.yaml").is_file()
    if resumed:
        check_resumed_data(run_dir, ds, resumed_classes)
    facts = None  # for the data-aware defaults (a resumed run's config is final)
    if recipe:
        facts = DataFacts(len(ds.train), D.probe_sizes(ds.train.paths, seed=t.seed), env.device.type, str(data_dir))
    run_dir = make_run_dir(cfg, data_dir, env, run_dir, len(ds.train) if recipe else None, hold, facts)
    if env.main and ds.split_made and not resumed:
        write_split(run_dir / "split.csv", ds)
    counts = D.class_counts(ds.train.labels, len(ds.classes))
    info(f"[bold]data[/] {esc(str(data_dir))}: {len(ds.classes)} classes, {len(ds.train)} train / {len(ds.val)} "
         "val images" + (" (seeded split of the class folders)" if ds.split_made else ""))
    info("  per class: " + ", ".join(f"{esc(c)} {k}" for c, k in zip(ds.classes, counts, strict=True)))
    info(task_line(cfg, ds.multilabel))
    return load_images(cfg, data_dir, ds, counts, env), run_dir


def make_run_dir(cfg: Config, data_dir: str | Path, env: Env, run_dir: Path | None, n_train: int | None,
                 hold: contextlib.ExitStack | None = None, facts: DataFacts | None = None) -> Path:
    """Fill the data-aware defaults (`facts`) and the recipe for `n_train` images (None: a resumed run, whose
    config is final), create the run folder (when `run_dir` is None, locked into `hold`), write config.yaml."""
    from vitcli.distributed import broadcast_str
    from vitcli.files import run_lock
    from vitcli.recipes import apply_recipe
    from vitcli.rundir import new_run_dir, write_config

    t = cfg.train
    if n_train is not None:  # keys the user left
        apply_recipe(cfg, n_train=n_train, world=env.world, quiet=not env.main, facts=facts)
        if t.threads:  # the defaults may have chosen it
            import torch

            torch.set_num_threads(t.threads)
    if run_dir is None:
        run_dir = new_run_dir(t.output, t.name) if env.main else Path(t.output) / t.name
        run_dir = Path(broadcast_str(str(run_dir)))
        if hold is not None and env.main:
            hold.enter_context(run_lock(run_dir))
    if env.main:
        write_config(run_dir, cfg, data_dir)
    return run_dir


def prepare_shards(cfg: Config, data_dir: str | Path, env: Env, run_dir: Path | None, recipe: bool,
                   hold: contextlib.ExitStack | None = None, resumed_classes: list[str] | None = None
                   ) -> tuple[TrainData, Path]:
    """prepare_data for tar shards (`vitcli shard`): nothing is listed or decoded up front; every rank streams
    its own shards through DataLoader workers, so memory does not grow with the number of images."""
    from vitcli import data as D
    from vitcli.device import cpu_count
    from vitcli.shards import open_shards

    d = cfg.data
    if d.balanced_sampler:
        raise VitcliError("'data.balanced_sampler' needs random access to the images; turn it off for shards")
    pre = D.preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std)
    workers = d.num_workers if d.num_workers >= 0 else min(8, max(1, cpu_count() - 1))
    bad = D.BadImageLog(total=0, max_fraction=d.max_bad_fraction, data_dir=data_dir)
    sd = open_shards(data_dir, size=pre["resize_size"], interpolation=d.interpolation, num_workers=workers,
                     shuffle_buffer=d.shuffle_buffer, on_bad=bad.add)
    if resumed_classes is not None and list(resumed_classes) != sd.classes:
        raise VitcliError(f"--resume: the shards '{data_dir}' hold the classes {sd.classes[:10]}, but the run was "
                          f"trained on {list(resumed_classes)[:10]}; resume with the run's data")
    bad.total = len(sd.train) + len(sd.val)
    bad.check()  # from now on each unreadable image is checked as it turns up
    run_dir = make_run_dir(cfg, data_dir, env, run_dir, len(sd.train) if recipe else None, hold)
    info(f"[bold]data[/] {esc(str(data_dir))}: {len(sd.classes)} classes, {len(sd.train)} train / {len(sd.val)} val "
         f"images in {len(sd.train.shards)} + {len(sd.val.shards)} shards, streamed ({workers} workers per process, "
         f"shuffle buffer {d.shuffle_buffer})")
    info("  per class: " + ", ".join(f"{esc(c)} {k}" for c, k in zip(sd.classes, sd.counts, strict=True)))
    info(task_line(cfg, sd.multilabel))
    ds = D.Dataset(sd.root, sd.classes, D.Split(), D.Split(), multilabel=sd.multilabel, source=sd.root)
    return TrainData(data_dir, ds, sd.train, sd.val, pre, sd.counts, bad, sd.val_counts), run_dir


def load_images(cfg: Config, data_dir: str | Path, ds: Dataset, counts: list[int], env: Env) -> TrainData:
    """Decode both splits once to uint8 at the resize side; cached in memory when they fit."""
    from vitcli import data as D
    from vitcli.device import cpu_count

    d = cfg.data
    pre = D.preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std)
    size = pre["resize_size"]
    total = len(ds.train) + len(ds.val)
    est_gb = total * 3 * size * size / 2**30
    cache = d.cache == "on" or (d.cache == "auto" and est_gb <= d.cache_max_gb)
    workers = d.num_workers if d.num_workers >= 0 else (0 if cache else min(8, max(1, cpu_count() - 1)))
    info(f"[bold]images[/] decoded once to {size}x{size} uint8"
         + (f", cached in memory ({est_gb * 1024:.0f} MiB)" if cache else f", not cached, {workers} workers"))
    bad = D.BadImageLog(total=total, max_fraction=d.max_bad_fraction, data_dir=data_dir)
    pin = env.device.type == "cuda"
    train = D.ImageStore(ds.train, size, d.interpolation, cache, workers, bad.add, "decoding train", pin)
    val = D.ImageStore(ds.val, size, d.interpolation, cache, workers, bad.add, "decoding val", pin)
    bad.check()  # uncached: files that only fail while decoding are checked again as they turn up
    if len(train) == 0 or len(val) == 0:
        raise VitcliError(f"'{data_dir}': no readable images left in the {'val' if len(train) else 'train'} split")
    if cache and env.device.type != "cpu":
        train.to(env.device)
        val.to(env.device)
    val_counts = D.class_counts(ds.val.labels, len(ds.classes))
    ds.train, ds.val = D.Split(), D.Split()  # the stores hold the images now: let the scan's Path lists go
    return TrainData(data_dir, ds, train, val, pre, counts, bad, val_counts)


def build_state(cfg: Config, data: TrainData, env: Env, run_dir: Path, *, wrap: bool = True) -> RunState:
    """Model, optimiser, schedule, EMA, scaler, loss and augmentation for a run (`wrap`: DDP / compile)."""
    import torch

    from vitcli import data as D
    from vitcli import multilabel as ML
    from vitcli.device import pick_attention, refine_auto_precision, set_fused_attention
    from vitcli.distill import build_distiller
    from vitcli.models import build_model
    from vitcli.optim import EMA, TrainLoss, build_mixup, build_optimizer

    d, t, o = cfg.data, cfg.train, cfg.optim
    model, spec = build_model(cfg.model, len(data.classes), d.img_size, distill_token=bool(t.teacher))
    model.to(env.device)
    source = " from pretrained weights" if cfg.model.pretrained == "true" or cfg.model.pretrained_file else ""
    k = spec["kwargs"]
    shape = f", width {k['embed_dim']}, {k['depth']} blocks, {k['stem']} stem" if "stem" in k else ""
    info(f"[bold]model[/] {esc(cfg.model.name)} ({spec['backend']}){source}{shape}, "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    if t.precision == "auto":
        env.precision, env.why = refine_auto_precision(env.precision, env.why, model, env.device, d.img_size,
                                                       d.batch_size)
    fused_attn, attn_why = pick_attention(env.device, env.precision)
    set_fused_attention(model, fused_attn)
    info(f"[bold]device[/] {env.device}, precision {env.precision} ({env.why})"
         + (f", {env.world} processes" if env.world > 1 else "") + ("" if fused_attn else f"; attention: {attn_why}"))
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    loss_fn = ML.train_loss(cfg, data.multilabel) or TrainLoss(cfg, data.counts, env.device)
    if loss_fn.class_w is not None:
        info("  class weights: " + ", ".join(f"{w:.2f}" for w in loss_fn.class_w.tolist()))
    distiller = build_distiller(cfg, data.classes, data.pre, env.device, model, data.multilabel)
    fwd_model = wrap_model(model, ema, cfg, env) if wrap else model
    aug_gen = torch.Generator().manual_seed(t.seed * 7919 + env.rank)
    sample_w = [1.0 / data.counts[y] for y in data.train.labels.tolist()] if d.balanced_sampler else None
    n_batches = data.train.steps(d.batch_size, 0, t.seed, env.world, sample_w)
    mixup = build_mixup(cfg, len(data.classes))
    steps_per_epoch = max(1, n_batches // t.accum_steps)
    total, warmup = steps_per_epoch * t.epochs, round(o.warmup_epochs * steps_per_epoch)
    run = RunState(
        cfg=cfg, env=env, run_dir=run_dir, spec=spec, model=model, fwd_model=fwd_model, ema=ema,
        optimizer=build_optimizer(model, o, env.device),
        scaler=torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16"),
        loss_fn=loss_fn, eval_loss=ML.eval_loss(data.multilabel),
        mixup=ML.LabelVectorMix(mixup) if mixup is not None and data.multilabel else mixup,
        augment=D.TrainAugment(d, aug_gen), aug_gen=aug_gen, sample_w=sample_w, steps_per_epoch=steps_per_epoch,
        total_steps=total, warmup_steps=warmup, distiller=distiller)
    run.set_schedule(total, warmup)
    return run


def wrap_model(model, ema, cfg: Config, env: Env):
    """channels-last, DDP (which broadcasts rank 0's weights; the EMA copy starts from them too), compile."""
    import torch

    t = cfg.train
    fwd = model.to(memory_format=torch.channels_last) if t.channels_last else model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
    if t.compile:  # after DDP, as torch recommends
        fwd = torch.compile(fwd)
    return fwd


def restore(run: RunState, ckpt: dict[str, Any]) -> None:
    """Load a resumed run's weights, EMA, optimiser, scaler, RNG states and progress from last.pt."""
    from vitcli.device import set_rng_state

    ts = ckpt["train_state"]
    run.model.load_state_dict(ts.get("model", ckpt["model"]))
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ts["optimizer"])
    if ts.get("scaler"):
        run.scaler.load_state_dict(ts["scaler"])
    pr = ts["progress"]
    run.progress = Progress(pr["epoch"], pr["batch"], pr["step"], pr["best_acc"], pr["best_epoch"],
                            pr["since_best"], list(pr["history"]), dict(pr["partial"]),
                            pr.get("best_score", pr["best_acc"]),  # runs from before best_metric used acc
                            pr.get("plan"))
    set_rng_state(ts["rng"])
    run.aug_gen.set_state(ts["aug_rng"])
    info(f"[bold]resumed[/] {esc(str(run.run_dir))} at epoch {run.progress.epoch + 1}, step {run.progress.step}")
    if run.progress.epoch >= run.cfg.train.epochs:
        info(f"the run already trained {run.progress.epoch} epochs; pass --epochs N (> {run.progress.epoch}) to "
             "extend it")


def train_step(run: RunState, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """One batch: lr, augmentation, mixup, forward under autocast, backward (accumulating), and on the last
    batch of an accumulation: clip, optimiser step, EMA. Returns the detached loss; never waits for the device."""
    import torch

    from vitcli.device import autocast
    from vitcli.optim import set_lr

    d, t, o, env = run.cfg.data, run.cfg.train, run.cfg.optim, run.env
    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
    if batch % t.accum_steps == 0:
        set_lr(run.optimizer, run.lr_fn(run.progress.step))
    xb = run.augment(x)  # (B, 3, img_size, img_size)
    if t.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    target = y
    if run.mixup is not None and len(y) and len(y) % 2 == 0:
        xb, target = run.mixup(xb, y)  # target (B, C) soft labels
    try:
        with autocast(env.device, env.precision):
            out = run.fwd_model(xb)  # (B, C), or (class head, distillation head) logits while distilling
            if run.distiller is not None:
                logits, loss = run.distiller(out, xb, target, run.loss_fn)
            else:
                logits = out.float()  # (B, C)
                # an empty batch (a rank out of shard images pads the epoch so all ranks step together): zero grads
                loss = run.loss_fn(logits, target) if len(y) else logits.sum() * 0.0
    except torch.OutOfMemoryError:
        raise VitcliError(f"out of memory at batch size {d.batch_size} on {env.device}; try --batch-size "
                          f"{max(1, d.batch_size // 2)} (or train.accum_steps {t.accum_steps * 2} to keep the "
                          "effective batch)") from None
    last = (batch + 1) % t.accum_steps == 0
    if env.world > 1 and not last:  # accumulate locally, all-reduce on the last one
        with run.fwd_model.no_sync():
            run.scaler.scale(loss / t.accum_steps).backward()
    else:
        run.scaler.scale(loss / t.accum_steps).backward()
    if last:
        if o.clip_grad > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), o.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.progress.step += 1
        if run.ema is not None:
            run.ema.update(run.model)
    hard = target.argmax(1) if target.ndim == 2 and y.ndim == 1 else y  # mixup/cutmix: the dominant label
    run.sums.add(loss, logits, hard, batch)
    return loss.detach()


def train_epoch(run: RunState, data: TrainData, bar, stop: StopFlag, stop_after_steps: int | None) -> bool:
    """Train one epoch (the rest of it after a resume). Raises Interrupted after saving last.pt on a signal;
    returns True, last.pt saved, when `stop_after_steps` is reached (tests)."""
    from vitcli.distributed import any_rank
    from vitcli.recipes import freeze_backbone

    cfg, env, p = run.cfg, run.env, run.progress
    d, t = cfg.data, cfg.train
    epoch = p.epoch
    n = min(data.train.steps(d.batch_size, epoch, t.seed, env.world, run.sample_w), run.steps_per_epoch * t.accum_steps)
    first = p.batch
    task = bar.add_task(f"epoch {epoch + 1}/{t.epochs}", total=n, completed=first, stats="")
    if t.freeze_epochs:
        freeze_backbone(run.model, frozen=epoch < t.freeze_epochs)  # head-only warm-up, then everything
    run.model.train()
    run.sums = EpochSums(p.partial, env.device)
    t0 = time.time() - p.partial["seconds"]
    where = (d.batch_size, epoch, t.seed, env.rank, env.world, first, run.sample_w, n)
    # the batch generator is not kept in a local: an exception (a signal's Interrupted) unwinding this frame then
    # frees it and shuts its DataLoader workers down at once, instead of at interpreter exit
    for bi, (x, y) in enumerate(data.train.train_batches(*where), start=first):
        train_step(run, x, y, bi)
        p.batch = bi + 1
        cut = run.budget is not None and run.budget.after_step(run)  # the time is up: end the epoch here
        end = bi + 1 == n or cut
        if (bi + 1) % run.log_every == 0 or end:
            read_sums(run, t0, bar, task)
        bar.update(task, advance=1)
        stopping = stop.code
        if env.world > 1 and ((bi + 1) % run.log_every == 0 or end):  # the ranks agree at the same batch
            stopping = any_rank(stop.code, env.device)
        elif env.world > 1:
            stopping = 0
        if stop_after_steps is not None and p.step >= stop_after_steps:
            stopping = stopping or -1
        saving = t.save_every_steps and p.step % t.save_every_steps == 0 and (bi + 1) % t.accum_steps == 0
        if stopping or (saving and env.main):
            save_last(run, data, t0)
            if stopping:
                bar.stop()
                stop_run(run, data, stop.code or (stopping if stopping > 0 else 130), stopping == -1)
                return True
        if cut:
            break
    bar.remove_task(task)
    p.partial["seconds"] = time.time() - t0
    streamed = data.train.epoch_check(env.device, env.world)  # shards: was every image seen once?
    if streamed:
        info(f"  epoch {epoch + 1}: {streamed}")
    return False


def read_sums(run: RunState, t0: float, bar=None, task=None) -> dict[str, float]:
    """Read the epoch's sums from the device (the one sync per LOG_EVERY batches): stop on a non-finite
    loss, show the running figures, tell the callbacks."""
    loss, correct, count, bad_batch, bad_loss = run.sums.read()
    if bad_batch >= 0:
        o, best = run.cfg.optim, run.run_dir / "best.pt"
        raise VitcliError(f"loss became {bad_loss} at epoch {run.progress.epoch + 1}, step {bad_batch + 1}; lower "
                          f"'optim.lr' (now {o.lr:g})"
                          + (" or use 'train.precision: fp32'" if run.env.precision != "fp32" else "")
                          + ("; best.pt holds the last good weights" if best.is_file() else ""))
    seconds = time.time() - t0
    run.progress.partial = {"loss": loss, "correct": correct, "count": count, "seconds": seconds}
    stats = {"loss": loss / max(count, 1), "acc": correct / max(count, 1), "lr": run.lr(),
             "images_per_s": count * run.env.world / max(seconds, 1e-9), "step": run.progress.step}
    if bar is not None:
        bar.update(task, stats=f"loss {stats['loss']:.4f} acc {stats['acc']:.3f} lr {stats['lr']:.2e} "
                               f"{stats['images_per_s']:.0f} img/s")
    if run.env.main:
        for cb in run.callbacks:
            cb.on_log(run, stats)
    return stats


def save_last(run: RunState, data: TrainData, t0: float) -> None:
    """last.pt mid-epoch, with the epoch's sums read first (a non-finite loss is never saved as progress)."""
    read_sums(run, t0)
    if run.env.main:
        write_checkpoint(run, data, "last.pt", {}, run.progress.epoch)


def stop_run(run: RunState, data: TrainData, code: int, quietly: bool) -> None:
    """After a signal: say how to resume and raise Interrupted (every rank after rank 0 has saved)."""
    from vitcli.distributed import barrier

    if quietly:
        return
    info(f"[yellow]stopped[/] at epoch {run.progress.epoch + 1}, step {run.progress.batch}; last.pt saved. "
         f"Resume with: vitcli train {esc(str(data.data_dir))} --resume {esc(str(run.run_dir))}")
    barrier()  # no rank exits (and gets torchrun to kill the rest) before the save
    raise Interrupted(code, run.run_dir)


def evaluate_epoch(run: RunState, data: TrainData) -> dict[str, float]:
    """Validation of the weights that are kept (EMA when on), summed over ranks; the epoch's metrics row."""
    from vitcli.distributed import all_reduce_sums, broadcast_buffers
    from vitcli.evaluation import run_eval

    env, p, d = run.env, run.progress, run.cfg.data
    if env.world > 1:  # replicas agree on weights (DDP) and, from here, on BatchNorm statistics too
        broadcast_buffers(run.model)
        if run.ema is not None:
            broadcast_buffers(run.ema.module)
    tl, tc, tn = all_reduce_sums([p.partial["loss"], p.partial["correct"], p.partial["count"]], env.device)
    f1 = run.cfg.train.best_metric == "macro_f1"
    ev = run_eval(run.eval_model, data.val, data.pre, env.device, env.precision, d.batch_size * 2, run.eval_loss,
                  env.rank, env.world, keep_logits=f1 or data.multilabel)
    vl, vc, vn = all_reduce_sums([ev.loss_sum, ev.correct, ev.count], env.device)
    seconds = p.partial["seconds"]
    row = {"epoch": p.epoch + 1, "train_loss": tl / max(tn, 1), "train_acc": tc / max(tn, 1),
           "val_loss": vl / max(vn, 1), "val_acc": vc / max(vn, 1), "lr": run.lr(), "seconds": seconds,
           "images_per_s": tn / max(seconds, 1e-9)}
    if data.multilabel:  # val_acc: share of labels right at 0.5; the mAP picks the best epoch
        from vitcli.multilabel import val_scores

        row["val_map"], run.thresholds = val_scores(ev, env.device, env.world)
    elif f1:
        row["val_macro_f1"] = _macro_f1(ev, len(data.classes), env.device)
    return row


def _macro_f1(ev, num_classes: int, device) -> float:
    """Macro F1 of the validation predictions, from the confusion matrix summed over ranks."""
    import numpy as np

    from vitcli.distributed import all_reduce_sums
    from vitcli.evaluation import averages, confusion_matrix, per_class_metrics

    cm = confusion_matrix(ev.labels.numpy(), ev.logits.argmax(1).numpy(), num_classes)
    cm = np.rint(all_reduce_sums(cm.astype(np.float64).ravel().tolist(), device)).astype(np.int64)
    cm = cm.reshape(num_classes, num_classes)
    return averages(per_class_metrics(cm), cm)["macro"]["f1"]


BEST_SCORE = {"acc": lambda row: row["val_acc"], "loss": lambda row: -row["val_loss"],
              "macro_f1": lambda row: row["val_macro_f1"], "map": lambda row: row["val_map"]}  # higher is better


def best_metric(cfg: Config, multilabel: bool) -> str:
    """train.best_metric, except that multi-label runs rank epochs by validation mAP unless it is loss."""
    return "map" if multilabel and cfg.train.best_metric != "loss" else cfg.train.best_metric


def end_epoch(run: RunState, data: TrainData, row: dict[str, float]) -> bool:
    """Record the epoch: best tracking, best.pt / last.pt, callbacks, the log line. True to stop early."""
    t, p = run.cfg.train, run.progress
    p.history.append(row)
    p.epoch, p.batch, p.partial = p.epoch + 1, 0, dict(EMPTY_PARTIAL)
    score = BEST_SCORE[best_metric(run.cfg, data.multilabel)](row)
    improved = score > p.best_score and _finite(run.eval_model)
    if improved:
        p.best_score, p.best_acc, p.best_epoch, p.since_best = score, row["val_acc"], p.epoch, 0
    else:
        p.since_best += 1
    metrics = {k: float(v) for k, v in row.items()}
    if run.env.main:
        if improved:
            write_checkpoint(run, data, "best.pt", metrics, p.epoch, with_state=False)
        write_checkpoint(run, data, "last.pt", metrics, p.epoch)
        for cb in run.callbacks:
            cb.on_epoch(run, row)
    info(f"epoch {p.epoch:>3}/{t.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
         f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
         + (f" mAP {row['val_map']:.4f}" if "val_map" in row else "") + f"{' *' if improved else ''}  "
         f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s")
    if t.patience and p.since_best >= t.patience:
        what = {"acc": "accuracy", "loss": "loss", "macro_f1": "macro F1", "map": "mAP"}[
            best_metric(run.cfg, data.multilabel)]
        best = -p.best_score if t.best_metric == "loss" else p.best_score
        info(f"early stop: val {what} did not improve for {t.patience} epochs (best {best:.4f} at epoch "
             f"{p.best_epoch})")
        return True
    return False


def write_checkpoint(run: RunState, data: TrainData, name: str, metrics: dict[str, float], epoch: int,
                     with_state: bool = True) -> None:
    """best.pt (weights to use) or last.pt (also what resuming needs), in the one checkpoint schema."""
    from vitcli.checkpoint import cpu_state, make_checkpoint, save_checkpoint
    from vitcli.config import to_dict
    from vitcli.device import rng_state

    train_state = None
    if with_state:
        train_state = {"optimizer": run.optimizer.state_dict(),
                       "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
                       "rng": rng_state(), "aug_rng": run.aug_gen.get_state(), "progress": asdict(run.progress)}
        if run.ema is not None:
            train_state["model"] = cpu_state(run.model.state_dict())
    ckpt = make_checkpoint(model_spec=run.spec, classes=data.classes, preprocess=data.pre,
                           state_dict=run.eval_model.state_dict(), config=to_dict(run.cfg),
                           data_dir=str(Path(data.data_dir).resolve()), epoch=epoch, step=run.progress.step,
                           metrics=metrics, train_state=train_state,
                           task="multilabel" if data.multilabel else "single", thresholds=run.thresholds)
    save_checkpoint(run.run_dir / name, ckpt)


def finish(run: RunState, data: TrainData, t_start: float) -> TrainResult:
    """Calibrate best.pt and last.pt (train.calibrate), check the replicas agree (torchrun), tell the callbacks,
    print the summary."""
    from vitcli.distributed import check_replicas, leave

    p = run.progress
    result = TrainResult(run.run_dir, p.best_acc, p.best_epoch, len(p.history), p.history, time.time() - t_start)
    if run.env.main and run.cfg.train.calibrate and p.history and not data.multilabel:  # multi-label: thresholds
        calibrate_checkpoints(run, data)
    if run.env.world > 1:
        digest = check_replicas(run.eval_model.state_dict(), run.env.world)
        info(f"[bold]distributed[/] all {run.env.world} processes hold identical weights (sha256 {digest[:16]})")
    if run.env.main:
        for cb in run.callbacks:
            cb.on_end(run, result)
        _summary(result, data.classes, data.bad, best_metric(run.cfg, data.multilabel))
    leave()
    return result


def calibrate_checkpoints(run: RunState, data: TrainData) -> None:
    """Fit the temperature and conformal scores of best.pt's and last.pt's weights on the validation split and
    store them in each file (train.calibrate)."""
    from vitcli.calibrate import fit_calibration
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from vitcli.evaluation import run_eval

    env = run.env
    if len(data.val) == 0:
        warn("calibration skipped: the validation split is empty")
        return
    for name in ("best.pt", "last.pt"):
        path = run.run_dir / name
        if not path.is_file():
            continue
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path).to(env.device)
        ev = run_eval(model, data.val, data.pre, env.device, env.precision, run.cfg.data.batch_size * 2,
                      keep_logits=True)
        ckpt["calibration"] = cal = fit_calibration(ev.logits, ev.labels)
        save_checkpoint(path, ckpt)
        note = " (no validation mistakes: temperature at its lower bound)" if cal["errors"] == 0 else ""
        info(f"[bold]calibrated[/] {name}: temperature {cal['temperature']:.3f}, val ECE {cal['ece_before']:.4f} -> "
             f"{cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f} on {cal['images']} "
             f"images{note}")


# ----------------------------------------------------------------------------------------------- driver
def train(cfg: Config, data_dir: str | Path | None, resume: str | Path | None = None,
          epochs_override: int | None = None, stop_after_steps: int | None = None,
          callbacks: list[Callback] | None = None, time_override: str | None = None) -> TrainResult:
    """Train a model on `data_dir` per `cfg`; with `resume`, continue the run in that folder (with
    `time_override`, fit its rest to a new time budget)."""
    t_start = time.time()
    with contextlib.ExitStack() as hold:  # the run-folder lock, held until the run ends
        callbacks = [MetricsFiles(), *(callbacks or [])]
        run, data = start_run(cfg, data_dir, resume, epochs_override, hold, t_start, time_override, callbacks)
        return run_epochs(run, data, t_start, stop_after_steps, callbacks)


def start_run(cfg: Config, data_dir: str | Path | None, resume: str | Path | None, epochs: int | None,
              hold: contextlib.ExitStack, t_start: float, time_override: str | None = None,
              callbacks: list[Callback] = ()) -> tuple[RunState, TrainData]:
    """open_run -> prepare_data -> build_state -> time budget -> restore. A first SIGINT/SIGTERM in here
    (scanning, decoding and caching can take minutes) stops with one line saying nothing was saved yet."""
    from vitcli.budget import budget_for
    from vitcli.signals import Stopped

    try:
        cfg, data_dir, run_dir, ckpt, env = open_run(cfg, data_dir, resume, epochs, hold)
        for cb in callbacks:  # before any work (a tracking server that cannot be reached, say)
            cb.on_open(cfg)
        data, run_dir = prepare_data(cfg, data_dir, env, run_dir, recipe=resume is None, hold=hold,
                                     resumed_classes=None if ckpt is None else list(ckpt["classes"]))
        run = build_state(cfg, data, env, run_dir)
        run.budget = budget_for(run, t_start, len(data.val), time_override, ckpt)  # counts from the start
        if ckpt is not None:
            restore(run, ckpt)
        return run, data
    except Stopped as e:
        e.detail = " while preparing the run (scanning or decoding images); no checkpoint was written"
        raise


def run_epochs(run: RunState, data: TrainData, t_start: float, stop_after_steps: int | None,
               callbacks: list[Callback]) -> TrainResult:
    """The epochs of a prepared run, then finish."""
    from vitcli.console import progress_bar

    run.callbacks = callbacks
    t = run.cfg.train
    if t.log_every_steps and set(t.log) - {"csv"}:  # step logs need the sums that often
        run.log_every = min(LOG_EVERY, t.log_every_steps * t.accum_steps)
    if run.env.main:
        for cb in run.callbacks:
            cb.on_start(run, data)
    try:
        with StopFlag() as stop, progress_bar(extra=True) as bar:
            epoch_task = bar.add_task("epochs", total=t.epochs, completed=run.progress.epoch, stats="")
            if run.budget is not None:
                run.budget.bar, run.budget.epoch_task = bar, epoch_task
            while run.progress.epoch < t.epochs:
                if train_epoch(run, data, bar, stop, stop_after_steps):  # stopped after N steps (tests)
                    _stopped(run)
                    return TrainResult(run.run_dir, run.progress.best_acc, run.progress.best_epoch, 0,
                                       run.progress.history)
                early = end_epoch(run, data, evaluate_epoch(run, data))
                if run.budget is not None:
                    run.budget.after_epoch(run)
                bar.update(epoch_task, advance=1)
                if early:
                    break
    except BaseException:
        _stopped(run)
        raise
    return finish(run, data, t_start)


def _stopped(run: RunState) -> None:
    if run.env.main:
        for cb in run.callbacks:
            cb.on_stop(run)


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
        from vitcli.signals import exit_now, first_signal

        def handler(signum, frame):
            if not first_signal():  # a second signal (also one after a first outside this loop): stop now
                exit_now(signum)
            self.code = code

        return handler

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _finite(model) -> bool:
    import torch

    return all(torch.isfinite(p).all() for p in model.parameters())


def _summary(res: TrainResult, classes: list[str], bad: BadImageLog, metric: str = "acc") -> None:
    from rich.table import Table

    tab = Table(title="training summary", show_header=False)
    tab.add_column()
    tab.add_column(overflow="fold")  # a long run folder wraps rather than losing its end in a log file
    last = res.history[-1] if res.history else {}
    tab.add_row("run folder", esc(str(res.run_dir)))
    by = "" if metric == "acc" else f", best val {metric}"
    tab.add_row("best val accuracy" if metric == "acc" else "val accuracy of best.pt",
                f"{res.best_acc:.4f} (epoch {res.best_epoch}{by})")
    if "val_map" in last:
        best = next(r for r in res.history if r["epoch"] == res.best_epoch)
        tab.add_row("val mAP of best.pt", f"{best['val_map']:.4f}")
    if last:
        tab.add_row("last epoch", f"{last['epoch']}: val acc {last['val_acc']:.4f}, val loss {last['val_loss']:.4f}")
    tab.add_row("classes", str(len(classes)))
    if len(bad):
        tab.add_row("unreadable images skipped", str(len(bad)))
    tab.add_row("wall time", f"{res.seconds:.1f} s")
    console.print(tab)
