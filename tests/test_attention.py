"""Attention capture, rollout and attention distance on the scratch ViT and timm ViT-family models."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcli.attention import (
    capture_attention,
    explicit_attention,
    mean_attention_distance,
    rollout,
    rollout_map,
)
from vitcli.vit import VisionTransformer

TINY_TIMM = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def scratch(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3) | kw
    return VisionTransformer(**args).eval()


def timm_model(name, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, **(TINY_TIMM | kw)).eval()


MODELS = {
    "scratch": lambda: scratch(),
    "timm-vit": lambda: timm_model("vit_tiny_patch16_224"),
    "timm-deit-distilled": lambda: timm_model("deit_tiny_distilled_patch16_224"),
    "timm-registers": lambda: timm_model("vit_small_patch14_reg4_dinov2"),
    "timm-avg-pool-qk-norm": lambda: timm_model("vit_tiny_patch16_224", global_pool="avg", qk_norm=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_captured_attention_equals_independent_softmax(name):
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    inputs = []  # what each attention module receives on the normal (fused) forward
    hooks = [blk.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    cap = capture_attention(model, x)
    assert len(cap.attentions) == len(model.blocks) == 2
    for blk, inp, got in zip(model.blocks, inputs, cap.attentions, strict=True):
        a = blk.attn
        B, T, D = inp.shape
        qkv = inp @ a.qkv.weight.T + (a.qkv.bias if a.qkv.bias is not None else 0)  # (B, T, 3D)
        q, k, _ = qkv.reshape(B, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (B, heads, T, hd)
        q, k = a.q_norm(q) if hasattr(a, "q_norm") else q, a.k_norm(k) if hasattr(a, "k_norm") else k
        want = torch.softmax(q @ k.transpose(-2, -1) / a.head_dim**0.5, dim=-1)  # (B, heads, T, T)
        assert got.shape == (2, 2, cap.num_prefix + 16, cap.num_prefix + 16)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_and_explicit_paths_give_same_logits_and_fused_is_restored(name):
    model = MODELS[name]()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    cap = capture_attention(model, x)
    assert (cap.logits - fused).abs().max() <= 1e-5
    for blk in model.blocks:  # back on the fused path, with the class's own forward
        assert blk.attn.fused_attn is True
        assert "forward" not in blk.attn.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), fused)


def test_prefix_tokens_and_source_rows_follow_the_model():
    assert capture_attention(MODELS["scratch"](), torch.randn(1, 3, 32, 32)).num_prefix == 1
    deit = capture_attention(MODELS["timm-deit-distilled"](), torch.randn(1, 3, 32, 32))
    assert (deit.num_prefix, deit.source) == (2, [0, 1])
    reg = capture_attention(MODELS["timm-registers"](), torch.randn(1, 3, 32, 32))
    assert (reg.num_prefix, reg.source) == (5, [0])
    avg = capture_attention(MODELS["timm-avg-pool-qk-norm"](), torch.randn(1, 3, 32, 32))
    assert avg.source is None
    assert rollout_map(reg).shape == (1, 4, 4)


def test_capture_handles_non_square_and_resized_grids():
    cap = capture_attention(scratch(), torch.randn(2, 3, 32, 48))
    assert cap.grid == (4, 6)
    heat = rollout_map(cap)
    assert heat.shape == (2, 4, 6)
    torch.testing.assert_close(heat.sum(dim=(1, 2)), torch.ones(2))
    model = timm_model("deit_tiny_distilled_patch16_224", dynamic_img_size=True)
    cap = capture_attention(model, torch.randn(1, 3, 48, 24))
    assert (cap.grid, cap.attentions[0].shape[-1]) == ((6, 3), 2 + 18)


def test_attention_path_is_restored_when_the_forward_fails():
    model = scratch()
    with pytest.raises(ValueError, match="divisible"):
        capture_attention(model, torch.randn(1, 3, 30, 30))
    assert all(blk.attn.fused_attn for blk in model.blocks)
    timm_vit = MODELS["timm-vit"]()
    with pytest.raises(RuntimeError), explicit_attention(timm_vit):
        raise RuntimeError("boom")
    assert all("forward" not in blk.attn.__dict__ for blk in timm_vit.blocks)


def hand_rollout(atts: list[np.ndarray], fusion: str, discard: float, prefix: int) -> np.ndarray:
    """Rollout for one image written out with loops: atts[l] is (heads, T, T)."""
    T = atts[0].shape[-1]
    result = np.eye(T)
    for a in atts:
        fused = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion].copy()
        k = int((T - prefix) * discard)
        for r in range(T):
            cols = sorted(range(prefix, T), key=lambda c: fused[r, c])[:k]
            for c in cols:
                fused[r, c] = 0.0
        fused = fused + np.eye(T)
        for r in range(T):
            fused[r] /= fused[r].sum()
        result = fused @ result
    return result


@pytest.mark.parametrize(("fusion", "discard"), [("mean", 0.0), ("max", 0.5), ("min", 0.75)])
def test_rollout_equals_hand_computation_on_a_small_fixed_model(fusion, discard):
    model = scratch(img_size=16, embed_dim=16, depth=3)  # 2x2 patches + class token = 5 tokens
    cap = capture_attention(model, torch.randn(1, 3, 16, 16))
    got = rollout(cap.attentions, fusion=fusion, discard_ratio=discard, num_prefix=1)[0]
    want = hand_rollout([a[0].double().numpy() for a in cap.attentions], fusion, discard, 1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    heat = rollout_map(cap, fusion=fusion, discard_ratio=discard)[0]
    np.testing.assert_allclose(heat.flatten().numpy(), want[0, 1:] / want[0, 1:].sum(), atol=1e-6)


def test_rollout_of_uniform_attention_adds_half_identity():
    uniform = torch.full((1, 2, 3, 3), 1 / 3)  # one layer, two heads, three tokens
    got = rollout([uniform], num_prefix=1)[0]
    want = torch.full((3, 3), 1 / 6) + torch.eye(3) / 2  # (A + I) / 2
    torch.testing.assert_close(got, want)


def test_mean_attention_distance_measures_pixels_between_patch_centres():
    T = 1 + 4  # class token + 2x2 grid
    to_self = torch.eye(T)[None, None]  # (1, 1, T, T)
    assert mean_attention_distance(to_self, 1, (2, 2), (8, 8)).item() == 0.0
    swap = torch.zeros(1, 1, T, T)  # each patch looks at its horizontal neighbour: 8 px away
    for q, k in [(1, 2), (2, 1), (3, 4), (4, 3)]:
        swap[0, 0, q, k] = 0.5
        swap[0, 0, q, 0] = 0.5  # weight on the class token is left out
    assert mean_attention_distance(swap, 1, (2, 2), (8, 8)).item() == pytest.approx(8.0)


# ---------------------------------------------------------------------------- semantic check
COLOURS = torch.tensor([[220, 40, 40], [40, 180, 60], [40, 70, 220]], dtype=torch.float32) / 255


def quadrant_images(n: int, g: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with coloured squares; the class is the colour of the square in the top-left quadrant, the
    other quadrants hold squares of random colours (or none) that carry no information."""
    half = size // 2
    x = torch.rand(n, 3, size, size, generator=g) * 0.25
    y = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        for q in range(4):
            if q and torch.rand(1, generator=g).item() < 0.3:
                continue
            colour = y[i] if q == 0 else torch.randint(0, 3, (1,), generator=g).item()
            r = int(torch.randint(3, 6, (1,), generator=g))
            oy, ox = (q // 2) * half, (q % 2) * half
            cy = oy + int(torch.randint(r, half - r + 1, (1,), generator=g))
            cx = ox + int(torch.randint(r, half - r + 1, (1,), generator=g))
            x[i, :, cy - r:cy + r, cx - r:cx + r] = COLOURS[colour].view(3, 1, 1)
    return (x - 0.3) / 0.3, y


@functools.cache
def trained_quadrant_vit():
    """(model, x_val, y_val): a tiny ViT trained for 120 steps on 32 px quadrant images (a few seconds)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x_train, y_train = quadrant_images(600, g)
    x_val, y_val = quadrant_images(200, g)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                              pos_embed="sincos")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(120):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x_val, y_val


def test_rollout_mass_of_a_trained_vit_falls_in_the_quadrant_that_decides_the_class():
    model, x_val, y_val = trained_quadrant_vit()
    cap = capture_attention(model, x_val)
    correct = cap.logits.argmax(dim=1) == y_val
    assert correct.sum() >= 50, f"only {int(correct.sum())}/200 correct"
    heat = rollout_map(cap, fusion="mean", discard_ratio=0.9)  # the defaults of vitcli inspect attention
    mass = heat[correct, :2, :2].sum(dim=(1, 2)).mean().item()  # top-left 2x2 of the 4x4 patch grid
    print(f"\nquadrant check: val accuracy {correct.float().mean():.1%}, rollout mass in the deciding quadrant "
          f"{mass:.1%} (uniform would be 25%)")
    assert mass >= 0.6
