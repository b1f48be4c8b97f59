"""Speed choices (speed.py): `data.batch_size: auto`, `train.compile` with its fallback, the per-machine cache."""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY, make_dataset, run_cli
from vitcli.config import load_config
from vitcli.errors import VitcliError

NO_BATCH = [a for i, a in enumerate(TINY) if a != "--batch-size" and TINY[i - 1] != "--batch-size"]


def test_batch_size_auto_resolves_to_a_whole_batch_and_trains(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=8)  # 24 images, 19 of them for training
    res = run_cli("train", str(data), *NO_BATCH, "--epochs", "1", "--set", "data.batch_size=auto")
    assert res.exit_code == 0, res.output
    assert "data.batch_size=16: auto:" in res.output
    saved = yaml.safe_load((tmp_path / "runs" / "train" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 16


def test_batch_size_auto_fills_the_matrix_units_and_never_exceeds_the_images():
    from vitcli.defaults import auto_batch

    cfg = load_config(None, ["model.name=vit-tiny/4", "data.img_size=32", "train.epochs=30"])
    assert auto_batch(cfg, 50_000, "cpu").values["data.batch_size"] == 64  # 64 x 65 tokens >= 4096 rows
    cfg = load_config(None, ["model.name=vit-tiny/16", "data.img_size=224", "train.epochs=30"])
    assert auto_batch(cfg, 50_000, "cpu").values["data.batch_size"] == 32
    assert auto_batch(cfg, 5, "cpu").values["data.batch_size"] == 4
    with pytest.raises(VitcliError, match="'data.batch_size' must be int or auto"):
        load_config(None, ["data.batch_size=big"])


def test_compile_setting_reads_yaml_booleans_and_refuses_other_words():
    assert load_config(None, ["train.compile=true"]).train.compile == "on"
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
    with pytest.raises(VitcliError, match="train.compile"):
        load_config(None, ["train.compile=maybe"])


def test_compile_auto_pays_only_for_long_runs_and_uses_the_time_measured_here():
    import torch

    from vitcli.speed import COMPILE_COLD_S, decide_compile, remember

    cpu = torch.device("cpu")
    assert decide_compile("auto", cpu, 120.0, "sig")[0] is False  # a 2-minute run: the compile costs more
    on, why = decide_compile("auto", cpu, 20 * COMPILE_COLD_S, "sig")
    assert on and "a first compile here" in why
    remember("sig", 5.0)  # a warm inductor cache on this machine: compiling is cheap now
    on, why = decide_compile("auto", cpu, 120.0, "sig")
    assert on and "measured here before" in why
    assert decide_compile("off", cpu, 1e9, "sig")[0] is False
    assert decide_compile("auto", torch.device("mps"), 1e9, "sig")[0] is False


def test_speed_cache_is_per_machine_and_survives_a_broken_file(tmp_path, monkeypatch):
    from vitcli.speed import cache_path, cached, remember

    monkeypatch.setenv("VITCLI_CACHE_DIR", str(tmp_path / "cache"))
    assert cached("x") is None
    remember("x", 1.5)
    assert cache_path().parent == tmp_path / "cache" and cache_path().name.startswith("speed-")
    assert cached("x") == 1.5
    cache_path().write_text("{not json")
    assert cached("x") is None
    remember("y", 2)
    assert cached("y") == 2


def test_failed_compile_prints_one_line_and_training_goes_on_eagerly(tmp_path, monkeypatch):
    import torch

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler here\nsecond line of the trace")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    data = make_dataset(tmp_path / "d", per_class=8)
    res = run_cli("train", str(data), *TINY, "--epochs", "2", "--set", "train.compile=on")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "torch.compile failed" in line]
    assert len(lines) == 1 and "no C++ compiler here" in lines[0] and "runs without it" in lines[0], res.output
    assert "second line" not in res.output
    assert "epoch   2/2" in res.output


def test_aten_gelu_is_bit_identical_eagerly_and_stays_one_op_in_the_compiled_graph():
    """On CPU, Compiled swaps nn.GELU for aten's kernel behind an opaque op (inductor's own erf is ~2x slower):
    eager results are the same bits, the compiled step calls the op forward and backward and matches eager;
    a batch of another size than the first runs eagerly."""
    import copy

    import torch
    from torch.profiler import profile

    from vitcli.speed import Compiled, aten_gelu
    from vitcli.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    x = torch.randn(4, 3, 16, 16)

    def step(fwd, m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fwd(x)
        out.float().square().sum().backward()
        return out.detach().float(), [p.grad.clone() for p in m.parameters()]

    out0, grads0 = step(model, model)
    swapped = copy.deepcopy(model)
    assert aten_gelu(swapped) == 1 and aten_gelu(swapped) == 0  # once; already swapped modules stay
    out1, grads1 = step(swapped, swapped)
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(swapped))(x)  # the op is one node: the graph stays whole
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]

    compiled = Compiled(model, "test")
    assert type(model.blocks[0].mlp.act).__name__ == "AtenGELU"
    with profile() as prof:
        out2, grads2 = step(compiled, model)
    assert not compiled.failed
    names = {e.name for e in prof.events()}
    assert {"aten::gelu", "aten::gelu_backward"} <= names, sorted(n for n in names if "gelu" in n)  # not inductor's
    torch.testing.assert_close(out2, out0, atol=0.05, rtol=0.05)
    for a, b in zip(grads2, grads0, strict=True):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.1)
    # another batch size (an epoch's partial last batch) runs eagerly: the same bits, no second graph
    with torch.no_grad():
        assert torch.equal(compiled(x[:3]), model(x[:3])) and compiled.batch == 4
