"""Attention capture for any supported ViT, attention rollout and mean attention distance.

Training and prediction keep the fused `F.scaled_dot_product_attention` path. Only inside `capture_attention`
does each attention module run the explicit softmax path, so its probabilities can be read; the fused
setting (or the original timm `forward`) is restored afterwards, also when the forward pass fails.

Works for the from-scratch `vitcli.vit.VisionTransformer` and timm ViT-family models built from
`timm.models.vision_transformer.Attention` (ViT, DeiT with its distillation token, register-token models),
with any number of prefix tokens (`model.num_prefix_tokens`) and any patch grid, square or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    import torch
    from torch import nn

FUSIONS = ("mean", "max", "min")


@dataclass
class Captured:
    """What one forward pass with attention capture returns."""

    logits: torch.Tensor  # (B, num_classes)
    attentions: list[torch.Tensor]  # per block, (B, heads, T, T) with T = prefix + gh * gw
    num_prefix: int  # tokens before the patch tokens (class, distillation, register tokens)
    grid: tuple[int, int]  # patch grid (gh, gw) of this input
    source: list[int] | None  # token rows the head reads (class / distillation); None = mean of patch tokens


@contextlib.contextmanager
def explicit_attention(model: nn.Module, keep_graph: bool = False) -> Iterator[list]:
    """Run every attention module on the explicit path while inside; yields the list that collects the
    attention probabilities (B, heads, T, T), one entry per attention call, in call order (still in the
    autograd graph with `keep_graph`, so gradients with respect to them can be taken)."""
    from vitcli.models import backend_of

    backend = backend_of(model)
    if not backend.attention_modules(model):
        raise VitcliError(f"model {type(model).__name__} has no attention layers vitcli can read; inspect "
                          "supports the from-scratch ViT and timm ViT / DeiT / register-token models")
    store: list = []
    with backend.explicit_attention(model, store, keep_graph):
        yield store


def patch_size_of(model: nn.Module) -> tuple[int, int]:
    """(ph, pw): input pixels per token, for any backend."""
    from vitcli.models import backend_of

    return backend_of(model).patch_size(model)


def model_grid(model: nn.Module) -> tuple[int, int]:
    """The token grid the model was built for (its position embeddings)."""
    from vitcli.models import backend_of

    return backend_of(model).grid(model)


def source_rows(model: nn.Module) -> list[int] | None:
    """Token rows whose output the classifier reads: the class token (and the distillation token of DeiT);
    None when the head pools the patch tokens."""
    pool = getattr(model, "global_pool", "token")
    if pool not in ("token", "map") or getattr(model, "cls_token", None) is None:
        return None
    return [0, 1] if getattr(model, "dist_token", None) is not None else [0]


def capture_attention(model: nn.Module, x: torch.Tensor) -> Captured:
    """Forward `x` (B, 3, H, W) once on the explicit path and return logits and every block's attention."""
    import torch

    with torch.no_grad(), explicit_attention(model) as store:
        logits = model(x)
    if isinstance(logits, (tuple, list)):  # DeiT distilled in training mode: (class head, distillation head)
        logits = (logits[0] + logits[1]) / 2
    if not store:
        raise VitcliError(f"model {type(model).__name__} ran no attention layer vitcli can read")
    ph, pw = patch_size_of(model)
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)
    tokens = store[0].shape[-1]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if tokens != prefix + grid[0] * grid[1]:
        raise VitcliError(f"attention has {tokens} tokens but {prefix} prefix tokens + a {grid[0]}x{grid[1]} "
                          "patch grid were expected; this model's token layout is not supported")
    return Captured(logits, list(store), prefix, grid, source_rows(model))


def fuse_heads(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T) by mean, max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise VitcliError(f"--fusion {fusion!r} is not valid; use one of {', '.join(FUSIONS)}")


def rollout(attentions: list[torch.Tensor], *, fusion: str = "mean", discard_ratio: float = 0.0,
            num_prefix: int = 1, head: int | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): fuse heads (or take one `head`), drop the weakest
    `discard_ratio` of each row's weights to patch tokens, add the identity for the residual, renormalise
    rows, and multiply the layers from the first up. Returns (B, T, T)."""
    import torch

    if not 0.0 <= discard_ratio < 1.0:
        raise VitcliError(f"--discard {discard_ratio} must be in [0, 1)")
    result = None
    for attn in attentions:  # each (B, heads, T, T)
        a = attn[:, head] if head is not None else fuse_heads(attn, fusion)  # (B, T, T)
        a = a.float().clone()
        T = a.shape[-1]
        k = int((T - num_prefix) * discard_ratio)
        if k > 0:  # zero the k smallest weights to patch tokens in every row; prefix columns are kept
            patch = a[..., num_prefix:]  # (B, T, T - prefix), a view
            idx = patch.topk(k, dim=-1, largest=False).indices
            patch.scatter_(-1, idx, 0.0)
        a = a + torch.eye(T, dtype=a.dtype, device=a.device)  # residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result  # (B, T, T)
    return result


def token_map(mat: torch.Tensor, cap_source: list[int] | None, num_prefix: int,
              grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, T) token-to-token weights -> (B, gh, gw) weight of each patch, read from the source rows
    (class token, or the mean over patch tokens when the head pools them), normalised to sum to 1."""
    if cap_source is None:
        rows = mat[:, num_prefix:, num_prefix:].mean(dim=1)  # (B, N)
    else:
        rows = mat[:, cap_source, num_prefix:].mean(dim=1)  # (B, N)
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows.reshape(-1, grid[0], grid[1])  # (B, gh, gw)


def rollout_map(cap: Captured, *, fusion: str = "mean", discard_ratio: float = 0.0, layers: int | None = None,
                head: int | None = None) -> torch.Tensor:
    """(B, gh, gw) rollout through the first `layers` blocks (all when None), summing to 1 per image."""
    atts = cap.attentions if layers is None else cap.attentions[:layers]
    mat = rollout(atts, fusion=fusion, discard_ratio=discard_ratio, num_prefix=cap.num_prefix, head=head)
    return token_map(mat, cap.source, cap.num_prefix, cap.grid)


def head_maps(cap: Captured, layer: int) -> torch.Tensor:
    """(B, heads, gh, gw): what the source token(s) attend to in each head of one layer (sums to 1)."""
    attn = cap.attentions[layer]  # (B, heads, T, T)
    B, H, T, _ = attn.shape
    maps = token_map(attn.reshape(B * H, T, T), cap.source, cap.num_prefix, cap.grid)
    return maps.reshape(B, H, *cap.grid)


def mean_attention_distance(attn: torch.Tensor, num_prefix: int, grid: tuple[int, int],
                            patch: tuple[int, int]) -> torch.Tensor:
    """(B, heads, T, T) -> (B, heads): attention-weighted distance in pixels between query and key patch
    centres, averaged over query patches (the ViT paper's figure 7, right). Weights to prefix tokens are
    left out and each row is renormalised over the patch keys."""
    import torch

    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32) * patch[0],
                            torch.arange(gw, dtype=torch.float32) * patch[1], indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(attn.device)  # (N, 2) pixels
    dist = torch.cdist(pos, pos)  # (N, N)
    a = attn[..., num_prefix:, num_prefix:].float()  # (B, heads, N, N)
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * dist).sum(dim=-1).mean(dim=-1)  # (B, heads)
