"""Pretrained weights: `model.pretrained: auto` and the weights' own data config (mean, std, size, crop).

Every test runs offline (conftest sets HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE in tmp_path); the "cached"
tests build a local Hugging Face cache holding timm's `test_vit.r160_in1k`, whose pretrained_cfg says mean and
std 0.5, 160 px, crop 0.95, bicubic: values that differ from vitcli's ImageNet defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from vitcli.config import load_config
from vitcli.defaults import DataFacts, finetune_facts
from vitcli.pretrained import DEFAULT_MODEL, Facts, apply_pretrained, finetune_budget, model_data_config

REPO = "timm/test_vit.r160_in1k"  # timm's pretrained tag of test_vit (64 wide, 6 blocks)
FAST = ["--device", "cpu", "--batch-size", "16", "--epochs", "1", "--set", "train.precision=fp32",
        "--set", "train.report=false", "--set", "train.calibrate=false", "--set", "data.scale_min=0.5"]


def hf_cache_with_test_vit() -> dict[str, torch.Tensor]:
    """Put test_vit weights into the Hugging Face cache the environment names, laid out as a download leaves
    them (refs/main -> snapshots/<commit>/model.safetensors); returns the weights."""
    import timm
    from safetensors.torch import save_file

    repo_dir = Path(os.environ["HF_HUB_CACHE"]) / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in timm.create_model("test_vit", pretrained=False).state_dict().items()}
    save_file(state, str(repo_dir / "snapshots" / commit / "model.safetensors"))
    return state


def scan(cfg, n_train: int = 500, side: int = 256, device: str = "cpu") -> dict:
    """What the data-aware defaults tell `model.pretrained: auto` about n_train images of side x side px."""
    return finetune_facts(cfg, DataFacts(n_train=n_train, sizes=[(side, side)] * 8, device_type=device))


def facts(cfg, n_train: int = 500, side: int = 256, device: str = "cpu") -> Facts:
    return Facts(n_train, **scan(cfg, n_train, side, device))


def test_auto_without_weights_trains_from_scratch_and_says_so_in_one_line():
    cfg = load_config()
    lines = apply_pretrained(cfg, 500, **scan(cfg), quiet=True)
    assert cfg.model.pretrained == "false" and cfg.model.name == "vit-tiny/16"
    assert len(lines) == 1 and "from scratch" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert DEFAULT_MODEL in lines[0]


def test_auto_with_a_named_timm_model_and_no_weights_trains_it_from_scratch(shapes):
    res = run_cli("train", shapes, "--model", "timm/test_vit", "--img-size", "32", *FAST)
    assert res.exit_code == 0, res.output
    said = [line for line in res.output.splitlines() if "pretrained" in line and "auto" in line]
    assert len(said) == 1 and "from scratch" in said[0] and "HF_HUB_OFFLINE" in said[0], res.output
    ckpt = torch.load(next(Path("runs").glob("*/best.pt")), weights_only=True)
    assert ckpt["config"]["model"]["pretrained"] == "false"
    assert ckpt["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # no weights: the defaults


def test_auto_with_cached_weights_fine_tunes_and_predicts_with_the_weights_mean_and_std(tmp_path, shapes):
    """A timm model whose weights use mean/std 0.5 trains and predicts with mean 0.5: the checkpoint's
    preprocessing records it, and predict's probabilities are the model's on (x - 0.5) / 0.5."""
    from vitcli.data import decode_square
    from vitcli.models import model_from_spec

    cached = hf_cache_with_test_vit()
    res = run_cli("train", shapes, "--model", "timm/test_vit", "--img-size", "32", *FAST)
    assert res.exit_code == 0, res.output
    assert "fine-tuning timm/test_vit" in res.output and f"{REPO} is in the local Hugging Face cache" in res.output
    assert "recipe finetune" in res.output
    ckpt = torch.load(next(Path("runs").glob("*/best.pt")), weights_only=True)
    pre = ckpt["preprocess"]
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3  # the weights', not ImageNet's
    assert pre["crop_pct"] == 0.95 and pre["resize_size"] == 33 and pre["interpolation"] == "bicubic"
    assert pre["img_size"] == 32  # the user's --img-size wins over the weights' 160
    assert ckpt["config"]["model"]["pretrained"] == "true"
    # the run started from the cached weights: the blocks moved little in one epoch at the fine-tuning lr
    start = cached["blocks.5.mlp.fc2.weight"]
    assert (ckpt["model"]["blocks.5.mlp.fc2.weight"] - start).abs().mean() < 0.1 * start.abs().mean()

    image = sorted(shapes.rglob("*.png"))[0]
    res = run_cli("predict", image, "--model", next(Path("runs").glob("*/best.pt")), "--format", "json",
                  "--output", "p.json", "--precision", "fp32", "--top-k", "3")
    assert res.exit_code == 0, res.output
    got = {t["class"]: t["prob"] for t in json.loads(Path("p.json").read_text())[0]["top"]}
    model = model_from_spec(ckpt["model_spec"]).eval()
    model.load_state_dict(ckpt["model"])
    x = decode_square(image, 33, "bicubic")[None, :, :32, :32].float() / 255  # (1, 3, 32, 32); crop 33 -> 32

    def probs(mean, std):  # the model trained on small mirrored crops: predict averages the logits of the image
        # and its mirror, each also shifted 2 px four ways (edges reflected)
        assert pre["mirror"] is True and pre["shift"] == 2
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        views = []
        for v in ((x - m) / s, (x.flip(-1) - m) / s):
            padded = torch.nn.functional.pad(v, (2, 2, 2, 2), mode="reflect")
            shifts = ((2, 0), (-2, 0), (0, 2), (0, -2))
            views += [v] + [padded[..., 2 - dy:34 - dy, 2 - dx:34 - dx] for dx, dy in shifts]
        with torch.no_grad():
            z = sum(model(v) for v in views) / len(views)  # (1, C)
            return dict(zip(ckpt["classes"], z.softmax(-1)[0].tolist(), strict=True))

    want, imagenet = probs([0.5] * 3, [0.5] * 3), probs([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert got == pytest.approx(want, abs=1e-5)
    assert max(abs(want[c] - imagenet[c]) for c in want) > 1e-4  # the check can tell the two apart
    # an export carries the same preprocessing, and predicting with it applies it
    res = run_cli("export", "-m", next(Path("runs").glob("*/best.pt")), "-f", "torchscript", "-o", "m.pt")
    assert res.exit_code == 0, res.output
    assert json.loads(Path("m.pt.json").read_text())["preprocess"] == pre
    res = run_cli("predict", image, "--model", "m.pt", "--format", "json", "--output", "e.json", "--top-k", "3")
    assert res.exit_code == 0, res.output
    exported = {t["class"]: t["prob"] for t in json.loads(Path("e.json").read_text())[0]["top"]}
    assert exported == pytest.approx(want, abs=1e-4)


def test_the_users_data_keys_win_over_the_weights():
    hf_cache_with_test_vit()
    cfg = load_config(overrides=["model.name=timm/test_vit", "model.pretrained=true", "data.mean=[0.1,0.2,0.3]",
                                 "data.interpolation=bilinear"])
    lines = apply_pretrained(cfg, 500, quiet=True)
    assert cfg.data.mean == [0.1, 0.2, 0.3] and cfg.data.interpolation == "bilinear"
    assert cfg.data.std == [0.5] * 3 and cfg.data.img_size == 160 and cfg.data.crop_pct == 0.95
    assert len(lines) == 1 and "std=0.5,0.5,0.5" in lines[0] and "mean" not in lines[0]


def test_a_local_weights_file_with_a_timm_config_json_brings_its_data_config(tmp_path):
    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    cfg = load_config(overrides=["model.name=timm/test_vit", f"model.pretrained_file={weights}"])
    assert model_data_config(cfg) == {}  # a bare file says nothing about its data: the config's keys stand
    (weights.parent / "config.json").write_text(json.dumps({"architecture": "test_vit", "pretrained_cfg": {
        "input_size": [3, 96, 96], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 1.0,
        "interpolation": "bilinear"}}))
    assert model_data_config(cfg) == {"data.img_size": 96, "data.crop_pct": 1.0, "data.mean": [0.5] * 3,
                                      "data.std": [0.25] * 3, "data.interpolation": "bilinear"}


def test_small_images_are_upsampled_only_as_far_as_the_cpu_budget_allows():
    """ViT-Ti/16 on 32 px photos: the weights' 224 px for a few images; for 8,000 on a CPU a smaller input (the
    position embeddings are resampled to it), larger again for a longer --time; never below the images' size."""
    cfg = load_config()
    few, _ = finetune_budget(cfg, facts(cfg, n_train=20, side=32), DEFAULT_MODEL)
    assert few == {"train.epochs": 5}
    many, why = finetune_budget(cfg, facts(cfg, n_train=8000, side=32), DEFAULT_MODEL)
    assert 32 <= many["data.img_size"] < 224 and many["data.img_size"] % 16 == 0, many
    assert "rather than the weights' 224" in why
    longer = load_config(overrides=["train.time=10m"])
    more, _ = finetune_budget(longer, facts(longer, n_train=8000, side=32), DEFAULT_MODEL)
    assert many["data.img_size"] < more["data.img_size"] < 224
    huge, _ = finetune_budget(cfg, facts(cfg, n_train=10**7, side=32), DEFAULT_MODEL)
    assert huge["data.img_size"] == 32  # nothing fits: the images' own size, not smaller
    gpu, _ = finetune_budget(cfg, facts(cfg, n_train=8000, side=32, device="cuda"), DEFAULT_MODEL)
    assert gpu == {"train.epochs": 5}
    mine = load_config(overrides=["data.img_size=48", "train.epochs=3"])
    assert finetune_budget(mine, facts(mine, n_train=8000, side=32), DEFAULT_MODEL) == ({}, "")


def test_auto_picks_the_default_pretrained_vit_for_photos_only_when_cached():
    import timm
    from safetensors.torch import save_file

    cfg = load_config()
    apply_pretrained(cfg, 500, **scan(cfg, side=24), quiet=True)  # not photos (defaults.py's rule: small)
    assert cfg.model.pretrained == "false" and cfg.model.name == "vit-tiny/16"
    repo = timm.models.get_pretrained_cfg(DEFAULT_MODEL).hf_hub_id
    snap = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    save_file({"x": torch.zeros(1)}, str(snap / "model.safetensors"))  # found in the cache; never loaded here
    cfg = load_config()
    lines = apply_pretrained(cfg, 2000, **scan(cfg, n_train=2000, side=160), quiet=True)
    assert cfg.model.name == f"timm/{DEFAULT_MODEL}" and cfg.model.pretrained == "true", lines
    assert cfg.data.mean == [0.5] * 3 and cfg.train.epochs == 5
    assert cfg.data.img_size < 224 and "fine-tuning" in lines[0] and "rather than the weights' 224" in lines[0]
