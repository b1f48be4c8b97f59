"""vitcli export --int8 / --fp16: reduced-precision ONNX files measured against the float model on the run's
validation images, the measurement stored in their metadata, and a file that loses too much refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import fitted_run_folder, make_dataset, run_cli

CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    return fitted_run_folder(tmp_path_factory.mktemp("fitted-run"), CLASSES)


def outlier_copy(run: Path, dest: Path) -> Path:
    """The run with an outlier feature in every block: one LayerNorm channel scaled up 1e4x and the matching
    input column of the next layer scaled down as much, so the float model computes the same function but an
    int8 activation scale set by the outlier rounds every other channel to zero."""
    from vitcli.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    sd = ckpt["model"]
    for i in range(2):
        for norm, nxt in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            for j in (0, 5, 9):
                sd[f"blocks.{i}.{norm}.weight"][j] *= 1e4
                sd[f"blocks.{i}.{norm}.bias"][j] *= 1e4
                sd[f"blocks.{i}.{nxt}.weight"][:, j] /= 1e4
    dest.mkdir(parents=True)
    save_checkpoint(dest / "best.pt", ckpt)
    return dest


@pytest.mark.parametrize("flag", ["--int8", "--fp16"])
def test_reduced_export_is_measured_against_the_float_model_and_predicts(tmp_path, fitted_run, flag):
    res = run_cli("export", "-m", fitted_run, flag, "-o", "m.onnx")
    assert res.exit_code == 0, res.output
    meta = json.loads(Path("m.onnx.json").read_text())
    fid = meta["fidelity"]
    assert meta["precision"] == flag[2:] and fid["images"] == 12  # 20 per class, default val_fraction 0.2
    assert fid["top1_float"] >= 90 and fid["drop"] <= 1.0 and fid["agreement"] >= 90
    assert f"agreement with the float model {fid['agreement']:.2f}%" in res.output
    if flag == "--int8":
        assert "static: top-1" in res.output and "dynamic: top-1" in res.output and "kept " in res.output
        assert fid["method"] in ("static", "dynamic")
    import onnx

    ops = {n.op_type for n in onnx.load("m.onnx").graph.node}
    if flag == "--int8":
        assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}, ops
    else:
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in onnx.load("m.onnx").graph.initializer}
    assert not list(Path().glob(".m.onnx*"))  # no temporary files left
    import onnxruntime as ort

    embedded = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(embedded.custom_metadata_map["vitcli"]) == meta
    images = make_dataset(tmp_path / "imgs", CLASSES, per_class=3, seed=9)
    res = run_cli("predict", images, "-m", "m.onnx", "-f", "jsonl", "-o", "p.jsonl")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in Path("p.jsonl").read_text().splitlines()]
    assert sum(r["top"][0]["class"] == Path(r["file"]).parent.name for r in rows) >= 8


def test_an_int8_export_that_loses_accuracy_is_refused_unless_forced(tmp_path, fitted_run):
    import torch

    from vitcli.checkpoint import load_model

    bad = outlier_copy(fitted_run, tmp_path / "runs" / "outliers")
    (a, _, _), (b, _, _) = load_model(fitted_run), load_model(bad)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(a(x), b(x), atol=1e-3)  # the float model is unchanged
    res = run_cli("export", "-m", bad, "--int8", "--int8-method", "dynamic", "-o", "bad.onnx")
    assert res.exit_code == 1
    assert "error: --int8 (dynamic) loses" in res.output and "(> --max-drop 1)" in res.output, res.output
    assert not Path("bad.onnx").exists() and not Path("bad.onnx.json").exists() and not list(Path().glob(".bad*"))
    res = run_cli("export", "-m", bad, "--int8", "--int8-method", "dynamic", "-o", "bad.onnx", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(Path("bad.onnx.json").read_text())["fidelity"]["drop"] > 1.0
    res = run_cli("export", "-m", bad, "--int8", "--int8-method", "dynamic", "-o", "b2.onnx", "--max-drop", "100")
    assert res.exit_code == 0, res.output


def test_reduced_export_options_are_checked(fitted_run):
    for args, msg in [(("--int8", "--fp16"), "--int8 and --fp16 are exclusive"),
                      (("--int8", "-f", "torchscript"), "--int8 needs --format onnx"),
                      (("--int8", "--int8-method", "qat"), "--int8-method 'qat' is not valid"),
                      (("--fp16", "--max-drop", "-1"), "--max-drop -1.0 is not valid")]:
        res = run_cli("export", "-m", fitted_run, *args)
        assert res.exit_code == 1 and msg in res.output, res.output
    moved = Path("moved")
    shutil.copytree(fitted_run, moved)
    from vitcli.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(moved / "best.pt")
    ckpt["data_dir"] = "/nonexistent/data"
    save_checkpoint(moved / "best.pt", ckpt)
    res = run_cli("export", "-m", moved, "--int8")
    assert res.exit_code == 1 and "is not there any more" in res.output and "--data DIR" in res.output, res.output
    images = make_dataset(Path("elsewhere"), CLASSES, per_class=4, seed=8, splits=("test",))
    res = run_cli("export", "-m", moved, "--int8", "--data", images, "-o", "m.onnx")
    assert res.exit_code == 0, res.output
    assert "calibrating on images of" in res.output and f"12 images of '{images}'" in res.output
    assert json.loads(Path("m.onnx.json").read_text())["fidelity"]["images"] == 12
