"""Time budget (`train.time`, `--time 5m`): the number of epochs and the lr schedule fitted to the wall clock.

The budget counts from the start of the training command, so scanning, decoding and caching are inside it.
After a few timed steps the run knows its seconds per step; validation is estimated from it (a forward pass
costs about a third of a training step). The epochs that fit are set, the warmup-cosine schedule is stretched
or shrunk to end with them, and the estimate is printed. At every epoch end the plan is checked against the
real epoch time: shrunk if the machine got slower, so the run still ends in time, and grown when the run is
ahead of its first plan (whose estimate of validation and per-epoch overhead is only a guess). The plan is saved in
last.pt: a resumed run keeps it, and `--time` with `--resume` fits the rest of the run to a new budget.
Under torchrun every process times its steps and all take the slowest figure, so they agree on the plan.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from vitcli.console import info

if TYPE_CHECKING:
    from vitcli.state import RunState

WARM_STEPS = 2  # steps run before timing starts (first-step allocations, lazy init)
TIMED_STEPS = 8  # steps timed to measure the seconds per step
EPOCH_OVERHEAD_S = 0.08  # per epoch besides training and validation: checkpoints, metrics, the log line, seconds
# (measured ~0.05-0.1 s for a tiny model on CPU; the first plan only needs it until real epochs are timed)
FINISH_S = 1.5  # kept free at the end: the summary, curves.png, interpreter exit, seconds
REPORT_S = 8.0  # kept free for `train.report` besides its validation pass: figures and report.html, seconds
GROW_SLACK = 1.1  # the plan grows at an epoch end only to the epochs that would fit were they this much slower
MARGIN = 0.03  # share of the budget kept free for timer noise and other processes
MAX_EPOCHS = 10_000  # upper bound on the epochs a long budget may choose

class TimeBudget:
    """Fits `run`'s epochs and schedule to end by `started + seconds`; see the module docstring."""

    def __init__(self, seconds: float, started: float, val_images: int, max_epochs: int = MAX_EPOCHS,
                 end_images: int = 0):
        self.seconds, self.deadline = seconds, started + seconds * (1 - MARGIN)
        self.val_images, self.max_epochs = val_images, max_epochs
        self.end_images = end_images  # images the end of the run forwards besides the report (calibration)
        self.bar = self.epoch_task = None  # the progress bar's epoch task, whose total follows the plan
        self.seen = 0  # batches this command has run
        self.prev = 0.0  # when the previous batch ended (0 after an epoch end: validation is not a step)
        self.timed, self.count = 0.0, 0  # seconds and number of the timed batches
        self.step_s = 0.0  # measured seconds per optimiser step (0 until measured)
        self.epoch_s = 0.0  # estimated seconds per epoch: training, validation, overhead
        self.last_end = 0.0  # when the previous epoch ended (0: none yet in this command)
        self.epoch_start = 0.0  # when the running epoch's first batch ended (0: not yet)
        self.epoch_times: list[float] = []  # seconds of each epoch this command ran, measured at its end

    def after_step(self, run: RunState) -> bool:
        """Called after every batch: times the first steps, then fits the plan. True: end this epoch now,
        because not even the running epoch fits (one process only; several keep their epochs whole)."""
        accum = run.cfg.train.accum_steps
        if not self.epoch_start:
            self.epoch_start = time.time()
        if not self.step_s:
            now = _synced(run)
            self.seen += 1
            if self.seen > WARM_STEPS * accum and self.prev:
                self.timed, self.count = self.timed + now - self.prev, self.count + 1
            self.prev = now
            if self.count >= TIMED_STEPS * accum:
                self.step_s = _slowest(self.timed / self.count * accum, run)
                self.fit(run)
        return bool(self.step_s) and run.env.world == 1 and run.cfg.train.epochs == run.progress.epoch + 1 \
            and time.time() + self._eval_s(run) + self._finish_s(run) > self.deadline

    def fit(self, run: RunState, refit: bool = False) -> None:
        """Set epochs, total and warmup steps so training, validation and the end fit before the deadline
        (`refit`: at an epoch end, with `epoch_s` measured; the warmup is kept, the cosine moves its end)."""
        t, p = run.cfg.train, run.progress
        spe = run.steps_per_epoch
        if not refit:
            self.epoch_s = max(self.epoch_s, spe * self.step_s + self._eval_s(run))
        # the least time left of any rank: each reads its own clock, and ranks that planned different epochs
        # would wait on each other's collectives forever
        left = -_slowest(-(self.deadline - time.time() - self._finish_s(run)), run)
        running = 1 if p.batch else 0  # an epoch under way finishes whatever the plan
        this_epoch = (spe - p.batch // t.accum_steps) * self.step_s + self._eval_s(run) if running else 0.0
        more = max(0, math.floor((left - this_epoch) / self.epoch_s))
        epochs = max(1, p.epoch + running, min(self.max_epochs, p.epoch + running + more))
        if refit and epochs > t.epochs:  # grow only to what fits with epochs 10% slower: no +1 / -1 flapping
            epochs = max(t.epochs, min(epochs, p.epoch + math.floor((left - this_epoch) / (GROW_SLACK * self.epoch_s))))
        if refit and epochs == t.epochs:
            return
        before, t.epochs = t.epochs, epochs
        total = spe * epochs
        warmup = min(run.warmup_steps, total // 5) if refit else round(run.warmup_steps * epochs / before)
        warmup = max(warmup, min(run.warmup_steps, p.step))  # a warmup under way is not cut short
        run.set_schedule(total, warmup)
        p.plan = {"epochs": epochs, "total_steps": total, "warmup_steps": warmup}
        if self.bar is not None:
            self.bar.update(self.epoch_task, total=epochs)
        ends = time.strftime("%H:%M:%S", time.localtime(self.deadline + self.seconds * MARGIN))
        if refit:
            info(f"[bold]time[/] an epoch takes {self.epoch_s:.2f} s now: {epochs} epochs fit (was {before}); the "
                 f"schedule ends with them, by {ends}")
        else:
            info(f"[bold]time[/] budget {_fmt(self.seconds)}: {self.step_s * 1000:.0f} ms a step, ~{self.epoch_s:.1f} "
                 f"s an epoch with validation: {epochs} epochs fit (warmup {warmup} steps, cosine to step {total}), "
                 f"ending by {ends}")

    def after_epoch(self, run: RunState) -> None:
        """An epoch ended: time it, and fit the plan again: shrink it if the rest no longer fits, grow it when
        the run is ahead (the first plan's estimate is a guess). The estimate is the slower of this epoch and
        the mean since the first timed one, so one quick epoch does not grow the plan past what fits."""
        now, self.prev = time.time(), 0.0
        if self.epoch_start and self.step_s:  # since the previous epoch's end (its checkpoints and log line
            # included), or else since the first batch ended, plus that batch
            start = self.last_end or self.epoch_start - self.step_s / run.cfg.train.accum_steps
            self.epoch_times.append(now - start)
            mean = sum(self.epoch_times) / len(self.epoch_times)
            self.epoch_s = _slowest(max(self.epoch_times[-1], mean), run)
            self.fit(run, refit=True)
        elif self.last_end:  # epochs too short to time steps inside one: a whole epoch, in units of steps
            batches = math.ceil(self.val_images / (run.cfg.data.batch_size * 2 * run.env.world))
            self.step_s = _slowest(now - self.last_end, run) / (run.steps_per_epoch + batches * 2 / 3)
            self.fit(run)
        self.last_end, self.epoch_start = now, 0.0

    def _finish_s(self, run: RunState) -> float:
        """After the last epoch: the summary, the calibration (`end_images` forwards, each ~a third of a training
        image's share of a step) and the report (a validation pass of best.pt and figures)."""
        forwards = self.end_images * self.step_s / (3 * run.cfg.data.batch_size)
        return FINISH_S + forwards + (REPORT_S + self._eval_s(run) if run.cfg.train.report else 0.0)

    def _eval_s(self, run: RunState) -> float:
        """Validation (a forward of twice the batch costs ~2/3 of a training step) plus the epoch's overhead."""
        batches = max(1, math.ceil(self.val_images / (run.cfg.data.batch_size * 2 * run.env.world)))
        return batches * 2 * self.step_s / 3 + EPOCH_OVERHEAD_S


def budget_for(run: RunState, started: float, val_images: int, time_override: str | None,
               ckpt: dict | None, end_images: int = 0) -> TimeBudget | None:
    """The run's TimeBudget, or None. A resumed run (`ckpt`, its last.pt) keeps the schedule its budget fitted,
    unless a new `--time` fits the rest of it again (or extends a finished run); a run stopped before its plan
    was made plans now."""
    from vitcli.config import user_keys

    t = run.cfg.train
    progress = ckpt["train_state"]["progress"] if ckpt is not None else {}
    plan = progress.get("plan")
    if time_override:
        t.time = time_override
        t.epochs += progress.get("epoch", 0)  # room for as many epochs again; the measured plan sets the number
    if plan and not time_override:
        t.epochs = plan["epochs"]
        run.set_schedule(plan["total_steps"], plan["warmup_steps"])
        return None
    if not t.time:
        return None
    from vitcli.defaults import MAX_EPOCHS as DEFAULT_MAX_EPOCHS

    mine = user_keys(run.cfg)
    if "train.epochs" in mine and ckpt is None:  # the user's epochs: the budget only shortens them
        cap = t.epochs
    elif "train.time" in mine or ckpt is not None:
        cap = MAX_EPOCHS
    else:  # the defaults' own budget (defaults.CPU_RUN_TIME): their epochs were a guess at the machine's speed,
        cap = max(t.epochs, DEFAULT_MAX_EPOCHS)  # so a faster machine trains more of them in it
    return TimeBudget(t.seconds, started, val_images, cap, end_images)


def _synced(run: RunState) -> float:
    """The time once the device has finished the queued work."""
    import torch

    if run.env.device.type == "cuda":
        torch.cuda.synchronize(run.env.device)
    elif run.sums is not None:
        run.sums.loss.item()  # CPU / MPS: reading a result waits for it
    return time.time()


def _slowest(seconds: float, run: RunState) -> float:
    """The largest of the ranks' figures (all ranks then fit the same plan)."""
    if run.env.world == 1:
        return seconds
    from vitcli.distributed import all_reduce_max

    return all_reduce_max(seconds, run.env.device)


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
