"""Export formats: one table (`EXPORT_FORMATS`) of what each format is — file suffix, exporter, predictor,
how a file is recognised — plus the metadata every exported file carries.

`vitcli export` writes a format through its exporter and checks it through its predictor; `vitcli predict`
picks the predictor of the file it is given. The exported graph maps normalised float32 images
(B, 3, img_size, img_size) to logits (B, C); the metadata (classes, preprocessing, model spec) is embedded
(ONNX metadata_props / a TorchScript extra file) and also written beside the file as `<file>.json`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli import __version__
from vitcli.errors import VitcliError, first_line

if TYPE_CHECKING:
    from vitcli.task import Task

EXPORT_FORMAT = "vitcli-export-v1"
EXPORT_META_KEY = "vitcli"  # ONNX metadata_props key / TorchScript extra file stem holding the metadata json


class Predictor:
    """A classifier with its class names, preprocessing and task (with its calibration); `logits` maps uint8
    images to float logits, `probs` to the task's calibrated probabilities."""

    classes: list[str]
    preprocess: dict[str, Any]
    path: Path
    kind: str
    task: Task  # single- or multi-label, with the temperature / conformal scores / thresholds stored
    ood: dict[str, Any] | None  # out-of-distribution thresholds (and the kNN bank for checkpoints), or None
    gives_features = False  # whether `outputs` returns penultimate embeddings (the kNN score needs them)
    tta = False  # views: the image and its mirror, logits averaged (`set_tta`)

    def _init_meta(self, path: Path, kind: str, meta: dict[str, Any]) -> None:
        from vitcli.task import Task

        self.path, self.kind = path, kind
        self.classes, self.preprocess = list(meta["classes"]), dict(meta["preprocess"])
        self.task = Task.from_meta(meta)
        self.ood = meta.get("ood")
        self.calibrated_tta = bool((meta.get("calibration") or {}).get("tta", False))  # the views calibration saw

    def logits(self, x):  # uint8 (B, 3, S, S) -> float32 (B, C) on CPU
        raise NotImplementedError

    def prepare(self, images: int, batch_size: int) -> str:
        """Before a pass over `images` images in batches of `batch_size`: take the fastest path (a checkpoint may
        compile its forward); returns how it runs, for the img/s line."""
        return self.kind

    def outputs(self, x):
        """uint8 (B, 3, S, S) -> (embeddings (B, D) or None, logits (B, C)), both float32 on CPU."""
        return None, self.logits(x)

    def set_tta(self, choice: bool | None) -> str | None:
        """Test-time augmentation: `choice` True / False, or None for the model's own default: on when it
        trained on mirrored images (its preprocess says so) and its calibration is fitted at the end of training
        on the same views (label vectors tune their thresholds on one view while training: off for them).
        Returns the line that says so, or None when off."""
        from vitcli.augment import views_text

        mirror = bool(self.preprocess.get("mirror", False)) and self.task.fits_temperature
        self.tta = mirror if choice is None else choice
        unlike = ""  # prediction takes other views than the calibration saw
        if self.calibrated_tta != self.tta and self.task.conformal_scores is not None:
            fitted = "the TTA views" if self.calibrated_tta else "the image alone"
            unlike = (f"; the temperature and conformal scores were fitted on {fitted}, so sets carry no coverage "
                      "guarantee")
        if not self.tta:
            return f"TTA off (--no-tta){unlike}" if unlike else None
        why = "--tta" if choice else f"the model trained on such views; --no-tta: 1/{self.views} the compute"
        return f"TTA: the mean of the logits of {views_text(self.preprocess)} ({why}){unlike}"

    @property
    def views(self) -> int:
        """Forward passes an image costs: the views TTA averages, or 1."""
        from vitcli.augment import view_count

        return view_count(self.preprocess, self.tta)

    def view_logits(self, x, logits=None):
        """uint8 (B, 3, S, S) -> float32 (B, C): the logits prediction uses; with TTA the mean over the views of
        the centre crop the model sees (`augment.tta_views`; the image's own logits are `logits` when already
        computed; views of the crop, since an odd margin would shift a mirrored-then-cropped image by a pixel)."""
        logits = self.logits(x) if logits is None else logits
        if not self.tta:
            return logits
        from vitcli.augment import center_crop, tta_views

        others = tta_views(center_crop(x, self.preprocess["img_size"]), self.preprocess)[1:]
        return (logits + sum(self.logits(v) for v in others)) / (len(others) + 1)

    def probs(self, x):
        """uint8 (B, 3, S, S) -> calibrated probabilities float64 (B, C) (`Task.probs` of `view_logits`)."""
        return self.task.probs(self.view_logits(x))

    def conformal_threshold(self, coverage: float) -> float:
        return self.task.conformal_threshold(coverage, str(self.path))


class OnnxPredictor(Predictor):
    """An exported .onnx file run by onnxruntime (CPU, or CUDA when asked for and available)."""

    def __init__(self, path: Path, device: str):
        ort = import_optional("onnxruntime", "running an ONNX model")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:
            raise VitcliError(f"--model '{path}' is not a loadable ONNX model: {first_line(e)}") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_META_KEY)
        self._init_meta(path, "onnx", json.loads(meta) if meta else read_sidecar(path))
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x):
        import torch

        from vitcli.augment import eval_transform

        xf = eval_transform(x, self.preprocess).contiguous().numpy()  # (B, 3, H, W) float32
        return torch.from_numpy(self.session.run(None, {self.input_name: xf})[0])  # (B, C)


class ScriptPredictor(Predictor):
    """An exported TorchScript file (metadata embedded as an extra file, or in the sidecar json)."""

    def __init__(self, path: Path, device: str):
        import torch

        from vitcli.device import pick_device

        extra = {f"{EXPORT_META_KEY}.json": ""}
        self.device = pick_device(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        except Exception as e:
            raise VitcliError(f"--model '{path}' is not a loadable TorchScript file: {first_line(e)}") from None
        text = extra[f"{EXPORT_META_KEY}.json"]
        self._init_meta(path, "torchscript", json.loads(text) if text else read_sidecar(path))

    def logits(self, x):
        import torch

        from vitcli.augment import eval_transform

        with torch.inference_mode():
            return self.module(eval_transform(x.to(self.device), self.preprocess)).float().cpu()  # (B, C)


def import_optional(name: str, purpose: str):
    """Import an optional dependency of the `export` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise VitcliError(f"{purpose} needs the '{name}' package: pip install 'vitcli[export]'") from None


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise VitcliError(f"--model '{path}' carries no vitcli metadata and '{side}' does not exist; "
                          "export models with 'vitcli export'")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise VitcliError(f"'{side}' is not readable JSON: {first_line(e)}") from None
    if not isinstance(meta, dict) or "classes" not in meta or "preprocess" not in meta:
        raise VitcliError(f"'{side}' lacks 'classes' or 'preprocess'; it was not written by 'vitcli export'")
    return meta


def export_metadata(ckpt: dict[str, Any], source: Path) -> dict[str, Any]:
    """What an exported file carries: classes, preprocessing, the model spec, the input/output contract and
    the task with its calibration (temperature, conformal scores, thresholds) that predictors apply to the
    logits."""
    from vitcli.calibrate import calibration_for_export
    from vitcli.ood import ood_for_export
    from vitcli.task import Task

    pre = ckpt["preprocess"]
    cal = calibration_for_export(ckpt.get("calibration"))
    return {
        "format": EXPORT_FORMAT, "vitcli_version": __version__, "source": str(source),
        "classes": list(ckpt["classes"]), "preprocess": dict(pre), "model_spec": ckpt["model_spec"],
        "input": {"name": "image", "shape": ["batch", 3, pre["img_size"], pre["img_size"]], "dtype": "float32",
                  "meaning": "RGB resized (shorter side to resize_size, interpolation), center-cropped to "
                             "img_size, scaled to [0, 1], then (x - mean) / std per channel"},
    } | ({"calibration": cal} if cal else {}) | Task.from_meta(ckpt).export_meta(len(ckpt["classes"])) | (
        {"ood": ood_for_export(ckpt["ood"])} if ckpt.get("ood") else {})


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


def export_torchscript(model, sample, path: Path, meta: dict[str, Any], opset: int = 0) -> None:
    """torch.jit.trace (works for both backends) with the metadata as an extra file."""
    import torch

    from vitcli.files import atomic_write

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


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a code/ folder; torch.save checkpoints do not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass(frozen=True)
class ExportFormat:
    name: str  # --format value
    suffix: str  # default file ending
    export: Callable[..., None]  # (model, sample, path, meta, opset) -> None; writes the file
    predictor: type[Predictor]  # runs the file as `vitcli predict` / `eval` / the export check do
    recognises: Callable[[Path], bool]  # whether a file on disk is of this format


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", ".onnx", export_onnx, OnnxPredictor, is_onnx),
    ExportFormat("torchscript", ".torchscript.pt", export_torchscript, ScriptPredictor, is_torchscript),
)}


def format_of(path: Path) -> ExportFormat | None:
    """The export format of a model file, or None for a vitcli checkpoint."""
    return next((f for f in EXPORT_FORMATS.values() if f.recognises(path)), None)
