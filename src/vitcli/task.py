"""The task a model solves: one label per image (`single`) or a label vector (`multilabel`), in one table.

A `Task` owns everything that differs between them, so no other module asks which one it holds:
- training: the loss (cross-entropy, BCE or the asymmetric loss of Ridnik et al. 2021), mixup on label
  vectors, hits per image, the validation metric that picks best.pt, what is fitted at the end (temperature
  and conformal scores, or per-class thresholds);
- inference: `probs` turns logits into calibrated probabilities (softmax(z / T) or sigmoid(z / T), averaged
  over the mirrored image under TTA) -- the ONE function every output path (predict, eval, inspect, report,
  exports, serve) calls -- and `decide` turns probabilities into answers (top class or `unknown` below
  --min-prob, per-class labels at their thresholds, conformal sets);
- metadata: what goes into a checkpoint (`task`, `thresholds`, `calibration`) and an export, and back
  (`Task.from_meta`).

    task = Task.from_meta(checkpoint_or_export_meta)
    p = task.probs(logits)            # float64 (N, C)
    answers = task.decide(p, min_prob=None, set_threshold=None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vitcli.calibrate import UNKNOWN  # noqa: F401  (the abstain answer, re-exported)
from vitcli.errors import VitcliError

if TYPE_CHECKING:
    import torch


# ----------------------------------------------------------------------------------------------- losses
def make_loss(kind: str, label_smoothing: float = 0.0):
    """loss(logits (B, C), multi-hot or mixed targets (B, C)) -> scalar mean over images and classes."""
    import torch.nn.functional as F

    def bce(logits, target):
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target)

    return bce if kind == "bce" else asymmetric_loss


def asymmetric_loss(logits, target, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
    """Asymmetric loss (Ridnik et al. 2021): easy negatives are down-weighted by (p_m)^gamma_neg, with the
    negative probability shifted by `clip` (p_m = max(p - clip, 0)); positives keep plain BCE when gamma_pos=0.
    Returned as a mean over images and classes, the same scale as BCE."""
    import torch

    p = torch.sigmoid(logits)  # (B, C)
    p_m = (p - clip).clamp(min=0)
    pos = target * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
    neg = (1 - target) * torch.log((1 - p_m).clamp(min=1e-8)) * p_m**gamma_neg
    return -(pos + neg).mean()


def mix(mixup, x, y):
    """Mixup / cutmix with timm's Mixup (its batch mode) on images, the same mixture of label vectors.

    x: float (B, 3, H, W), mixed in place; y: multi-hot (B, C) -> mixed (B, C)."""
    lam = mixup._mix_batch(x)  # timm: mixes x with x.flip(0) in place and returns the (corrected) weight
    return x, y * lam + y.flip(0) * (1.0 - lam)


class TrainLoss:
    """Cross-entropy with label smoothing and optional class weights; soft (B, C) targets from mixup/cutmix
    get the same class weights."""

    def __init__(self, cfg, counts: list[int], device):
        import torch

        self.class_w = None
        if cfg.data.class_weights == "auto":
            n = len(counts)
            self.class_w = torch.tensor([sum(counts) / (n * max(1, c)) for c in counts], device=device)  # (C,)
        self.ce = torch.nn.CrossEntropyLoss(weight=self.class_w, label_smoothing=cfg.train.label_smoothing)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:  # soft targets (B, C) from mixup / cutmix
            logp = logits.log_softmax(-1)  # (B, C)
            if self.class_w is not None:
                return -(target * logp * self.class_w).sum(-1).mean()
            return -(target * logp).sum(-1).mean()
        return self.ce(logits, target)


class SigmoidLoss:
    """BCE or asymmetric loss on (B, C) targets; class indices (single-label data) become one-hot vectors."""

    class_w = None  # the training summary asks every loss for its class weights

    def __init__(self, kind: str, label_smoothing: float):
        self.kind, self.fn = kind, make_loss(kind, label_smoothing)

    def __call__(self, logits, target):
        import torch.nn.functional as F

        if target.ndim == 1:
            target = F.one_hot(target, logits.shape[1]).float()  # (B, C)
        return self.fn(logits, target)


class LabelVectorMix:
    """timm's Mixup / cutmix for multi-hot targets: the same mixture of images and of label vectors."""

    def __init__(self, mixup):
        self.mixup = mixup

    def __call__(self, x, y):
        return mix(self.mixup, x, y)


LOSS_WORDS = {"ce": "softmax + cross-entropy", "bce": "sigmoid + binary cross-entropy",
              "asl": "sigmoid + asymmetric loss"}


# ----------------------------------------------------------------------------------------------- decisions
@dataclass
class Decision:
    """What a model answers for one image, as class indices (most probable first) into its classes."""

    order: list[int]  # every class, most probable first
    abstained: bool = False  # single-label: the top probability is below its --min-prob threshold
    set: list[int] | None = None  # --coverage: the conformal prediction set
    labels: list[int] | None = None  # multi-label: every class at or above its cut-off
    unsure: list[int] = field(default_factory=list)  # multi-label: at its tuned threshold but below --min-prob


# ----------------------------------------------------------------------------------------------- tasks
class Task:
    """What single- and multi-label models share; subclasses fill in what differs. Holds the calibration
    of one model (temperature, conformal scores, per-class thresholds) once built from its metadata."""

    name: ClassVar[str]  # the checkpoint's "task" value
    words: ClassVar[str]  # how messages name it
    one_label: ClassVar[bool]  # one label per image (else a label vector)
    fits_temperature: ClassVar[bool]  # training ends by fitting a temperature and conformal scores

    def __init__(self, temperature: float = 1.0, conformal_scores: np.ndarray | None = None,
                 thresholds: list[float] | None = None, calibration: dict[str, Any] | None = None):
        self.temperature = temperature  # divides the logits; 1 = none fitted
        self.conformal_scores = conformal_scores  # sorted validation scores 1 - p_true, or None
        self.thresholds = thresholds  # multi-label: per-class cut-offs tuned on validation
        self.calibration = calibration  # the checkpoint's "calibration" entry, as stored

    @staticmethod
    def from_meta(meta: dict[str, Any]) -> Task:
        """The task of a checkpoint or export metadata dict, with its calibration and thresholds."""
        from vitcli.calibrate import calibration_of

        name = meta.get("task") or "single"
        if name not in TASKS:
            raise VitcliError(f"the model's task {name!r} is not known to this vitcli; known: {', '.join(TASKS)}")
        t, scores = calibration_of(meta)
        th = meta.get("thresholds")
        return TASKS[name](t, scores, [float(v) for v in th] if th else None, meta.get("calibration"))

    @staticmethod
    def of_data(ds) -> Task:
        """The task of a scanned dataset (a label file or shards with label vectors: multi-label)."""
        return TASKS["multilabel" if getattr(ds, "multilabel", False) else "single"]()

    def uncalibrated(self) -> Task:
        """The same task without a temperature: the model's raw probabilities (eval's "before" ECE)."""
        return type(self)(thresholds=self.thresholds)

    # ---- inference
    def activation(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities, float64 (N, C), of logits (N, C) divided by the stored temperature. The one
        logits -> probability rule."""
        return self.activation(logits.detach().cpu().double() / self.temperature)  # (N, C)

    def decide(self, probs, min_prob: np.ndarray | None = None, set_threshold: float | None = None
               ) -> list[Decision]:
        """Answers for probabilities (N, C): `min_prob` (C,) per-class minimum probabilities (--min-prob),
        `set_threshold` a conformal threshold (--coverage)."""
        raise NotImplementedError

    def conformal_threshold(self, coverage: float, where: str) -> float:
        raise NotImplementedError

    # ---- training
    def loss_kind(self, cfg) -> str:
        """The loss `train.loss` resolves to (ce | bce | asl); options that do not fit the task are errors."""
        return cfg.train.loss if cfg.train.loss != "auto" else "ce"

    def line(self, cfg) -> str:
        """The task and the loss it trains with (printed at the start of training)."""
        return f"[bold]task[/] {self.words} (one label per image): {LOSS_WORDS[self.loss_kind(cfg)]}"

    def train_loss(self, cfg, counts: list[int], device):
        kind = self.loss_kind(cfg)
        if kind != "ce":
            return SigmoidLoss(kind, cfg.train.label_smoothing)
        return TrainLoss(cfg, counts, device)

    def eval_loss(self):
        raise NotImplementedError

    def mixup(self, mixup):
        """The batch mixer for timm's Mixup (None when off)."""
        return mixup

    def best_metric(self, cfg) -> str:
        """The validation metric that picks best.pt (a key of BEST_SCORE in the engine)."""
        return cfg.train.best_metric

    def keep_val_logits(self, cfg) -> bool:
        """Whether validation must keep every logit (for metrics beyond the summed loss and hits)."""
        return cfg.train.best_metric == "macro_f1"

    def val_metrics(self, ev, n_classes: int, device, metric: str, world: int) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """make_checkpoint's task and thresholds."""
        return {"task": self.name, "thresholds": self.thresholds}

    def export_meta(self, n_classes: int) -> dict[str, Any]:
        raise NotImplementedError


def hits(logits, y):
    """Per image (B,): 1 when the top class is the label (indices (B,)); for label vectors (B, C) the share of
    classes whose sigmoid > 0.5 agrees with the vector."""
    if y.ndim == 2:
        return ((logits > 0) == (y > 0.5)).float().mean(1)
    return logits.argmax(1) == y


class SingleLabel(Task):
    """One class per image: softmax, a temperature and conformal sets, argmax or `unknown`."""

    name, words, one_label, fits_temperature = "single", "single-label", True, True

    def activation(self, z):
        return z.softmax(-1)

    def decide(self, probs, min_prob=None, set_threshold=None):
        p = np.asarray(probs, dtype=np.float64)
        out = []
        for row in p:
            order = np.argsort(-row, kind="stable").tolist()
            d = Decision(order, abstained=min_prob is not None and row[order[0]] < min_prob[order[0]])
            if set_threshold is not None:
                d.set = [i for i in order if 1.0 - row[i] <= set_threshold]
            out.append(d)
        return out

    def conformal_threshold(self, coverage: float, where: str) -> float:
        """The split-conformal threshold for `coverage`; with too few validation images for it, says so and
        returns inf (every class in every set: the only threshold that keeps the guarantee)."""
        from vitcli.calibrate import check_coverage, conformal_threshold
        from vitcli.console import warn

        check_coverage(coverage)
        if self.conformal_scores is None:
            raise VitcliError(f"--coverage needs conformal scores, and '{where}' has none: train with "
                              "'train.calibrate: true' (the default) to store them")
        thr = conformal_threshold(self.conformal_scores, coverage)
        if math.isinf(thr):
            need = math.ceil(coverage / (1 - coverage))
            warn(f"--coverage {coverage:g} needs at least {need} validation images and '{where}' was calibrated "
                 f"on {len(self.conformal_scores)}: every class is in every set (lower --coverage)")
        return thr

    def eval_loss(self):
        import torch

        return torch.nn.CrossEntropyLoss()

    def fit_calibration(self, logits, labels) -> dict[str, Any]:
        """The checkpoint's "calibration" entry from validation logits (N, C) and labels (N,): a temperature
        (kept at 1 with too few mistakes, else bounded) and the conformal scores."""
        from vitcli.calibrate import fit_calibration

        return fit_calibration(logits, labels)

    def val_metrics(self, ev, n_classes, device, metric, world):
        """Macro F1 from the confusion matrix summed over ranks, when it picks the best epoch."""
        if metric != "macro_f1":
            return {}
        from vitcli.distributed import all_reduce_sums
        from vitcli.metrics import averages, confusion_matrix, per_class_metrics

        cm = confusion_matrix(ev.labels.numpy(), ev.logits.argmax(1).numpy(), n_classes)
        cm = np.rint(all_reduce_sums(cm.astype(np.float64).ravel().tolist(), device)).astype(np.int64)
        cm = cm.reshape(n_classes, n_classes)
        return {"val_macro_f1": averages(per_class_metrics(cm), cm)["macro"]["f1"]}

    def export_meta(self, n_classes):
        cal = "softmax(logits / calibration.temperature) -> calibrated probabilities"
        return {"output": {"name": "logits", "shape": ["batch", n_classes],
                           "meaning": cal if self.calibration else "softmax -> probabilities"}}


class MultiLabel(Task):
    """A label vector per image: a sigmoid per class, per-class thresholds tuned on validation, mAP."""

    name, words, one_label, fits_temperature = "multilabel", "multi-label", False, False

    def activation(self, z):
        return z.sigmoid()

    def cutoffs(self, n: int) -> np.ndarray:
        from vitcli.metrics import DEFAULT_THRESHOLD

        return np.asarray(self.thresholds or [DEFAULT_THRESHOLD] * n, dtype=np.float64)

    def decide(self, probs, min_prob=None, set_threshold=None):
        """Per class: present at or above its tuned threshold; with --min-prob, a class between its threshold
        and its minimum probability is `unsure` (neither listed nor ruled out)."""
        p = np.asarray(probs, dtype=np.float64)
        th = self.cutoffs(p.shape[1])
        bar = th if min_prob is None else np.maximum(th, min_prob)
        out = []
        for row in p:
            order = np.argsort(-row, kind="stable").tolist()
            out.append(Decision(order, labels=[i for i in order if row[i] >= bar[i]],
                                unsure=[i for i in order if th[i] <= row[i] < bar[i]]))
        return out

    def conformal_threshold(self, coverage: float, where: str) -> float:
        raise VitcliError(f"--coverage {coverage:g}: prediction sets are for single-label models and '{where}' is "
                          "multi-label; its labels already form a set (each class at its tuned threshold; "
                          "--min-prob raises a class's bar)")

    def loss_kind(self, cfg):
        t, d = cfg.train, cfg.data
        kind = t.loss if t.loss != "auto" else "bce"
        if kind == "ce":
            raise VitcliError("'train.loss' ce needs one label per image; this data is multi-label: use bce or asl")
        if d.class_weights != "none" or d.balanced_sampler:
            key = "data.class_weights" if d.class_weights != "none" else "data.balanced_sampler"
            raise VitcliError(f"'{key}' is for one label per image; turn it off for multi-label data")
        return kind

    def line(self, cfg):
        from vitcli.metrics import MIN_POSITIVES

        return (f"[bold]task[/] multi-label (labels read from the data; several per image): "
                f"{LOSS_WORDS[self.loss_kind(cfg)]}; mAP picks the best epoch and per-class thresholds are tuned on "
                f"the validation set (a class with fewer than {MIN_POSITIVES} validation positives keeps 0.5)")

    def eval_loss(self):
        import torch

        return torch.nn.BCEWithLogitsLoss()

    def mixup(self, mixup):
        return LabelVectorMix(mixup) if mixup is not None else None

    def best_metric(self, cfg):
        return "map" if cfg.train.best_metric != "loss" else "loss"

    def keep_val_logits(self, cfg):
        return True

    def val_metrics(self, ev, n_classes, device, metric, world):
        """Validation mAP from every rank's logits and label vectors; the tuned thresholds are kept."""
        import torch

        from vitcli.metrics import average_precision, tune_thresholds

        logits, labels = ev.logits, ev.labels
        if world > 1:
            import torch.distributed as dist

            parts: list = [None] * world
            dist.all_gather_object(parts, (logits, labels))
            parts = [p for p in parts if p[0].numel()]  # a rank may hold no validation shard
            logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        probs = self.probs(logits).numpy()  # (N, C)
        targets = labels.double().numpy()
        aps = [average_precision(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
        aps = [a for a in aps if not np.isnan(a)]
        self.thresholds = tune_thresholds(probs, targets)
        return {"val_map": float(np.mean(aps)) if aps else 0.0}

    def export_meta(self, n_classes):
        return {"task": self.name, "thresholds": list(self.thresholds or []),
                "output": {"name": "logits", "shape": ["batch", n_classes],
                           "meaning": "sigmoid per class -> probabilities; a class is present at or above its "
                                      "threshold"}}


TASKS: dict[str, type[Task]] = {t.name: t for t in (SingleLabel, MultiLabel)}
