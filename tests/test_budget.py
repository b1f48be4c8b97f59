"""`--time` / train.time: the epochs and the schedule are fitted so the whole command ends within the budget;
the plan survives a resume, and `--time` with `--resume` fits the rest to a new budget."""

from __future__ import annotations

import time

import pytest

from conftest import TINY, make_dataset, run_cli, tiny_config
from vitcli.config import parse_duration
from vitcli.errors import VitcliError
from vitcli.files import safe_torch_load
from vitcli.train import train


def test_durations_take_s_m_h_and_bad_ones_name_the_key():
    assert [parse_duration(x) for x in ("300s", "5m", "1.5h", "90", " 2 min ")] == [300, 300, 5400, 90, 120]
    for bad in ("5x", "m", "-1m", "0s", "five minutes"):
        with pytest.raises(VitcliError, match="'train.time' .* use a number with s, m or h"):
            parse_duration(bad)


def test_bad_time_flag_is_a_one_line_error(shapes):
    res = run_cli("train", shapes, *TINY, "--time", "5 parsecs")
    assert res.exit_code == 1 and "'train.time' '5 parsecs' is not a duration" in res.output
    assert "Traceback" not in res.output


def test_time_budget_ends_the_command_in_time_with_the_schedule_fitted(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=16)
    t0 = time.time()
    res = run_cli("train", data, *TINY, "--time", "8s", "--set", "train.report=false")
    wall = time.time() - t0
    assert res.exit_code == 0, res.output
    assert wall <= 8.0, wall
    assert "time budget 8 s:" in res.output and "epochs fit" in res.output
    last = safe_torch_load(tmp_path / "runs" / "train" / "last.pt")
    plan, history = last["train_state"]["progress"]["plan"], last["train_state"]["progress"]["history"]
    assert plan["epochs"] == len(history) == last["config"]["train"]["epochs"] >= 2
    assert history[-1]["lr"] < 0.2 * last["config"]["optim"]["lr"]  # the cosine ran to its end


def test_a_resumed_run_keeps_its_plan_and_time_fits_the_rest_anew(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=16)  # 36 train images, 9 steps an epoch at batch 4
    sets = ["train.time=6s", "train.report=false"]
    cfg = tiny_config(tmp_path / "runs", "cut", epochs=1000, batch_size=4, extra_sets=sets)
    cut = train(cfg, data, stop_after_steps=14)  # planned after 10 steps, stopped at step 14
    plan = safe_torch_load(cut.run_dir / "last.pt")["train_state"]["progress"]["plan"]
    assert plan and plan["epochs"] < 1000  # the budget, not the epochs given, chose the number
    res = train(None, None, resume=cut.run_dir)  # no new budget: the saved plan, to its end
    assert res.epochs_run == plan["epochs"]
    t0 = time.time()
    res = run_cli("train", "--resume", cut.run_dir, "--time", "5s")  # a new budget for a finished run's extension
    assert res.exit_code == 0, res.output
    assert time.time() - t0 <= 5.0
    assert "time budget 5 s" in res.output and "already trained" not in res.output


def test_the_plan_keeps_room_for_the_calibrations_forwards():
    """Calibrating best.pt and last.pt forwards the validation split over every TTA view, plus training images for
    the out-of-distribution bank: the budget keeps time for them (a forward: a third of an image's step share)."""
    from types import SimpleNamespace

    from vitcli.budget import TimeBudget
    from vitcli.config import load_config

    run = SimpleNamespace(cfg=load_config(overrides=["train.report=false", "data.batch_size=64"]),
                          env=SimpleNamespace(world=1))
    plain, calibrated = TimeBudget(600, time.time(), 1000), TimeBudget(600, time.time(), 1000, end_images=6400)
    plain.step_s = calibrated.step_s = 0.3
    assert calibrated._finish_s(run) - plain._finish_s(run) == pytest.approx(6400 * 0.3 / (3 * 64))
