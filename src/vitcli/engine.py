"""Training: `train(cfg, data_dir)` is a short driver over named phases, each a function a reader (or the lr
finder) can call alone:

    open_run      resume lookup, device and processes, seeding
    prepare_data  scan the dataset, choose the recipe, write the run folder, decode the images
    build_state   model, optimiser, schedule, EMA, scaler, loss, augmentation  (-> RunState; state.py)
    restore       a resumed run's weights, optimiser, RNGs and progress (state.py)
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
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.config import Config
from vitcli.console import console, esc, info, warn
from vitcli.errors import VitcliError
from vitcli.state import EMPTY_PARTIAL, LOG_EVERY, EpochSums, RunState, build_state, restore
from vitcli.task import Task

if TYPE_CHECKING:
    import torch

    from vitcli.dataset import Dataset, Store
    from vitcli.defaults import DataFacts
    from vitcli.store import BadImageLog

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
    train: Store
    val: Store
    pre: dict[str, Any]  # eval preprocessing, stored in checkpoints
    counts: list[int]  # training images per class
    bad: BadImageLog
    val_counts: list[int] = field(default_factory=list)  # validation images per class
    task: Task = None  # type: ignore[assignment]  # single- or multi-label, from the data (set in __post_init__)

    def __post_init__(self):
        if self.task is None:
            self.task = Task.of_data(self.ds)

    @property
    def classes(self) -> list[str]:
        return self.ds.classes


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
            done = ckpt["train_state"]["progress"].get("epoch", 0) if ckpt is not None else 0
            if 1 <= epochs < done:  # below 1: the range check below says so
                raise VitcliError(f"--epochs {epochs}: the run '{run_dir}' has already trained {done} epochs, and "
                                  f"--epochs counts them all (not extra ones); give more than {done} to train on")
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
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    return cfg, data_dir, run_dir, ckpt, Env(device, precision, why, dist_i.rank, dist_i.world_size)


def prepare_data(cfg: Config, data_dir: str | Path, env: Env, run_dir: Path | None, recipe: bool,
                 hold: contextlib.ExitStack | None = None, resumed_classes: list[str] | None = None
                 ) -> tuple[TrainData, Path]:
    """Scan the source (sources.py decides what DATA is), fill the data-aware defaults and the recipe
    (`recipe`: not for a resumed run, whose config is final), write config.yaml / split.csv, open the stores.
    Returns the data and the run folder (created when `run_dir` is None, and locked into `hold`). A resumed
    run's classes must match its checkpoint's (`resumed_classes`), checked before anything is written."""
    from vitcli.dataset import check_val_split
    from vitcli.defaults import DataFacts, split_defaults
    from vitcli.looks import SIDE
    from vitcli.rundir import check_resumed_data, write_split
    from vitcli.sources import open_source

    d, t = cfg.data, cfg.train
    source = open_source(data_dir, d.val_csv or None)
    ds = source.scan(d.val_fraction, t.seed)
    split = split_defaults(cfg, sum(ds.sizes()), len(ds.classes)) if recipe and ds.pool is not None else []
    if split:  # a large folder: a smaller validation share
        ds = ds.resplit(d.val_fraction, t.seed)
    check_val_split(ds, d.val_fraction)
    resumed = run_dir is not None and (run_dir / "config.yaml").is_file()
    if resumed:
        check_resumed_data(run_dir, ds, resumed_classes)
    n_train, n_val = ds.sizes()
    counts, val_counts = ds.counts()
    facts = None  # for the data-aware defaults (a resumed run's config is final)
    if recipe:
        pixels = source.sample_pixels(ds, SIDE, t.seed)
        facts = DataFacts(n_train, source.sample_sizes(ds, t.seed), env.device.type, str(data_dir),
                          counts=[] if ds.multilabel else counts, split=split, pixels=pixels)
    run_dir = make_run_dir(cfg, data_dir, env, run_dir, n_train if recipe else None, hold, facts)
    if env.main and ds.split_made and source.listed and not resumed:
        write_split(run_dir / "split.csv", ds)
    info(f"[bold]data[/] {esc(str(data_dir))} ({source.kind}): {len(ds.classes)} classes, {n_train} train / {n_val} "
         "val images" + (" (seeded split of the class folders)" if ds.split_made and source.listed else ""))
    info("  per class: " + ", ".join(f"{esc(c)} {k}" for c, k in zip(ds.classes, counts, strict=True)))
    info(Task.of_data(ds).line(cfg))
    return open_stores(cfg, data_dir, source, ds, (counts, val_counts), env), run_dir


def make_run_dir(cfg: Config, data_dir: str | Path, env: Env, run_dir: Path | None, n_train: int | None,
                 hold: contextlib.ExitStack | None = None, facts: DataFacts | None = None) -> Path:
    """Fill the data-aware defaults (`facts`) and the recipe for `n_train` images (None: a resumed run, whose
    config is final), create the run folder (when `run_dir` is None, locked into `hold`), write config.yaml."""
    from vitcli.distributed import broadcast
    from vitcli.files import run_lock
    from vitcli.recipes import apply_recipe
    from vitcli.rundir import mark_running, new_run_dir, write_config

    t = cfg.train
    if n_train is not None:  # keys the user left
        apply_recipe(cfg, n_train=n_train, world=env.world, quiet=not env.main, facts=facts)
        if t.threads > 0:  # the defaults may have chosen it
            import torch

            torch.set_num_threads(t.threads)
    if run_dir is None:
        run_dir = new_run_dir(t.output, t.name) if env.main else Path(t.output) / t.name
        run_dir = Path(broadcast(str(run_dir)))
        if hold is not None and env.main:
            hold.enter_context(run_lock(run_dir))
    if env.main:
        mark_running(run_dir)  # first: `vitcli runs` shows the run as running from now on
        write_config(run_dir, cfg, data_dir)
    return run_dir


def open_stores(cfg: Config, data_dir: str | Path, source, ds: Dataset, counts: tuple[list[int], list[int]],
                env: Env) -> TrainData:
    """The source's train and val stores; unreadable images are counted against data.max_bad_fraction."""
    from vitcli.augment import tta_shift
    from vitcli.dataset import Split
    from vitcli.decode import preprocess_info
    from vitcli.device import cpu_count
    from vitcli.store import BadImageLog

    d, mirror = cfg.data, cfg.data.hflip > 0
    pre = preprocess_info(d.img_size, d.crop_pct, d.interpolation, d.mean, d.std, mirror=mirror,
                          shift=tta_shift(d.img_size, mirror, d.scale_min, d.translate))
    bad = BadImageLog(total=sum(ds.sizes()), max_fraction=d.max_bad_fraction, data_dir=data_dir)
    train, val = source.stores(ds, d, pre, bad.add, env.device, min(8, max(1, cpu_count() - 1)))
    bad.check()  # from now on each unreadable image is checked as it turns up
    if len(train) == 0 or len(val) == 0:
        raise VitcliError(f"'{data_dir}': no readable images left in the {'val' if len(train) else 'train'} split")
    ds.train, ds.val, ds.pool = Split(), Split(), None  # the stores hold the images now: let the scan's Path lists go
    return TrainData(data_dir, ds, train, val, pre, counts[0], bad, counts[1])


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
    ev = run_eval(run.eval_model, data.val, data.pre, env.device, env.precision, d.batch_size * 2, run.eval_loss,
                  env.rank, env.world, keep_logits=run.task.keep_val_logits(run.cfg))
    vl, vc, vn = all_reduce_sums([ev.loss_sum, ev.correct, ev.count], env.device)
    seconds = p.partial["seconds"]
    row = {"epoch": p.epoch + 1, "train_loss": tl / max(tn, 1), "train_acc": tc / max(tn, 1),
           "val_loss": vl / max(vn, 1), "val_acc": vc / max(vn, 1), "lr": run.lr(), "seconds": seconds,
           "images_per_s": tn / max(seconds, 1e-9)}
    metric = run.task.best_metric(run.cfg)  # label vectors: val_acc is the share of labels right at 0.5
    return row | run.task.val_metrics(ev, len(data.classes), env.device, metric, env.world)


BEST_SCORE = {"acc": lambda row: row["val_acc"], "loss": lambda row: -row["val_loss"],
              "macro_f1": lambda row: row["val_macro_f1"], "map": lambda row: row["val_map"]}  # higher is better


def end_epoch(run: RunState, data: TrainData, row: dict[str, float]) -> bool:
    """Record the epoch: best tracking, best.pt / last.pt, callbacks, the log line. True to stop early."""
    t, p = run.cfg.train, run.progress
    p.history.append(row)
    p.epoch, p.batch, p.partial = p.epoch + 1, 0, dict(EMPTY_PARTIAL)
    score = BEST_SCORE[run.task.best_metric(run.cfg)](row)
    improved = score > p.best_score and _finite(run.eval_model)
    if improved:
        p.best_score, p.best_acc, p.best_epoch, p.since_best = score, row["val_acc"], p.epoch, 0
    else:
        p.since_best += 1
    metrics = {k: float(v) for k, v in row.items()}
    if run.budget is not None:  # refit before last.pt is written, so it holds the plan the run follows
        run.budget.after_epoch(run)
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
            run.task.best_metric(run.cfg)]
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
                           **run.task.checkpoint_meta())
    save_checkpoint(run.run_dir / name, ckpt)


def finish(run: RunState, data: TrainData, t_start: float) -> TrainResult:
    """Calibrate best.pt and last.pt (train.calibrate), check the replicas agree (torchrun), tell the callbacks,
    print the summary."""
    from vitcli.distill import weak_teacher
    from vitcli.distributed import check_replicas, leave

    p = run.progress
    result = TrainResult(run.run_dir, p.best_acc, p.best_epoch, len(p.history), p.history, time.time() - t_start)
    if run.env.main and run.cfg.train.calibrate and p.history:
        calibrate_checkpoints(run, data)
    if run.env.world > 1:
        digest = check_replicas(run.eval_model.state_dict(), run.env.world)
        info(f"[bold]distributed[/] all {run.env.world} processes hold identical weights (sha256 {digest[:16]})")
    if run.env.main:
        for cb in run.callbacks:
            cb.on_end(run, result)
        _summary(result, data.classes, data.bad, run.task.best_metric(run.cfg))
        if weak := weak_teacher(run.distiller, p.best_acc, len(data.val)):
            warn(weak)
    leave()
    return result


def calibration_images(run: RunState, data: TrainData) -> int:
    """Images `calibrate_checkpoints` forwards: for best.pt and last.pt, the validation split over the TTA views
    (the temperature), then again with up to ood.BANK_MAX training images (the out-of-distribution scores)."""
    from vitcli.augment import view_count
    from vitcli.ood import BANK_MAX

    if not run.cfg.train.calibrate:  # every rank plans with it: the plans must agree (the main one calibrates)
        return 0
    views = view_count(data.pre, data.pre.get("mirror", False)) if run.task.fits_temperature else 0
    return 2 * ((views + 1) * len(data.val) + min(len(data.train), BANK_MAX))


def calibrate_checkpoints(run: RunState, data: TrainData) -> None:
    """Fit, for best.pt's and last.pt's weights on the validation split, the temperature and conformal scores
    (tasks that fit one) and the out-of-distribution thresholds, and store them in each file (train.calibrate)."""
    from vitcli.augment import views_text
    from vitcli.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from vitcli.evaluation import run_eval
    from vitcli.ood import fit_for_model

    env, batch = run.env, run.cfg.data.batch_size * 2
    if len(data.val) == 0:
        warn("calibration skipped: the validation split is empty")
        return
    for name in ("best.pt", "last.pt"):
        path = run.run_dir / name
        if not path.is_file():
            continue
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path).to(env.device)
        if run.task.fits_temperature:  # label vectors: the per-class thresholds are their calibration
            mirror = data.pre.get("mirror", False)  # fitted on the logits prediction will use (its default TTA)
            ev = run_eval(model, data.val, data.pre, env.device, env.precision, batch, keep_logits=True, tta=mirror)
            ckpt["calibration"] = cal = run.task.fit_calibration(ev.logits, ev.labels)
            cal["tta"] = mirror
            views = f" ({views_text(data.pre)}, as prediction averages them)" if mirror else ""
            info(f"[bold]calibrated[/] {name}{views}: temperature {cal['temperature']:.3f} ({cal['rule']}), val ECE "
                 f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} -> "
                 f"{cal['nll_after']:.4f} on {cal['images']} images")
        temperature = (ckpt.get("calibration") or {}).get("temperature", 1.0)
        ckpt["ood"] = ood = fit_for_model(model, data.train, data.val, data.pre, env.device, env.precision, batch,
                                          temperature, run.cfg.train.ood_keep, run.cfg.train.seed)
        save_checkpoint(path, ckpt)
        th = ood["thresholds"]
        info(f"[bold]out-of-distribution[/] {name}: thresholds keep {ood['keep']:.0%} of {ood['images']} "
             f"validation images answered: knn {th['knn']:.4f} (k={ood['k']}, {len(ood['bank'])} training "
             f"embeddings), energy {th['energy']:.3f}")


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
    from vitcli.distill import build_distiller
    from vitcli.signals import Stopped

    try:
        cfg, data_dir, run_dir, ckpt, env = open_run(cfg, data_dir, resume, epochs, hold)
        for cb in callbacks:  # before any work (a tracking server that cannot be reached, say)
            cb.on_open(cfg)
        data, run_dir = prepare_data(cfg, data_dir, env, run_dir, recipe=resume is None, hold=hold,
                                     resumed_classes=None if ckpt is None else list(ckpt["classes"]))
        run = build_state(cfg, data, env, run_dir)
        run.distiller = build_distiller(cfg, data.classes, data.pre, env.device, run.model, not data.task.one_label,
                                        data.val, (env.rank, env.world))
        run.budget = budget_for(run, t_start, len(data.val), time_override, ckpt,  # counts from the start
                                calibration_images(run, data))
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
                row = evaluate_epoch(run, data)
                early = end_epoch(run, data, row)
                if run.threads is not None and not early and run.progress.epoch < t.epochs:
                    run.threads.after_epoch(row["images_per_s"])
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
