"""Runs people can look at: TensorBoard and MLflow logging, report.html in a real browser, `vitcli runs` and
`vitcli compare` with its exact McNemar test. One tiny training run (module fixture) feeds every test."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli, tiny_config

VAL_COUNTS = {"blue": 10, "green": 4, "red": 10}  # the validation folder, sorted class order


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run logging to csv, TensorBoard and MLflow (default ./mlruns file store in a temp folder),
    with report.html; data has train/ (20 per class) and val/ (VAL_COUNTS)."""
    from vitcli.train import train

    root = tmp_path_factory.mktemp("tracking")
    data = make_dataset(root / "data", per_class=20, splits=("train", "val"), seed=3)
    for c, n in VAL_COUNTS.items():
        for extra in sorted((data / "val" / c).iterdir())[n:]:
            extra.unlink()
    cfg = tiny_config(root / "runs", "run", epochs=2, batch_size=16, extra_sets=[
        "train.log=[csv,tensorboard,mlflow]", "train.log_every_steps=1", "train.report=true"])
    old = Path.cwd()
    os.chdir(root)  # MLflow's default store is ./mlruns
    try:
        res = train(cfg, data)
    finally:
        os.chdir(old)
    return {"root": root, "data": data, "run": res.run_dir, "result": res}


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- loggers
def test_tensorboard_events_hold_the_metrics_csv_values(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained["run"]
    assert list(run.glob("events.out.tfevents.*")), "no event file in the run folder"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = csv_rows(run)
    val = acc.Scalars("val/acc")
    assert [e.step for e in val] == [int(r["epoch"]) for r in rows] == [1, 2]
    for e, r in zip(val, rows, strict=True):
        assert e.value == pytest.approx(float(r["val_acc"]), abs=1e-5)
    for e, r in zip(acc.Scalars("train/loss"), rows, strict=True):
        assert e.value == pytest.approx(float(r["train_loss"]), rel=1e-5)
    import torch

    total = torch.load(run / "last.pt", weights_only=True)["step"]
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == list(range(1, total + 1))  # train.log_every_steps=1: every optimiser step
    assert len(acc.Scalars("step/lr")) == len(steps)
    images = set(acc.Tags()["images"])
    assert {"figures/curves", "figures/confusion", "figures/attention"} <= images
    assert acc.Images("figures/confusion")[0].width > 100


def test_mlflow_file_store_holds_params_metrics_and_artifacts(trained):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(trained["root"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("vitcli")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.embed_dim"] == "32"
    assert params["train.log"] == "['csv', 'tensorboard', 'mlflow']"
    assert Path(params["data"]) == trained["data"].resolve()
    rows = csv_rows(trained["run"])
    hist = client.get_metric_history(run.info.run_id, "val_acc")
    assert [(m.step, round(m.value, 5)) for m in hist] == [(int(r["epoch"]), round(float(r["val_acc"]), 5))
                                                           for r in rows]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "config.yaml", "report.html", "best.pt"} <= arts


def test_missing_tracking_package_is_a_one_line_error(shapes, monkeypatch):
    from conftest import TINY

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    res = run_cli("train", shapes, *TINY, "--epochs", "1", "--set", "train.log=csv,mlflow")
    assert res.exit_code == 1, res.output
    assert "train.log: mlflow needs the 'mlflow' package: pip install 'vitcli[track]'" in res.output
    assert "Traceback" not in res.output and not Path("runs").exists()
    res = run_cli("train", shapes, *TINY, "--set", "train.log=[csv,wandb]")
    assert res.exit_code == 1 and "'train.log' must be a list of csv, tensorboard, mlflow" in res.output


# ----------------------------------------------------------------------------------------------- runs
def test_runs_table_shows_status_newest_first(trained, tmp_path):
    import time

    from vitcli.train import train

    runs = tmp_path / "runs"
    shutil.copytree(trained["run"], runs / "done")
    cut = train(tiny_config(runs, "cut", epochs=2, batch_size=16), trained["data"], stop_after_steps=1)
    time.sleep(0.01)
    for name, pid in (("live", os.getpid()), ("killed", _dead_pid())):  # run.json as a live / kill -9'd run
        shutil.copytree(trained["run"], runs / name)
        info = json.loads((runs / name / "run.json").read_text())
        info |= {"status": "running", "pid": pid, "started": time.time()}
        (runs / name / "run.json").write_text(json.dumps(info))
        time.sleep(0.01)
    (runs / "eval").mkdir()  # not a training run: ignored

    res = run_cli("runs", runs, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == ["killed", "live", "cut", "done"]
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"killed": "interrupted", "live": "running", "cut": "interrupted", "done": "finished"}
    done = rows[-1]
    best = max(trained["result"].history, key=lambda h: h["val_acc"])
    assert done["best_val_acc"] == pytest.approx(best["val_acc"], abs=1e-6) and done["epochs"] == 2
    assert done["model"] == "vit-tiny/8" and Path(done["data"]) == trained["data"].resolve()
    assert done["wall_s"] > 0 and rows[2]["epochs"] == 0 and cut.epochs_run == 0
    table = run_cli("runs", runs)
    assert table.exit_code == 0, table.output
    for word in ("killed", "interrupted", "running", "finished", "vit-tiny/8"):
        assert word in table.output
    assert run_cli("runs", tmp_path / "nope").output.startswith("error: runs folder")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------- compare
def constant_run(src: Path, dst: Path, cls: int, lr: float) -> Path:
    """A copy of run `src` whose classifier always answers class `cls` (zero weights, one-hot bias)."""
    import torch

    shutil.copytree(src, dst)
    ck = torch.load(dst / "best.pt", weights_only=True)
    ck["model"]["head.weight"].zero_()
    ck["model"]["head.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(cls), 3).float() * 10)
    ck["config"]["optim"]["lr"] = lr
    torch.save(ck, dst / "best.pt")
    return dst


def test_compare_mcnemar_matches_reference(trained, tmp_path):
    from scipy.stats import binomtest

    a = constant_run(trained["run"], tmp_path / "a", 0, 1e-3)  # always "blue"
    b = constant_run(trained["run"], tmp_path / "b", 1, 5e-4)  # always "green"
    # A is right on the 10 blue images, B on the 4 green ones, both wrong on the 10 red ones
    n_a, n_b = VAL_COUNTS["blue"], VAL_COUNTS["green"]
    hand = 2 * sum(math.comb(n_a + n_b, i) for i in range(n_b + 1)) / 2 ** (n_a + n_b)
    ref = binomtest(n_b, n_a + n_b, 0.5).pvalue
    assert hand == pytest.approx(ref, rel=1e-12)

    res = run_cli("compare", a, b, "--json", "--device", "cpu")  # default: both runs' validation images
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["images"] == sum(VAL_COUNTS.values())
    m = r["mcnemar"]
    assert (m["both_right"], m["only_a_right"], m["only_b_right"], m["both_wrong"]) == (0, 10, 4, 10)
    assert m["p_value"] == pytest.approx(ref, rel=1e-12) and not m["significant"]
    assert r["config_diff"] == [{"key": "optim.lr", "a": 1e-3, "b": 5e-4}]
    blue, green, red = r["per_class"]
    assert (blue["recall_a"], blue["recall_b"], blue["recall_delta"]) == (1.0, 0.0, -1.0)
    assert (green["recall_a"], green["recall_b"], green["recall_delta"]) == (0.0, 1.0, 1.0)
    assert red["f1_a"] == red["f1_b"] == 0.0
    assert r["accuracy_a"] == pytest.approx(10 / 24) and r["accuracy_b"] == pytest.approx(4 / 24)

    text = run_cli("compare", a, b, trained["data"] / "val", "--device", "cpu")  # DATA given: the same images
    assert text.exit_code == 0, text.output
    assert f"{ref:.6g}" in text.output
    for row, n in (("both right", 0), ("only A right", 10), ("only B right", 4), ("both wrong", 10)):
        assert re.search(rf"{row}\W+{n}\b", text.output), (row, text.output)
    assert "A is right on 10 of the 14 images where exactly one model is right" in text.output
    assert "not significant at the 0.05 level" in text.output and "optim.lr" in text.output


def test_compare_refuses_models_of_different_tasks(trained, tmp_path, shapes):
    import torch

    other = shutil.copytree(trained["run"], tmp_path / "other")
    ck = torch.load(other / "best.pt", weights_only=True)
    ck["classes"] = ["cat", "dog", "eel"]
    torch.save(ck, other / "best.pt")
    res = run_cli("compare", trained["run"], other)
    assert res.exit_code == 1 and "do not have the same classes" in res.output
    assert len(res.output.strip().splitlines()) == 1

    data = shutil.copytree(trained["data"], tmp_path / "data2")  # same classes, one validation image fewer
    next((data / "val" / "red").iterdir()).unlink()
    moved = shutil.copytree(trained["run"], tmp_path / "moved")
    ck = torch.load(moved / "best.pt", weights_only=True)
    ck["data_dir"] = str(data)
    torch.save(ck, moved / "best.pt")
    res = run_cli("compare", trained["run"], moved)
    assert res.exit_code == 1 and "were validated on different images" in res.output and "give DATA" in res.output
    assert run_cli("compare", trained["run"], moved, data / "val", "--device", "cpu").exit_code == 0


# ----------------------------------------------------------------------------------------------- report.html
SECTIONS = ["command", "data", "curves", "metrics", "per-class", "confusion", "mistakes", "attention"]
FIGURES = {"curves", "confusion", "attention"}  # sections that must show a drawn figure


def test_report_html_is_self_contained(trained):
    page = (trained["run"] / "report.html").read_text()
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page.lower()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert page.count('src="data:image/png;base64,') >= 4


def test_report_html_in_headless_chromium(trained, tmp_path):
    """Both pages (training's and eval's) load from a file with no console errors and no request beyond the file
    itself; every section shows; each figure is decoded and its screenshot is not blank. A copy of the page
    with one external image must be caught, so the checks can fail."""
    import io

    import numpy as np
    from PIL import Image

    from browser import Chromium, find_chromium, problems

    res = run_cli("eval", trained["data"] / "val", "--model", trained["run"], "-o", tmp_path / "ev",
                  "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "report.html").is_file()
    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page was only checked "
                    "as text by test_report_html_is_self_contained")
    leaky = tmp_path / "leaky.html"
    leaky.write_text((trained["run"] / "report.html").read_text().replace(
        "</body>", '<img src="https://example.com/pixel.png"></body>'))
    browser = Chromium(exe, tmp_path / "profile")
    try:
        for page in (trained["run"] / "report.html", tmp_path / "ev" / "report.html"):
            sid, events = browser.open(page.as_uri())
            assert problems(events) == [], page
            seen = browser.evaluate(sid, "[...document.querySelectorAll('section')].map(s => "
                                         "[s.id, s.getBoundingClientRect().height])")
            assert [s for s, _ in seen] == SECTIONS and all(h > 40 for _, h in seen), seen
            imgs = browser.evaluate(sid, "[...document.images].map(i => {const r = i.getBoundingClientRect(); "
                                         "return {section: i.closest('section').id, natural: i.naturalWidth, "
                                         "x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}})")
            assert FIGURES <= {i["section"] for i in imgs}
            for im in imgs:
                assert im["natural"] > 0 and im["width"] > 100 and im["height"] > 100, im
                clip = {k: im[k] for k in ("x", "y", "width", "height")}
                shot = np.asarray(Image.open(io.BytesIO(browser.screenshot(sid, clip))).convert("L"), float)
                assert shot.std() > 15 and (shot < 200).mean() > 0.02, (page.name, im["section"])
        _, events = browser.open(leaky.as_uri())
        assert any("example.com" in p for p in problems(events)), problems(events)
    finally:
        browser.close()


def test_report_html_escapes_names_from_the_data():
    from vitcli.html_report import render, table

    page = render("run <b>", [("data", "Data", table(["class"], [["<img src=x onerror=alert(1)>"]]))])
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<title>run &lt;b&gt;</title>" in page
