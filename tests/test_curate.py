"""Better data: `vitcli embed`, `search`, `cv`, `inspect data --label-errors` and `select`, on generated images and
tiny models (the from-scratch ViT and a timm DeiT)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, trained_run
from vitcli.checkpoint import make_checkpoint, save_checkpoint
from vitcli.data import preprocess_info


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder of a tiny scratch ViT trained one epoch, its 3-class dataset)."""
    return trained_run(tmp_path_factory.mktemp("curate"), "--epochs", "1", per_class=8)


@pytest.fixture
def deit_checkpoint(tmp_path) -> Path:
    """A vitcli checkpoint of a tiny timm DeiT (two prefix tokens, a distillation head)."""
    from vitcli.models import model_from_spec

    spec = {"backend": "timm", "name": "deit_tiny_distilled_patch16_224", "img_size": 32,
            "kwargs": dict(num_classes=3, embed_dim=32, depth=1, num_heads=2, patch_size=8)}
    torch.manual_seed(0)
    model = model_from_spec(spec)
    ckpt = make_checkpoint(model_spec=spec, classes=["red", "green", "blue"], epoch=1,
                           preprocess=preprocess_info(32, 1.0, "bicubic", [0.5] * 3, [0.25] * 3),
                           state_dict=model.state_dict())
    path = tmp_path / "deit" / "best.pt"
    save_checkpoint(path, ckpt)
    return path


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
    run, data = trained
    queries = [data / "red" / "red_003.png", data / "blue" / "blue_005.png"]
    for model in (run, deit_checkpoint):
        res = run_cli("search", *queries, "--in", data, "--model", model, "-k", "3", "--json", "--device", "cpu",
                      "-o", tmp_path / "s")
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert [r["neighbours"][0]["path"] for r in out["results"]] == [str(q) for q in queries]
        assert all(r["neighbours"][0]["similarity"] > 0.9999 for r in out["results"])
        assert all(len(r["neighbours"]) == 3 for r in out["results"])
        assert (tmp_path / "s" / "search.png").stat().st_size > 1000
