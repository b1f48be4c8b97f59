"""`vitcli train` end to end on generated images: it learns, and the run folder holds what it should."""

import csv

import pytest
import timm
import torch

from conftest import TINY, make_dataset, run_cli
from vitcli.checkpoint import FORMAT, model_from_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(root / "shapes", per_class=30)
    out = root / "runs"
    res = run_cli("train", data, *TINY, "--epochs", "8", "--output", out)
    assert res.exit_code == 0, res.output
    return out / "train", res.output


def test_tiny_vit_learns_coloured_shapes(trained):
    run, _ = trained
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 8
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(float(r["val_acc"]) for r in rows) >= 0.9


def test_run_folder_holds_exactly_the_documented_files(trained):
    run, _ = trained
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.yaml", "curves.png", "last.pt", "metrics.csv", "run.json", "split.csv"]
    header = open(run / "metrics.csv").readline().strip().split(",")
    assert header == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def test_checkpoint_is_self_describing_and_loads_weights_only(trained):
    run, _ = trained
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["format"] == FORMAT
    assert ckpt["classes"] == ["blue", "green", "red"]
    assert ckpt["preprocess"]["img_size"] == 32 and len(ckpt["preprocess"]["mean"]) == 3
    assert ckpt["model_spec"]["backend"] == "scratch"
    assert ckpt["config"]["model"]["embed_dim"] == 32
    assert 1 <= ckpt["epoch"] <= 8 and ckpt["metrics"]["val_acc"] >= 0.9
    model = model_from_checkpoint(ckpt)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_progress_output_and_summary(trained):
    _, output = trained
    assert "epoch   8/8" in output and "img/s" in output
    assert "training summary" in output and "best val accuracy" in output


def test_second_run_gets_a_new_folder(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=6)
    for _ in range(2):
        res = run_cli("train", data, *TINY, "--epochs", "1")
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train", "train-2"]


def test_timm_backend_from_local_weights_with_another_head(tmp_path):
    from safetensors.torch import save_file

    size = dict(embed_dim=32, depth=2, num_heads=2)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, **size)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    data = make_dataset(tmp_path / "d", per_class=8)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--model", "timm/vit_tiny_patch16_224",
                  "--set", f"model.pretrained_file={tmp_path / 'w.safetensors'}")
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "runs/train/last.pt", weights_only=True)
    assert ckpt["model_spec"]["backend"] == "timm"
    assert ckpt["model"]["head.weight"].shape == (3, 32)
    # the backbone started from the file: patch embedding moved only a little from the saved weights
    w0 = src.state_dict()["patch_embed.proj.weight"]
    assert (ckpt["model"]["patch_embed.proj.weight"] - w0).abs().max() < 0.05


def test_pretrained_file_for_another_architecture_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    data = make_dataset(tmp_path / "d", per_class=4)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--set", f"model.pretrained_file={tmp_path / 'w.safetensors'}")
    assert res.exit_code == 1
    assert "w.safetensors" in res.output and "does not fit the model" in res.output
