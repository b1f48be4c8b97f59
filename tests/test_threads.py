"""`train.threads: -1` (auto, threads.py): one thread or every core, timed on a copy of the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_dataset, run_cli
from vitcli.device import cpu_count
from vitcli.threads import ThreadTuner, candidates, tuner_for


@pytest.fixture
def auto_threads(monkeypatch):
    """The user left OMP_NUM_THREADS unset (the suite sets it to 1); torch's threads are put back after."""
    if cpu_count() < 2:
        pytest.skip("one core: auto has nothing to choose")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_auto_times_both_counts_and_trains_exactly_as_the_chosen_fixed_count(tmp_path, auto_threads):
    data = make_dataset(tmp_path / "d", per_class=12)
    auto = run_cli("train", str(data), *TINY, "--epochs", "2", "--set", "train.threads=-1", "--name", "auto")
    assert auto.exit_code == 0, auto.output
    found = re.search(r"threads (\d+) \(auto: a step took (\d+) ms on 1 thread, (.*) here\)", auto.output)
    assert found, auto.output
    chosen, others = int(found[1]), [int(n) for n in re.findall(r"\d+ ms on (\d+)", found[3])]
    assert others == candidates(cpu_count())[1:] and others[-1] == cpu_count()
    assert chosen in candidates(cpu_count()) and torch.get_num_threads() == chosen
    # the probe ran on a copy, in eval mode, with its own random generator: the run is the run a fixed count gives
    fixed = run_cli("train", str(data), *TINY, "--epochs", "2", "--set", f"train.threads={chosen}", "--name", "fixed")
    assert fixed.exit_code == 0, fixed.output
    a, b = weights(tmp_path / "runs" / "auto"), weights(tmp_path / "runs" / "fixed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tuner(threads: int, device: str = "cpu", world: int = 1) -> ThreadTuner | None:
    from vitcli.config import load_config

    return tuner_for(torch.nn.Linear(2, 2), load_config(None, [f"train.threads={threads}"]), torch.device(device),
                     "fp32", world)


def test_auto_applies_only_on_one_cpu_process_without_omp_num_threads(auto_threads, monkeypatch):
    assert isinstance(tuner(-1), ThreadTuner)
    assert tuner(0) is None and tuner(2) is None  # a number is the user's
    assert tuner(-1, world=2) is None  # torchrun: one process per core
    assert tuner(-1, device="cuda") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert tuner(-1) is None  # the user's OpenMP setting wins


def test_epochs_that_slow_down_or_a_long_stretch_at_one_thread_probe_again(auto_threads, monkeypatch):
    probes = []

    def probe(self, why=""):
        probes.append(why)
        self.threads, self.best_ips, self.since = self.threads or self.many, 0.0, 0

    monkeypatch.setattr(ThreadTuner, "probe", probe)
    t = tuner(-1)
    t.probe()
    for ips in (400, 420, 410, 400):  # steady: no new probe
        t.after_epoch(ips)
    assert len(probes) == 1
    t.after_epoch(250)  # below 0.7 x the fastest since the probe: another process took a core
    assert len(probes) == 2 and "slowed to 250 img/s from 420" in probes[-1]
    t.threads = 1  # the probe chose one thread: after RECHECK_EPOCHS epochs it looks again
    for ips in (250, 255, 250, 252):
        t.after_epoch(ips)
    assert len(probes) == 3 and "checked again after 4 epochs" in probes[-1]
    t.threads = t.many  # at every core: only slower epochs bring a probe
    for ips in (400, 405, 410, 400, 402, 404):
        t.after_epoch(ips)
    assert len(probes) == 3


def test_the_counts_compared_are_one_half_and_every_core():
    assert candidates(1) == [1] and candidates(2) == [1, 2] and candidates(3) == [1, 3]
    assert candidates(16) == [1, 8, 16]
