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
    proc = subprocess.run([sys.executable, "-m", "vitcli", "train", str(shapes), *TINY, "--epochs", "2",
                           "--output", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    lines = err.splitlines()
    steps = [ln for ln in lines if ln.startswith("epoch 2/2  ")]
    pattern = r"epoch 2/2  (\d+)/(\d+) \d+%  elapsed \d+:\d\d:\d\d  eta (\d+:\d\d:\d\d|\?)  loss \d\.\d{4} acc "
    assert steps and all(re.match(pattern, ln) for ln in steps), steps
    done = [int(re.match(pattern, ln)[1]) for ln in steps]
    assert done == sorted(done) and done[-1] == int(re.match(pattern, steps[-1])[2])  # counts up to the total
    assert any(re.match(r"epochs  2/2 100%  elapsed", ln) for ln in lines), err
    assert "\r" not in err and "\x1b[" not in err and "…" not in err  # no bar redraws, colours or cut fragments
    assert max(len(ln) for ln in steps) > 80  # whole lines, not cut at 80 columns
