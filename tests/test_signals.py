"""Interruptions in real processes: SIGTERM / SIGINT save last.pt and exit 143 / 130 with a resume hint;
kill -9 at random moments always leaves a run that resumes; the finished run equals an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, DatasetsUntouched, make_dataset, tiny_config
from vitcli.files import safe_torch_load
from vitcli.train import train

EPOCHS = 3
# 18 train / 6 val images, 2 per step: 9 steps per epoch, 27 in all; last.pt after every step
EXTRA_SETS = ["train.save_every_steps=1", "model.drop_rate=0.1", "data.mixup=0.2"]
ARGS = [*TINY, "--batch-size", "2", "--epochs", str(EPOCHS), *(a for s in EXTRA_SETS for a in ("--set", s))]
TOTAL_STEPS = 9 * EPOCHS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("signals") / "d", per_class=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run, uninterrupted, in this process (one thread, like the subprocesses)."""
    out = tmp_path_factory.mktemp("ref")
    run = train(tiny_config(out, "ref", epochs=EPOCHS, batch_size=2, extra_sets=EXTRA_SETS), data).run_dir
    return safe_torch_load(run / "last.pt")["model"]


def _forked_main(log: str, cwd: str, args: list[str]) -> None:
    """Child side of a forked run: output to `log`, then the CLI exactly as `python -m vitcli` runs it."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    torch.set_num_threads(1)
    from vitcli.cli import app

    app(args=["train", *args], prog_name="vitcli")  # exits through SystemExit with the CLI's exit code


class _ForkedProc:
    """The subset of Popen that the tests use, over a multiprocessing fork."""

    def __init__(self, process):
        self.process = process

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("forked vitcli train", timeout)
        return self.process.exitcode

    def send_signal(self, sig):
        os.kill(self.process.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    @property
    def returncode(self):
        return self.process.exitcode


class Run:
    """`vitcli train` in a child process, output in a file (a full pipe would block it). By default a fresh
    `python -m vitcli`; with fork=True a fork of this process, which already imported torch (a real process
    with its own signals and exit code, but seconds faster to start)."""

    def __init__(self, cwd: Path, *args: str, fork: bool = False):
        self.log = cwd / f"log-{time.monotonic_ns()}.txt"
        self.untouched = DatasetsUntouched(args, cwd)  # checked in wait(): the dataset is never written to
        if fork:
            import multiprocessing

            child = multiprocessing.get_context("fork").Process(target=_forked_main,
                                                                 args=(str(self.log), str(cwd), list(args)))
            child.start()
            self.proc = _ForkedProc(child)
            return
        env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "vitcli", "train", *args], cwd=cwd, env=env,
                                         stdout=f, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"vitcli train did not finish:\n{self.output()}") from None
        self.untouched.__exit__(None, None, None)
        return code


def saved_step(run: Path) -> int:
    try:
        return safe_torch_load(run / "last.pt")["train_state"]["progress"]["step"]
    except Exception:  # not written yet
        return -1


def wait_for_step(child: Run, run: Path, step: int, timeout: float = 90, may_finish: bool = False) -> int | None:
    """Poll last.pt until it records at least `step` optimiser steps (training is under way); None when the
    child finished successfully first and `may_finish`."""
    end, seen = time.monotonic() + timeout, None
    while time.monotonic() < end:
        stamp = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else None
        if stamp != seen:  # read it only when it changed: the children need the CPU more than this loop
            seen = stamp
            if (got := saved_step(run)) >= step:
                return got
        if child.proc.poll() is not None:
            if may_finish and child.proc.returncode == 0:
                return None
            raise AssertionError(f"exited early ({child.proc.returncode}):\n{child.output()}")
        time.sleep(0.05)
    child.proc.kill()
    raise AssertionError(f"no last.pt with step >= {step} after {timeout}s:\n{child.output()}")


def assert_finished_like_reference(run: Path, reference: dict) -> None:
    last = safe_torch_load(run / "last.pt")
    assert last["epoch"] == EPOCHS and last["train_state"]["progress"]["step"] == TOTAL_STEPS
    for k, v in reference.items():
        assert torch.equal(last["model"][k], v), k
    assert (run / "metrics.csv").read_text().count("\n") == EPOCHS + 1
    assert safe_torch_load(run / "best.pt")["format"] == last["format"]


def test_sigterm_and_sigint_save_exit_143_130_and_resume_to_the_same_weights(tmp_path, data, reference):
    run = tmp_path / "runs" / "sig"
    first = Run(tmp_path, str(data), *ARGS, "--name", "sig")
    wait_for_step(first, run, 2)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 143, first.output()
    out = first.output()
    assert "stopped at epoch" in out and f"--resume {run.relative_to(tmp_path)}" in out
    assert "Traceback" not in out
    stopped_at = saved_step(run)
    assert 2 <= stopped_at < TOTAL_STEPS

    # the resumed runs are forks of this process (torch already imported): seconds instead of tens of seconds
    second = Run(tmp_path, "--resume", str(run), fork=True)
    wait_for_step(second, run, stopped_at + 2)
    second.proc.send_signal(signal.SIGINT)
    assert second.wait() == 130, second.output()
    assert "stopped at epoch" in second.output() and "Traceback" not in second.output()
    assert saved_step(run) > stopped_at

    third = Run(tmp_path, "--resume", str(run), fork=True)
    assert third.wait() == 0, third.output()
    assert_finished_like_reference(run, reference)


def test_kill_9_at_random_moments_always_leaves_a_resumable_run(tmp_path, data, reference):
    rng = random.Random()
    run = tmp_path / "runs" / "k9"
    child = Run(tmp_path, str(data), *ARGS, "--name", "k9", fork=True)
    delays, kills = [], 0
    while kills < 4:
        if wait_for_step(child, run, max(1, saved_step(run) + 1), may_finish=True) is None:
            break  # the resumed run finished before it could be killed again
        delays.append(round(rng.uniform(0.0, 0.1), 3))  # a step takes tens of ms: land anywhere in one or two
        time.sleep(delays[-1])
        child.proc.kill()
        if child.wait() == 0:  # it finished during the delay
            break
        assert child.proc.returncode == -signal.SIGKILL, child.output()
        kills += 1
        assert saved_step(run) >= 1, f"last.pt unreadable after kill -9 (delays {delays})"
        child = Run(tmp_path, "--resume", str(run), fork=True)
    assert kills >= 2, delays
    assert child.wait() == 0, (delays, child.output())
    assert_finished_like_reference(run, reference)
    assert not list(run.glob(".*.tmp")), delays  # half-written temp files from the kills were cleared
