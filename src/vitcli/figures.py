"""Metrics and figures (matplotlib is imported lazily, with the non-interactive Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.console import visible, warn
from vitcli.errors import VitcliError

if TYPE_CHECKING:
    import torch

PANEL_IN, TITLE_IN, SUPTITLE_IN, DPI = 2.0, 0.25, 0.5, 100  # attention figure layout, inches and dots/inch

LABEL_CHARS = 32  # a class or file name drawn in a figure is cut to this many characters


def fig_label(text: object, limit: int = LABEL_CHARS) -> str:
    """A name as drawn in a figure: control characters as escapes, cut to `limit` characters with '...'."""
    from vitcli.errors import clip

    return clip(visible(text), limit)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120, tight: bool = True) -> None:
    """Write a figure atomically (a crash never leaves half a PNG) and close it; tight=False keeps the
    exact figsize * dpi pixel size."""
    import io

    from vitcli.files import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy per epoch, train and val, side by side."""
    plt = pyplot()
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_acc"] for r in history], "o-", label="train")
    b.plot(ep, [r["val_acc"] for r in history], "o-", label="val")
    b.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion(cm, classes: list[str], path: str | Path, normalize: bool = False) -> None:
    """Confusion matrix heat map, counts or row-normalised (each true class sums to 1)."""
    import numpy as np

    plt = pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    n = len(classes)
    side = min(24.0, max(4.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, shown.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true",
           title="confusion matrix" + (" (row-normalised)" if normalize else ""))
    labels = [fig_label(c) for c in classes]
    ax.set_xticklabels(labels, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    if n <= 30:
        top = shown.max() or 1.0
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * top else "black")
    save_figure(fig, path)


def plot_reliability(bins: list[dict], ece: float, path: str | Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal of perfect calibration."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers = [(x["lo"] + x["hi"]) / 2 for x in bins]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    a.bar(centers, [x["accuracy"] for x in bins], width=width, edgecolor="black", label="accuracy")
    a.bar(centers, [x["confidence"] - x["accuracy"] if x["count"] else 0 for x in bins], width=width,
          bottom=[x["accuracy"] for x in bins], color="red", alpha=0.3, label="gap to confidence")
    a.plot([0, 1], [0, 1], "k--", lw=1)
    a.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {ece:.4f})")
    a.legend(loc="upper left", fontsize=8)
    b.bar(centers, [x["count"] for x in bins], width=width, edgecolor="black")
    b.set(xlabel="confidence (top-1 probability)", ylabel="images")
    save_figure(fig, path)


def plot_mistakes(items: list[dict], path: str | Path, pre: dict) -> None:
    """Gallery of mistakes (file, true, predicted, prob_predicted, loss), as the model sees them."""
    import math

    from vitcli.augment import center_crop
    from vitcli.decode import BadImage, decode_square

    plt = pyplot()
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items, strict=False):
        try:
            img = center_crop(decode_square(it["file"], pre["resize_size"], pre["interpolation"]), pre["img_size"])
            ax.imshow(img.permute(1, 2, 0).numpy())
        except BadImage:
            pass
        ax.set_title(f"true {fig_label(it['true'])}\npred {fig_label(it['predicted'])} "
                     f"({it['prob_predicted']:.2f})\n"
                     f"loss {it['loss']:.2f}", fontsize=8)
    fig.suptitle("highest-loss mistakes")
    save_figure(fig, path)


def overlay(photo: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5):
    """uint8 photo (3, H, W) + heat map (gh, gw) -> float RGB (H, W, 3): the map upsampled bilinearly,
    scaled to [0, 1], coloured with 'jet' and blended over the photo."""
    import matplotlib
    import torch.nn.functional as F

    H, W = photo.shape[-2:]
    h = F.interpolate(heat[None, None].float().cpu(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)  # (H, W)
    colour = matplotlib.colormaps["jet"](h.numpy())[..., :3]  # (H, W, 3)
    img = photo.permute(1, 2, 0).float().cpu().numpy() / 255.0  # (H, W, 3)
    return (1 - alpha) * img + alpha * colour


def panel_figure(rows: int, cols: int, title: str):
    """A figure of rows x cols image panels of exactly (cols * 200) x (rows * 225 + 50) pixels."""
    plt = pyplot()
    w, h = cols * PANEL_IN, rows * (PANEL_IN + TITLE_IN) + SUPTITLE_IN
    fig = plt.figure(figsize=(w, h), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (SUPTITLE_IN + TITLE_IN) / h, wspace=0.04,
                        hspace=TITLE_IN / PANEL_IN)  # the band above each row holds its panel titles
    fig.suptitle(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def decode_batch(paths: list[Path], pre: dict[str, Any]) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """(readable paths, uint8 crops (B, 3, S, S) exactly as the model sees them, normalised (B, 3, S, S));
    unreadable files are skipped with a warning."""
    import torch

    from vitcli.augment import center_crop, eval_transform
    from vitcli.decode import BadImage, decode_square

    keep, imgs = [], []
    for p in paths:
        try:
            imgs.append(decode_square(p, pre["resize_size"], pre.get("interpolation", "bicubic")))
            keep.append(p)
        except BadImage as e:
            warn(f"skipped {e}")
    if not imgs:
        raise VitcliError("none of the images could be read")
    raw = torch.stack(imgs)  # (B, 3, R, R) uint8
    return keep, center_crop(raw, pre["img_size"]), eval_transform(raw, pre)


def plot_ood(scores: dict, report: dict, path: Path) -> Path:
    """One histogram panel per out-of-distribution score: labelled (in-distribution) vs --ood-data images, with
    the model's threshold; titled with the AUROC."""
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.2), squeeze=False)
    for ax, (name, (s_id, s_ood)) in zip(axes[0], scores.items(), strict=True):
        bins = np.linspace(min(s_id.min(), s_ood.min()), max(s_id.max(), s_ood.max()), 40)
        ax.hist(s_id, bins=bins, alpha=0.6, density=True, label=f"labelled ({len(s_id)})")
        ax.hist(s_ood, bins=bins, alpha=0.6, density=True, label=f"--ood-data ({len(s_ood)})")
        r = report["scores"][name]
        ax.axvline(r["threshold"], color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{name}: AUROC {r['auroc']:.3f}", fontsize=9)
        ax.set_xlabel("score (higher = less like the training data)", fontsize=8)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return path
