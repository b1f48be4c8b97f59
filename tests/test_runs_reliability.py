"""Issue 24, the run-folder side under hostile input: `runs` / `report` / `compare` on FIFOs, badly typed and
random run.json and run folders; run.json written first; MLflow at a closed port; multi-label `compare`; bidi
characters and huge class names in report.html and figures; the abstain word; `--resume --epochs` below what
is done; and one machine-readable output convention (--json on stdout, --json-out PATH)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import pytest

from conftest import TINY, make_dataset, run_cli, run_vitcli, trained_run
from test_fuzz import assert_clean
from test_outputs import one_error_line
from test_scan import no_hang

SEED = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch tiny run and its dataset."""
    return trained_run(tmp_path_factory.mktemp("rel"), "--epochs", "1")


def fake_run(root: Path, name: str, run_json: bytes | None = None, config: bytes = b"train:\n  epochs: 3\n") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_bytes(b"# vitcli; data: /nowhere\n" + config)
    if run_json is not None:
        (d / "run.json").write_bytes(run_json)
    return d


def runs_json(folder: Path) -> dict[str, dict]:
    res = run_cli("runs", folder, "--json")
    assert res.exit_code == 0, res.output
    return {r["name"]: r for r in json.loads(res.stdout)}


# ----------------------------------------------------------------------------------------------- runs
def test_runs_lists_a_fifo_run_json_as_unreadable_without_blocking(tmp_path):
    fifo = fake_run(tmp_path / "runs", "fifo")
    os.mkfifo(fifo / "run.json")
    fake_run(tmp_path / "runs", "ok", json.dumps({"status": "finished", "wall_s": 5.0}).encode())
    (tmp_path / "runs" / "cfg").mkdir()
    os.mkfifo(tmp_path / "runs" / "cfg" / "config.yaml")
    proc = run_vitcli("runs", tmp_path / "runs", timeout=60)  # a real process: a blocking open would hang it
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout and "unreadable fifo:" in proc.stdout and "not a regular file" in proc.stdout
    assert "unreadable cfg:" in proc.stdout and "config.yaml' is not a regular file" in proc.stdout


@pytest.mark.parametrize("bad, key", [({"pid": "abc", "status": "running"}, "pid"), ({"wall_s": "x"}, "wall_s"),
                                      ({"started": 1e300}, "started"), ({"train_counts": [1, "a"]}, "train_counts"),
                                      ({"model": ["x"]}, "model")])
def test_runs_shows_a_badly_typed_run_json_as_unreadable_and_lists_the_rest(tmp_path, bad, key):
    fake_run(tmp_path / "runs", "bad", json.dumps(bad).encode())
    fake_run(tmp_path / "runs", "ok", json.dumps({"status": "finished"}).encode())
    rows = runs_json(tmp_path / "runs")
    assert rows["ok"]["status"] == "finished"
    assert rows["bad"]["status"] == "unreadable"
    assert f'"{key}"' in rows["bad"]["error"] and "run.json" in rows["bad"]["error"]
    table = run_cli("runs", tmp_path / "runs")
    assert table.exit_code == 0 and "unreadable bad:" in table.output and f'"{key}"' in table.output


def test_a_starting_run_shows_as_running_before_its_images_are_decoded(tmp_path, monkeypatch):
    """run.json is written when the run folder is taken: `runs` during the decoding sees "running"."""
    from vitcli import engine
    from vitcli.runs import list_runs

    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    seen = []
    real = engine.open_stores

    def decode(*args, **kwargs):
        seen.extend(list_runs(tmp_path / "runs"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "open_stores", decode)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert [(r["name"], r["status"]) for r in seen] == [("train", "running")]
    info = json.loads((tmp_path / "runs" / "train" / "run.json").read_text())
    assert info["status"] == "finished" and info["pid"] == os.getpid() and info["classes"] == ["green", "red"]


# ----------------------------------------------------------------------------------------------- fuzz
def random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        keys = ["pid", "wall_s", "started", "status", "host", "model", "data_dir", "train_counts", "classes", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    return {"int": lambda: rng.choice([0, -1, 2**70, rng.randint(-10, 10**6)]),
            "float": lambda: rng.choice([float("nan"), float("inf"), -1e308, rng.random() * 1e12]),
            "str": lambda: "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 30))),
            "bool": lambda: rng.random() < 0.5, "null": lambda: None}[kind]()


def random_run_json(rng: random.Random) -> bytes:
    """Valid JSON of random structure, vitcli's keys with random values, or random bytes."""
    pick = rng.random()
    if pick < 0.4:
        return json.dumps(random_json(rng)).encode()
    if pick < 0.8:
        d = {"status": rng.choice(["running", "finished", "interrupted", "?"]), "host": socket.gethostname()}
        d[rng.choice(["pid", "wall_s", "started", "train_counts", "epochs"])] = random_json(rng)
        return json.dumps(d).encode()
    return rng.randbytes(rng.randint(0, 300)) if rng.random() < 0.7 else b"[" * 50_000


def test_fuzz_runs_on_random_run_json_and_run_folders(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "runs"
    for i in range(40):
        config = rng.choice([b"train:\n  epochs: 3\n", rng.randbytes(50), b"train: [1, 2]\n", b"- a\n- b\n"])
        d = fake_run(root, f"r{i:02d}", random_run_json(rng), config)
        if rng.random() < 0.3:
            (d / "metrics.csv").write_bytes(rng.choice([rng.randbytes(80), b"epoch,val_acc\n1,x\n",
                                                        b"epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,"
                                                        b"images_per_s\n1,1,1,1,nan,1,inf,1\n"]))
        if rng.random() < 0.1:
            os.mkfifo(d / rng.choice(["metrics.csv", "run.json.x"]))
    t0 = time.time()
    with no_hang(60):
        for extra in ([], ["--json"]):
            res = run_cli("runs", root, *extra)
            assert_clean(res, (0,))
    rows = runs_json(root)
    assert len(rows) == 40  # every folder is listed, readable or not
    assert all(r["status"] in ("finished", "interrupted", "running", "unreadable") for r in rows.values())
    assert time.time() - t0 < 60


def test_fuzz_report_and_compare_on_random_run_folders(run, tmp_path):
    """Run folders whose run.json, metrics.csv, config.yaml or best.pt hold random bytes or structure: report
    and compare end with success or one line."""
    rng = random.Random(SEED)
    src, _ = run
    with no_hang(240):
        for i in range(6):
            d = shutil.copytree(src, tmp_path / f"r{i}")
            name = rng.choice(["run.json", "metrics.csv", "config.yaml", "best.pt", "run.json"])
            target = d / name
            target.unlink(missing_ok=True)
            choice = rng.random()
            if choice < 0.2:
                os.mkfifo(target)
            elif name == "run.json":
                target.write_bytes(random_run_json(rng))
            else:
                target.write_bytes(rng.randbytes(rng.randint(0, 400)))
            assert_clean(run_cli("report", d, "--device", "cpu"))
            assert_clean(run_cli("compare", src, d, "--device", "cpu", "--json"))
            assert_clean(run_cli("runs", tmp_path))


# ----------------------------------------------------------------------------------------------- mlflow
def test_mlflow_uri_with_nothing_listening_fails_fast_before_any_work(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    t0 = time.time()
    res = run_cli("train", data, *TINY, "--epochs", "1", "--set", "train.log=[csv,mlflow]")
    assert res.exit_code == 1, res.output
    assert f"MLFLOW_TRACKING_URI 'http://127.0.0.1:{port}': cannot connect" in one_error_line(res.output)
    assert time.time() - t0 < 20 and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def ml_runs(tmp_path_factory):
    """Two 1-epoch multi-label runs (same seed, so the same validation images) and their label file."""
    from test_multilabel import make_multilabel

    root = tmp_path_factory.mktemp("mlc")
    labels, _ = make_multilabel(root / "d", 48)
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        res = run_cli("train", labels, *TINY, "--epochs", "1", "--output", root / "runs", "--name", name,
                      "--set", f"optim.lr={lr}")
        assert res.exit_code == 0, res.output
    return root / "runs" / "a", root / "runs" / "b", labels


def test_compare_of_multilabel_runs_tests_exact_matches_and_says_so(ml_runs):
    a, b, labels = ml_runs
    for extra in ([], [labels]):  # their validation images, then the label file as DATA
        res = run_cli("compare", a, b, *extra, "--json", "--device", "cpu")
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)
        m = r["mcnemar"]
        assert r["task"] == "multilabel" and "exact match" in m["right_means"]
        assert m["both_right"] + m["only_a_right"] + m["only_b_right"] + m["both_wrong"] == r["images"]
        assert r["accuracy_a"] == pytest.approx((m["both_right"] + m["only_a_right"]) / r["images"])
    text = run_cli("compare", a, b, labels, "--device", "cpu")
    assert text.exit_code == 0, text.output
    assert "exact match" in text.output and "one label per image" not in text.output


def test_compare_of_a_multilabel_and_a_single_label_run_is_refused(ml_runs, tmp_path):
    import torch

    a, _, _ = ml_runs
    single = shutil.copytree(a, tmp_path / "single")
    ck = torch.load(single / "best.pt", weights_only=True)
    ck["task"] = "single"
    torch.save(ck, single / "best.pt")
    res = run_cli("compare", a, single)
    assert res.exit_code == 1
    assert "is multi-label and" in one_error_line(res.output) and "same task" in res.output


# ----------------------------------------------------------------------------------------------- names
def test_report_html_shows_bidi_and_control_characters_as_escapes():
    from vitcli.html_report import render, table

    page = render("run", [("data", "Data", table(["class"], [["rtl\u202eexe.txt", "a\x1b[31mb"]])),
                          ("cfg", "Config", "<pre>" + __import__("html").escape("a: 1\nb: 2") + "</pre>")])
    assert "\u202e" not in page and "\x1b" not in page
    assert "rtl\\u202eexe.txt" in page and "a\\x1b[31mb" in page and "a: 1\nb: 2" in page


def test_ten_thousand_character_class_names_are_cut_in_figures(tmp_path):
    import numpy as np
    from PIL import Image

    from vitcli.figures import plot_confusion

    classes = [c * 10_000 for c in "abc"]
    plot_confusion(np.eye(3, dtype=int) * 4, classes, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as im:
        assert max(im.size) < 2000, im.size


def test_report_of_a_shard_trained_run_does_not_ask_for_data(run, tmp_path):
    import torch

    src, data = run
    shards = tmp_path / "shards"
    assert run_cli("shard", data, shards).exit_code == 0
    moved = shutil.copytree(src, tmp_path / "moved")
    ck = torch.load(moved / "best.pt", weights_only=True)
    ck["data_dir"] = str(shards)
    torch.save(ck, moved / "best.pt")
    res = run_cli("report", moved, "--device", "cpu")
    assert res.exit_code == 1
    line = one_error_line(res.output)
    assert "streamed tar shards" in line and "give DATA" not in line and "vitcli eval DATA" in line


def test_a_class_named_unknown_with_min_prob_is_refused(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    (data / "green").rename(data / "unknown")
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    res = run_cli("predict", data / "red", "--model", tmp_path / "runs" / "train", "--min-prob", "0.5")
    assert res.exit_code == 1
    assert "class named 'unknown'" in one_error_line(res.output)
    assert run_cli("predict", data / "red", "--model", tmp_path / "runs" / "train").exit_code == 0


def test_resume_with_epochs_below_the_epochs_done_says_so(tmp_path):
    data = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    assert run_cli("train", data, *TINY, "--epochs", "2", "--batch-size", "4").exit_code == 0
    run = tmp_path / "runs" / "train"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = run_cli("train", "--resume", run, "--epochs", "1")
    assert res.exit_code == 1
    assert "has already trained 2 epochs" in one_error_line(res.output)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------------------------- --json
def test_every_command_prints_json_with_json_and_writes_it_with_json_out(run, tmp_path):
    src, data = run
    for args in (["runs", src.parent], ["compare", src, src, "--device", "cpu"],
                 ["eval", data, "--model", src, "--device", "cpu", "-o", tmp_path / "ev"],
                 ["predict", data / "red", "--model", src, "--device", "cpu"]):
        res = run_cli(*args, "--json")
        assert res.exit_code == 0, res.output
        printed = json.loads(res.stdout)  # stdout holds the JSON only; tables went to stderr
        out = tmp_path / f"{args[0]}.json"
        res = run_cli(*args, "--json-out", out)
        assert res.exit_code == 0, res.output
        written = json.loads(out.read_text())
        assert type(printed) is type(written) and len(printed) == len(written), args[0]


def test_old_json_path_spelling_still_works_with_a_deprecation_line(run, tmp_path):
    src, data = run
    res = run_cli("eval", data, "--model", src, "--device", "cpu", "-o", tmp_path / "ev", "--json",
                  tmp_path / "old.json")
    assert res.exit_code == 0, res.output
    assert "--json PATH is deprecated: use --json-out" in res.output
    assert json.loads((tmp_path / "old.json").read_text())["images"] > 0
    res = run_cli("predict", data / "red", "--model", src, "--json", "--format", "csv")
    assert res.exit_code == 1 and "do not go with --format csv" in one_error_line(res.output)


# ----------------------------------------------------------------------------------------------- --time
def test_time_budget_grows_its_plan_when_ahead_and_uses_the_budget(tmp_path):
    """The first plan guesses validation and overhead; epoch ends measure them. On a small set the run used
    15.9 s of `--time 20s` before the plan could grow; now it grows (or, on a loaded machine where epochs are
    slower than planned, the budget is used anyway)."""
    import re

    data = make_dataset(tmp_path / "d", per_class=16)
    t0 = time.time()
    res = run_cli("train", data, *TINY, "--time", "20s")
    wall = time.time() - t0
    assert res.exit_code == 0, res.output
    grew = any(int(a) > int(b) for a, b in re.findall(r"(\d+) epochs fit \(was (\d+)\)", res.output))
    assert grew or wall >= 0.9 * 20, (wall, res.output[-3000:])
    assert wall <= 20 * 1.5, wall  # in time, give or take a loaded machine
