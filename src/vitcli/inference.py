"""Run a model on images: the Prediction record, loading any model file as a predictor, decoding in threads
while the model runs, batched inference with abstention and prediction sets.

A service shared by `vitcli predict`, `eval`, `export`'s check and `serve`. The model is a vitcli checkpoint, an
exported ONNX file (run by onnxruntime) or an exported TorchScript file; class names and preprocessing always
come from the model file, so prediction repeats training's eval transform exactly. Only torch, PIL and numpy are
imported for a from-scratch checkpoint: no timm, no torchvision (they cost seconds of start-up).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError
from vitcli.formats import Predictor

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcli.task import Task


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    error: str | None = None
    abstained: bool = False  # top probability below its --min-prob threshold: the answer is "unknown"
    set: list[str] | None = None  # --coverage: the conformal prediction set, most likely first
    labels: list[tuple[str, float]] | None = None  # multi-label: every class at or above its threshold
    unsure: list[tuple[str, float]] | None = None  # multi-label --min-prob: at its threshold, below --min-prob
    ood_score: float | None = None  # --ood: the out-of-distribution score (higher = less like the training data)
    ood: bool = False  # --ood: the score is above the model's threshold; the answer is the unknown word
    unknown: str = "unknown"  # the answer when abstaining or out of distribution (--ood-word)

    @property
    def answer(self) -> str:
        """The predicted class (the unknown word when abstaining or out of distribution); multi-label: the labels
        joined by '|'."""
        if self.ood:
            return self.unknown
        if self.labels is not None:
            return "|".join(c for c, _ in self.labels)
        return self.unknown if self.abstained else self.top[0][0]

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        ood = {"ood_score": self.ood_score, "ood": self.ood} if self.ood_score is not None else {}
        if self.labels is not None:
            unsure = {"unsure": [{"class": c, "prob": p} for c, p in self.unsure]} if self.unsure else {}
            answer = {"answer": self.unknown} if self.ood else {}
            return {"file": self.file, "labels": [{"class": c, "prob": p} for c, p in self.labels],
                    "top": [{"class": c, "prob": p} for c, p in self.top]} | unsure | answer | ood
        d = {"file": self.file, "class": self.answer, "prob": self.top[0][1],
             "top": [{"class": c, "prob": p} for c, p in self.top]}
        return d | ({"set": self.set} if self.set is not None else {}) | ood


def passive_omp_threads() -> None:
    """Let idle OpenMP threads sleep instead of spin (unless the user chose otherwise).

    With spinning threads, a machine whose cores are busy with other work runs a one-image forward pass
    ~30x slower (a waiting thread steals the core the working one needs); large batches lose little to
    passive waiting. Only takes effect when called before torch is first imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ----------------------------------------------------------------------------------------------- models
class TorchPredictor(Predictor):
    """A vitcli checkpoint (scratch or timm model) on the chosen device and precision."""

    def __init__(self, path: Path, device: str, precision: str):
        import torch

        from vitcli.checkpoint import load_checkpoint, model_from_checkpoint
        from vitcli.device import pick_attention, pick_device, pick_precision, set_fused_attention

        ckpt = load_checkpoint(path)
        self._init_meta(path, f"checkpoint ({ckpt['model_spec']['backend']})", ckpt)
        self.config = ckpt.get("config", {})  # the training config (eval's report.html shows it)
        self.device = pick_device(device)
        self.precision, _ = pick_precision(precision, self.device)
        self.model = model_from_checkpoint(ckpt, path).to(self.device)
        self.spec = ckpt["model_spec"]
        self._torch = torch
        fused, _ = pick_attention(self.device, self.precision)  # the training step's rule, faster here too
        set_fused_attention(self.model, fused)
        self.fwd, self.batch = self.model, 0  # prepare() may compile the forward for batches of `batch` images

    def prepare(self, images: int, batch_size: int) -> str:
        """Compile the forward when the pass over `images` images pays for it (speed.decide_compile, by the
        seconds the eager forward would take and the compile time measured on this machine)."""
        import time

        from vitcli.device import linear_macs_per_image
        from vitcli.speed import Compiled, decide_compile, remember, signature, step_seconds_guess

        size = self.preprocess["img_size"]
        eager = step_seconds_guess(linear_macs_per_image(self.model, size), batch_size, self.precision, self.device)
        expected = eager / 3 * -(-images // batch_size)  # a forward is a third of a training step
        sig = signature(self.spec, batch_size, size, self.precision, self.device, "predict")
        wanted, why = decide_compile("auto", self.device, expected, sig)
        how = f"{self.kind}, {self.precision}"
        if not wanted:
            return how
        self.fwd, self.batch = Compiled(self.model, "prediction", frozen=True), batch_size
        t = time.perf_counter()
        res = self.preprocess["resize_size"]
        self.logits(self._torch.zeros(batch_size, 3, res, res, dtype=self._torch.uint8))  # compile now
        if not self.fwd.failed:
            remember(sig, round(time.perf_counter() - t, 1))
            return f"{how}, compiled ({why})"
        return how

    def logits(self, x):
        from vitcli.augment import eval_transform
        from vitcli.device import autocast

        n = x.shape[0]
        if self.batch and n < self.batch:  # the compiled forward runs one batch shape: pad the last batch
            x = self._torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
        with self._torch.inference_mode(), autocast(self.device, self.precision):
            x = eval_transform(x.to(self.device, non_blocking=True), self.preprocess)  # (B, 3, H, W)
            return self.fwd(x)[:n].float().cpu()  # (B, C)

    gives_features = True

    def outputs(self, x):
        from vitcli.augment import eval_transform
        from vitcli.device import autocast
        from vitcli.ood import features_and_logits

        with self._torch.inference_mode(), autocast(self.device, self.precision):
            x = eval_transform(x.to(self.device, non_blocking=True), self.preprocess)  # (B, 3, H, W)
            feats, logits = features_and_logits(self.model, x)  # (B, D), (B, C)
            return feats.cpu(), logits.cpu()


def load_predictor(model: str | None, device: str = "auto", precision: str = "auto",
                   runs_dir: str = "runs") -> Predictor:
    """--model as a checkpoint, run folder, .onnx or TorchScript file; None -> the newest run."""
    from vitcli.checkpoint import resolve_model_path
    from vitcli.console import esc, info
    from vitcli.formats import format_of

    path = resolve_model_path(model, runs_dir)
    fmt = format_of(path)
    pred = fmt.predictor(path, device) if fmt else TorchPredictor(path, device, precision)
    info(f"[bold]model[/] {esc(str(path))} ({pred.kind}, {len(pred.classes)} classes)")
    return pred


# ----------------------------------------------------------------------------------------------- inference
def _decode(path: Path, size: int, interpolation: str):
    from vitcli.decode import BadImage, decode_square

    try:
        return decode_square(path, size, interpolation), None  # uint8 (3, S, S)
    except BadImage as e:
        return None, str(e)


def decoded(paths: list[Path], size: int, interpolation: str, threads: int, window: int) -> Iterator:
    """(path, uint8 image or None, error or None) in input order; at most `window` images decoded ahead,
    in a thread pool (PIL releases the GIL) so decoding overlaps with the model."""
    if threads <= 1 or len(paths) <= 1:
        for p in paths:
            yield (p, *_decode(p, size, interpolation))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        todo = iter(paths)
        pending: deque = deque()
        for p in todo:
            pending.append((p, pool.submit(_decode, p, size, interpolation)))
            if len(pending) >= window:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt, size, interpolation)))
            yield (p, *fut.result())


def answers(pred: Predictor, names: list[str], full, k: int, min_prob=None, threshold: float | None = None,
            scores=None, ood: str | None = None, unknown: str = "unknown") -> list[Prediction]:
    """Calibrated probabilities (B, C) of the images `names` -> their Predictions, as the task decides: top `k`,
    `unknown` below `min_prob` (C,), the conformal set for `threshold`, the labels at or above their thresholds
    (multi-label), and with `scores` (B,) of the score `ood`, out of distribution above its threshold."""
    classes = pred.classes
    out = []
    for j, (name, pr, d) in enumerate(zip(names, full.tolist(), pred.task.decide(full, min_prob, threshold),
                                          strict=True)):
        r = Prediction(name, [(classes[i], round(pr[i], 6)) for i in d.order[:k]], abstained=d.abstained,
                       unknown=unknown)
        if scores is not None:
            r.ood_score = round(float(scores[j]), 6)
            r.ood = bool(scores[j] > pred.ood["thresholds"][ood])
        if d.set is not None:
            r.set = [classes[i] for i in d.set]
        if d.labels is not None:
            r.labels = [(classes[i], round(pr[i], 6)) for i in d.labels]
            r.unsure = [(classes[i], round(pr[i], 6)) for i in d.unsure]
        out.append(r)
    return out


def predict_images(pred: Predictor, paths: list[Path], top_k: int = 1, batch_size: int = 64,
                   threads: int = 0, progress: bool = True, min_prob=None, threshold: float | None = None,
                   ood: str | None = None, unknown: str = "unknown") -> Iterator[Prediction]:
    """Yield one Prediction per path, in order; unreadable images give an error entry, the rest go on.
    `min_prob` (C,) thresholds turn a top-1 below its class's threshold into `unknown` (multi-label: a label
    below its --min-prob is unsure); `threshold` (a conformal threshold) adds the prediction set; `ood` (a
    score name) adds the out-of-distribution score and answers `unknown` above the model's threshold."""
    import torch

    from vitcli.console import progress_bar

    pre = pred.preprocess
    k = max(1, min(top_k, len(pred.classes)))
    threads = threads or min(4, os.cpu_count() or 1)
    bar = progress_bar(transient=True) if progress and len(paths) > batch_size else None
    task = bar.add_task("predicting", total=len(paths)) if bar else None

    def flush(batch: list[tuple[Path, Any]]) -> Iterator[Prediction]:
        x = torch.stack([img for _, img in batch])  # uint8 (B, 3, S, S)
        full, scores = scored_probs(pred, x, ood)  # (B, C) float64, (B,) or None
        yield from answers(pred, [str(p) for p, _ in batch], full, k, min_prob, threshold, scores, ood, unknown)

    if bar:
        bar.start()
    try:
        batch: list[tuple[Path, Any]] = []
        for path, img, err in decoded(paths, pre["resize_size"], pre["interpolation"], threads,
                                      window=2 * batch_size):
            if err is not None:
                yield Prediction(str(path), error=err)
            else:
                batch.append((path, img))
            if len(batch) == batch_size:
                yield from flush(batch)
                batch = []
            if bar:
                bar.advance(task)
        if batch:
            yield from flush(batch)
    finally:
        if bar:
            bar.stop()




def scored_probs(pred: Predictor, x, ood: str | None):
    """Calibrated probabilities (B, C) (with the predictor's TTA) and, with `ood`, that out-of-distribution score
    (B,) of the image itself (as the thresholds were fitted), from one pass."""
    if ood is None:
        return pred.probs(x), None
    from vitcli.ood import ood_scores

    feats, logits = pred.outputs(x)
    return pred.task.probs(pred.view_logits(x, logits)), ood_scores(pred.ood, feats, logits)[ood]


# ----------------------------------------------------------------------------------------------- looking inside
@dataclass
class Loaded:
    model: nn.Module
    classes: list[str]
    pre: dict[str, Any]  # preprocessing as stored in the checkpoint, img_size possibly overridden
    run_dir: Path
    device: torch.device
    task: Task  # the model's task.Task: its calibrated probabilities

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The task's calibrated probabilities (B, C) (`Task.probs`)."""
        return self.task.probs(logits)


def load(model_arg: str | None, img_size: int | None = None, device: str = "cpu") -> Loaded:
    """The checkpoint's model (newest run when `model_arg` is None) in fp32 eval mode, at `img_size`."""
    from vitcli.checkpoint import load_model
    from vitcli.device import pick_device

    model, ckpt, path = load_model(model_arg)
    dev = pick_device(device)
    model = model.float().eval().to(dev)
    pre = dict(ckpt["preprocess"])
    if img_size is not None and img_size != pre["img_size"]:
        pre = set_resolution(model, pre, img_size)
    from vitcli.task import Task

    return Loaded(model, list(ckpt["classes"]), pre, Path(path).parent, dev, Task.from_meta(ckpt))


def set_resolution(model: nn.Module, pre: dict[str, Any], img_size: int) -> dict[str, Any]:
    """Run the model at another input side: the scratch ViT resamples its positions itself; timm ViTs are
    switched with `set_input_size`. Returns the preprocessing for that side."""
    from vitcli.decode import resize_size_for
    from vitcli.models import backend_of

    backend = backend_of(model)
    ph, pw = backend.patch_size(model)
    if img_size < 1 or img_size % ph or img_size % pw:
        raise VitcliError(f"--img-size {img_size} must be a positive multiple of the patch size {ph}")
    backend.set_input_size(model, img_size)
    return dict(pre, img_size=img_size, resize_size=resize_size_for(img_size, pre["crop_pct"]))
