"""Hostile files: a pickle that would run code is refused wherever vitcli loads weights (also with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set) and nothing it asks for happens; hostile class names write nothing
outside the output folder and print literally."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_dataset, run_cli
from vitcli.checkpoint import FORMAT, load_checkpoint, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "vitcli"


class Trap:
    """Unpickling this runs `exec`, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def write_traps(folder: Path, marker: Path) -> dict[str, Path]:
    """The same trap as a vitcli-looking checkpoint (torch zip format), as plain weights, and as a raw pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": folder / "trap_ckpt.pt", "weights": folder / "trap_weights.pth",
             "raw": folder / "trap_raw.pt"}
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(1)}, "classes": ["a", "b"], "trap": Trap(marker)},
               paths["checkpoint"])
    torch.save({"state_dict": Trap(marker)}, paths["weights"])
    with open(paths["raw"], "wb") as f:
        pickle.dump({"model": Trap(marker)}, f, protocol=2)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sec") / "d", classes=("red", "green"), per_class=6)


def test_every_torch_load_in_vitcli_is_weights_only():
    calls = [(p.name, m) for p in SRC.glob("*.py") for m in re.finditer(r"torch\.load\((.*)\)", p.read_text())]
    assert calls, "expected torch.load in checkpoint.py"
    for name, m in calls:
        assert "weights_only=True" in m[1], (name, m[0])
    assert not [p.name for p in SRC.glob("*.py") if re.search(r"\bpickle\.loads?\(", p.read_text())]


def test_trapped_pickle_is_refused_everywhere_and_never_runs(tmp_path, data):
    marker = tmp_path / "MARKER"
    traps = write_traps(tmp_path / "traps", marker)
    run = tmp_path / "runs" / "trapped"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(traps["checkpoint"].read_bytes())
    img = data / "red" / "red_000.png"
    attempts = {
        "predict --model": ["predict", img, "--model", traps["checkpoint"], "--device", "cpu"],
        "eval --model": ["eval", data, "--model", traps["checkpoint"], "--device", "cpu"],
        "inspect --model": ["inspect", "attention", img, "--model", traps["checkpoint"]],
        "train --resume": ["train", "--resume", run],
        "pretrained_file": ["train", data, *TINY, "--set", f"model.pretrained_file={traps['weights']}"],
        "raw pickle": ["predict", img, "--model", traps["raw"], "--device", "cpu"],
    }
    for what, args in attempts.items():
        res = run_cli(*args)
        assert res.exit_code not in (0, None), (what, res.output)
        assert "Traceback" not in res.output, (what, res.output)
        assert "refuses (weights_only=True)" in res.output and "import exec" in res.output, (what, res.output)
        assert not marker.exists(), what


def test_trapped_pickle_is_refused_with_torch_force_no_weights_only_load_set(tmp_path, data, monkeypatch):
    """The environment variable that turns weights_only off in torch.load calls that do not pass it."""
    marker = tmp_path / "MARKER"
    traps = write_traps(tmp_path / "traps", marker)
    for args in (["predict", data / "red" / "red_000.png", "--model", traps["checkpoint"], "--device", "cpu"],
                 ["train", data, *TINY, "--set", f"model.pretrained_file={traps['weights']}"]):
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        res = run_cli(*args)
        assert res.exit_code not in (0, None), res.output
        assert "refuses (weights_only=True)" in res.output and "Traceback" not in res.output, res.output
        assert not marker.exists()


def test_foreign_files_as_weights_are_clear_errors(tmp_path, data):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not safetensors")
    res = run_cli("train", data, *TINY, "--set", f"model.pretrained_file={fake}")
    assert res.exit_code == 1 and str(fake) in res.output and "Traceback" not in res.output, res.output
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    res = run_cli("predict", data / "red" / "red_000.png", "--model", plain, "--device", "cpu")
    assert res.exit_code not in (0, None) and "not a vitcli checkpoint" in res.output, res.output


@pytest.fixture(scope="module")
def hostile_classes_model(data, tmp_path_factory):
    """A real trained checkpoint whose class names were edited to be hostile."""
    out = tmp_path_factory.mktemp("hostile")
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4", "--output", out / "runs")
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / "runs" / "train" / "best.pt")
    ckpt["classes"] = ["../../escaped", "[red]x/..\\evil"]
    save_checkpoint(out / "hostile.pt", ckpt)
    return out / "hostile.pt"


def snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_hostile_class_names_print_literally_and_write_nothing_outside_the_output(tmp_path, data, monkeypatch,
                                                                                  hostile_classes_model):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path) | snapshot(data.parent)
    img = data / "red" / "red_000.png"
    res = run_cli("predict", img, "--model", hostile_classes_model, "--device", "cpu", "--top-k", "2")
    assert res.exit_code == 0, res.output
    assert "../../escaped" in res.output and "[red]x/..\\evil" in res.output  # markup printed, not applied
    res = run_cli("predict", img, "--model", hostile_classes_model, "--device", "cpu", "--format", "csv",
                  "--output", work / "out" / "preds.csv")
    assert res.exit_code == 0, res.output
    res = run_cli("inspect", "attention", img, "--model", hostile_classes_model, "--output", work / "out" / "att")
    assert res.exit_code == 0, res.output
    after = snapshot(tmp_path) | snapshot(data.parent)
    new = sorted(str(p) for p in after - before)
    assert new and all(p.startswith(str(work / "out")) for p in new), new
