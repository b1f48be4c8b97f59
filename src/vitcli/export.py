"""`vitcli export`: write a checkpoint in one of the formats of `vitcli.formats.EXPORT_FORMATS` and check it.

Every export is checked by running it through its format's predictor (as `vitcli predict` runs it) on random
images at two batch sizes and comparing with PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError
from vitcli.formats import EXPORT_FORMATS, ExportFormat, export_metadata, sidecar_path

TOLERANCE = 1e-4  # max abs logit difference accepted in fp32


def verify(path: Path, fmt: ExportFormat, model, preprocess: dict[str, Any], device: str = "cpu") -> float:
    """Max abs logit difference between the exported file (run as `vitcli predict` runs it) and PyTorch,
    on random images at two batch sizes (so a batch size baked into the graph is caught)."""
    import torch

    from vitcli.data import eval_transform

    runner = fmt.predictor(path, device)
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
    from vitcli.inference import passive_omp_threads

    passive_omp_threads()
    import torch

    from vitcli.checkpoint import load_model
    from vitcli.console import esc, info
    from vitcli.files import atomic_write_text, regular_target

    if fmt not in EXPORT_FORMATS:
        raise VitcliError(f"--format {fmt!r} is not valid; use one of {', '.join(EXPORT_FORMATS)}")
    form = EXPORT_FORMATS[fmt]
    net, ckpt, src = load_model(model)
    net = net.float().eval()
    info(f"[bold]model[/] {esc(str(src))} ({ckpt['model_spec']['backend']}, {len(ckpt['classes'])} classes)")
    path = regular_target(output) if output else src.parent / f"model{form.suffix}"  # a link is kept
    meta = export_metadata(ckpt, src)
    pre = ckpt["preprocess"]
    sample = torch.randn(2, 3, pre["img_size"], pre["img_size"], generator=torch.Generator().manual_seed(0))
    form.export(net, sample, path, meta, opset)
    side = sidecar_path(path)
    atomic_write_text(side, json.dumps(meta, indent=1))
    diff = verify(path, form, net, pre)
    mb = path.stat().st_size / 2**20
    info(f"wrote {esc(str(path))} ({mb:.1f} MiB) and {esc(str(side))}")
    verdict = "[green]ok[/]" if diff <= TOLERANCE else "[red]too large[/]"
    info(f"check: max abs logit difference to PyTorch {diff:.2e} at batch sizes 1 and 3 ({verdict}, "
         f"tolerance {TOLERANCE:g})")
    if diff > TOLERANCE:
        raise VitcliError(f"'{path}' disagrees with PyTorch by {diff:.2e} (> {TOLERANCE:g}); the file is kept "
                          "for inspection, do not deploy it")
    return {"path": path, "sidecar": side, "max_abs_diff": diff}
