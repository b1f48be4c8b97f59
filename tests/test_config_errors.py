"""Bad configs and arguments: one clean line naming the key / file / line, a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from conftest import TINY, make_dataset, run_cli, run_vitcli

FILES = {
    "syntax.yaml": "data:\n  img_size: 32\n  batch_size: [1, 2\nmodel:\n  name: vit-tiny/8\n",
    "tabs.yaml": "data:\n\timg_size: 32\n",
    "unknown.yaml": "optim:\n  lrr: 0.1\n",
    "section.yaml": "optimiser:\n  lr: 0.1\n",
    "type.yaml": "train:\n  epochs: ten\n",
    "list.yaml": "- data\n- model\n",
}

# (arguments after `vitcli train DATA`, phrases the one error line must contain)
CASES = {
    "yaml_syntax_names_the_line": (["-c", "syntax.yaml"], ["syntax.yaml", "YAML syntax error at line 4",
                                                          "started at line 3"]),
    "yaml_tab_names_the_line": (["-c", "tabs.yaml"], ["tabs.yaml", "line 2"]),
    "unknown_key_in_file_suggests_closest": (["-c", "unknown.yaml"], ["'optim.lrr'", "did you mean 'optim.lr'"]),
    "unknown_section_suggests_closest": (["-c", "section.yaml"], ["'optimiser.lr'", "did you mean 'optim.lr'"]),
    "unknown_set_key_suggests_closest": (["--set", "model.nmae=x"], ["'model.nmae'", "did you mean 'model.name'"]),
    "wrong_type_in_file": (["-c", "type.yaml"], ["'train.epochs' must be int", "'ten'"]),
    "wrong_type_in_set": (["--set", "train.epochs=1.5"], ["'train.epochs' must be int", "1.5"]),
    "wrong_type_list": (["--set", "data.mean=3"], ["'data.mean' must be a list"]),
    "not_a_mapping": (["-c", "list.yaml"], ["list.yaml", "expected a mapping"]),
    "set_without_equals": (["--set", "optim.lr"], ["expected KEY=VALUE"]),
    "negative_lr": (["--set", "optim.lr=-1e-3"], ["'optim.lr' must be > 0", "-0.001"]),
    "img_size_not_divisible_by_patch": (["--model", "vit-tiny/16", "--img-size", "40"],
                                        ["'data.img_size' 40", "divisible by the patch size 16"]),
    "batch_size_zero": (["--batch-size", "0"], ["'data.batch_size' must be at least 1", "got 0"]),
    "epochs_zero": (["--epochs", "0"], ["'train.epochs' must be at least 1"]),
    "bad_choice": (["--set", "data.cache=sometimes"], ["'data.cache' must be one of auto, on, off"]),
    "bad_device": (["--device", "gpu"], ["'train.device'", "'gpu'"]),
    "unknown_model": (["--model", "vit-huge/14"], ["'model.name'", "vit-huge/14", "vit-tiny/16"]),
    "missing_config_file": (["-c", "nope.yaml"], ["config file 'nope.yaml' does not exist"]),
    "missing_pretrained_file": (["--set", "model.pretrained_file=missing.pt"],
                                ["'model.pretrained_file'", "missing.pt", "does not exist"]),
}


@pytest.fixture
def data(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    return make_dataset(tmp_path / "d", classes=("red", "green"), per_class=3)


def assert_one_clean_line(output: str, phrases: list[str]) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert "Traceback" not in output


def _errors_only(output: str) -> str:
    """The lines a failing run printed from the first error on (the data summary may come before it)."""
    lines = output.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), 0)
    return "\n".join(lines[first:])


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_is_one_clean_line(data, case):
    args, phrases = CASES[case]
    res = run_cli("train", data, *TINY, "--epochs", "1", *args)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert_one_clean_line(_errors_only(res.output), phrases)


@pytest.mark.parametrize("args, phrases", [
    (["train", "nowhere"], ["dataset folder 'nowhere' does not exist"]),
    (["train", "d/red/red_000.png"], ["is not a folder"]),
    (["train"], ["missing DATA"]),
    (["train", "d", "--resume", "no_run"], ["--resume 'no_run'", "no such run folder"]),
    (["train", "d", "--resume", "d", "--batch-size", "4"], ["only --epochs and --time may change"]),
    (["config", "--set", "optim.lr=0"], ["'optim.lr' must be > 0"]),
])
def test_missing_paths_and_bad_arguments_are_one_clean_line(data, args, phrases):
    res = run_cli(*args)
    assert res.exit_code == 1, res.output
    assert_one_clean_line(res.output, phrases)


def test_config_on_off_values_read_as_text_not_booleans(data, tmp_path):
    (tmp_path / "cache.yaml").write_text("data:\n  cache: off\n")
    res = run_cli("config", "-c", tmp_path / "cache.yaml", "--set", "data.max_bad_fraction=0")
    assert res.exit_code == 0, res.output
    assert "cache: 'off'" in res.output or "cache: off" in res.output


@pytest.mark.parametrize("case", ["yaml_syntax_names_the_line", "unknown_set_key_suggests_closest",
                                  "negative_lr", "img_size_not_divisible_by_patch", "batch_size_zero",
                                  "missing_config_file"])
def test_config_error_in_a_real_process_exits_1_without_traceback(data, tmp_path, case):
    args, phrases = CASES[case]
    proc = run_vitcli("train", data, *TINY, "--epochs", "1", *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""  # errors go to stderr; stdout stays clean for pipes
    assert_one_clean_line(proc.stderr, phrases)
