"""Config: precedence defaults < YAML < flags/--set, strict keys and types, `vitcli config`."""

import sys

import pytest
import yaml

from conftest import run_cli
from vitcli.config import Config, load_config
from vitcli.errors import VitcliError


def test_precedence_defaults_then_yaml_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\ntrain:\n  epochs: 3\ndata:\n  batch_size: 8\n")
    cfg = load_config(f, ["optim.lr=5e-4"], {"train.epochs": 7, "data.img_size": None})
    assert cfg.optim.lr == 5e-4  # --set beats YAML
    assert cfg.train.epochs == 7  # flag beats YAML
    assert cfg.data.batch_size == 8  # YAML beats default
    assert cfg.data.img_size == Config().data.img_size  # unset flag keeps the default


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(VitcliError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(VitcliError, match=r"c\.yaml.*'train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(f)


def test_wrong_type_names_the_key():
    with pytest.raises(VitcliError, match=r"'train\.epochs' must be int, got 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(VitcliError, match=r"'data\.mean' must be a list"):
        load_config(None, ["data.mean=0.5"])


def test_int_is_accepted_for_float_and_scientific_notation_parses():
    cfg = load_config(None, ["optim.lr=1", "optim.weight_decay=1e-2"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.01


def test_out_of_range_values_are_errors():
    with pytest.raises(VitcliError, match=r"'optim\.lr' must be > 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(VitcliError, match=r"'data\.img_size' 30 must be divisible by the patch size 16"):
        load_config(None, ["data.img_size=30"])
    with pytest.raises(VitcliError, match=r"'data\.batch_size' must be at least 1"):
        load_config(None, ["data.batch_size=0"])


def test_config_command_prints_loadable_yaml_with_comments(tmp_path):
    res = run_cli("config")
    assert res.exit_code == 0, res.output
    assert "# peak learning rate" in res.output
    data = yaml.safe_load(res.output)
    assert set(data) == {"data", "model", "optim", "train"}
    f = tmp_path / "roundtrip.yaml"
    f.write_text(res.output)
    assert load_config(f) == Config()


def test_cli_reports_config_errors_as_one_line(tmp_path):
    res = run_cli("train", str(tmp_path), "--set", "optim.lrr=1")
    assert res.exit_code == 1
    assert "did you mean 'optim.lr'" in res.output
    assert "Traceback" not in res.output


def test_help_does_not_import_torch():
    import subprocess

    code = ("import sys; from typer.testing import CliRunner; from vitcli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--batch-size' in r.output; "
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
