"""Precision and attention-path choice, and the cheaper augmentation resampling that must not change results."""

from __future__ import annotations

import pytest

from conftest import TINY, run_cli


def scratch_vit(dim: int, depth: int, heads: int, img: int, patch: int, classes: int = 3):
    from vitcli.config import load_config
    from vitcli.models import build_model

    cfg = load_config(None, [f"model.name=vit-tiny/{patch}", f"model.embed_dim={dim}", f"model.depth={depth}",
                             f"model.num_heads={heads}", f"data.img_size={img}"])
    return build_model(cfg.model, classes, img)[0]


def test_separable_crop_grid_equals_affine_grid():
    import torch
    import torch.nn.functional as F

    from vitcli.data import crop_grid

    g = torch.Generator().manual_seed(0)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = torch.rand(6, generator=g) * torch.tensor([1.0, -1, 1, -1, 1, -1])  # width, some flipped
    theta[:, 1, 1] = torch.rand(6, generator=g)
    theta[:, :, 2] = torch.rand(6, 2, generator=g) - 0.5
    want = F.affine_grid(theta, [6, 3, 20, 20], align_corners=False)
    assert torch.allclose(crop_grid(theta, 20, "cpu"), want, atol=1e-6)
    theta[:, 0, 1] = 0.3  # a rotated window takes the general path
    assert torch.allclose(crop_grid(theta, 20, "cpu"), F.affine_grid(theta, [6, 3, 20, 20], align_corners=False))


@pytest.mark.parametrize("padding", ["reflection", "border"])
def test_normalising_after_bilinear_resampling_equals_normalising_before(padding):
    import torch
    import torch.nn.functional as F

    from vitcli.data import normalize, normalize_

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 24, 24), generator=g, dtype=torch.uint8)
    grid = torch.rand(4, 16, 16, 2, generator=g) * 2.4 - 1.2  # partly outside the image
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    before = F.grid_sample(normalize(x, mean, std), grid, padding_mode=padding, align_corners=False)
    after = normalize_(F.grid_sample(x.float(), grid, padding_mode=padding, align_corners=False), mean, std)
    assert torch.allclose(before, after, atol=1e-5)


def test_linear_macs_count_every_linear_layer_of_a_vit():
    from vitcli.device import linear_macs_per_image

    model = scratch_vit(32, 2, 2, 32, 8)
    tokens, dim = (32 // 8) ** 2 + 1, 32
    per_block = tokens * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)  # qkv, proj, fc1, fc2
    assert linear_macs_per_image(model, 32) == 2 * per_block + dim * 3  # + the head on the class token
    assert model.training  # the counting pass leaves the mode as it was


def test_auto_precision_keeps_fp32_for_tiny_models_and_bf16_for_real_ones():
    import torch

    from vitcli.device import refine_auto_precision

    cpu = torch.device("cpu")
    tiny = refine_auto_precision("bf16", "fast CPU", scratch_vit(32, 2, 2, 32, 8), cpu, 32, 16)
    assert tiny[0] == "fp32" and "too little work" in tiny[1]
    small = refine_auto_precision("bf16", "fast CPU", scratch_vit(192, 6, 3, 32, 4), cpu, 32, 64)
    assert small == ("bf16", "fast CPU")
    assert refine_auto_precision("fp32", "no bf16", scratch_vit(32, 2, 2, 32, 8), cpu, 32, 16) == ("fp32", "no bf16")


def test_bf16_on_cpu_trains_with_the_explicit_attention_path_in_both_backends():
    import timm
    import torch

    from vitcli.device import pick_attention, set_fused_attention

    cpu = torch.device("cpu")
    assert pick_attention(cpu, "bf16")[0] is False
    assert pick_attention(cpu, "fp32")[0] is True
    assert pick_attention(torch.device("cuda", 0), "bf16")[0] is True
    ours = scratch_vit(32, 2, 2, 32, 8)
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    for model in (ours, theirs):
        assert set_fused_attention(model, False) == 2
        assert not any(getattr(m, "fused_attn", False) for m in model.modules())


def test_train_prints_the_precision_it_picked_and_why(shapes):
    from vitcli.device import cpu_has_fast_bf16

    res = run_cli("train", shapes, *TINY, "--epochs", "1", "--set", "train.precision=auto")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("device cpu, precision"))
    if cpu_has_fast_bf16():
        assert "precision fp32 (auto:" in line and "too little work for bf16" in line
    else:
        assert "precision fp32 (no fast half precision on cpu)" in line

