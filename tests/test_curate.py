"""Better data: `vitcli embed`, `search`, `cv`, `inspect data --label-errors` and `select`, on generated images and
tiny models (the from-scratch ViT and a timm DeiT)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, make_dataset, run_cli, track_dataset, trained_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder of a tiny scratch ViT trained one epoch, its 3-class dataset)."""
    return trained_run(tmp_path_factory.mktemp("curate"), "--epochs", "1", per_class=8)


# ----------------------------------------------------------------------------------------------- embed / search
def test_embed_writes_npy_csv_and_parquet_with_the_same_rows(trained, tmp_path):
    run, data = trained
    for name in ("e.npy", "e.csv", "e.parquet"):
        res = run_cli("embed", data, "-o", tmp_path / name, "--model", run, "--device", "cpu")
        assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "e.npy")
    paths = (tmp_path / "e.paths.txt").read_text().splitlines()
    assert x.shape == (24, 32) and len(paths) == 24 and all(Path(p).is_file() for p in paths)
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["path", "f0"] and len(rows) == 25
    assert [r[0] for r in rows[1:]] == paths
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in rows[1:]]), x, rtol=1e-4, atol=1e-5)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert table["path"] == paths and np.allclose(table["f31"], x[:, 31], atol=1e-6)


def test_embeddings_are_the_features_the_head_reads(trained, deit_checkpoint, tmp_path):
    """Both backends: the embedding fed through the model's head gives the model's logits."""
    from vitcli.embeddings import embed_images, image_paths
    from vitcli.inference import load

    _, data = trained
    for model in (str(trained[0]), str(deit_checkpoint)):
        loaded = load(model)
        emb = embed_images(loaded, image_paths(data)[:5], batch_size=2)
        assert emb.features.shape == (5, 32) and emb.probs.shape == (5, 3)
        np.testing.assert_allclose(emb.probs.sum(1), 1.0, atol=1e-6)
        if not hasattr(loaded.model, "head_dist"):  # DeiT's two heads read two tokens
            with torch.no_grad():
                logits = loaded.model.head(torch.from_numpy(emb.features))  # (5, 3)
            np.testing.assert_allclose(loaded.probs(logits).numpy(), emb.probs, atol=1e-5)


def test_embed_refuses_to_write_into_the_dataset(trained):
    run, data = trained
    res = run_cli("embed", data, "-o", data / "e.npy", "--model", run)
    assert res.exit_code == 1 and "inside the dataset" in res.output
    res = run_cli("embed", data, "-o", "e.txt", "--model", run)
    assert res.exit_code == 1 and ".npy" in res.output


def test_search_finds_the_query_image_itself_first(trained, deit_checkpoint, tmp_path):
    import shutil

    run, _ = trained
    data = make_dataset(tmp_path / "set", per_class=4)
    shutil.copy(data / "red" / "red_003.png", data / "green" / "a_copy.png")  # ties with the query, listed first
    queries = [data / "red" / "red_003.png", data / "blue" / "blue_001.png"]
    for model in (run, deit_checkpoint):
        res = run_cli("search", *queries, "--in", data, "--model", model, "-k", "3", "--json", "--device", "cpu",
                      "-o", tmp_path / "s")
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert [r["neighbours"][0]["path"] for r in out["results"]] == [str(q) for q in queries]
        assert all(r["neighbours"][0]["similarity"] > 0.9999 for r in out["results"])
        assert out["results"][0]["neighbours"][1]["path"] == str(data / "green" / "a_copy.png")
        assert all(len(r["neighbours"]) == 3 for r in out["results"])
        assert (tmp_path / "s" / "search.png").stat().st_size > 1000
    res = run_cli("search", queries[0], "--in", data, "--model", run, "-k", "2", "--json-out", tmp_path / "s.json",
                  "--device", "cpu", "-o", tmp_path / "s")  # the file gets the JSON, stdout the table
    assert res.exit_code == 0 and "{" not in res.stdout, res.output
    assert json.loads((tmp_path / "s.json").read_text())["results"][0]["neighbours"][0]["path"] == str(queries[0])


def test_inspect_data_reports_near_duplicates_across_splits(tmp_path):
    from PIL import Image

    data = make_dataset(tmp_path / "split", per_class=10, splits=("train", "val"))
    track_dataset(data)
    Image.open(data / "train" / "red" / "red_001.png").resize((40, 40)).save(data / "val" / "red" / "copy.jpg")
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    assert "near-duplicates across splits (by 16x16 pixel thumbnails): 1" in res.output
    assert "copy.jpg" in res.output and "red_001.png" in res.output
    res = run_cli("inspect", "data", data, "--near", "1.5")
    assert res.exit_code == 0 and "near-duplicates" not in res.output


def test_k_centre_greedy_spreads_its_picks():
    from vitcli.embeddings import k_centre_greedy

    rng = np.random.default_rng(0)
    copies = np.ones((6, 8)) + rng.normal(0, 1e-3, (6, 8))  # six near-copies of one image
    others = rng.normal(0, 1, (6, 8))
    picked = k_centre_greedy(np.concatenate([copies, others]), 4, first=0)
    assert picked[0] == 0 and sum(i < 6 for i in picked) == 1 and len(set(picked)) == 4
    away = k_centre_greedy(np.concatenate([copies, others]), 3, centres=copies[:1])
    assert all(i >= 6 for i in away)  # nothing near an image already labelled


def test_badge_picks_the_largest_gradient_first_and_never_a_copy_twice():
    from vitcli.embeddings import badge

    rng = np.random.default_rng(0)
    probs = np.tile([0.5, 0.3, 0.2], (12, 1)) + rng.uniform(0, 0.05, (12, 3))
    probs[:6] = [0.34, 0.33, 0.33]  # six copies of the most uncertain image ...
    probs /= probs.sum(1, keepdims=True)
    feats = rng.normal(0, 1, (12, 8))
    feats[:6] = feats[0]  # ... with one embedding
    for seed in range(5):
        picked = badge(probs, feats, 5, seed)
        assert picked[0] < 6 and sum(i < 6 for i in picked) == 1 and len(set(picked)) == 5
    assert badge(probs, feats, 5, 3) == badge(probs, feats, 5, 3)
    away = badge(probs, feats, 3, 0, centres=(probs[:1], feats[:1]))
    assert all(i >= 6 for i in away)


# ----------------------------------------------------------------------------------------------- cv
def _tiny_cv_args(epochs: int = 2) -> list[str]:
    return [*TINY, "--set", "model.depth=1", "--epochs", str(epochs)]


def test_cv_interrupted_and_resumed_gives_the_same_numbers(tmp_path, monkeypatch):
    from vitcli import engine

    data = make_dataset(tmp_path / "shapes", per_class=8)
    res = run_cli("cv", data, "--folds", "3", *_tiny_cv_args(), "--json")
    assert res.exit_code == 0, res.output
    full = json.loads(res.stdout)
    assert len(full["per_fold"]) == 3 and set(full["summary"]["top1"]) == {"mean", "std"}
    assert abs(full["summary"]["top1"]["mean"] - np.mean([m["top1"] for m in full["per_fold"]])) < 1e-12
    with open(tmp_path / "runs" / "cv" / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and sorted(int(r["fold"]) for r in rows) == [1] * 8 + [2] * 8 + [3] * 8
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("blue", "green", "red")) - 1) < 1e-4 for r in rows)
    assert not any(p.suffix == ".csv" for p in data.rglob("*"))  # fold label files live in the run folder

    calls = {"n": 0}
    real = engine.train_epoch

    def stop_in_fold_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # fold 2, epoch 2: after fold 2's epoch-1 last.pt
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_epoch", stop_in_fold_two)
    res = run_cli("cv", data, "--folds", "3", *_tiny_cv_args(), "--name", "again")
    assert res.exit_code == 130, res.output
    again = tmp_path / "runs" / "again"
    assert (again / "fold1" / "oof.npz").is_file() and not (again / "fold2" / "oof.npz").is_file()
    monkeypatch.setattr(engine, "train_epoch", real)
    res = run_cli("cv", "--resume", again, "--json", "--json-out", tmp_path / "cv.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cv.json").read_text()) == json.loads(res.stdout)
    resumed = json.loads(res.stdout)
    for a, b in zip(full["per_fold"], resumed["per_fold"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_cv_multilabel_label_file_with_a_time_budget(tmp_path):
    data = make_dataset(tmp_path / "shapes", per_class=8)
    lines = ["path,label"]
    for i, p in enumerate(sorted(data.rglob("*.png"))):
        lines.append(f"{p.relative_to(tmp_path)},{p.parent.name}" + ("|bright" if i % 2 else ""))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    res = run_cli("cv", tmp_path / "labels.csv", "--folds", "2", *TINY, "--time", "20s", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["task"] == "multilabel" and "mAP" in out["summary"] and out["images"] == 24
    budgets = [yaml_key(tmp_path / "runs" / "cv" / f"fold{k}" / "config.yaml", "time") for k in (1, 2)]
    assert budgets[0] == "10s" and 1 <= int(budgets[1][:-1]) <= 20
    with open(tmp_path / "runs" / "cv" / "oof.csv") as f:
        header = next(csv.reader(f))
    assert header == ["path", "label", "fold", "p_blue", "p_bright", "p_green", "p_red"]
    res = run_cli("inspect", "data", tmp_path / "labels.csv", "--label-errors", "--from", tmp_path / "runs" / "cv",
                  "--json", "--json-out", tmp_path / "errors.json")
    assert res.exit_code == 0, res.output
    errors = json.loads(res.stdout)
    assert json.loads((tmp_path / "errors.json").read_text()) == errors
    assert errors["task"] == "multilabel" and errors["images"] == 24
    assert all(r["given"] != r["suggested"] for r in errors["issues"])
    from vitcli.manifest import read_manifest

    fixed = read_manifest(errors["files"]["corrected"])  # a label file training takes as it is
    assert fixed.multilabel and len(fixed.parts["all"][0]) == 24


def yaml_key(path: Path, key: str):
    import yaml

    return yaml.safe_load(path.read_text())["train"][key]


def test_cv_errors_name_the_problem(tmp_path):
    data = make_dataset(tmp_path / "shapes", per_class=3)
    res = run_cli("cv", data, "--folds", "4", *TINY)
    assert res.exit_code == 1 and "--folds 4" in res.output and "red (3)" in res.output
    res = run_cli("cv", "--resume", tmp_path)
    assert res.exit_code == 1 and "cv.json" in res.output
    res = run_cli("inspect", "data", data, "--label-errors", "--from", tmp_path)
    assert res.exit_code == 1 and "oof.csv" in res.output


# ----------------------------------------------------------------------------------------------- label errors
def test_confident_learning_finds_flipped_labels_in_simulated_probabilities():
    from vitcli.confident import find_label_issues, find_multilabel_issues

    rng = np.random.default_rng(0)
    n, c = 300, 3
    true = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(n, 30, replace=False)
    given[flipped] = (given[flipped] + rng.integers(1, c, 30)) % c
    issues = find_label_issues(probs, given)
    assert len({t.index for t in issues[:30]} & set(flipped.tolist())) >= 24
    assert sum(t.suggested == true[t.index] for t in issues[:30]) >= 24
    assert len(find_label_issues(probs, true)) <= 3  # clean labels: a short list
    margin = find_label_issues(probs, given, "normalized_margin")
    assert {t.index for t in margin} == {t.index for t in issues} and all(0 <= t.score <= 1 for t in margin)
    targets = rng.random((n, 4)) < 0.3
    p = np.clip(np.where(targets, 0.85, 0.1) + rng.normal(0, 0.08, (n, 4)), 0.01, 0.99)
    noisy = targets.astype(int)
    bits = rng.choice(n, 20, replace=False)
    noisy[bits, rng.integers(0, 4, 20)] ^= 1
    ml = find_multilabel_issues(p, noisy)
    assert len({t.index for t in ml[:20]} & set(bits.tolist())) >= 16


def test_label_errors_finds_flipped_labels_and_writes_corrections(tmp_path):
    import random

    data = make_dataset(tmp_path / "shapes", per_class=30)
    rng = random.Random(1)
    rows = [(p, p.parent.name) for p in sorted(data.rglob("*.png"))]
    flipped = set(rng.sample(range(len(rows)), 9))  # 10% of the labels
    colours = ["red", "green", "blue"]
    lines = ["path,label"] + [f"{p},{rng.choice([x for x in colours if x != c]) if i in flipped else c}"
                              for i, (p, c) in enumerate(rows)]
    noisy = tmp_path / "noisy.csv"
    noisy.write_text("\n".join(lines) + "\n")
    sets = [f"{k}={v}" for k, v in (("model.name", "vit-tiny/8"), ("data.img_size", 32), ("train.device", "cpu"),
                                    ("data.batch_size", 16), ("model.embed_dim", 32), ("model.depth", 1),
                                    ("model.num_heads", 2), ("data.crop_pct", 1.0), ("train.precision", "fp32"),
                                    ("train.report", "false"), ("optim.lr", 3e-3))]
    res = run_cli("inspect", "data", noisy, "--label-errors", "--folds", "3", *[x for s in sets for x in ("--set", s)],
                  "--epochs", "15", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = {str(rows[i][0]) for i in flipped}
    top = {r["path"] for r in out["issues"][:9]}
    assert len(top & want) / 9 >= 0.8, out["issues"][:10]  # precision = recall at K = the number flipped
    assert all(r["suggested"] == Path(r["path"]).parent.name for r in out["issues"][:9] if r["path"] in want)
    files = out["files"]
    assert Path(files["gallery"]).stat().st_size > 1000
    with open(files["corrected"]) as f:
        fixed = list(csv.DictReader(f))
    assert len(fixed) == 90 and sum(r["label"] != Path(r["path"]).parent.name for r in fixed) <= 3
    again = run_cli("inspect", "data", noisy, "--label-errors", "--from", tmp_path / "runs" / "cv", "--json",
                    "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["issues"] == out["issues"]
    res = run_cli("train", files["corrected"], *TINY, "--epochs", "1", "--name", "fixed")
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------------------------- select
def test_select_picks_uncertain_images_and_draws_them(trained, tmp_path):
    from vitcli.embeddings import embed_images, image_paths
    from vitcli.inference import load
    from vitcli.selection import uncertainty

    run, _ = trained
    pool = make_dataset(tmp_path / "unlabelled", per_class=6, seed=7)
    res = run_cli("select", pool, "--model", run, "--n", "5", "--strategy", "margin", "--pool", "1", "--json",
                  "-o", tmp_path / "sel")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    emb = embed_images(load(str(run)), image_paths(pool))
    unsure = uncertainty(emb.probs, False)
    top5 = {str(emb.paths[i]) for i in np.argsort(-unsure, kind="stable")[:5]}
    assert {r["path"] for r in out["selected"]} == top5 and out["selected"][0]["uncertainty"] == pytest.approx(
        unsure.max(), abs=1e-5)
    assert (tmp_path / "sel" / "selected.png").stat().st_size > 1000
    res = run_cli("select", pool, "--model", run, "--n", "4", "-o", tmp_path / "sel2", "--json-out",
                  tmp_path / "sel2.json")
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "sel2.json").read_text())["selected"]) == 4
    with open(tmp_path / "sel2" / "selected.csv") as f:
        assert len({r["path"] for r in csv.DictReader(f)}) == 4
    res = run_cli("select", pool, "--model", run, "--n", "4", "--strategy", "badge", "--labelled", trained[1],
                  "--json", "-o", tmp_path / "sel3")
    assert res.exit_code == 0, res.output
    assert len({r["path"] for r in json.loads(res.stdout)["selected"]}) == 4
    res = run_cli("select", pool, "--model", run, "-o", pool / "x")
    assert res.exit_code == 1 and "inside the dataset" in res.output
