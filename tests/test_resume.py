"""Resume: a run stopped mid-epoch and resumed ends with the very weights of an uninterrupted run (CPU);
--epochs extends a finished run; broken checkpoints are clear errors; crashes never cost the previous last.pt."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_dataset, run_cli, tiny_config
from vitcli.checkpoint import save_checkpoint
from vitcli.files import atomic_write, safe_torch_load
from vitcli.train import train

# everything random at once: dropout, stochastic depth, EMA, mixup / cutmix, RandAugment, random erasing
RANDOM_SETS = ["model.drop_rate=0.1", "model.drop_path_rate=0.1", "train.ema_decay=0.9", "data.mixup=0.2",
               "data.cutmix=0.2", "data.randaugment=rand-m5-n1", "data.reprob=0.25"]


def tiny_cfg(tmp_path, name: str, epochs: int = 3, extra: list[str] = ()):
    return tiny_config(tmp_path / "runs", name, epochs=epochs, batch_size=4, extra_sets=RANDOM_SETS + list(extra))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 18 train / 6 val images, 4 per batch: 4 steps per epoch
    return make_dataset(tmp_path_factory.mktemp("resume") / "d", per_class=8)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = train(tiny_cfg(out, "ref"), data)
    return safe_torch_load(res.run_dir / "last.pt"), safe_torch_load(res.run_dir / "best.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stop_at", [3, 4, 6])  # mid epoch 1, its last step, mid epoch 2
def test_resume_matches_uninterrupted_run(tmp_path, data, uninterrupted, stop_at):
    ref_last, ref_best = uninterrupted
    cut = train(tiny_cfg(tmp_path, "cut"), data, stop_after_steps=stop_at)
    saved = safe_torch_load(cut.run_dir / "last.pt")
    assert saved["train_state"]["progress"]["step"] == stop_at
    res = train(None, None, resume=cut.run_dir)  # dataset folder and config come from last.pt
    assert res.run_dir == cut.run_dir and res.epochs_run == 3
    last = safe_torch_load(cut.run_dir / "last.pt")
    assert_same_weights(last["model"], ref_last["model"])  # the EMA weights
    assert_same_weights(last["train_state"]["model"], ref_last["train_state"]["model"])  # the raw weights
    assert_same_weights(safe_torch_load(cut.run_dir / "best.pt")["model"], ref_best["model"])
    strip = [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
             for row in last["train_state"]["progress"]["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
                     for row in ref_last["train_state"]["progress"]["history"]]
    assert torch.equal(last["train_state"]["aug_rng"], ref_last["train_state"]["aug_rng"])


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_resume_is_bit_exact_with_either_stem(tmp_path, data, stem):
    sets = [f"model.stem={stem}"]
    ref = safe_torch_load(train(tiny_cfg(tmp_path, "ref", 2, sets), data).run_dir / "last.pt")
    cut = train(tiny_cfg(tmp_path, "cut", 2, sets), data, stop_after_steps=5)
    train(None, None, resume=cut.run_dir)
    last = safe_torch_load(cut.run_dir / "last.pt")
    assert last["model_spec"]["kwargs"]["stem"] == stem
    assert any(".running_mean" in k for k in last["model"]) == (stem == "conv")  # BatchNorm statistics resume too
    assert_same_weights(last["train_state"]["model"], ref["train_state"]["model"])
    assert_same_weights(last["model"], ref["model"])


def test_resume_with_epochs_extends_a_finished_run(tmp_path, data):
    res = run_cli("train", data, *TINY, "--batch-size", "4", "--epochs", "1", "--name", "short")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "short"
    res = run_cli("train", "--resume", run)  # finished: nothing to do, and it says how to extend
    assert res.exit_code == 0, res.output
    assert "--epochs" in res.output and "epoch   2/" not in res.output
    res = run_cli("train", "--resume", run, "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output and "epoch   2/2" in res.output
    last = safe_torch_load(run / "last.pt")
    assert last["epoch"] == 2 and last["config"]["train"]["epochs"] == 2
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert not list(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def one_epoch_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    return train(tiny_cfg(out, "done", epochs=1, extra=["train.ema_decay=0"]), data).run_dir


@pytest.fixture
def finished_run(tmp_path, one_epoch_run):
    """A private copy of a finished one-epoch run, free to damage."""
    return Path(shutil.copytree(one_epoch_run, tmp_path / "done"))


@pytest.mark.parametrize("damage, phrase", [
    ("truncate", "is not a readable checkpoint"),
    ("text", "is not a readable checkpoint"),
    ("empty", "is not a readable checkpoint"),
    ("foreign", "is not a vitcli checkpoint"),
    ("weights_only", "holds weights only"),
])
def test_truncated_or_foreign_checkpoint_is_a_clear_error_naming_the_file(finished_run, damage, phrase):
    last = finished_run / "last.pt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "text":
        last.write_text("not a checkpoint\n")
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, last)
    else:
        last.write_bytes((finished_run / "best.pt").read_bytes())
    res = run_cli("train", "--resume", finished_run, "--epochs", "2")
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and phrase in lines[0], res.output
    assert "Traceback" not in res.output


def test_weights_that_do_not_fit_the_model_built_are_a_clear_error(finished_run):
    """E.g. a pooled student distilled into a token by an older vitcli: its config now builds no token."""
    last = finished_run / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["train_state"].setdefault("model", dict(ckpt["model"]))["dist_token"] = torch.zeros(1, 1, 32)
    torch.save(ckpt, last)
    res = run_cli("train", "--resume", finished_run, "--epochs", "2")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"the weights in '{last}' do not fit the model" in " ".join(res.output.split()), res.output
    assert "dist_token" in res.output and "start a new run" in res.output


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_truncated_model_checkpoint_is_a_clear_error_in_eval_and_predict(finished_run, data, command):
    best = finished_run / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    target = data if command == "eval" else data / "red" / "red_000.png"
    res = run_cli(command, target, "--model", best, "--device", "cpu")
    assert res.exit_code != 0, res.output
    assert str(best) in res.output and "not a readable checkpoint" in res.output, res.output
    assert "Traceback" not in res.output


def test_a_crash_while_saving_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "last.pt"
    torch.save({"step": 1}, target)
    before = target.read_bytes()

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C while torch.save is writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.dtype.is_floating_point)


def test_non_finite_loss_stops_naming_epoch_and_step_and_best_stays_finite(tmp_path, data):
    res = run_cli("train", data, *TINY, "--batch-size", "4", "--epochs", "3", "--set", "optim.lr=10",  # the top of
                  "--set", "optim.weight_decay=100",  # both ranges: each step scales the weights by -999
                  "--set", "optim.warmup_epochs=0", "--set", "optim.clip_grad=0")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert re.search(r"error: loss became (nan|inf|-inf) at epoch \d+, step \d+", res.output), res.output
    best = tmp_path / "runs" / "train" / "best.pt"
    assert not best.exists() or _all_finite(safe_torch_load(best)["model"])
    assert ("best.pt holds the last good weights" in res.output) == best.exists()


def test_loss_turning_nan_mid_run_leaves_the_last_good_best_pt(finished_run):
    best = finished_run / "best.pt"
    before = best.read_bytes()
    last = safe_torch_load(finished_run / "last.pt")
    for state in (last["model"], last["train_state"].get("model", {})):
        for k, v in state.items():
            if k.startswith("head") and v.dtype.is_floating_point:
                v.fill_(float("nan"))  # as if the previous step had blown up
    save_checkpoint(finished_run / "last.pt", last)
    res = run_cli("train", "--resume", finished_run, "--epochs", "2")
    assert res.exit_code == 1, res.output
    assert "loss became nan at epoch 2, step 1" in res.output and "Traceback" not in res.output, res.output
    assert "best.pt holds the last good weights" in res.output
    assert best.read_bytes() == before and _all_finite(safe_torch_load(best)["model"])


def test_resume_repairs_metrics_csv_when_killed_between_last_pt_and_metrics(finished_run):
    metrics = finished_run / "metrics.csv"
    full = metrics.read_text()
    metrics.write_text(full.splitlines()[0] + "\n")  # as if killed right after last.pt was replaced
    res = run_cli("train", "--resume", finished_run)
    assert res.exit_code == 0, res.output
    assert metrics.read_text() == full


def test_run_killed_before_its_first_save_starts_again_from_its_config(tmp_path, one_epoch_run):
    early = tmp_path / "runs" / "early"
    early.mkdir(parents=True)
    (early / "config.yaml").write_bytes((one_epoch_run / "config.yaml").read_bytes())  # all a kill left
    res = run_cli("train", "--resume", early)
    assert res.exit_code == 0, res.output
    assert_same_weights(safe_torch_load(early / "last.pt")["model"],
                        safe_torch_load(one_epoch_run / "last.pt")["model"])
