"""Batched training augmentation and evaluation transforms on the compute device (uint8 in, normalised float out)."""

from __future__ import annotations

import math
from typing import Any

from vitcli.errors import VitcliError


def normalize(x, mean, std):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) normalised."""
    import torch

    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def normalize_(x, mean, std):
    """In place: float (B, 3, H, W) in [0, 255] -> normalised."""
    import torch

    scale = torch.tensor([1 / (255.0 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=x.device).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


def crop_grid(theta, size: int, device, rotated: bool | None = None):
    """F.affine_grid(theta, (B, 3, size, size)) for a CPU theta (B, 2, 3); built separably (x from the column,
    y from the row, several times cheaper) when the window is not rotated (`rotated` None: look at theta)."""
    import torch
    import torch.nn.functional as F

    B = theta.shape[0]
    th = theta.to(device, non_blocking=True)
    if rotated is None:
        rotated = bool(theta[:, 0, 1].any() or theta[:, 1, 0].any())
    if rotated:
        return F.affine_grid(th, [B, 3, size, size], align_corners=False)
    base = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1  # (size,) pixel centres
    gx = th[:, 0, 0].view(B, 1, 1) * base.view(1, 1, size) + th[:, 0, 2].view(B, 1, 1)  # (B, 1, size)
    gy = th[:, 1, 1].view(B, 1, 1) * base.view(1, size, 1) + th[:, 1, 2].view(B, 1, 1)  # (B, size, 1)
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (B, size, size, 2)


TTA_SHIFT_BELOW = 64  # prediction also averages shifted views of model inputs smaller than this side (px): cheap
# there (a small token grid), and worth ~1 point: eight CIFAR-10 models (32 px, 9 to 30 minutes) scored 0.4-1.25
# points more test top-1 with the image and its mirror each also shifted 2 px four ways than with the two alone
# (mean +0.9; benchmarks/tta_views.py)


def tta_shift(img_size: int, mirror: bool, scale_min: float, translate: float) -> int:
    """Pixels test-time augmentation shifts the views by (0: none): img_size / 16 for a model that trained on
    small mirrored, cropped or shifted images (photos), so the shifted views are ones it saw."""
    moved = scale_min < 1 or translate > 0
    return img_size // 16 if mirror and moved and img_size < TTA_SHIFT_BELOW else 0


SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # the ways `tta_views` moves each view (x, y): right, left, down, up


def tta_views(x, pre: dict[str, Any]) -> list:
    """(B, C, S, S) model-sized images -> the views test-time augmentation averages: the image and its mirror, and
    with `pre["shift"]` > 0 (`tta_shift`, stored at training) each of them also shifted that many pixels right,
    left, down and up, the edge reflected into the gap. The first view is the image itself."""
    import torch

    both = [x, x.flip(-1)]
    d = int(pre.get("shift", 0))
    if not d:
        return both
    side = x.shape[-1]

    def reflect(offset: int):  # source index of each output pixel, moved by `offset`, mirrored at the edges
        i = (torch.arange(side, device=x.device) - offset).abs()
        return torch.where(i > side - 1, 2 * (side - 1) - i, i)

    moved = [v.index_select(-1, reflect(d * dx)).index_select(-2, reflect(d * dy)) for v in both for dx, dy in SHIFTS]
    return both + moved


def view_count(pre: dict[str, Any], tta: bool) -> int:
    """Forward passes an image costs: len(`tta_views`) with test-time augmentation, else 1."""
    return 2 * (1 + (len(SHIFTS) if pre.get("shift") else 0)) if tta else 1


def views_text(pre: dict[str, Any]) -> str:
    """What `tta_views` averages, in words."""
    d = int(pre.get("shift", 0))
    both = "the image and its mirror"
    return f"{view_count(pre, True)} views: {both}, each also shifted {d} px four ways" if d else both


def center_crop(x, size: int):
    """(B, C, S, S) -> (B, C, size, size)."""
    s = x.shape[-1]
    top = (s - size) // 2
    return x[..., top:top + size, top:top + size]


class TrainAugment:
    """Batched augmentation on the compute device: random-resized crop + flip in one affine resample,
    optional RandAugment (timm, per image), normalisation, and random erasing (timm)."""

    def __init__(self, cfg, generator):
        self.cfg, self.g = cfg, generator
        self.randaug = None
        if cfg.randaugment:
            from timm.data.auto_augment import rand_augment_transform

            try:
                self.randaug = rand_augment_transform(cfg.randaugment, {"translate_const": 10})
            except Exception as e:
                raise VitcliError(f"'data.randaugment' {cfg.randaugment!r} is not a valid timm RandAugment "
                                  f"spec (e.g. rand-m9-mstd0.5): {e}") from None
        self.erase = None
        if cfg.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=cfg.reprob, mode="pixel", device="cpu")

    def __call__(self, x):
        """uint8 (B, 3, S, S) -> float (B, 3, img_size, img_size), normalised."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        if self.randaug is not None:
            x = self._randaugment(x)
        B, dev = x.shape[0], x.device
        g = self.g
        area = torch.empty(B).uniform_(cfg.scale_min, 1.0, generator=g)
        logr = torch.empty(B).uniform_(-math.log(cfg.ratio_max), math.log(cfg.ratio_max), generator=g)
        ratio = logr.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the side
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(B, generator=g) * (1 - w) + w / 2) * 2 - 1  # crop centre in [-1, 1]
        cy = (torch.rand(B, generator=g) * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(torch.rand(B, generator=g) < cfg.hflip, -1.0, 1.0)
        if cfg.translate > 0:  # shift the window, past the border too (filled with the edge pixels)
            cx = cx + torch.empty(B).uniform_(-2 * cfg.translate, 2 * cfg.translate, generator=g)
            cy = cy + torch.empty(B).uniform_(-2 * cfg.translate, 2 * cfg.translate, generator=g)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        if cfg.rotate > 0:  # rotated window: theta[:, :, :2] = R(angle) @ diag(w * flip, h)
            angle = torch.empty(B).uniform_(-cfg.rotate, cfg.rotate, generator=g) * (math.pi / 180)
            cos, sin = angle.cos(), angle.sin()
            theta[:, 0, 0], theta[:, 0, 1] = w * flip * cos, -h * sin
            theta[:, 1, 0], theta[:, 1, 1] = w * flip * sin, h * cos
        size = cfg.img_size
        grid = crop_grid(theta, size, dev, rotated=cfg.rotate > 0)  # (B, size, size, 2)
        pad = "border" if cfg.translate > 0 or cfg.rotate > 0 else "reflection"
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=pad, align_corners=False)
        if cfg.color_jitter > 0:
            out = self._jitter(out)
        out = normalize_(out, cfg.mean, cfg.std)  # bilinear weights sum to 1: same as normalising first, cheaper
        if self.erase is not None:
            self.erase.device = out.device
            out = self.erase(out)
        return out  # (B, 3, img_size, img_size)

    def _jitter(self, x):
        """Brightness, contrast and saturation of each image times a random factor in [1 - j, 1 + j]."""
        import torch

        j, g, B = self.cfg.color_jitter, self.g, x.shape[0]
        b, c, s = (torch.empty(B, 1, 1, 1).uniform_(1 - j, 1 + j, generator=g).to(x.device) for _ in range(3))
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = grey + (x - grey) * s  # (B, 3, H, W): saturation about each pixel's grey
        mean = grey.mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
        return ((x - mean) * c + mean * b).clamp_(0, 255)  # contrast about the image's mean, then brightness

    def _randaugment(self, x):
        import numpy as np
        import torch
        from PIL import Image

        out = []
        for img in x.cpu():
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            out.append(torch.from_numpy(np.asarray(self.randaug(pil)).copy()).permute(2, 0, 1))
        return torch.stack(out).to(x.device)


def eval_transform(x, pre: dict[str, Any]):
    """uint8 (B, 3, resize_size, resize_size) -> normalised float (B, 3, img_size, img_size)."""
    return normalize(center_crop(x, pre["img_size"]), pre["mean"], pre["std"])
