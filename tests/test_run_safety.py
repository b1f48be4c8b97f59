"""A run folder is never shared, mixed up or written into the dataset: the lock on a training run, resume on
other data, outputs in DATA or in unwritable places, a full disk while saving, and signals at awkward moments
(while caching, twice in a row, to the whole process group) stop with one line and no traceback."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY, DatasetsUntouched, DiskFull, make_dataset, run_cli
from test_outputs import one_error_line
from test_signals import Run, _forked_main, wait_for_step
from vitcli.files import safe_torch_load

NO_TRACE = ("Traceback", "Exception ignored", "DataLoader worker", "KeyboardInterrupt")


def clean(output: str) -> None:
    for phrase in NO_TRACE:
        assert phrase not in output, output


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safety") / "d", classes=("red", "green"), per_class=6)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run on `data`."""
    out = tmp_path_factory.mktemp("finished")
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4", "--output", out)
    assert res.exit_code == 0, res.output
    return out / "train"


def test_resume_of_a_run_another_process_trains_is_refused_naming_its_pid(tmp_path, data):
    child = Run(tmp_path, str(data), *TINY, "--batch-size", "2", "--epochs", "30", "--set",
                "train.save_every_steps=1", fork=True)
    run = tmp_path / "runs" / "train"
    wait_for_step(child, run, 1)
    res = run_cli("train", "--resume", run)
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert f"run folder '{run}' is in use by another vitcli process (PID {child.proc.process.pid})" in line
    time.sleep(0.3)
    assert child.proc.poll() is None, child.output()  # the trainer was not disturbed
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == 143, child.output()
    clean(child.output())
    assert safe_torch_load(run / "last.pt")["train_state"]["progress"]["step"] >= 1
    assert not (run / ".vitcli.lock").exists()  # released with the run


@pytest.mark.parametrize("change", ["renamed_class", "more_classes", "same_classes_other_files"])
def test_resume_with_other_data_checks_classes_before_writing_anything(tmp_path, finished, change):
    other = make_dataset(tmp_path / "other", classes=("red", "green"), per_class=6, seed=3)
    if change == "renamed_class":
        os.rename(other / "green", other / "grey")
    elif change == "more_classes":
        make_dataset(other, classes=("blue",), per_class=6)
    else:
        (other / "red" / "red_000.png").unlink()
    run = tmp_path / "run"
    run.mkdir()
    for name, content in folder_state(finished).items():
        (run / name).write_bytes(content)
    before = folder_state(run)
    res = run_cli("train", other, "--resume", run, "--epochs", "1")
    if change == "same_classes_other_files":
        assert res.exit_code == 0, res.output
        assert "changed since the run started (0 images added, 1 missing" in res.output
        assert folder_state(run)["split.csv"] == before["split.csv"]  # the record of the original split
    else:
        assert res.exit_code == 1, res.output
        line = one_error_line(res.output)
        assert "was trained on ['green', 'red']" in line and "resume with the run's dataset" in line
        assert folder_state(run) == before


@pytest.mark.parametrize("epochs", ["-1", "0"])
def test_resume_with_epochs_below_one_is_refused(finished, epochs):
    before = folder_state(finished)
    res = run_cli("train", "--resume", finished, "--epochs", epochs)
    assert res.exit_code == 1, res.output
    assert f"'train.epochs' must be at least 1 and at most 1000000, got {epochs}" in one_error_line(res.output)
    assert folder_state(finished) == before


@pytest.mark.parametrize("extra", [[], ["--find-lr"]])
def test_default_output_inside_the_dataset_is_refused_and_nothing_is_written(data, monkeypatch, extra):
    monkeypatch.chdir(data)  # cd DATA && vitcli train .
    res = run_cli("train", ".", *TINY, "--epochs", "1", *extra)
    assert res.exit_code == 1, res.output
    assert "the default output folder 'runs' is inside the dataset '.'" in one_error_line(res.output)
    assert not (data / "runs").exists()


@pytest.mark.parametrize("output, phrase", [
    ("a_file", "--output '{tmp}/a_file' is a file; give a folder"),
    ("/proc/vitcli-test", "--output '/proc/vitcli-test': cannot create the folder: No such file or directory"),
    ("/sys/vitcli-test", "--output '/sys/vitcli-test': cannot create the folder"),  # read-only, even for root
    ("{data}/out", "is inside the dataset"),
])
def test_unwritable_train_output_is_one_line(tmp_path, data, output, phrase):
    (tmp_path / "a_file").write_text("x")
    output = output.format(data=data)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--output", tmp_path / output if "/" not in output
                  else output)
    assert res.exit_code == 1, res.output
    assert phrase.format(tmp=tmp_path) in one_error_line(res.output)


def test_export_into_an_unwritable_place_is_one_line(finished, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for out, phrase in (("/proc/vitcli-test/m.pt", "cannot create its folder: No such file or directory"),
                        ("/sys/vitcli-test/m.pt", "cannot create its folder"),
                        (tmp_path / "a_file" / "m.pt", "cannot create its folder: File exists"),
                        (tmp_path, "is a folder; give a file name")):
        res = run_cli("export", "--model", finished, "--format", "torchscript", "-o", out)
        assert res.exit_code == 1, res.output
        assert phrase in one_error_line(res.output)


def test_export_to_a_symlink_keeps_the_link(finished, tmp_path):
    os.symlink("real.pt", tmp_path / "link.pt")
    res = run_cli("export", "--model", finished, "--format", "torchscript", "-o", tmp_path / "link.pt")
    assert res.exit_code == 0, res.output
    assert os.readlink(tmp_path / "link.pt") == "real.pt" and (tmp_path / "real.pt").stat().st_size > 1000


def test_disk_full_while_saving_last_pt_is_one_line_and_keeps_the_old_one(tmp_path, data, monkeypatch):
    """Simulated at the OS boundary: writes of last.pt's temp file fail with ENOSPC from the second save on."""
    from vitcli import files

    real_fdopen, saves = os.fdopen, {"last": 0}

    def fdopen(fd, mode):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".last.pt."):
            saves["last"] += 1
            if saves["last"] > 1:
                return DiskFull(fd)
        return real_fdopen(fd, mode)

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    res = run_cli("train", data, *TINY, "--epochs", "3", "--batch-size", "4")
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert "last.pt': No space left on device (the previous file is kept)" in line
    last = safe_torch_load(tmp_path / "runs" / "train" / "last.pt")
    assert last["epoch"] == 1
    assert not list((tmp_path / "runs" / "train").glob(".*.tmp"))


def test_one_image_per_class_says_what_would_help(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=1)
    res = run_cli("train", data, *TINY, "--epochs", "1")
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert "every class has a single image" in line and "val_fraction" not in line


def test_find_lr_reports_the_files_it_skips(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=8)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    res = run_cli("train", data, *TINY, "--find-lr")
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "broken.png: not an image in an allowed format" in res.output


# ----------------------------------------------------------------------------------------------- signals
def _group_main(log: str, cwd: str, args: list[str]) -> None:
    os.setsid()  # its own process group, so the test can signal the whole group
    _forked_main(log, cwd, args)


def forked_train(cwd: Path, *args: str, group: bool = False) -> Run:
    """`vitcli train` in a forked child (a real process, without a second torch import); with `group`, the
    leader of a new process group."""
    if not group:
        return Run(cwd, *args, fork=True)
    import multiprocessing

    from test_signals import _ForkedProc

    child = Run.__new__(Run)
    child.log = cwd / "log.txt"
    child.untouched = DatasetsUntouched(args, cwd)
    process = multiprocessing.get_context("fork").Process(target=_group_main, args=(str(child.log), str(cwd),
                                                                                   list(args)))
    process.start()
    child.proc = _ForkedProc(process)
    return child


def test_sigterm_to_the_process_group_with_dataloader_workers_is_clean(tmp_path, data):
    child = forked_train(tmp_path, str(data), *TINY, "--batch-size", "2", "--epochs", "30", "--set",
                         "data.cache=off", "--set", "data.num_workers=2", "--set", "train.save_every_steps=1",
                         group=True)
    wait_for_step(child, tmp_path / "runs" / "train", 2)
    os.killpg(child.proc.process.pid, signal.SIGTERM)  # the trainer and its DataLoader workers at once
    assert child.wait(60) == 143, child.output()
    clean(child.output())
    assert "last.pt saved. Resume with" in child.output()
    safe_torch_load(tmp_path / "runs" / "train" / "last.pt")


def test_two_quick_sigints_stop_at_once_without_tracebacks(tmp_path, data):
    child = forked_train(tmp_path, str(data), *TINY, "--batch-size", "2", "--epochs", "30", "--set",
                         "train.save_every_steps=1")
    wait_for_step(child, tmp_path / "runs" / "train", 2)
    child.proc.send_signal(signal.SIGINT)
    child.proc.send_signal(signal.SIGINT)
    assert child.wait(60) == 130, child.output()
    clean(child.output())
    safe_torch_load(tmp_path / "runs" / "train" / "last.pt")  # whole: atomic writes


def test_sigterm_while_caching_says_so(tmp_path):
    from PIL import Image

    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=1)
    for c in ("red", "green"):  # big images: decoding them takes a while
        for i in range(30):
            Image.new("RGB", (1000, 1000), (i * 5, 90, 40)).save(data / c / f"big_{i:02d}.png", compress_level=1)
    child = forked_train(tmp_path, str(data), *TINY, "--epochs", "1", "--set", "data.cache=on")
    end = time.monotonic() + 90
    while "decoded once" not in (child.output() if child.log.exists() else ""):
        assert child.proc.poll() is None and time.monotonic() < end, child.output()
        time.sleep(0.005)
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait(60) == 143, child.output()
    clean(child.output())
    assert "error: stopped by SIGTERM while preparing the run (scanning or decoding images)" in child.output()
