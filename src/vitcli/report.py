"""Metrics and figures (matplotlib is imported lazily, with the non-interactive Agg backend)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a figure atomically (a crash never leaves half a PNG) and close it."""
    import io

    from vitcli.checkpoint import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
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
