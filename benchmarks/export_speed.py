"""Speed and accuracy of one vitcli run in every precision it ships in, on the same validation images.

    python benchmarks/export_speed.py RUN [--data DIR] [--threads 1] [--seconds 10]

For torch fp32, torch bf16 (autocast, as `vitcli predict --precision bf16`), ONNX fp32, ONNX fp16 and ONNX int8
(static and dynamic): images/s at batch 1 and 64, p50/p99 latency of one image, and top-1 on the run's
validation images (the split rebuilt as training made it), or on --data (class folders, or its test/ else val/),
as `vitcli export --data` takes them. Files go to a temporary folder; the ONNX files are
made by `vitcli export` (with --force, so every variant is measured even past --max-drop). Preprocessing
(crop, normalise) is inside the timed call, as `vitcli predict` runs it; decoding is not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, x, seconds: float) -> list[float]:
    """Wall seconds of each call of fn(x), repeated for about `seconds` (at least 5 calls, after a warm-up)."""
    fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def measure(name: str, logits_of, x, y, seconds: float) -> dict:
    import torch

    pred = torch.cat([logits_of(x[i:i + 64]).argmax(-1) for i in range(0, len(x), 64)])
    one = sorted(timed(logits_of, x[:1], seconds))
    many = timed(logits_of, x[:64], seconds)
    return {"name": name, "top1": 100.0 * float((pred == y).float().mean()),
            "ips1": 1.0 / statistics.mean(one), "ips64": len(x[:64]) / statistics.mean(many),
            "p50": 1e3 * one[len(one) // 2], "p99": 1e3 * one[min(len(one) - 1, int(0.99 * len(one)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a vitcli run folder (its dataset folder must still exist)")
    ap.add_argument("--data", type=Path, help="labelled images instead of the run's validation split")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing per measurement (default 10)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from vitcli.checkpoint import load_checkpoint, resolve_model_path
    from vitcli.export import check_images, export_model
    from vitcli.formats import OnnxPredictor
    from vitcli.inference import TorchPredictor
    from vitcli.quantize import decode_images

    path = resolve_model_path(args.run)
    ckpt = load_checkpoint(path)
    x, y = decode_images(check_images(path, ckpt, args.data, False)[0], ckpt["preprocess"])  # (N, 3, S, S), (N,)
    rows = [measure(f"torch {p}", TorchPredictor(path, "cpu", p).logits, x, y, args.seconds) for p in ("fp32", "bf16")]
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ONNX fp32": export_model(str(path), output=Path(tmp) / "m.onnx", data=args.data)["path"]}
        for label, precision, method in (("fp16", "fp16", "auto"), ("int8 static", "int8", "static"),
                                         ("int8 dynamic", "int8", "dynamic")):
            files[f"ONNX {label}"] = export_model(str(path), output=Path(tmp) / f"{method}.{precision}.onnx",
                                                  precision=precision, int8_method=method, force=True,
                                                  data=args.data)["path"]
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        for name, f in files.items():
            runner = OnnxPredictor(f, "cpu")
            runner.session = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])  # same threads
            rows.append(measure(name, runner.logits, x, y, args.seconds) | {"mib": f.stat().st_size / 2**20})
    spec = ckpt["model_spec"]["kwargs"]
    print(f"\n{path}: width {spec.get('embed_dim')}, {spec.get('depth')} blocks, {ckpt['preprocess']['img_size']} px, "
          f"{len(y)} labelled images, {args.threads} thread(s), {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}")
    base = next(r for r in rows if r["name"] == "ONNX fp32")
    print("\n| model | top-1 | img/s batch 1 | img/s batch 64 | p50 ms | p99 ms | vs ONNX fp32 (batch 1) | MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mib = f"{r['mib']:.1f}" if "mib" in r else ""
        print(f"| {r['name']} | {r['top1']:.2f}% | {r['ips1']:.0f} | {r['ips64']:.0f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['ips1'] / base['ips1']:.2f}x | {mib} |")


if __name__ == "__main__":
    main()
