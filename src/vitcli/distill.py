"""Knowledge distillation (DeiT, Touvron et al. 2021): a frozen teacher labels every training batch and the
student's distillation token learns from it while its class token learns from the labels; the student then
predicts with the mean of both heads. A student without a distillation token (a timm model) learns both from
its one head.

The teacher (`train.teacher`) is a run folder, a vitcli checkpoint, an exported .onnx / TorchScript file or
`timm/<name>` (timm's pretrained weights, which must predict the run's classes); it runs without gradients
in the cheapest precision its device runs well (bf16 on CUDA and on CPUs with fast bf16, else fp16 / fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcli.config import Config
from vitcli.errors import VitcliError, first_line
from vitcli.models import TIMM_PREFIX

JUDGE_IMAGES = 50  # validation images below which the teacher's score is printed but not judged against the student


@dataclass
class Teacher:
    """A frozen classifier that takes the student's normalised training images."""

    run: Callable  # teacher-normalised images (B, 3, T, T) -> logits (B, C)
    pre: dict[str, Any]  # the teacher's preprocessing (img_size, mean, std)
    student_pre: dict[str, Any]  # the student's (what the training batches are normalised with)
    device: Any  # torch.device the teacher runs on
    precision: str  # fp32 | bf16 | fp16: autocast for a torch teacher; "fp32" for an ONNX file
    name: str  # what train.teacher named, for messages

    def adapt(self, x):
        """Student-normalised images (B, 3, S, S) -> teacher-normalised (B, 3, T, T)."""
        import torch
        import torch.nn.functional as F

        s, t = self.student_pre, self.pre
        if (s["img_size"], s["mean"], s["std"]) == (t["img_size"], t["mean"], t["std"]):
            return x
        mean_s, std_s, mean_t, std_t = (torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                                        for v in (s["mean"], s["std"], t["mean"], t["std"]))
        x = x.float() * std_s + mean_s  # (B, 3, S, S) in [0, 1]
        if s["img_size"] != t["img_size"]:
            x = F.interpolate(x, size=(t["img_size"], t["img_size"]), mode="bilinear", antialias=True,
                              align_corners=False)  # (B, 3, T, T)
        return (x - mean_t) / std_t

    def eval(self) -> Teacher:
        """What `evaluation.run_eval` asks of a model: a frozen teacher is always in eval mode."""
        return self

    def __call__(self, x):
        """Teacher logits (B, C), float32, without gradients."""
        import torch

        from vitcli.device import autocast

        with torch.no_grad(), autocast(self.device, self.precision):
            return self.run(self.adapt(x)).float()


class Distiller:
    """The training loss with a teacher: (1 - w) * the label loss on the class head + w * the distillation loss
    on the distillation head (hard: cross-entropy with the teacher's class; soft: KL divergence at temperature
    tau, times tau^2)."""

    def __init__(self, teacher: Teacher, kind: str, weight: float, temperature: float,
                 val_acc: float | None = None):
        self.teacher, self.kind, self.weight, self.tau = teacher, kind, weight, temperature
        self.val_acc = val_acc  # the teacher's top-1 on the run's validation images (None: none to score)

    def __call__(self, out, x, target, label_loss):
        """`out`: the student's logits (B, C), or (class head, distillation head) logits; `x` the batch it saw.
        Returns (logits (B, C) for the running accuracy: the mean of the heads, the loss)."""
        import torch.nn.functional as F

        cls, dist = (o.float() for o in out) if isinstance(out, tuple) else (out.float(), out.float())
        logits = (cls + dist) / 2  # (B, C)
        if not len(x):  # an empty padding batch (see train_step): zero gradients
            return logits, logits.sum() * 0.0
        t = self.teacher(x)  # (B, C)
        if self.kind == "hard":
            kd = F.cross_entropy(dist, t.argmax(-1))
        else:
            kd = F.kl_div(F.log_softmax(dist / self.tau, -1), F.log_softmax(t / self.tau, -1), reduction="batchmean",
                          log_target=True) * self.tau**2
        return logits, (1 - self.weight) * label_loss(cls, target) + self.weight * kd


def build_distiller(cfg: Config, classes: list[str], pre: dict[str, Any], device, model,
                    multilabel: bool = False, val=None, world: tuple[int, int] = (0, 1)) -> Distiller | None:
    """The Distiller for `train.teacher` (None when unset); tells `model` to return both heads while training.
    With the validation store `val` (this rank's share by `world` = (rank, world size)), the teacher is scored
    on it first, so the teacher line and the end of the run can say whether it knows more than its student."""
    from vitcli.console import esc, info
    from vitcli.device import pick_precision

    t = cfg.train
    if not t.teacher:
        return None
    if multilabel:
        raise VitcliError(f"'train.teacher' {t.teacher!r}: distillation needs one label per image, the data is "
                          "multi-label")
    run, tpre, tclasses, kind = load_teacher(t.teacher, device, classes)
    if list(tclasses) != list(classes):
        raise VitcliError(f"'train.teacher' {t.teacher!r} predicts {len(tclasses)} classes {list(tclasses)[:5]}, "
                          f"the data has {len(classes)} {list(classes)[:5]}: the teacher must know the same classes "
                          "in the same order")
    precision = "fp32" if kind == "onnx" else pick_precision("auto", device)[0]
    if hasattr(model, "distilled_training"):
        model.distilled_training = True
    if getattr(model, "dist_token", None) is not None:
        token = "the distillation token"
    elif cfg.model.global_pool == "avg":  # models.build_model gives a pooled student no token
        token = "the one head (it reads the mean of the patch tokens, which learns faster than a token of its own)"
    else:
        token = "the one head"
    teacher = Teacher(run, tpre, pre, device, precision, t.teacher)
    acc = None if val is None else teacher_accuracy(teacher, val, pre, 2 * cfg.data.batch_size, *world)
    info(f"[bold]teacher[/] {esc(t.teacher)} ({kind}, {precision}): {t.distill} distillation into {token}, "
         f"weight {t.distill_weight:g}" + (f", temperature {t.distill_temperature:g}" if t.distill == "soft" else "")
         + ("" if acc is None else f"; {acc:.2%} top-1 on this run's {len(val):,} validation images"))
    return Distiller(teacher, t.distill, t.distill_weight, t.distill_temperature, acc)


def teacher_accuracy(teacher: Teacher, val, pre: dict[str, Any], batch_size: int, rank: int = 0,
                     world: int = 1) -> float | None:
    """The teacher's top-1 on the validation store (summed over ranks); None when it holds no images."""
    from vitcli.distributed import all_reduce_sums
    from vitcli.evaluation import run_eval

    ev = run_eval(teacher, val, pre, teacher.device, teacher.precision, batch_size, rank=rank, world=world)
    correct, count = all_reduce_sums([ev.correct, ev.count], teacher.device)
    return correct / count if count else None


def weak_teacher(distiller: Distiller | None, student_acc: float, n_val: int) -> str | None:
    """A warning when the student scored at least as well as its teacher on the validation images, else None
    (also None for fewer than JUDGE_IMAGES of them: a few images decide nothing). Distilled students are pulled
    towards their teacher, so a weak one drags its student down to about its own score, not below it."""
    if distiller is None or distiller.val_acc is None or n_val < JUDGE_IMAGES or student_acc < distiller.val_acc:
        return None
    return (f"the teacher {distiller.teacher.name} scored {distiller.val_acc:.2%} on the {n_val:,} validation images "
            f"and its student {student_acc:.2%}: distillation helps only when the teacher knows more; compare with a "
            "run without train.teacher, or use a stronger teacher")


def load_teacher(name: str, device, classes: list[str]) -> tuple[Callable, dict[str, Any], list[str], str]:
    """(normalised images -> logits, preprocessing, class names, kind) for what `train.teacher` names."""
    if name.startswith(TIMM_PREFIX):
        return timm_teacher(name.removeprefix(TIMM_PREFIX), device, classes)
    from vitcli.checkpoint import load_model, resolve_model_path
    from vitcli.formats import format_of

    path = resolve_model_path(name) if Path(name).exists() else None
    if path is None:
        raise VitcliError(f"'train.teacher' {name!r} does not exist; give a run folder, a vitcli checkpoint, an "
                          f"exported .onnx / TorchScript file or {TIMM_PREFIX}<name>")
    fmt = format_of(path)
    if fmt is None:
        net, ckpt, _ = load_model(path)
        net = net.to(device).eval().requires_grad_(False)
        return net, ckpt["preprocess"], ckpt["classes"], f"checkpoint, {ckpt['model_spec']['backend']}"
    pred = fmt.predictor(path, str(device))
    if fmt.name == "onnx":
        return onnx_runner(pred, device), pred.preprocess, pred.classes, "onnx"
    pred.module.requires_grad_(False)
    return pred.module, pred.preprocess, pred.classes, fmt.name


def onnx_runner(pred, device) -> Callable:
    """Normalised images (B, 3, T, T) on `device` -> logits (B, C) on `device`, through onnxruntime."""
    import torch

    def run(x):
        out = pred.session.run(None, {pred.input_name: x.float().cpu().numpy()})[0]  # (B, C)
        return torch.from_numpy(out).to(device)

    return run


def timm_teacher(name: str, device, classes: list[str]) -> tuple[Callable, dict[str, Any], list[str], str]:
    """timm's pretrained `name`; its head must already predict the run's classes (timm weights carry no class
    names: the run's own are assumed, in order, when the count matches)."""
    import timm

    from vitcli.decode import preprocess_info
    from vitcli.hub import weights_file

    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file(name))})
    except Exception as e:  # no such model, no weights, offline without them in the cache
        raise VitcliError(f"'train.teacher' {TIMM_PREFIX}{name}: {first_line(e)}") from None
    cfg = net.pretrained_cfg
    pre = preprocess_info(cfg["input_size"][-1], cfg.get("crop_pct", 1.0), cfg.get("interpolation", "bicubic"),
                          cfg["mean"], cfg["std"])
    if net.num_classes != len(classes):
        raise VitcliError(f"'train.teacher' {TIMM_PREFIX}{name} predicts {net.num_classes} classes, the data has "
                          f"{len(classes)}: fine-tune it first (vitcli train --model {TIMM_PREFIX}{name} --set "
                          "model.pretrained=true) and give that run folder")
    return net.to(device).eval().requires_grad_(False), pre, classes, "timm"
