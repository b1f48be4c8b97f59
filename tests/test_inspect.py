"""`vitcli inspect`: every subcommand through the CLI, on a trained scratch ViT and a timm DeiT checkpoint."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_dataset, run_cli, shape_image, trained_run
from vitcli.checkpoint import make_checkpoint, save_checkpoint
from vitcli.data import preprocess_info


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder of a tiny scratch ViT trained one epoch, its dataset) — shared by the tests here."""
    return trained_run(tmp_path_factory.mktemp("inspect"), "--epochs", "1", per_class=12)


@pytest.fixture
def deit_checkpoint(tmp_path) -> Path:
    """A vitcli checkpoint of a tiny timm DeiT with its distillation token (2 prefix tokens)."""
    from vitcli.models import model_from_spec

    spec = {"backend": "timm", "name": "deit_tiny_distilled_patch16_224", "img_size": 32,
            "kwargs": dict(num_classes=3, embed_dim=32, depth=2, num_heads=2, patch_size=8)}
    torch.manual_seed(0)
    model = model_from_spec(spec)
    ckpt = make_checkpoint(model_spec=spec, classes=["red", "green", "blue"], epoch=1,
                           preprocess=preprocess_info(32, 1.0, "bicubic", [0.5] * 3, [0.25] * 3),
                           state_dict=model.state_dict())
    path = tmp_path / "deit" / "best.pt"
    save_checkpoint(path, ckpt)
    return path


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def wrote(output: str) -> list[Path]:
    return [Path(line.removeprefix("wrote ").strip()) for line in output.splitlines() if line.startswith("wrote ")]


def panels(cols: int, rows: int) -> tuple[int, int]:
    """Pixel size of an attention figure: 200 px per panel column, 225 px per row, 50 px for the title."""
    return cols * 200, rows * 225 + 50


def test_attention_writes_overlays_of_the_expected_sizes_into_the_run_folder(trained):
    run, data = trained
    images = sorted((data / "red").iterdir())[:2]
    res = run_cli("inspect", "attention", *images, "--model", run)
    assert res.exit_code == 0, res.output
    paths = wrote(res.output)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{p.stem}_{k}.png" for p in images for k in ("rollout", "attention", "grid"))
    assert all(p.parent == run / "inspect" for p in paths)
    for p in paths:
        kind = p.stem.rsplit("_", 1)[1]
        want = {"rollout": panels(2, 1), "attention": panels(2, 1), "grid": panels(2, 2)}[kind]  # 2 heads, 2 blocks
        assert png_size(p) == want, p.name


def test_attention_raw_layers_and_heads_and_a_resized_grid(trained, tmp_path):
    run, data = trained
    image = next((data / "blue").iterdir())
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "raw", "--layer", "all",
                  "--head", "1", "--img-size", "48", "--output", tmp_path / "o")
    assert res.exit_code == 0, res.output
    (path,) = wrote(res.output)
    assert path == tmp_path / "o" / f"{image.stem}_attention.png"
    assert png_size(path) == panels(1, 2)
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "rollout", "--layer", "0",
                  "--head", "0", "--fusion", "max", "--discard", "0", "--output", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert [p.name for p in wrote(res.output)] == [f"{image.stem}_rollout.png"]


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "5"], "--layer 5 is out of range"),
    (["--head", "x"], "--head 'x'"),
    (["--fusion", "median"], "--fusion 'median' is not valid"),
    (["--discard", "1.0"], "--discard 1.0 must be in [0, 1)"),
    (["--layer", "1.5"], "--layer '1.5': use all, last, or 0-based numbers"),
])
def test_attention_rejects_bad_options_with_one_line(trained, args, message):
    run, data = trained
    res = run_cli("inspect", "attention", next((data / "red").iterdir()), "--model", run, *args)
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output


def test_attention_on_a_timm_deit_checkpoint_with_a_distillation_token(deit_checkpoint, tmp_path):
    data = make_dataset(tmp_path / "imgs", classes=("green",), per_class=2)
    res = run_cli("inspect", "attention", data, "--model", deit_checkpoint)
    assert res.exit_code == 0, res.output
    paths = wrote(res.output)
    assert len(paths) == 6 and all(p.parent == deit_checkpoint.parent / "inspect" for p in paths)
    assert png_size(next(p for p in paths if p.name.endswith("_grid.png"))) == panels(2, 2)


def test_attention_skips_an_unreadable_image_and_says_so(trained, tmp_path):
    run, data = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    res = run_cli("inspect", "attention", bad, next((data / "red").iterdir()), "--model", run,
                  "--method", "rollout", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and len(wrote(res.output)) == 1


def test_model_summary_from_a_run_a_config_and_timm_names(trained, tmp_path):
    run, _ = trained
    res = run_cli("inspect", "model", "--model", run)
    assert res.exit_code == 0, res.output
    assert "grid 4x4" in res.output and "tokens 17 (1 prefix + 16 patches)" in res.output
    assert "FLOPs per image" in res.output and "blocks" in res.output
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: vit-tiny/8, embed_dim: 32, depth: 1, num_heads: 2}\ndata: {img_size: 32}\n")
    res = run_cli("inspect", "model", "--config", cfg, "--num-classes", "5")
    assert res.exit_code == 0, res.output
    assert "width 32, 1 blocks" in res.output
    res = run_cli("inspect", "model", "--model", "deit_tiny_distilled_patch16_224", "--img-size", "64")
    assert res.exit_code == 0, res.output
    assert "tokens 18 (2 prefix + 16 patches)" in res.output
    res = run_cli("inspect", "model", "--model", "timm/no_such_model_xyz")
    assert res.exit_code == 1 and "no_such_model_xyz" in res.output


def test_flops_match_the_formula_for_a_scratch_vit():
    from vitcli.views import count_flops
    from vitcli.vit import VisionTransformer

    D, N, depth, classes = 32, 1 + 16, 2, 3
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=2,
                              num_classes=classes).eval()
    total, per = count_flops(model, 32)
    per_block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * 4 * D  # qkv, QK/AV, proj, mlp
    assert per["blocks.0"] == per_block
    assert total == 2 * 16 * (3 * 64) * D + depth * per_block + 2 * D * classes


def test_posembed_distance_and_filters_write_their_figures(trained, tmp_path):
    run, data = trained
    res = run_cli("inspect", "posembed", "--model", run)
    assert res.exit_code == 0, res.output
    assert wrote(res.output) == [run / "inspect" / "posembed.png"]
    res = run_cli("inspect", "distance", data, "--model", run, "--max-images", "6", "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    png, csv = wrote(res.output)
    assert png.name == "attention_distance.png" and png_size(png)[0] > 300
    rows = csv.read_text().splitlines()
    assert rows[0] == "block,head,mean_distance_px" and len(rows) == 1 + 2 * 2
    assert all(0 <= float(r.split(",")[2]) <= 32 * 2**0.5 for r in rows[1:])
    res = run_cli("inspect", "filters", "--model", run, "--components", "5", "-o", tmp_path / "f")
    assert res.exit_code == 0, res.output
    assert wrote(res.output) == [tmp_path / "f" / "filters.png"]


def test_posembed_similarity_of_a_position_with_itself_is_one():
    from vitcli.views import filter_components, posembed_similarity
    from vitcli.vit import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="sincos")
    sim, grid = posembed_similarity(model)
    assert grid == (4, 4) and sim.shape == (4, 4, 4, 4)
    torch.testing.assert_close(torch.stack([sim[r, c, r, c] for r in range(4) for c in range(4)]), torch.ones(16))
    assert sim[0, 0, 0, 1] > sim[0, 0, 0, 3]  # sine-cosine positions: nearer is more similar
    tiles = filter_components(model, 28)
    assert tiles.shape == (28, 8, 8, 3) and tiles.min() >= 0 and tiles.max() <= 1


def test_data_check_finds_duplicates_disguised_and_unreadable_files_without_writing(tmp_path):
    data = make_dataset(tmp_path / "ds", classes=("red", "green"), per_class=6, splits=("train", "val"))
    train, val = data / "train", data / "val"
    for i in range(2):  # more red in train: imbalance
        shape_image("red", 32, random.Random(i)).save(train / "red" / f"extra_{i}.png")
    shutil.copy(train / "red" / "red_000.png", val / "red" / "leak.png")  # across splits
    shutil.copy(train / "green" / "green_001.png", train / "red" / "mislabelled.png")  # within, two classes
    Image.open(train / "green" / "green_002.png").save(train / "green" / "disguised.png", format="JPEG")
    (train / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (train / "green" / "notes.txt").write_text("not an image")
    Image.new("L", (40, 24), 128).save(val / "green" / "grey.png")
    before = sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*"))
    res = run_cli("inspect", "data", data)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "unreadable files: 1" in out and "broken.png" in out
    assert "disguised files (extension does not match the content): 1" in out and "is JPEG" in out
    assert "exact duplicates within a split: 1" in out and "[different classes]" in out
    assert "exact duplicates across splits" in out and "leak.png" in out
    assert "ignored 1 file(s)" in out
    assert "L (1)" in out and "40x24" in out
    from vitcli.datacheck import check_data

    rep = check_data(data)
    assert rep.classes == ["green", "red"]
    assert rep.counts == {"train": [7, 9], "val": [7, 7]}  # readable images only
    assert rep.imbalance == {"train": pytest.approx(9 / 7), "val": 1.0}
    assert sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*")) == before  # read only


def test_inspect_data_of_class_folders_reports_one_split(shapes):
    from vitcli.datacheck import check_data

    rep = check_data(shapes)
    assert rep.counts == {"all": [30, 30, 30]} and rep.imbalance == {"all": 1.0}
    assert not (rep.unreadable or rep.disguised or rep.dup_within or rep.dup_across)
    assert rep.sizes == {(32, 32): 90} and rep.modes == {"RGB": 90}
