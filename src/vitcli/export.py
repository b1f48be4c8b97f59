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

    from vitcli.augment import eval_transform

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
                 opset: int = 17, precision: str = "fp32", int8_method: str = "auto", max_drop: float = 1.0,
                 force: bool = False, data: str | Path | None = None) -> dict[str, Any]:
    """Export the checkpoint `model` resolves to, in fp32 or (ONNX) as an int8 / fp16 file gated on its accuracy;
    returns {"path", "sidecar", "max_abs_diff"} (+ "fidelity" for a reduced file)."""
    from vitcli.inference import passive_omp_threads

    passive_omp_threads()
    import torch

    from vitcli.checkpoint import load_model
    from vitcli.console import esc, info
    from vitcli.files import atomic_write_text, regular_target

    form = check_options(fmt, precision, int8_method, max_drop)
    net, ckpt, src = load_model(model)
    net = net.float().eval()
    info(f"[bold]model[/] {esc(str(src))} ({ckpt['model_spec']['backend']}, {len(ckpt['classes'])} classes)")
    stem = "model" if precision == "fp32" else f"model.{precision}"
    path = regular_target(output) if output else src.parent / f"{stem}{form.suffix}"  # a link is kept
    meta = export_metadata(ckpt, src)
    pre = ckpt["preprocess"]
    fp32 = path if precision == "fp32" else path.with_name(f".{path.name}.fp32{form.suffix}")
    sample = torch.randn(2, 3, pre["img_size"], pre["img_size"], generator=torch.Generator().manual_seed(0))
    try:
        form.export(net, sample, fp32, meta, opset)
        diff = verify(fp32, form, net, pre)
        info(f"check: max abs logit difference to PyTorch {diff:.2e} at batch sizes 1 and 3 "
             f"({'[green]ok[/]' if diff <= TOLERANCE else '[red]too large[/]'}, tolerance {TOLERANCE:g})")
        if diff > TOLERANCE:
            raise VitcliError(f"'{fp32}' disagrees with PyTorch by {diff:.2e} (> {TOLERANCE:g}); the file is kept "
                              "for inspection, do not deploy it")
        fid = None if precision == "fp32" else reduced_export(net, ckpt, src, fp32, path, precision, int8_method,
                                                              max_drop, force, data)
    finally:
        if fp32 != path:
            fp32.unlink(missing_ok=True)
    if fid is not None:
        from vitcli.quantize import set_metadata

        meta |= {"precision": precision, "fidelity": fid.as_meta()}
        set_metadata(path, meta)
    side = sidecar_path(path)
    atomic_write_text(side, json.dumps(meta, indent=1))
    info(f"wrote {esc(str(path))} ({path.stat().st_size / 2**20:.1f} MiB) and {esc(str(side))}")
    return {"path": path, "sidecar": side, "max_abs_diff": diff} | ({"fidelity": fid} if fid else {})


def check_options(fmt: str, precision: str, int8_method: str, max_drop: float) -> ExportFormat:
    from vitcli.quantize import INT8_METHODS

    if fmt not in EXPORT_FORMATS:
        raise VitcliError(f"--format {fmt!r} is not valid; use one of {', '.join(EXPORT_FORMATS)}")
    if precision not in ("fp32", "int8", "fp16"):
        raise VitcliError(f"precision {precision!r} is not valid; use fp32, int8 (--int8) or fp16 (--fp16)")
    if precision != "fp32" and fmt != "onnx":
        raise VitcliError(f"--{precision} needs --format onnx, got --format {fmt}")
    if int8_method not in INT8_METHODS:
        raise VitcliError(f"--int8-method {int8_method!r} is not valid; use one of {', '.join(INT8_METHODS)}")
    if not max_drop >= 0:
        raise VitcliError(f"--max-drop {max_drop} is not valid; give top-1 points >= 0 (e.g. 1.0)")
    return EXPORT_FORMATS[fmt]


def check_images(src: Path, ckpt: dict[str, Any], data: str | Path | None, calibrate: bool):
    """(labelled images to check on, training images to calibrate on or None, where the first come from): the
    run's validation and training splits, or `data` (its test/ else val/ split) and the run's training split,
    else `data` again when the run's dataset is gone."""
    from vitcli.console import esc, info
    from vitcli.html_report import run_dataset
    from vitcli.sources import scan_eval_folder

    if data is None:
        ds = run_dataset(src.parent, ckpt, "give --data DIR")
        return ds.val, ds.train if calibrate else None, f"validation images of '{ds.root}'"
    split = scan_eval_folder(data, list(ckpt["classes"]))
    if not calibrate:
        return split, None, f"images of '{data}'"
    try:
        calib = run_dataset(src.parent, ckpt).train
    except VitcliError as e:
        info(f"calibrating on images of {esc(str(data))}: {esc(str(e))}")
        calib = split
    return split, calib, f"images of '{data}'"


def reduced_export(net, ckpt: dict[str, Any], src: Path, fp32: Path, path: Path, precision: str, int8_method: str,
                   max_drop: float, force: bool, data: str | Path | None = None):
    """Write the int8 / fp16 version of the checked fp32 file `fp32` to `path`, after measuring it against the
    float model on the run's validation images; refused (file removed) when it loses more than `max_drop` top-1
    points, unless `force`. With int8 method auto, static and dynamic are both measured and the better kept."""
    import torch

    from vitcli import quantize as Q
    from vitcli.augment import eval_transform
    from vitcli.console import esc, info

    if ckpt.get("task") == "multilabel":
        raise VitcliError(f"--{precision}: the accuracy check compares top-1 and '{src}' is multi-label; export "
                          "it in fp32")
    methods = ["fp16"] if precision == "fp16" else ["static", "dynamic"] if int8_method == "auto" else [int8_method]
    check, calib_split, where = check_images(src, ckpt, data, "static" in methods)
    pre = ckpt["preprocess"]
    x, y = Q.decode_images(check, pre)  # uint8 (N, 3, S, S), (N,)
    if len(y) == 0:
        raise VitcliError(f"no readable {where} to check the {precision} file on")
    with torch.inference_mode():
        ref = Q.batched_logits(lambda b: net(eval_transform(b, pre)), x)  # (N, C)
    calib = Q.calibration_images(calib_split, pre) if calib_split is not None else None
    results = {}  # method -> (Fidelity, temporary file); `path` is replaced only by an accepted file
    try:
        for m in methods:
            out = path.with_name(f".{path.name}.{m}")
            Q.reduce(fp32, out, m, calib)
            f = Q.fidelity(out, m, ref, x, y)
            results[m] = (f, out)
            info(f"{m}: top-1 {f.top1:.2f}% (float {f.top1_float:.2f}%, {-f.drop:+.2f} points), agreement with "
                 f"the float model {f.agreement:.2f}% on {f.images} {where}, {f.ms_batch1:.1f} ms/image")
        fid = results[methods[0]][0] if len(methods) == 1 else Q.better(results["static"][0], results["dynamic"][0])
        if len(methods) > 1:
            info(f"kept {fid.method} int8 (the higher agreement with the float model; the faster on a tie)")
        if fid.drop > max_drop and not force:
            raise VitcliError(f"--{precision} ({fid.method}) loses {fid.drop:.2f} top-1 points (> --max-drop "
                              f"{max_drop:g}) on {fid.images} {where}; not written (--force writes it)")
        results.pop(fid.method)[1].replace(path)
    finally:
        for _, out in results.values():
            out.unlink(missing_ok=True)
    info(f"{esc(precision)} file within --max-drop {max_drop:g}" if fid.drop <= max_drop else
         f"[red]{esc(precision)} file loses {fid.drop:.2f} points[/], written because of --force")
    return fid
