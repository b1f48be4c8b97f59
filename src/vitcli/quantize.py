"""Reduced-precision ONNX files made from an fp32 export: int8 (static, calibrated on training images, or
dynamic) through onnxruntime.quantization, and fp16 through onnxruntime's float16 converter; plus what a
reduced file costs in accuracy against the float model on labelled images (`Fidelity`).

Every reduced file keeps the fp32 contract: float32 normalised images in, float32 logits out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, first_line
from vitcli.formats import EXPORT_META_KEY, OnnxPredictor, import_optional

INT8_METHODS = ("auto", "static", "dynamic")  # --int8-method values; auto measures both and keeps the better
CALIBRATION_IMAGES = 128  # training images whose activation ranges fix the static int8 scales
CALIBRATION_BATCH = 16  # images per calibration forward pass


@dataclass
class Fidelity:
    """A reduced-precision file against the float model on the same labelled images."""

    method: str  # "static" / "dynamic" int8, or "fp16"
    top1: float  # % of images the reduced file classifies correctly
    top1_float: float  # % the float (PyTorch fp32) model classifies correctly
    agreement: float  # % of images where both predict the same class
    images: int  # labelled images compared
    ms_batch1: float  # median milliseconds for one image (a rough speed, measured on this machine)

    @property
    def drop(self) -> float:
        """Top-1 points lost to the reduced precision (negative: it gained)."""
        return self.top1_float - self.top1

    def as_meta(self) -> dict[str, Any]:
        return asdict(self) | {"drop": round(self.drop, 4)}


def quantize_dynamic(src: Path, dst: Path, calibration=None) -> None:
    """int8 weights, activations quantised per batch at run time: no calibration images needed."""
    q = import_optional("onnxruntime.quantization", "int8 export")
    q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8, per_channel=True)


def quantize_static(src: Path, dst: Path, calibration) -> None:
    """int8 weights (per output channel) and activations with scales fixed from `calibration`, float32
    normalised images (N, 3, H, W), in QDQ form."""
    q = import_optional("onnxruntime.quantization", "int8 export")

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + CALIBRATION_BATCH] for i in range(0, len(calibration),
                                                                                     CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    q.quantize_static(str(src), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      op_types_to_quantize=["MatMul", "Gemm", "Conv"])


def to_fp16(src: Path, dst: Path, calibration=None) -> None:
    """fp16 weights and arithmetic inside; float32 input and output kept (keep_io_types)."""
    onnx = import_optional("onnx", "fp16 export")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(proto, str(dst))


REDUCERS: dict[str, Callable[..., None]] = {"static": quantize_static, "dynamic": quantize_dynamic,
                                            "fp16": to_fp16}


def reduce(src: Path, dst: Path, method: str, calibration=None) -> None:
    """Write the `method` version of the fp32 ONNX file `src` to `dst` (temporary files on failure removed)."""
    import logging

    logging.disable(logging.WARNING)  # onnxruntime.quantization's advice on the root logger ("consider pre-processing")
    try:
        REDUCERS[method](src, dst, calibration)
    except VitcliError:
        raise
    except Exception as e:
        dst.unlink(missing_ok=True)
        raise VitcliError(f"{method} conversion of '{src}' failed: {first_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)


def set_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Replace the vitcli metadata embedded in an ONNX file."""
    onnx = import_optional("onnx", "ONNX export")
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key != EXPORT_META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = EXPORT_META_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


def decode_images(split, pre: dict[str, Any], limit: int | None = None, seed: int = 0):
    """uint8 images (N, 3, resize, resize) and labels (N,) of a Split (a seeded sample of `limit` of them)."""
    import random

    from vitcli.store import ImageStore

    idx = list(range(len(split)))
    if limit is not None and limit < len(idx):
        idx = sorted(random.Random(seed).sample(idx, limit))
    store = ImageStore(split.subset(idx), pre["resize_size"], pre["interpolation"], cache=True, num_workers=0,
                         progress_label="decoding")
    return store.images, store.labels


def calibration_images(split, pre: dict[str, Any]):
    """float32 normalised images (N, 3, H, W) as numpy: a seeded sample of the training images."""
    from vitcli.augment import eval_transform

    x, _ = decode_images(split, pre, CALIBRATION_IMAGES)
    return eval_transform(x, pre).contiguous().numpy()


def batched_logits(logits_of, x, batch_size: int = 64):
    """logits (N, C) of uint8 images (N, 3, S, S), in batches."""
    import torch

    return torch.cat([logits_of(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def median_ms(logits_of, x, repeats: int = 15) -> float:
    """Median wall milliseconds of `logits_of` on one image (after one warm-up call)."""
    import statistics

    one = x[:1]
    logits_of(one)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        logits_of(one)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def fidelity(path: Path, method: str, float_logits, x, y) -> Fidelity:
    """Run the reduced file `path` on uint8 images `x` (N, 3, S, S) with labels `y` (N,) and compare with
    the float model's logits (N, C)."""
    runner = OnnxPredictor(path, "cpu")
    got = batched_logits(runner.logits, x)  # (N, C)
    ref_pred, pred = float_logits.argmax(-1), got.argmax(-1)  # (N,)
    n = len(y)
    return Fidelity(method=method, top1=100.0 * float((pred == y).sum()) / n,
                    top1_float=100.0 * float((ref_pred == y).sum()) / n,
                    agreement=100.0 * float((pred == ref_pred).sum()) / n, images=n,
                    ms_batch1=median_ms(runner.logits, x))


def better(a: Fidelity, b: Fidelity) -> Fidelity:
    """The more faithful of two int8 files (higher agreement with the float model, then higher top-1), the
    faster one when they tie."""
    return max((a, b), key=lambda f: (round(f.agreement, 6), round(f.top1, 6), -f.ms_batch1))
