"""`vitcli export`: ONNX (dynamic batch) or TorchScript files that carry their class names and preprocessing.

The exported graph maps normalised float32 images (B, 3, img_size, img_size) to logits (B, C). The metadata
(classes, preprocessing, model spec) is embedded (ONNX metadata_props / a TorchScript extra file) and also
written beside the file as `<file>.json`. Every export is checked by running it on a sample at two batch
sizes and comparing with PyTorch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vitcli import __version__
from vitcli.errors import VitcliError
from vitcli.predict import EXPORT_FORMAT, EXPORT_META_KEY, first_line, import_optional, sidecar_path

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # max abs logit difference accepted in fp32


def export_metadata(ckpt: dict[str, Any], source: Path) -> dict[str, Any]:
    pre = ckpt["preprocess"]
    return {
        "format": EXPORT_FORMAT, "vitcli_version": __version__, "source": str(source),
        "classes": list(ckpt["classes"]), "preprocess": dict(pre), "model_spec": ckpt["model_spec"],
        "input": {"name": "image", "shape": ["batch", 3, pre["img_size"], pre["img_size"]], "dtype": "float32",
                  "meaning": "RGB resized (shorter side to resize_size, interpolation), center-cropped to "
                             "img_size, scaled to [0, 1], then (x - mean) / std per channel"},
        "output": {"name": "logits", "shape": ["batch", len(ckpt["classes"])], "meaning": "softmax -> probabilities"},
    }


def export_onnx(model, sample, path: Path, meta: dict[str, Any], opset: int) -> None:
    """torch.onnx (TorchScript-based exporter: no onnxscript needed) with a dynamic batch axis, then the
    metadata is added as metadata_props."""
    import torch

    onnx = import_optional("onnx", "ONNX export")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(model, (sample,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = EXPORT_META_KEY, json.dumps(meta)
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except VitcliError:
        raise
    except Exception as e:
        raise VitcliError(f"ONNX export of '{meta['source']}' failed: {first_line(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_torchscript(model, sample, path: Path, meta: dict[str, Any]) -> None:
    """torch.jit.trace (works for both backends) with the metadata as an extra file."""
    import torch

    from vitcli.checkpoint import atomic_write

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, sample)
    except Exception as e:
        raise VitcliError(f"TorchScript export of '{meta['source']}' failed: {first_line(e)}") from None
    extra = {f"{EXPORT_META_KEY}.json": json.dumps(meta)}

    def write(f) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the portable format
            torch.jit.save(traced, f, _extra_files=extra)

    atomic_write(path, write)


def verify(path: Path, fmt: str, model, preprocess: dict[str, Any], device: str = "cpu") -> float:
    """Max abs logit difference between the exported file (run as `vitcli predict` runs it) and PyTorch,
    on random images at two batch sizes (so a batch size baked into the graph is caught)."""
    import torch

    from vitcli.data import eval_transform
    from vitcli.predict import OnnxPredictor, ScriptPredictor

    runner = OnnxPredictor(path, device) if fmt == "onnx" else ScriptPredictor(path, device)
    g = torch.Generator().manual_seed(0)
    s = preprocess["resize_size"]
    worst = 0.0
    for b in (1, 3):
        x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)  # (b, 3, S, S)
        with torch.inference_mode():
            ref = model(eval_transform(x, preprocess)).float()  # (b, C)
        got = runner.logits(x)  # (b, C)
        if got.shape != ref.shape:
            raise VitcliError(f"export check: '{path}' returned shape {tuple(got.shape)} for batch {b}, "
                              f"PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((got - ref).abs().max()))
    return worst


def export_model(model: str | None = None, fmt: str = "onnx", output: str | Path | None = None,
                 opset: int = 17) -> dict[str, Any]:
    """Export the checkpoint `model` resolves to; returns {"path", "sidecar", "max_abs_diff"}."""
    from vitcli.predict import passive_omp_threads

    passive_omp_threads()
    import torch

    from vitcli.checkpoint import atomic_write, load_model
    from vitcli.console import esc, info

    if fmt not in FORMATS:
        raise VitcliError(f"--format {fmt!r} is not valid; use one of {', '.join(FORMATS)}")
    net, ckpt, src = load_model(model)
    net = net.float().eval()
    info(f"[bold]model[/] {esc(str(src))} ({ckpt['model_spec']['backend']}, {len(ckpt['classes'])} classes)")
    path = Path(output) if output else src.parent / f"model{FORMATS[fmt]}"
    meta = export_metadata(ckpt, src)
    pre = ckpt["preprocess"]
    sample = torch.randn(2, 3, pre["img_size"], pre["img_size"], generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        export_onnx(net, sample, path, meta, opset)
    else:
        export_torchscript(net, sample, path, meta)
    side = sidecar_path(path)
    text = json.dumps(meta, indent=1)
    atomic_write(side, lambda f: f.write(text.encode()))
    diff = verify(path, fmt, net, pre)
    mb = path.stat().st_size / 2**20
    info(f"wrote {esc(str(path))} ({mb:.1f} MiB) and {esc(str(side))}")
    verdict = "[green]ok[/]" if diff <= TOLERANCE else "[red]too large[/]"
    info(f"check: max abs logit difference to PyTorch {diff:.2e} at batch sizes 1 and 3 ({verdict}, "
         f"tolerance {TOLERANCE:g})")
    if diff > TOLERANCE:
        raise VitcliError(f"'{path}' disagrees with PyTorch by {diff:.2e} (> {TOLERANCE:g}); the file is kept "
                          "for inspection, do not deploy it")
    return {"path": path, "sidecar": side, "max_abs_diff": diff}
