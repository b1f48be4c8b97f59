"""The convolutional stem (`model.stem: conv`): token grid from its stride; it trains, saves, exports and inspects
like the patch stem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_cli, trained_run
from vitcli.config import load_config
from vitcli.errors import VitcliError
from vitcli.vit import ConvStem, VisionTransformer


def test_conv_stem_gives_the_same_tokens_as_a_patch_embedding_of_its_stride():
    for patch, layers in ((2, 3), (4, 3), (16, 4)):
        stem = ConvStem(patch_size=patch, in_chans=3, embed_dim=32)
        assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in stem.modules()) == layers
        assert stem(torch.randn(2, 3, 32, 32)).shape == (2, (32 // patch) ** 2, 32)  # (B, N, D)
    m = VisionTransformer(img_size=32, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2,
                          stem="conv").eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 48, 64)).shape == (1, 3)  # other resolutions: positions interpolated
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(patch_size=14, in_chans=3, embed_dim=32)


def test_conv_stem_with_a_patch_that_is_no_power_of_two_is_a_config_error():
    with pytest.raises(VitcliError, match="'model.stem' conv needs a power-of-two patch size"):
        load_config(flags={"model.name": "vit-tiny/14"}, overrides=["model.stem=conv"])
    with pytest.raises(VitcliError, match="model.stem"):
        load_config(overrides=["model.stem=cnn"])
    with pytest.raises(VitcliError, match="'model.pos_conv' is for vitcli's own ViT"):
        load_config(flags={"model.name": "timm/resnet18"}, overrides=["model.pos_conv=true"])


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory) -> tuple[Path, Path]:
    return trained_run(tmp_path_factory.mktemp("conv"), "--epochs", "2", "--set", "model.stem=conv", per_class=10)


def test_conv_stem_trains_and_saves_a_self_describing_checkpoint(conv_run):
    from vitcli.checkpoint import load_model, safe_torch_load

    run, _ = conv_run
    ckpt = safe_torch_load(run / "best.pt")
    assert ckpt["model_spec"]["kwargs"]["stem"] == "conv"
    assert ckpt["model_spec"]["kwargs"]["pos_conv"]  # the small-data recipe's position conv, exported below too
    assert any(k.startswith("patch_embed.convs.") for k in ckpt["model"])  # BatchNorm statistics too
    model, _, _ = load_model(run)
    assert isinstance(model.patch_embed, ConvStem)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_conv_stem_exports_to_onnx_and_torchscript(conv_run, tmp_path):
    import onnxruntime as ort

    from vitcli.checkpoint import load_model

    run, _ = conv_run
    model, _, _ = load_model(run)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    assert run_cli("export", "-m", run, "-f", "onnx", "-o", "m.onnx").exit_code == 0
    got = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert abs(got - ref.numpy()).max() <= 1e-4
    assert run_cli("export", "-m", run, "-f", "torchscript", "-o", "m.pt").exit_code == 0
    with torch.inference_mode():
        assert (torch.jit.load("m.pt")(x) - ref).abs().max() <= 1e-4


def test_every_inspect_view_works_with_the_conv_stem(conv_run, tmp_path):
    run, data = conv_run
    image = next((data / "red").iterdir())
    res = run_cli("inspect", "model", "--model", run)
    assert res.exit_code == 0, res.output
    assert "patch 8x8, grid 4x4, tokens 17" in res.output  # the stem's stride sets the token grid
    for args in (("attention", image, "--method", "rollout"), ("attention", image, "--layer", "all"),
                 ("posembed",), ("distance", data, "--max-images", "4"), ("filters", "--components", "4")):
        res = run_cli("inspect", *args, "--model", run, "-o", tmp_path / args[0])
        assert res.exit_code == 0, (args, res.output)
        assert list((tmp_path / args[0]).glob("*.png")), args
