"""Every numeric config key has a range (one table, checked by validate); YAML 1.1 numbers such as 5e-4 read as
numbers; the YAML reader is bounded (size, alias expansion, nesting) and values quoted in messages are cut."""

from __future__ import annotations

import os
import time
import typing

import pytest

from conftest import TINY, make_dataset, run_cli
from test_outputs import one_error_line
from vitcli.config import RANGES, Config, load_config


def test_every_numeric_key_has_a_range():
    cfg = Config()
    numeric = []
    for section in ("data", "model", "optim", "train"):
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        numeric += [f"{section}.{k}" for k, tp in hints.items() if tp in (int, float, list[float])]
    assert sorted(numeric) == sorted(RANGES)


@pytest.mark.parametrize("setting, phrase", [
    ("data.ratio_max=.inf", "'data.ratio_max' must be >= 1 and <= 10, got inf"),
    ("model.mlp_ratio=.inf", "'model.mlp_ratio' must be >= 0.25 and <= 64, got inf"),
    ("model.mlp_ratio=1e-9", "'model.mlp_ratio' must be >= 0.25 and <= 64, got 1e-09"),
    ("train.seed=1e23", "'train.seed' must be at least 0 and at most 4294967295"),
    ("optim.warmup_epochs=1e308", "'optim.warmup_epochs' must be >= 0 and <= 1e+06, got 1e+308"),
    ("data.crop_pct=1e-9", "'data.crop_pct' must be >= 0.25 and <= 1"),
    ("data.crop_pct=0.001", "'data.crop_pct' must be >= 0.25 and <= 1, got 0.001"),
    ("train.threads=100000", "'train.threads' must be at least -1 and at most 1024"),
    ("data.mixup=.inf", "'data.mixup' must be >= 0 and <= 100 (0 = off), got inf"),
    ("data.mean=[.nan, 0.5, 0.5]", "'data.mean' must be a list of 3 numbers, each >= -10 and <= 10, got [nan"),
    ("train.name=" + "n" * 300, "'train.name' must be a plain folder name of at most 100 characters"),
    ("train.name=a\x1b[2Jb", "'train.name' must be a plain folder name"),
])
def test_out_of_range_values_are_one_line(setting, phrase):
    res = run_cli("config", "--set", setting)
    assert res.exit_code == 1, res.output
    line = one_error_line(res.output)
    assert phrase in line and len(line) < 300, line


def test_long_name_flag_fails_before_touching_anything(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=2)
    res = run_cli("train", data, *TINY, "--name", "x" * 300)
    assert res.exit_code == 1, res.output
    assert "'train.name'" in one_error_line(res.output) and not (tmp_path / "runs").exists()


def test_yaml_1_1_number_strings_are_read_as_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 5e-4\n  betas: [9e-1, 999e-3]\ntrain:\n  seed: 1e3\n")
    cfg = load_config(tmp_path / "c.yaml", ["optim.weight_decay=5e-2"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == [0.9, 0.999] and cfg.train.seed == 1000
    assert cfg.optim.weight_decay == 0.05
    res = run_cli("config", "-c", tmp_path / "c.yaml", "--set", "train.epochs=2.5e1")
    assert res.exit_code == 0 and "epochs: 25" in res.output, res.output


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["laughs", "laughs-in-set", "big", "deep", "fifo"])
def test_hostile_yaml_is_refused_quickly_in_one_short_line(tmp_path, kind):
    path = tmp_path / "c.yaml"
    args = ["config", "-c", path]
    if kind == "laughs":
        path.write_text(billion_laughs())
    elif kind == "laughs-in-set":
        args = ["config", "--set", "data.mean=" + billion_laughs().replace("\n", ", ").join("{}")]
    elif kind == "big":
        path.write_text("# padding\n" * 200_000)
    elif kind == "deep":
        path.write_text("data:\n  mean: " + "[" * 50_000 + "]" * 50_000 + "\n")
    else:
        os.mkfifo(path)  # nobody writes: reading it would block forever
    t0 = time.monotonic()
    res = run_cli(*args)
    assert time.monotonic() - t0 < 10
    assert res.exit_code == 1, res.output[-500:]
    line = one_error_line(res.output)
    assert len(line) < 400, line
    assert {"laughs": "expands to more than 100,000 values", "laughs-in-set": "expands to more than",
            "big": "a config is at most", "deep": "nested too deeply",
            "fifo": "is not a regular file"}[kind] in line, line
