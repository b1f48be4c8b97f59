"""Training recipes: chosen by situation, printed with the reason, and never overriding the user's keys."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import TINY, make_dataset, run_cli
from vitcli.config import load_config
from vitcli.defaults import divisor_patch, patch_size
from vitcli.errors import VitcliError
from vitcli.recipes import SMALL_DATA, apply_recipe, choose, ema_decay_for, strength


def test_auto_recipe_follows_data_size_and_pretrained_weights(tmp_path):
    cfg = load_config()
    assert choose(cfg, 1_000)[0] == "scratch-small"
    assert choose(cfg, SMALL_DATA)[0] == "scratch"
    weights = tmp_path / "w.safetensors"
    cfg = load_config(overrides=[f"model.pretrained_file={weights}", "model.name=timm/test_vit"])
    name, why = choose(cfg, 1_000)
    assert name == "finetune" and str(weights) in why
    cfg = load_config(overrides=["train.recipe=scratch"])
    assert choose(cfg, 10) == ("scratch", "'train.recipe' is scratch")


def test_recipe_fills_only_the_keys_the_user_did_not_set(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"data": {"mixup": 0.0, "img_size": 32}, "train": {"epochs": 200}}))
    cfg = load_config(path, ["model.drop_path_rate=0.0"], {"model.name": None})
    recipe = apply_recipe(cfg, n_train=500, quiet=True)
    assert recipe.name == "scratch-small"
    # the user's values stand, even where they equal a default or the recipe would set something else
    assert cfg.data.mixup == 0.0 and cfg.model.drop_path_rate == 0.0 and cfg.train.epochs == 200
    assert {"data.mixup", "model.drop_path_rate"} <= set(recipe.kept)
    # the rest is the 200-epoch (heavy) from-scratch regime with small-data ViT choices
    assert cfg.data.cutmix == 1.0 and cfg.data.reprob == 0.25 and cfg.data.randaugment.startswith("rand-m9")
    assert cfg.model.global_pool == "avg" and cfg.model.pos_embed == "sincos" and cfg.model.pos_conv
    assert cfg.model.name == "vit-tiny/4"  # default patch 16 on 32 px would leave a 2x2 token grid
    assert cfg.train.ema_decay > 0 and cfg.optim.warmup_epochs == 10
    assert cfg.train.recipe == "scratch-small"
    assert set(recipe.applied) & set(recipe.kept) == set()


def test_flags_count_as_user_settings():
    cfg = load_config(flags={"model.name": "vit-tiny/16", "data.img_size": 32})
    apply_recipe(cfg, n_train=100, quiet=True)
    assert cfg.model.name == "vit-tiny/16"


def test_recipe_none_changes_nothing():
    cfg = load_config(overrides=["train.recipe=none"])
    sections = {s: dict(vars(getattr(cfg, s))) for s in ("data", "model", "optim", "train")}
    assert apply_recipe(cfg, n_train=100, quiet=True).applied == {}
    assert {s: dict(vars(getattr(cfg, s))) for s in sections} == sections


def test_finetune_recipe_lowers_lr_decays_layers_and_drops_mixup():
    cfg = load_config(overrides=["model.pretrained_file=x.safetensors", "model.name=timm/test_vit",
                                 "data.mixup=0.5"])
    recipe = apply_recipe(cfg, n_train=5_000, quiet=True)
    assert recipe.name == "finetune"
    assert cfg.optim.lr < 1e-3 and cfg.optim.layer_decay == 0.75
    assert cfg.data.cutmix == 0.0 and cfg.data.randaugment == ""
    assert cfg.data.mixup == 0.5  # set by the user: kept


def test_augmentation_strength_grows_with_run_length():
    assert [strength(e) for e in (5, 30, 70, 300)] == ["minimal", "light", "medium", "heavy"]
    # a model narrower than DeiT-Ti stops at medium augmentation however long it trains (HEAVY_WIDTH)
    assert strength(300, 128) == "medium" and strength(300, 192) == "heavy" and strength(59, 192) == "light"
    assert strength(70, 128, img_size=28) == "light"  # RandAugment needs images of 32 px and up
    assert strength(300, 96) == strength(70, 96) == "light"  # ... and a model 128 wide
    short = load_config(overrides=["train.epochs=5"])
    apply_recipe(short, n_train=1_000, quiet=True)
    assert short.data.mixup == 0 and short.data.reprob == 0 and short.train.ema_decay == 0
    long = load_config(overrides=["train.epochs=300", "data.img_size=64"])
    apply_recipe(long, n_train=50_000, quiet=True)
    assert long.train.recipe == "scratch" and long.data.mixup == 0.8 and long.data.cutmix == 1.0
    assert long.model.global_pool == "token"  # small-data choices only for small data
    small = load_config(overrides=["train.epochs=120", "data.img_size=32", "model.embed_dim=128", "model.num_heads=4"])
    recipe = apply_recipe(small, n_train=6_400, quiet=True)
    assert recipe.why.endswith("120 epochs: medium augmentation: RandAugment at magnitude 6, erasing 0.25, no mixup "
                               "(width 128: narrower than 192, too small for the full DeiT set)")
    assert small.data.mixup == 0.0 and small.data.cutmix == 0.0 and small.data.randaugment.startswith("rand-m6")
    assert small.data.reprob == 0.25
    tiny = load_config(overrides=["train.epochs=100", "data.img_size=32", "model.embed_dim=96", "model.num_heads=3"])
    assert "light augmentation (width 96: narrower than 128, too small for RandAugment)" in apply_recipe(
        tiny, n_train=480, quiet=True).why and tiny.data.randaugment == ""
    glyphs = load_config(overrides=["train.epochs=70", "data.img_size=28", "model.name=vit-tiny/4",
                                    "model.embed_dim=96"])
    assert "70 epochs: light augmentation (images of 28 px: under 32, too small for RandAugment)" in apply_recipe(
        glyphs, n_train=3_200, quiet=True).why  # light augmentation's values
    assert glyphs.data.randaugment == "" and glyphs.data.reprob == 0.1 and glyphs.data.mixup == 0.2


def test_helpers_pick_sensible_values():
    assert patch_size(224, 16) == 16 and patch_size(32, 16) == 4 and patch_size(16, 16) == 2 and patch_size(8, 16) == 2
    assert patch_size(32, at_most=2) == 2 and divisor_patch(30, patch_size(30)) == 2 and divisor_patch(28, 4) == 4
    assert 0.98 <= ema_decay_for(100) < ema_decay_for(10_000) < ema_decay_for(10**8) <= 0.9999


def test_freeze_epochs_with_torchrun_is_an_error():
    cfg = load_config(overrides=["train.freeze_epochs=1"])
    with pytest.raises(VitcliError, match="train.freeze_epochs"):
        apply_recipe(cfg, n_train=100, world=2, quiet=True)


def test_train_prints_recipe_and_records_it(shapes, tmp_path):
    res = run_cli("train", shapes, *TINY, "--epochs", "1", "--set", "data.mixup=0.0")
    assert res.exit_code == 0, res.output
    assert "recipe scratch-small: from scratch on 72 training images" in res.output
    assert "keeps your" in res.output and "data.mixup" in res.output
    saved = yaml.safe_load((tmp_path / "runs" / "train" / "config.yaml").read_text())
    assert saved["train"]["recipe"] == "scratch-small"
    assert saved["model"]["global_pool"] == "avg" and saved["model"]["name"] == "vit-tiny/8"


def test_frozen_backbone_warmup_trains_only_the_head_then_everything(tmp_path):
    from safetensors.torch import save_file

    from vitcli.checkpoint import load_checkpoint
    from vitcli.models import build_model

    data = make_dataset(tmp_path / "d", per_class=12)
    cfg = load_config(flags={"model.name": "vit-tiny/8", "data.img_size": 32},  # the TINY model
                      overrides=["model.embed_dim=32", "model.depth=2", "model.num_heads=2"])
    pretrained, _ = build_model(cfg.model, 3, 32)
    weights = tmp_path / "pre.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(weights))
    start = pretrained.state_dict()

    def run(name: str, epochs: int) -> dict:
        res = run_cli("train", data, *TINY, "--epochs", str(epochs), "--name", name,
                      "--set", f"model.pretrained_file={weights}", "--set", "train.freeze_epochs=1",
                      "--set", "optim.lr=1e-2", "--set", "optim.warmup_epochs=0")
        assert res.exit_code == 0, res.output
        assert "recipe finetune" in res.output
        return load_checkpoint(tmp_path / "runs" / name / "last.pt")["model"]

    frozen = run("frozen", 1)
    assert all(torch.equal(frozen[k], start[k]) for k in start if not k.startswith("head."))
    assert not torch.equal(frozen["head.weight"], start["head.weight"])
    thawed = run("thawed", 2)
    assert not torch.equal(thawed["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_finetuning_related_pretrained_weights_beats_training_from_scratch(tmp_path):
    """timm ViT pretrained (here) on 4 colour classes; then 3 colour classes from 5 images each, same steps."""
    from safetensors.torch import save_file

    from vitcli.checkpoint import load_checkpoint

    common = ["--model", "timm/test_vit", "--img-size", "32", "--device", "cpu", "--set", "data.crop_pct=1.0",
              "--set", "train.precision=fp32", "--set", "data.scale_min=0.5"]
    pre = make_dataset(tmp_path / "pre", classes=("red", "green", "blue", "yellow"), per_class=30, seed=1)
    res = run_cli("train", pre, *common, "--epochs", "6", "--batch-size", "16", "--name", "pre")
    assert res.exit_code == 0, res.output
    weights = tmp_path / "pre.safetensors"
    save_file({k: v.contiguous() for k, v in load_checkpoint(tmp_path / "runs" / "pre" / "best.pt")["model"].items()},
              str(weights))
    new = tmp_path / "new"
    make_dataset(new / "train", per_class=5, seed=2)
    make_dataset(new / "val", per_class=20, seed=3)
    acc = {}
    for name, extra in (("finetune", ["--set", f"model.pretrained_file={weights}"]), ("scratch", [])):
        res = run_cli("train", new, *common, *extra, "--epochs", "2", "--batch-size", "5", "--name", name)
        assert res.exit_code == 0, res.output
        assert f"recipe {'finetune' if extra else 'scratch-small'}" in res.output
        acc[name] = float(res.output.split("last epoch")[1].split("val acc")[1].split(",")[0])
    print(f"same 6 steps: fine-tuned {acc['finetune']:.3f}, from scratch {acc['scratch']:.3f}")
    assert acc["finetune"] >= acc["scratch"] + 0.2, acc
