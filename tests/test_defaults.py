"""Data-aware defaults: input size, token grid, model size, stem, augmentation and epochs from the scanned folder;
the user's keys always win; few photos get the fine-tuning hint."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import make_dataset, run_cli
from vitcli.config import load_config
from vitcli.data import probe_sizes, scan_dataset
from vitcli.defaults import LADDER, DataFacts, forward_macs
from vitcli.recipes import apply_recipe


def grey_folder(root: Path, classes: int, per_class: int, size: tuple[int, int], ext: str = ".png") -> Path:
    rng = random.Random(0)
    for c in range(classes):
        folder = root / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("L", size, rng.randint(0, 255))
            img.save(folder / f"{i}{ext}")
    return root


def scanned(folder: Path, cfg, device_type: str = "cpu"):
    ds = scan_dataset(folder, cfg.data.val_fraction, 0)
    facts = DataFacts(len(ds.train), probe_sizes(ds.train.paths), device_type, str(folder))
    return apply_recipe(cfg, n_train=len(ds.train), quiet=True, facts=facts), facts


def test_small_grey_images_keep_their_size_with_a_conv_stem_ladder_and_gentle_augmentation(tmp_path):
    cfg = load_config()
    recipe, facts = scanned(grey_folder(tmp_path / "d", 10, 20, (28, 28)), cfg)
    assert facts.sizes[0] == (28, 28) and recipe.name == "scratch-small"
    assert cfg.data.img_size == 28 and cfg.model.name == "vit-tiny/4" and cfg.model.stem == "conv"  # 7x7 tokens
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == LADDER[0][1:]  # 160 images
    assert cfg.data.scale_min == 0.75 and cfg.data.hflip == 0.0 and cfg.data.rotate > 0 and cfg.data.crop_pct == 1
    assert cfg.train.epochs == 100 and cfg.train.threads == -1  # 2 steps an epoch: the longest run, threads timed
    assert cfg.model.global_pool == "avg"  # the recipe still fills what the defaults do not choose
    assert recipe.hint is None


def test_larger_images_and_more_of_them_get_a_coarser_grid_a_bigger_model_and_fewer_epochs(tmp_path):
    cfg = load_config(flags={"data.batch_size": 16})
    scanned(grey_folder(tmp_path / "d", 2, 700, (96, 80)), cfg, "cuda")  # 1,120 training images of 80 px
    assert cfg.data.img_size == 80 and cfg.model.name == "vit-tiny/8"  # 10x10 tokens
    assert (cfg.model.embed_dim, cfg.model.depth) == LADDER[1][1:3]
    assert cfg.data.scale_min == 0.08 and cfg.data.hflip == 0.5  # not small: the usual crops and flips
    assert cfg.train.epochs == 14  # 1,000 steps of 70 (a CPU fills minutes instead: test_looks)


def test_photos_train_at_224_and_get_the_exact_fine_tuning_command(tmp_path, capsys):
    data = grey_folder(tmp_path / "photos", 2, 3, (500, 375), ext=".jpg")
    cfg = load_config()
    recipe, _ = scanned(data, cfg)
    assert cfg.data.img_size == 224 and cfg.model.name == "vit-tiny/16"
    assert recipe.hint and f"vitcli train {data} --model timm/vit_tiny_patch16_224 --set model.pretrained=true" \
        in recipe.hint
    assert cfg.model.pretrained == "false"  # offline (as every test) and not cached: scratch, with the hint


def test_a_cpu_takes_a_smaller_model_and_fewer_epochs_for_photos_than_a_gpu():
    sizes = [(500, 375)] * 8
    cpu, gpu = load_config(), load_config()
    apply_recipe(cpu, n_train=6_000, quiet=True, facts=DataFacts(6_000, sizes, "cpu"))
    apply_recipe(gpu, n_train=6_000, quiet=True, facts=DataFacts(6_000, sizes, "cuda"))
    assert (gpu.model.embed_dim, gpu.model.depth) == LADDER[2][1:3]
    assert cpu.model.embed_dim < gpu.model.embed_dim and cpu.train.epochs < gpu.train.epochs
    assert forward_macs(224, 16, cpu.model.embed_dim, cpu.model.depth, "conv") <= 3e8
    assert cpu.train.threads == -1 and gpu.train.threads == 0
    torchrun = load_config()  # two processes on the CPU: one thread each, no probe
    apply_recipe(torchrun, n_train=6_000, world=2, quiet=True, facts=DataFacts(6_000, sizes, "cpu"))
    assert torchrun.train.threads == 1


def test_the_users_keys_win_over_every_data_aware_default(tmp_path):
    data = grey_folder(tmp_path / "d", 3, 10, (28, 28))
    cfg = load_config(flags={"data.img_size": 32, "model.name": "vit-small/8", "train.epochs": 3},
                      overrides=["data.hflip=0.5", "model.stem=patch", "train.threads=2"])
    recipe, _ = scanned(data, cfg)
    assert (cfg.data.img_size, cfg.model.name, cfg.train.epochs) == (32, "vit-small/8", 3)
    assert (cfg.data.hflip, cfg.model.stem, cfg.train.threads) == (0.5, "patch", 2)
    assert cfg.model.embed_dim == 0 and cfg.model.depth == 0  # the named preset's size, not the ladder's
    assert cfg.data.translate > 0  # keys the user left alone are still chosen
    applied = {k for c in recipe.defaults for k in c.applied}
    assert not applied & {"data.img_size", "model.name", "train.epochs", "data.hflip", "model.stem"}
    # a reason that names values the user replaced says so
    glyph = next(c for c in recipe.defaults if "data.translate" in c.applied)
    assert glyph.why.endswith("(your data.hflip kept)"), glyph.why


def test_a_partial_size_keeps_the_users_keys_and_takes_the_rest_from_the_data_not_the_preset(tmp_path):
    """Setting only the width (say, for a small student) used to keep vit-tiny's 12 blocks and 3 heads."""
    data = grey_folder(tmp_path / "d", 3, 20, (28, 28))  # 48 training images: the ladder's first rung
    cfg = load_config(overrides=["model.embed_dim=64"])
    recipe, _ = scanned(data, cfg)
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (64, LADDER[0][2], 2)  # 64 % 3: 2 heads
    size = next(c for c in recipe.defaults if "model.depth" in c.applied)
    assert size.why == "width 64, 4 blocks, 2 heads for 48 training images and a CPU (your model.embed_dim kept)"
    deep = load_config(overrides=["model.depth=2", "model.num_heads=2"])
    scanned(data, deep)
    assert (deep.model.embed_dim, deep.model.depth, deep.model.num_heads) == (LADDER[0][1], 2, 2)
    named = load_config(overrides=["model.name=vit-small/4", "model.depth=2"])  # a named preset: its own width
    scanned(data, named)
    assert (named.model.embed_dim, named.model.depth, named.model.num_heads) == (0, 2, 0)


def test_pretrained_and_recipe_none_get_no_data_aware_defaults(tmp_path):
    facts = DataFacts(100, [(28, 28)] * 4)
    for sets in (["model.pretrained_file=w.safetensors", "model.name=timm/test_vit"], ["train.recipe=none"]):
        cfg = load_config(overrides=sets)
        recipe = apply_recipe(cfg, n_train=100, quiet=True, facts=facts)
        assert recipe.defaults == [] and cfg.data.img_size == 224


def test_train_with_no_flags_prints_each_choice_and_records_it(tmp_path):
    data = make_dataset(tmp_path / "shapes", per_class=6, size=16)
    res = run_cli("train", data, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                  "--set", "train.precision=fp32")
    assert res.exit_code == 0, res.output
    assert "defaults from the data" in res.output
    assert "data.img_size=16: the images are about 16 px" in res.output and "model.stem=conv" in res.output
    saved = yaml.safe_load((tmp_path / "runs" / "train" / "config.yaml").read_text())
    assert saved["data"]["img_size"] == 16 and saved["model"]["stem"] == "conv"
    assert saved["model"]["name"] == "vit-tiny/2" and saved["model"]["embed_dim"] == LADDER[0][1]


@pytest.mark.parametrize("side", [8, 31, 100, 159, 160, 1000])
def test_the_input_size_always_fits_the_chosen_patch(side):
    cfg = load_config()
    apply_recipe(cfg, n_train=500, quiet=True, facts=DataFacts(500, [(side, side + 5)]))
    patch = int(cfg.model.name.split("/")[1])
    assert cfg.data.img_size % patch == 0 and 4 <= cfg.data.img_size // patch <= 14


def test_a_time_budget_guesses_fewer_epochs_so_the_recipe_fits_the_run_length():
    facts = DataFacts(3_200, [(28, 28)] * 8, "cpu")
    free, timed = load_config(), load_config(overrides=["train.time=3m"])
    apply_recipe(free, n_train=3_200, quiet=True, facts=facts)
    recipe = apply_recipe(timed, n_train=3_200, quiet=True, facts=facts)
    assert 1 <= timed.train.epochs < free.train.epochs == 49  # ~8 minutes of a CPU without a budget
    assert any("train.epochs" in c.applied and "3m" in c.why for c in recipe.defaults)


def test_the_time_budgets_guess_counts_the_cores_so_the_augmentation_fits_the_run(monkeypatch):
    """The recipe's augmentation level and EMA horizon follow the first guess of epochs: one core's rate alone
    guessed 64 epochs for a 30-minute CIFAR-sized run on 2 cores that trained 100 (light augmentation, not medium)."""
    import vitcli.device

    facts = DataFacts(7_000, [(32, 32)] * 8, "cpu")
    epochs = {}
    for cores in (1, 2, 8):
        monkeypatch.setattr(vitcli.device, "cpu_count", lambda cores=cores: cores)
        cfg = load_config(overrides=["train.time=12m"])
        apply_recipe(cfg, n_train=7_000, quiet=True, facts=facts)
        epochs[cores] = cfg.train.epochs
    assert epochs[1] < epochs[2] < epochs[8]
    assert epochs[2] / epochs[1] == pytest.approx(1.7, rel=0.1)  # what the thread probe measures on 2 cores


def test_a_large_folder_holds_out_a_thousand_images_not_a_fifth():
    from vitcli.defaults import split_defaults

    cfg = load_config()
    assert split_defaults(cfg, 2000, 5) == [] and cfg.data.val_fraction == 0.2  # 20% of 2,000 is only 400
    assert split_defaults(load_config(), 30_000, 100)[0].applied == {"data.val_fraction": 0.167}  # 50 a class
    assert split_defaults(load_config(), 100_000, 10)[0].applied == {"data.val_fraction": 0.1}  # at least 10%
    cfg = load_config()
    (made,) = split_defaults(cfg, 8000, 10)
    assert cfg.data.val_fraction == made.applied["data.val_fraction"] == 0.125 and "~1,000 held out" in made.why
    mine = load_config(overrides=["data.val_fraction=0.3"])
    assert split_defaults(mine, 8000, 10) == [] and mine.data.val_fraction == 0.3


def test_train_on_a_large_folder_trains_on_all_but_the_held_out_thousand(tmp_path):
    data = grey_folder(tmp_path / "big", classes=10, per_class=600, size=(8, 8))
    res = run_cli("train", data, "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--set",
                  "train.precision=fp32", "--set", "model.embed_dim=32", "--set", "model.depth=1",
                  "--set", "model.num_heads=2")
    assert res.exit_code == 0, res.output
    assert "data.val_fraction=0.167: 6,000 images: ~1,002 held out are enough" in res.output
    assert "5000 train / 1000 val images" in res.output
    run = tmp_path / "runs" / "train"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["val_fraction"] == 0.167
    rows = (run / "split.csv").read_text().splitlines()[1:]
    assert sum(r.startswith("val,") for r in rows) == 1000 and len(rows) == 6000


def test_a_resplit_is_the_scan_at_that_share_without_listing_the_files_again(tmp_path):
    from vitcli.sources import open_source

    data = grey_folder(tmp_path / "d", classes=3, per_class=40, size=(8, 8))
    rows = ["path,label"] + [f"d/c{c}/{i}.png,c{c}" for c in range(3) for i in range(40)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    for where in (data, tmp_path / "labels.csv"):
        source = open_source(where, None)
        again, direct = source.scan(0.2, 3).resplit(0.1, 3), source.scan(0.1, 3)
        assert (again.train.paths, again.train.labels) == (direct.train.paths, direct.train.labels)
        assert (again.val.paths, again.val.labels) == (direct.val.paths, direct.val.labels) and len(again.val) == 12


def test_each_skipped_file_is_reported_once_by_the_split_and_the_report(tmp_path):
    data = grey_folder(tmp_path / "big", classes=10, per_class=600, size=(8, 8))
    (data / "__notes").mkdir()  # a hidden folder: the scan warns that it skipped it
    res = run_cli("train", data, "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--set",
                  "train.precision=fp32", "--set", "model.embed_dim=32", "--set", "model.depth=1",
                  "--set", "model.num_heads=2")
    assert res.exit_code == 0, res.output
    assert res.output.count("__notes") == 1, res.output  # report.html's scan at the end keeps it to itself
    assert (Path("runs") / "train" / "report.html").is_file()
