"""The from-scratch ViT: timm-identical parameter names and logits, fused vs explicit attention, shapes."""

import pytest
import timm
import torch

from vitcli.vit import VisionTransformer


def timm_pair(global_pool: str = "token", **kw):
    kwargs = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=3,
                  global_pool=global_pool, **kw)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    ours = VisionTransformer(**kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("fused", [True, False])
def test_timm_weights_load_strictly_and_give_same_logits(global_pool, fused):
    torch.manual_seed(0)
    ref, ours = timm_pair(global_pool)
    for blk in ours.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-5


def test_parameter_names_match_timm():
    ref, ours = timm_pair()
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(1)
    m = VisionTransformer(img_size=32, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = m(x)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        explicit = m(x)
    assert (fused - explicit).abs().max().item() <= 1e-5


def test_attention_probabilities_are_hookable_on_explicit_path():
    m = VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    seen = []
    m.blocks[0].attn.attn_probs.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        m(torch.randn(2, 3, 16, 16))
    (probs,) = seen
    assert probs.shape == (2, 2, 17, 17)  # (B, heads, 1 + 16 patches, same)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 17))


def test_other_resolution_interpolates_positions_and_non_square_works():
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 48, 64)).shape == (1, 3)


def test_invalid_shapes_fail_with_a_sentence():
    with pytest.raises(ValueError, match="divisible by patch size"):
        VisionTransformer(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=30, num_heads=4)


def test_sincos_position_embedding_is_fixed():
    m = VisionTransformer(img_size=16, patch_size=4, num_classes=2, embed_dim=32, depth=1, num_heads=2,
                          pos_embed="sincos")
    assert not m.pos_embed.requires_grad
    # neighbouring patches are more alike than distant ones
    pe = m.pos_embed[0, 1:]
    sim = torch.nn.functional.cosine_similarity(pe[0:1], pe, dim=-1)
    assert sim[1] > sim[15]


def test_pos_conv_adds_a_depthwise_conv_of_the_token_grid_after_the_first_block():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2,
                          pos_conv=True).eval()
    x = torch.randn(2, 3, 16, 24)  # a 4x6 grid: not the square it was built for
    with torch.no_grad():
        # reference: the same layers called one by one, the conv written as unfold + per-channel weights
        t = m.blocks[0](m._pos_embed(m.patch_embed(x), (4, 6)))  # (2, 1 + 24, 32)
        grid = t[:, 1:].transpose(1, 2).reshape(2, 32, 4, 6)
        cols = torch.nn.functional.unfold(grid, 3, padding=1).reshape(2, 32, 9, 24)  # (B, D, 3*3, N)
        conv = (cols * m.pos_conv.weight.reshape(1, 32, 9, 1)).sum(2) + m.pos_conv.bias.reshape(1, 32, 1)
        t = torch.cat([t[:, :1], t[:, 1:] + conv.transpose(1, 2)], dim=1)
        ref = m.head(m.norm(m.blocks[1](t))[:, 0])
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    plain = VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2)
    assert not any(n.startswith("pos_conv") for n, _ in plain.named_parameters())
    one_block = VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2,
                                  pos_conv=True).eval()
    assert one_block(x).shape == (2, 3)  # the conv after the only block, then the head
