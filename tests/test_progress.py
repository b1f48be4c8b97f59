"""Progress where output is not a terminal (pipe, nohup, CI, a job's log file): whole lines with elapsed and ETA."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import TINY


def test_piped_training_prints_plain_progress_lines(shapes, tmp_path):
    env = dict(os.environ, VITCLI_PROGRESS_SECONDS="0", COLUMNS="80")  # a line on every update
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", "vitcli", "train", str(shapes), *TINY, "--epochs", "1",
                           "--output", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    lines = err.splitlines()
    steps = [ln for ln in lines if ln.startswith("epoch 1/1  ")]
    pattern = r"epoch 1/1  (\d+)/(\d+) \d+%  elapsed \d+:\d\d:\d\d  eta (\d+:\d\d:\d\d|\?)(  loss \d\.\d{4} acc .*)?$"
    assert steps and all(re.match(pattern, ln) for ln in steps), steps
    assert re.match(pattern, steps[-1])[4], steps[-1]  # the running loss once the epoch's sums are read
    done = [int(re.match(pattern, ln)[1]) for ln in steps]
    assert done == sorted(done) and done[-1] == int(re.match(pattern, steps[-1])[2])  # counts up to the total
    assert any(re.match(r"epochs  1/1 100%  elapsed", ln) for ln in lines), err
    assert "\r" not in err and "\x1b[" not in err and "…" not in err  # no bar redraws, colours or cut fragments
    assert max(len(ln) for ln in steps) > 80  # whole lines, not cut at 80 columns
    assert str(tmp_path / "runs" / "train") in err.replace("│", "").replace("\n", "").replace(" ", "")


def test_plain_progress_line_reports_elapsed_and_eta():
    from vitcli.console import PlainProgress, _Task

    t = _Task("epoch 1/3", total=100, completed=40, fields={"stats": "loss 0.5000"}, start=1000.0,
              start_completed=10)
    # 30 batches in 60 s -> 2 s each; 60 left -> 120 s
    assert PlainProgress.line(t, 1060.0) == "epoch 1/3  40/100 40%  elapsed 0:01:00  eta 0:02:00  loss 0.5000"
    t = _Task("scan", total=None, completed=7, start=0.0)
    assert PlainProgress.line(t, 3725.0) == "scan  7  elapsed 1:02:05"


def test_plain_progress_takes_a_new_total_as_rich_does():
    """A time budget refits the epochs: the epochs line must count to the new number (it kept the first)."""
    from vitcli.console import PlainProgress

    bar = PlainProgress(interval=1e9)
    task = bar.add_task("epochs", total=49, stats="")
    bar.update(task, advance=61)
    bar.update(task, total=69)
    assert PlainProgress.line(bar.tasks[task], bar.tasks[task].start + 10).startswith("epochs  61/69 88%")
    assert "total" not in bar.tasks[task].fields
