"""Files the user names are written through, never replaced: a symlink keeps pointing where it did, a device or
FIFO gets the bytes; an output that cannot be written is one error line. Devices only through links and FIFOs
made in tmp_path (never a /dev node itself)."""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path

import pytest

from conftest import DiskFull, make_dataset, run_cli, run_vitcli

CLASSES = ["blue", "red"]


def tiny_checkpoint(path: Path, classes=CLASSES) -> Path:
    """A vitcli checkpoint of an untrained 32 px ViT (these tests need a model, not a good one)."""
    import torch

    from vitcli import __version__
    from vitcli import data as D
    from vitcli.checkpoint import FORMAT, save_checkpoint
    from vitcli.config import ModelConfig
    from vitcli.models import build_model

    torch.manual_seed(0)
    model, spec = build_model(ModelConfig(name="vit-tiny/8", embed_dim=32, depth=1, num_heads=2), len(classes), 32)
    pre = D.preprocess_info(32, 1.0, "bicubic", [0.5] * 3, [0.25] * 3)
    save_checkpoint(path, {"format": FORMAT, "vitcli_version": __version__, "model_spec": spec,
                           "classes": list(classes), "preprocess": pre, "config": {}, "epoch": 1, "step": 1,
                           "metrics": {}, "model": model.eval().state_dict()})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    data = make_dataset(root / "data", classes=CLASSES, per_class=3)
    return tiny_checkpoint(root / "model.pt"), data


def one_error_line(output: str) -> str:
    """The command printed exactly one `error:` line and no traceback; returns that line."""
    assert "Traceback" not in output and "Exception ignored" not in output, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


def predict(setup, *args):
    model, data = setup
    return run_cli("predict", data / "red", "--model", model, "--device", "cpu", *args)


def test_symlink_output_keeps_the_link_and_fills_its_target(setup, tmp_path):
    (tmp_path / "real.csv").write_text("old\n")
    os.symlink("real.csv", tmp_path / "link.csv")
    res = predict(setup, "-o", tmp_path / "link.csv")
    assert res.exit_code == 0, res.output
    assert os.readlink(tmp_path / "link.csv") == "real.csv"
    rows = list(csv.reader(io.StringIO((tmp_path / "real.csv").read_text())))
    assert rows[0][0] == "file" and len(rows) == 4


def test_output_through_a_link_to_a_device_writes_through_it(setup, tmp_path):
    os.symlink(os.devnull, tmp_path / "null.csv")
    res = predict(setup, "-o", tmp_path / "null.csv")
    assert res.exit_code == 0, res.output
    assert os.readlink(tmp_path / "null.csv") == os.devnull  # not replaced by a regular file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", ["predict", "eval --json-out"])
def test_disk_full_output_is_one_line(setup, tmp_path, command):
    os.symlink("/dev/full", tmp_path / "full.out")  # writes fail with ENOSPC, like a full disk
    model, data = setup
    if command == "predict":
        res = predict(setup, "-o", tmp_path / "full.out", "-f", "json")
    else:
        res = run_cli("eval", data, "--model", model, "--device", "cpu", "--output", tmp_path / "ev",
                      "--json-out", tmp_path / "full.out")
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert "full.out" in line and "No space left on device" in line
    assert os.readlink(tmp_path / "full.out") == "/dev/full"


def test_fifo_output_gets_the_bytes_and_stays_a_fifo(setup, tmp_path):
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))  # noqa: SIM115
    reader.start()
    res = predict(setup, "-o", fifo)
    reader.join(timeout=30)
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["file"] for line in got[0].splitlines()] == sorted(
        str(p) for p in (setup[1] / "red").iterdir())
    assert fifo.is_fifo()


def test_fifo_output_without_a_reader_fails_at_once(setup, tmp_path):
    os.mkfifo(tmp_path / "nobody.csv")
    res = predict(setup, "-o", tmp_path / "nobody.csv")
    assert res.exit_code == 1, res.output
    assert "nobody.csv" in one_error_line(res.output)


def test_dev_stdout_through_a_link_writes_to_the_pipe(setup, tmp_path):
    model, data = setup
    os.symlink("/dev/stdout", tmp_path / "out.csv")
    proc = run_vitcli("predict", data / "red", "--model", model, "--device", "cpu", "-o", "out.csv", cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("file,class_1,prob_1,error\n") and proc.stdout.count("\n") == 4
    assert os.readlink(tmp_path / "out.csv") == "/dev/stdout"


@pytest.mark.parametrize("args, phrase", [
    (["predict", "-o", "{dir}"], "is a folder; give a file name"),
    (["eval", "--json-out", "{dir}"], "is a folder; give a file name"),
    (["eval", "--output", "{file}"], "is a file; give a folder"),
    (["eval", "--output", "/proc/vitcli-test/figures"], "cannot create the folder"),
    (["predict", "-o", "/proc/vitcli-test.csv"], "cannot write there"),
    (["eval", "--output", "{data}/figures"], "inside the dataset"),
])
def test_unwritable_outputs_are_one_line(setup, tmp_path, args, phrase):
    model, data = setup
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    args = [a.format(dir=tmp_path / "a_dir", file=tmp_path / "a_file", data=data) for a in args]
    target = [data / "red"] if args[0] == "predict" else [data]
    res = run_cli(args[0], *target, "--model", model, "--device", "cpu", *args[1:])
    assert res.exit_code == 1, res.output
    assert phrase in one_error_line(res.output)
    assert (tmp_path / "a_file").read_text() == "x"


def test_default_eval_output_inside_the_dataset_is_refused(setup, monkeypatch):
    model, data = setup
    monkeypatch.chdir(data)  # `cd DATA && vitcli eval .` would put runs/eval into the dataset
    res = run_cli("eval", ".", "--model", model, "--device", "cpu")
    assert res.exit_code == 1, res.output
    assert "never writes into a dataset" in one_error_line(res.output)
    assert not (data / "runs").exists()


@pytest.mark.parametrize("flag, value, phrase", [
    ("--device", "bogus", "--device 'bogus' is not a device"),
    ("--precision", "bogus", "--precision 'bogus' is not valid"),
])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_bogus_device_or_precision_is_an_error_not_a_silent_default(setup, command, flag, value, phrase):
    model, data = setup
    target = data / "red" if command == "predict" else data
    res = run_cli(command, target, "--model", model, flag, value)
    assert res.exit_code == 1, res.output
    assert phrase in one_error_line(res.output)


def test_enospc_while_writing_a_run_file_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Simulated: the OS-level write of the temp file fails with ENOSPC (no small full disk to use here)."""

    from vitcli import files
    from vitcli.errors import VitcliError
    from vitcli.files import write_output

    (tmp_path / "keep.json").write_text("old")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: DiskFull(fd))
    with pytest.raises(VitcliError, match=r"--json '.*keep.json': cannot write there: No space left on device"):
        write_output(tmp_path / "keep.json", b"new", "--json")
    assert (tmp_path / "keep.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]  # no temp file left
