"""Class-specific explanations against a hand computation (finite differences + numpy), faithfulness curves,
and the inspect commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from test_attention import TINY_TIMM, trained_quadrant_vit
from test_predict import fitted_checkpoint
from vitcli.explain import auc, curves, explain, faithfulness, gradients, ranking
from vitcli.vit import VisionTransformer

EPS = 1e-6


def tiny64() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3).double().eval()


def fd_grad(model, x, targets, module, shape) -> np.ndarray:
    """d logit_target / d (output of `module`) by central differences: a hook adds +-EPS to one entry."""
    grads = np.zeros((len(x), *shape))
    for idx in np.ndindex(*shape):
        vals = []
        for sign in (1, -1):
            def bump(_m, _i, out, idx=idx, sign=sign):
                out = out.clone()
                out[(slice(None), *idx)] += sign * EPS
                return out

            h = module.register_forward_hook(bump)
            with torch.no_grad():
                vals.append(model(x).gather(1, targets[:, None])[:, 0].numpy())
            h.remove()
        grads[(slice(None), *idx)] = (vals[0] - vals[1]) / (2 * EPS)
    return grads


def test_gradient_maps_match_a_hand_computation_on_a_tiny_vit():
    model = tiny64()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 2])
    T, D = 5, 8  # class token + 2x2 patches, width 8
    with torch.no_grad():
        atts = []
        hooks = [b.attn.attn_probs.register_forward_hook(lambda _m, _i, o: atts.append(o.numpy()))
                 for b in model.blocks]
        toks = []
        hooks.append(model.blocks[-1].norm1.register_forward_hook(lambda _m, _i, o: toks.append(o.numpy())))
        model(x)
        for h in hooks:
            h.remove()
    ga = [fd_grad(model, x, targets, b.attn.attn_probs, (2, T, T)) for b in model.blocks]  # (B, H, T, T)
    gt = fd_grad(model, x, targets, model.blocks[-1].norm1, (T, D))  # (B, T, D)

    got = gradients(model, x, targets)
    for a, d, ref in zip(got.attention_grads, got.attentions, ga, strict=True):
        assert np.allclose(a.numpy(), ref, atol=1e-6)
        assert d.shape == (2, 2, T, T)
    assert np.allclose(got.token_grads.numpy(), gt, atol=1e-6)

    bars = [np.clip(a * d, 0, None).mean(1) for a, d in zip(atts, ga, strict=True)]  # (B, T, T) per block
    eye = np.eye(T)
    roll, rel = None, np.broadcast_to(eye, (2, T, T))
    for bar in bars:
        m = bar + eye
        m = m / m.sum(-1, keepdims=True)
        roll = m if roll is None else m @ roll
        rel = rel + bar @ rel
    w = gt[:, 1:].mean(1)  # (B, D)
    cam = np.clip((toks[0][:, 1:] * w[:, None]).sum(-1), 0, None)  # (B, 4)
    hand = {"grad-rollout": roll[:, 0, 1:], "chefer": rel[:, 0, 1:], "gradcam": cam}
    for method, ref in hand.items():
        maps, _, t = explain(model, x, method, targets)
        assert t.tolist() == [0, 2]
        ref = ref / ref.sum(-1, keepdims=True)
        assert np.allclose(maps.reshape(2, 4).numpy(), ref, atol=1e-5), method
    assert model.blocks[0].attn.fused_attn is False  # what the test set is left as it was


def test_class_specific_maps_differ_between_classes_and_rollout_does_not():
    model = tiny64()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for method in ("grad-rollout", "gradcam", "chefer"):
        m0, _, _ = explain(model, x, method, torch.tensor([0]))
        m1, _, _ = explain(model, x, method, torch.tensor([1]))
        assert (m0 - m1).abs().max() > 1e-3, method
    r0, _, _ = explain(model, x, "rollout", torch.tensor([0]))
    r1, _, _ = explain(model, x, "rollout", torch.tensor([1]))
    assert torch.equal(r0, r1)
    assert model.blocks[0].attn.fused_attn is True  # the fused path is restored after capture


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "vit_tiny_patch16_224"])
def test_gradient_maps_work_for_timm_vits_with_extra_prefix_tokens(name):
    import timm

    kw = dict(TINY_TIMM) | ({"reg_tokens": 2} if name.startswith("vit_") else {})
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    for method in ("grad-rollout", "gradcam", "chefer"):
        maps, logits, t = explain(model, x, method)
        assert maps.shape == (2, 4, 4) and torch.allclose(maps.sum((1, 2)), torch.ones(2), atol=1e-5)
        assert torch.equal(t, logits.argmax(1))
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)  # the original forward is back


class Patch0(torch.nn.Module):
    """Logits [sum of patch 0 of channel 0, 0] on a 2x2 grid of 2 px patches: only patch 0 matters."""

    def forward(self, x):
        s = x[:, 0, :2, :2].sum((1, 2))  # (B,)
        return torch.stack([s, torch.zeros_like(s)], dim=1)  # (B, 2)


def test_deletion_and_insertion_curves_move_patches_in_the_given_order():
    x = torch.full((1, 3, 4, 4), 5.0)  # patch 0 sums to 20: p(class 0) ~ 1 while it is there
    first, last = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[1, 2, 3, 0]])
    d, i = curves(Patch0(), x, first, torch.tensor([0]), (2, 2), steps=4)
    assert d[0].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.5])
    assert i[0].tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    d2, i2 = curves(Patch0(), x, last, torch.tensor([0]), (2, 2), steps=4)
    assert d2[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])
    assert auc(d) == pytest.approx((0.75 + 0.5 * 3) / 4) and auc(d) < auc(d2)  # trapezoids, dx = 1/4
    # a flat map is ranked in a seeded random order, not top-left first
    orders = {tuple(ranking(torch.zeros(1, 4, 4), seed=s)[0].tolist()) for s in range(5)}
    assert len(orders) > 1


def test_class_specific_maps_beat_a_random_order_on_the_quadrant_task():
    model, x_val, y_val = trained_quadrant_vit()
    res = faithfulness(model, [x_val[:64], x_val[64:128]], ["rollout", "grad-rollout", "gradcam", "chefer"],
                       steps=16)
    m = res["methods"]
    print("\n" + ", ".join(f"{k}: del {v['deletion_auc']:.3f} ins {v['insertion_auc']:.3f}" for k, v in m.items()))
    assert res["images"] == 128
    for method in ("grad-rollout", "gradcam", "chefer"):
        assert m[method]["deletion_auc"] < m["random"]["deletion_auc"], method
    assert m["grad-rollout"]["insertion_auc"] > m["random"]["insertion_auc"]


def test_inspect_attention_class_and_faithfulness_commands(tmp_path, tmp_path_factory):
    run = fitted_checkpoint(tmp_path_factory)
    image = next((run.parent.parent / "data" / "red").iterdir())
    out = tmp_path / "o"
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "gradcam", "--class", "blue",
                  "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (out / f"{image.stem}_gradcam_blue.png").is_file()
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "chefer", "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert len(list(out.glob(f"{image.stem}_chefer_*.png"))) == 1  # the predicted class
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "gradcam", "--class", "purple")
    assert res.exit_code == 1 and "--class 'purple' is not a class" in res.output and "Traceback" not in res.output
    res = run_cli("inspect", "attention", image, "--model", run, "--method", "rollout", "--class", "red")
    assert res.exit_code == 1 and "--class explains one class" in res.output

    res = run_cli("inspect", "faithfulness", image.parent, "--model", run, "--max-images", "4", "--steps", "4",
                  "--json-out", tmp_path / "f.json", "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["images"] == 4 and set(data["methods"]) == {"rollout", "grad-rollout", "gradcam", "chefer", "random"}
    assert all(0 <= v["deletion_auc"] <= 1 and len(v["insertion_curve"]) == 5 for v in data["methods"].values())
    assert (out / "faithfulness.png").is_file() and "random" in res.output
    res = run_cli("inspect", "faithfulness", image.parent, "--model", run, "--method", "gradcam,lime")
    assert res.exit_code == 1 and "--method 'gradcam,lime'" in res.output
    res = run_cli("inspect", "faithfulness", image.parent, "--model", run, "--baseline", "zero")
    assert res.exit_code == 1 and "--baseline 'zero'" in res.output and "blur" in res.output


def test_baselines_blur_keep_a_flat_image_and_noise_is_seeded():
    from vitcli.explain import baseline_image

    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(baseline_image(flat, "blur", (4, 4)), flat)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = baseline_image(x, "blur", (4, 4))
    assert blurred.std() < 0.5 * x.std()  # fine detail is gone
    assert torch.equal(baseline_image(x, "noise", (4, 4), seed=3), baseline_image(x, "noise", (4, 4), seed=3))
    assert torch.equal(baseline_image(x, "mean", (4, 4)), torch.zeros_like(x))
