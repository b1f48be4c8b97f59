"""Training state: the one `RunState` the epoch loop reads and changes (model, optimiser, schedule, EMA, scaler,
the task's losses, augmentation), its `Progress` (what last.pt saves), the on-device `EpochSums`, and the phases that
make and restore it: `build_state` (a new run) and `restore` (a resumed one, bit-exact on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.config import Config
from vitcli.console import esc, info
from vitcli.errors import VitcliError, clip

if TYPE_CHECKING:
    import torch

    from vitcli.engine import Callback, Env, TrainData

LOG_EVERY = 25  # batches between reads of the on-device loss / accuracy sums (one host-device sync each)


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
        from vitcli.task import hits

        self.correct += hits(logits.detach(), hard).sum()  # label vectors: hard is (B, C)
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
    loss_fn: Any  # the task's training loss (task.TrainLoss or task.SigmoidLoss)
    eval_loss: Any  # plain cross-entropy for validation
    mixup: Any  # timm Mixup or None
    augment: Any  # data.TrainAugment
    aug_gen: Any  # torch.Generator of the augmentation (saved for resume)
    sample_w: list[float] | None  # per-image sampling weights (balanced sampler) or None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    progress: Progress = field(default_factory=Progress)
    task: Any = None  # the data's task.Task: loss, validation metrics, thresholds tuned at the last validation
    sums: Any = None  # EpochSums of the running epoch
    lr_fn: Any = None  # step -> peak-relative lr; the warmup-cosine schedule unless replaced (lr finder)
    callbacks: list[Callback] = field(default_factory=list)
    log_every: int = LOG_EVERY  # batches between reads of the sums (and on_log calls)
    budget: Any = None  # budget.TimeBudget while `train.time` fits the epochs, else None
    threads: Any = None  # threads.ThreadTuner while `train.threads` is auto, else None
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


def build_state(cfg: Config, data: TrainData, env: Env, run_dir: Path, *, wrap: bool = True) -> RunState:
    """Model, optimiser, schedule, EMA, scaler, loss and augmentation for a run (`wrap`: DDP / compile)."""
    import torch

    from vitcli.augment import TrainAugment
    from vitcli.device import pick_attention, refine_auto_precision, set_fused_attention
    from vitcli.models import build_model
    from vitcli.optim import EMA, build_mixup, build_optimizer
    from vitcli.threads import tuner_for

    d, t, o = cfg.data, cfg.train, cfg.optim
    model, spec = build_model(cfg.model, len(data.classes), d.img_size, distill_token=bool(t.teacher))
    model.to(env.device)
    source = " from pretrained weights" if cfg.model.pretrained == "true" or cfg.model.pretrained_file else ""
    k = spec["kwargs"]
    shape = f", width {k['embed_dim']}, {k['depth']} blocks, {k['stem']} stem" if "stem" in k else ""
    shape += ", position conv" if k.get("pos_conv") else ""
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
    loss_fn = data.task.train_loss(cfg, data.counts, env.device)
    if loss_fn.class_w is not None:
        info("  class weights: " + ", ".join(f"{w:.2f}" for w in loss_fn.class_w.tolist()))
    aug_gen = torch.Generator().manual_seed(t.seed * 7919 + env.rank)
    sample_w = [1.0 / data.counts[y] for y in data.train.labels.tolist()] if d.balanced_sampler else None
    n_batches = data.train.steps(d.batch_size, 0, t.seed, env.world, sample_w)
    mixup = build_mixup(cfg, len(data.classes))
    steps_per_epoch = max(1, n_batches // t.accum_steps)
    total, warmup = steps_per_epoch * t.epochs, round(o.warmup_epochs * steps_per_epoch)
    threads = tuner_for(model, cfg, env.device, env.precision, env.world) if wrap else None
    if threads is not None:
        threads.probe()  # before the compile, whose kernels and cache entry are per thread count
    fwd_model = wrap_model(model, ema, cfg, env, spec, total * t.accum_steps) if wrap else model
    run = RunState(
        cfg=cfg, env=env, run_dir=run_dir, spec=spec, model=model, fwd_model=fwd_model, ema=ema,
        optimizer=build_optimizer(model, o, env.device),
        scaler=torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16"),
        loss_fn=loss_fn, eval_loss=data.task.eval_loss(), mixup=data.task.mixup(mixup), task=data.task,
        augment=TrainAugment(d, aug_gen), aug_gen=aug_gen, sample_w=sample_w, steps_per_epoch=steps_per_epoch,
        total_steps=total, warmup_steps=warmup, threads=threads)
    run.set_schedule(total, warmup)
    return run


def wrap_model(model, ema, cfg: Config, env: Env, spec: dict[str, Any], batches: int):
    """channels-last, DDP (which broadcasts rank 0's weights; the EMA copy starts from them too), and
    torch.compile when `train.compile` says so for a run of `batches` batches (speed.py)."""
    import torch

    from vitcli.speed import signature

    t = cfg.train
    fwd = model.to(memory_format=torch.channels_last) if t.channels_last else model
    if env.world > 1:
        import warnings

        from torch.nn.parallel import DistributedDataParallel as DDP

        # a depthwise conv's weight gradient (C, 1, 3, 3) comes with another stride on its size-1 axis than
        # DDP's bucket view: the same memory layout, so nothing to fix and nothing for the user to read
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())
    sig = signature(spec, cfg.data.batch_size, cfg.data.img_size, env.precision, env.device)  # the cache key
    if compile_wanted(model, cfg, env, sig, batches):  # after DDP, as torch recommends
        fwd = compile_step(fwd, model, cfg, env, sig)
    return fwd


def compile_wanted(model, cfg: Config, env: Env, sig: str, batches: int) -> bool:
    """Decide `train.compile` (auto: by the expected seconds of eager steps, a time budget's at most), print
    the choice and its reason, and write it into the config so that a resumed run keeps it."""
    from vitcli.device import linear_macs_per_image
    from vitcli.speed import decide_compile, step_seconds_guess

    d, t = cfg.data, cfg.train
    expected = 0.0
    if t.compile == "auto":
        macs = linear_macs_per_image(model, d.img_size)
        expected = batches * step_seconds_guess(macs, d.batch_size, env.precision, env.device)
        if t.time:
            expected = min(expected, t.seconds)
    wanted, why = decide_compile(t.compile, env.device, expected, sig)
    if env.world > 1:  # rank 0 decides: each rank's own guess (a matmul probe, a cache) may differ, and a rank
        from vitcli.distributed import broadcast  # that compiles runs other collectives than one that does not

        wanted, why = broadcast((wanted, why))
    info(f"[bold]compile[/] {'on' if wanted else 'off'} ({why})")
    t.compile = "on" if wanted else "off"
    return wanted


def compile_step(fwd, model, cfg: Config, env: Env, sig: str):
    """The compiled forward, compiled now on a batch of zeros (nothing changes); eager again if that fails.
    The seconds it took are remembered for the next run's decision on this machine."""
    import torch

    from vitcli.device import autocast
    from vitcli.speed import Compiled, remember, warm_up

    d = cfg.data
    compiled = Compiled(fwd, "training")
    x = torch.zeros(d.batch_size, 3, d.img_size, d.img_size, device=env.device)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # several processes: no warm-up backward, whose gradient all-reduce a rank that failed to compile would not
    # join; the ranks agree on the outcome, so all of them run compiled or all eagerly
    seconds = warm_up(compiled, model, x, autocast(env.device, env.precision), backward=env.world == 1)
    if env.world > 1:
        from vitcli.distributed import any_rank

        if any_rank(int(compiled.failed), env.device) and not compiled.failed:
            compiled.fail(RuntimeError("another process could not compile"))
    if not compiled.failed:
        remember(sig, round(seconds, 1))
        info(f"  compiled in {seconds:.0f} s")
    return compiled


def restore(run: RunState, ckpt: dict[str, Any]) -> None:
    """Load a resumed run's weights, EMA, optimiser, scaler, RNG states and progress from last.pt."""
    from vitcli.device import set_rng_state

    ts = ckpt["train_state"]
    try:
        run.model.load_state_dict(ts.get("model", ckpt["model"]))
    except RuntimeError as e:  # e.g. a pooled student distilled into a token before students lost it
        why = clip(" ".join(str(e).split()), 200)  # torch's message spans lines: the keys are on the later ones
        raise VitcliError(f"--resume: the weights in '{run.run_dir / 'last.pt'}' do not fit the model this version "
                          f"of vitcli builds from the run's config ({why}); start a new run") from None
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
