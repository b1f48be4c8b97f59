"""Fine-tuning from related pretrained weights vs training from scratch, for the same number of steps.

Pretrains timm's small `test_vit` on generated filled shapes (6 classes), then trains on a new, related task
(outlined shapes, 4 classes, few training images) twice with the same epochs and batch size: once from the
pretrained weights (recipe `finetune`) and once from random weights (recipe `scratch-small`). Prints both
validation accuracies and the difference.

    python benchmarks/finetune_vs_scratch.py            # ~2-4 min on a 2-core CPU
    python benchmarks/finetune_vs_scratch.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from make_pretrained import (  # noqa: E402
    FINETUNE_SHAPES,
    PRETRAIN_SHAPES,
    make_finetune_set,
    make_shapes,
    pretrain,
)


def compare(work: Path, *, img_size: int = 64, pretrain_per_class: int = 200, pretrain_epochs: int = 15,
            train_per_class: int = 16, val_per_class: int = 40, epochs: int = 20, seed: int = 0,
            lr: float = 0.0) -> dict:
    """Pretrain, then fine-tune and train from scratch with the same steps; returns the accuracies."""
    from vitcli.config import load_config
    from vitcli.train import train

    t0 = time.time()
    pre = make_shapes(work / "pretrain", PRETRAIN_SHAPES, pretrain_per_class, img_size, seed=seed)
    weights = work / "pretrained.safetensors"
    pre_acc = pretrain(pre, weights, img_size=img_size, epochs=pretrain_epochs, output=work / "runs")
    t_pre = time.time() - t0
    data = make_finetune_set(work / "finetune", train_per_class, val_per_class, img_size, seed=seed + 100)
    out = {"pretrain_val_acc": pre_acc, "pretrain_s": t_pre}
    ft_lr = [f"optim.lr={lr}"] if lr else []  # 0: the finetune recipe's lr
    runs = (("finetune", [f"model.pretrained_file={weights}", *ft_lr]), ("scratch", ["model.pretrained=false"]))
    for name, extra in runs:
        cfg = load_config(flags={"model.name": "timm/test_vit", "data.img_size": img_size, "train.epochs": epochs,
                                 "train.output": str(work / "runs"), "train.name": name, "data.batch_size": 16},
                          overrides=["data.crop_pct=1.0", "data.scale_min=0.6", "train.precision=fp32",
                                     "train.threads=1", f"train.seed={seed}", *extra])
        t = time.time()
        res = train(cfg, data)
        out[f"{name}_best_acc"] = res.best_acc
        out[f"{name}_last_acc"] = res.history[-1]["val_acc"]
        out[f"{name}_steps"] = len(res.history) * (train_per_class * len(FINETUNE_SHAPES) // 16)
        out[f"{name}_s"] = time.time() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pretraining and fewer epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0, help="fine-tuning lr (default: the finetune recipe's)")
    args = ap.parse_args()
    import torch

    kw = dict(pretrain_per_class=60, pretrain_epochs=6, epochs=10) if args.quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        r = compare(Path(tmp), seed=args.seed, lr=args.lr, **kw)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; timm/test_vit at 64 px")
    print(f"pretraining (filled shapes, {len(PRETRAIN_SHAPES)} classes): val acc {r['pretrain_val_acc']:.3f} "
          f"in {r['pretrain_s']:.0f} s")
    for name in ("finetune", "scratch"):
        print(f"{name:>9}: {r[f'{name}_steps']} steps, val acc best {r[f'{name}_best_acc']:.3f} "
              f"last {r[f'{name}_last_acc']:.3f} ({r[f'{name}_s']:.0f} s)")
    print(f"fine-tuning - scratch (last epoch): {r['finetune_last_acc'] - r['scratch_last_acc']:+.3f}")


if __name__ == "__main__":
    main()
