"""vitcli export: ONNX and TorchScript files agree with PyTorch and carry their classes and preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli
from test_predict import CLASSES, fitted_checkpoint


def _predictions(images: Path, model: Path) -> list[dict]:
    res = run_cli("predict", images, "-m", model, "-k", "3", "-f", "jsonl", "-o", "p.jsonl", "--precision", "fp32")
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in Path("p.jsonl").read_text().splitlines()]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["file"] for x in a] == [x["file"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert [t["class"] for t in x["top"]] == [t["class"] for t in y["top"]]
        assert [t["prob"] for t in x["top"]] == pytest.approx([t["prob"] for t in y["top"]], abs=1e-5)


@pytest.mark.parametrize("backend", ["scratch", "timm"])
def test_onnx_export_agrees_with_pytorch_at_any_batch_size(tmp_path, tmp_path_factory, backend):
    import numpy as np
    import onnxruntime as ort
    import torch

    from vitcli.checkpoint import load_model

    run = fitted_checkpoint(tmp_path_factory, backend)
    res = run_cli("export", "--model", run, "--format", "onnx", "--output", "m.onnx")
    assert res.exit_code == 0, res.output
    assert "max abs logit difference to PyTorch" in res.output
    sess = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["vitcli"])
    assert meta["classes"] == list(CLASSES) and meta["preprocess"]["img_size"] == 32
    assert json.loads(Path("m.onnx.json").read_text()) == meta
    model, _, _ = load_model(run)
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    with torch.inference_mode():
        ref = model(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4
    images = make_dataset(tmp_path / "imgs", CLASSES, per_class=2, seed=9)
    _same(_predictions(images, Path("m.onnx")), _predictions(images, run))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_export_agrees_with_pytorch_and_predicts(tmp_path, tmp_path_factory):
    import torch

    from vitcli.checkpoint import load_model

    run = fitted_checkpoint(tmp_path_factory)
    res = run_cli("export", "-m", run, "-f", "torchscript", "-o", "m.pt")
    assert res.exit_code == 0, res.output
    extra = {"vitcli.json": ""}
    module = torch.jit.load("m.pt", _extra_files=extra)
    assert json.loads(extra["vitcli.json"])["classes"] == list(CLASSES)
    model, _, _ = load_model(run)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert (module(x) - model(x)).abs().max() <= 1e-4
    images = make_dataset(tmp_path / "imgs", CLASSES, per_class=2, seed=9)
    _same(_predictions(images, Path("m.pt")), _predictions(images, run))


def test_onnx_without_metadata_uses_the_sidecar_else_says_what_is_missing(tmp_path, tmp_path_factory):
    import onnx

    run = fitted_checkpoint(tmp_path_factory)
    assert run_cli("export", "-m", run, "-o", "m.onnx").exit_code == 0
    proto = onnx.load("m.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, "bare.onnx")
    Path("bare.onnx.json").write_text(Path("m.onnx.json").read_text())
    img = make_dataset(tmp_path / "one", ("green",), per_class=1) / "green" / "green_000.png"
    res = run_cli("predict", img, "-m", "bare.onnx")
    assert res.exit_code == 0 and "green" in res.output, res.output
    Path("bare.onnx.json").unlink()
    res = run_cli("predict", img, "-m", "bare.onnx")
    assert res.exit_code == 1 and "carries no vitcli metadata" in res.output
    res = run_cli("export", "-m", run, "-f", "tflite")
    assert res.exit_code == 1 and "--format 'tflite' is not valid" in res.output
