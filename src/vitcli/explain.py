"""Class-specific explanations of a ViT's decision and how faithful each explanation is.

Maps (each (B, gh, gw), one weight per patch, summing to 1) for a target class c, from the gradient of the
class-c logit:
- `grad-rollout`: gradient-weighted attention rollout. Per block, Abar = mean over heads of
  (dlogit_c/dA * A)^+ (Chefer et al. 2021's head fusion); then rollout as for plain attention: add the
  identity, normalise rows, multiply the blocks from the first up.
- `chefer`: the rule of Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability" (ICCV), for
  self-attention: R = I, then R <- R + Abar R per block, no normalisation. This is their LRP-free method;
  the LRP-based relevance of their CVPR 2021 paper is not implemented.
- `gradcam`: Grad-CAM (Selvaraju et al. 2017) on the patch tokens entering the last block (the output of
  its first LayerNorm, the layer pytorch-grad-cam recommends for ViTs: the last block's own patch outputs do
  not reach a class-token head). Channel weights = gradient averaged over patch tokens; map = ReLU of the
  weighted sum of channels per patch.
- `rollout`: plain attention rollout (vitcli.attention), the same map for every class, for comparison.

Faithfulness (Petsiuk et al. 2018, RISE): deletion replaces patches, most important first, with a baseline
(by default the image blurred with a Gaussian of one patch side, RISE's insertion canvas; or random pixels,
or the mean image) and records the target-class probability; insertion starts from the baseline and puts
patches back in the same order. A flat mean patch is something many models never saw in training: on the
quadrant example any such patch drops the probability to chance, whatever the order, which hides how good
a map is. The area under each curve (x = share of patches) is the
score: low for deletion and high for insertion mean the map found what the model uses. A random patch order
gives the baseline. Gradients run on the explicit attention path inside `explicit_attention` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    import torch
    from torch import nn

CLASS_METHODS = ("grad-rollout", "gradcam", "chefer")  # maps that depend on the target class
MAP_METHODS = ("rollout",) + CLASS_METHODS
BASELINES = ("mean", "blur", "noise")  # what a removed patch shows in the faithfulness tests
ROLLOUT_DISCARD = 0.9  # the plain rollout's discard ratio in faithfulness (inspect attention's default)


@dataclass
class Gradients:
    """One forward + backward pass for a target class per image."""

    logits: torch.Tensor  # (B, C), detached
    targets: torch.Tensor  # (B,) class index each map explains
    attentions: list[torch.Tensor]  # per block, (B, heads, T, T)
    attention_grads: list[torch.Tensor]  # per block, d target logit / d attention, (B, heads, T, T)
    tokens: torch.Tensor  # (B, T, D) tokens entering the last block (its norm1 output)
    token_grads: torch.Tensor  # (B, T, D)
    num_prefix: int
    grid: tuple[int, int]
    source: list[int] | None  # token rows the head reads; None = mean of patch tokens


def last_block_norm(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    norm = getattr(blocks[-1], "norm1", None) if blocks is not None and len(blocks) else None
    if norm is None:
        raise VitcliError(f"model {type(model).__name__} has no transformer blocks with a norm1 layer; gradcam "
                          "needs a ViT-family model")
    return norm


def gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None) -> Gradients:
    """Forward `x` (B, 3, H, W) on the explicit attention path and take the gradient of each image's
    target-class logit (default: the predicted class) with respect to every attention map and to the tokens
    entering the last block."""
    import torch

    from vitcli.attention import explicit_attention, patch_size_of, source_rows

    acts: list[torch.Tensor] = []
    hook = last_block_norm(model).register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.enable_grad(), explicit_attention(model, keep_graph=True) as store:
            logits = model(x.detach().requires_grad_(True))
            if isinstance(logits, (tuple, list)):  # DeiT distilled in training mode
                logits = (logits[0] + logits[1]) / 2
            if targets is None:
                targets = logits.argmax(dim=1)
            targets = targets.to(logits.device).long()
            score = logits.gather(1, targets[:, None]).sum()  # images are independent: one backward for all
            grads = torch.autograd.grad(score, [*store, acts[-1]])
    finally:
        hook.remove()
    ph, pw = patch_size_of(model)
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if store[0].shape[-1] != prefix + grid[0] * grid[1]:
        raise VitcliError(f"attention has {store[0].shape[-1]} tokens but {prefix} prefix tokens + a "
                          f"{grid[0]}x{grid[1]} patch grid were expected; this model's token layout is not supported")
    return Gradients(logits.detach(), targets.detach(), [a.detach() for a in store], [g.detach() for g in grads[:-1]],
                     acts[-1].detach(), grads[-1].detach(), prefix, grid, source_rows(model))


def weighted_attention(g: Gradients) -> list[torch.Tensor]:
    """Per block, Abar = mean over heads of (grad * A)^+, (B, T, T)."""
    return [(a * d).clamp(min=0).mean(dim=1).float() for a, d in zip(g.attentions, g.attention_grads, strict=True)]


def grad_rollout_map(g: Gradients) -> torch.Tensor:
    """(B, gh, gw) gradient-weighted rollout: identity added, rows normalised, blocks multiplied."""
    import torch

    from vitcli.attention import token_map

    result = None
    for a in weighted_attention(g):  # (B, T, T)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result  # (B, T, T)
    return token_map(result, g.source, g.num_prefix, g.grid)


def chefer_map(g: Gradients) -> torch.Tensor:
    """(B, gh, gw) Chefer et al. 2021 (generic, self-attention): R = I; R <- R + Abar @ R per block."""
    import torch

    from vitcli.attention import token_map

    bars = weighted_attention(g)
    B, T, _ = bars[0].shape
    r = torch.eye(T, dtype=bars[0].dtype, device=bars[0].device).expand(B, T, T)  # (B, T, T)
    for a in bars:
        r = r + a @ r
    # without the identity: for a head that pools the patch tokens, each token's relevance to itself would
    # otherwise dominate the map (the class-token row has no such diagonal entry on patches)
    return token_map(r - torch.eye(T, dtype=r.dtype, device=r.device), g.source, g.num_prefix, g.grid)


def gradcam_map(g: Gradients) -> torch.Tensor:
    """(B, gh, gw) Grad-CAM on the patch tokens entering the last block."""
    tok = g.tokens[:, g.num_prefix:].float()  # (B, N, D)
    weights = g.token_grads[:, g.num_prefix:].float().mean(dim=1)  # (B, D)
    cam = (tok * weights[:, None, :]).sum(dim=-1).clamp(min=0)  # (B, N)
    cam = cam / cam.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return cam.reshape(-1, *g.grid)  # (B, gh, gw)


def explain(model: nn.Module, x: torch.Tensor, method: str, targets: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps (B, gh, gw), logits (B, C), targets (B,)) for one of MAP_METHODS."""
    if method not in MAP_METHODS:
        raise VitcliError(f"--method {method!r} is not valid; use one of {', '.join(MAP_METHODS)}")
    if method == "rollout":
        from vitcli.attention import capture_attention, rollout_map

        cap = capture_attention(model, x)
        t = cap.logits.argmax(dim=1) if targets is None else targets
        return rollout_map(cap, discard_ratio=ROLLOUT_DISCARD), cap.logits.detach(), t
    g = gradients(model, x, targets)
    fn = {"grad-rollout": grad_rollout_map, "chefer": chefer_map, "gradcam": gradcam_map}[method]
    return fn(g), g.logits, g.targets


# ----------------------------------------------------------------------------------------------- faithfulness
def ranking(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, gh, gw) -> (B, N) patch indices, most important first; ties in a seeded random order (so a flat
    map is not read in raster order, which would favour the top-left corner)."""
    import torch

    flat = maps.flatten(1).float().cpu()  # (B, N)
    perm = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(seed))  # (N,)
    order = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices  # (B, N) into perm
    return perm[order]


def random_ranking(batch: int, n: int, seed: int) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])  # (B, N)


def baseline_image(x: torch.Tensor, kind: str, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """What a removed patch shows, (B, 3, H, W) for normalised x: "mean" the dataset mean (0), "blur" the
    image blurred with a Gaussian of sigma = one patch side, "noise" per-pixel N(0, 1) noise (random pixels
    with the dataset's mean and std, as random erasing draws them)."""
    import torch
    import torch.nn.functional as F

    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    if kind != "blur":
        raise VitcliError(f"--baseline {kind!r} is not valid; use one of {', '.join(BASELINES)}")
    sigma = x.shape[-1] / grid[1]
    r = int(2 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()  # (2r+1,)
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def curves(model: nn.Module, x: torch.Tensor, order: torch.Tensor, targets: torch.Tensor,
           grid: tuple[int, int], steps: int, to_probs=None, chunk: int = 256,
           base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves, each (B, steps + 1): the target-class probability (`to_probs` of the
    logits, the model's calibrated rule; default a plain softmax) after removing
    (deletion) or keeping only (insertion) the first round(k N / steps) patches of `order` (B, N), k = 0..steps.
    Removed patches show `base` (B, 3, H, W), default the mean image (0 for normalised input x)."""
    import torch

    B, N = order.shape
    gh, gw = grid
    counts = torch.round(torch.arange(steps + 1) * N / steps).long()  # (S+1,) patches moved at each step
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N).expand(B, N))  # (B, N): position of each patch in the order
    first = rank[:, None, :] < counts[None, :, None]  # (B, S+1, N): patch among the first k
    out = []
    for keep in (~first, first):  # deletion keeps the rest; insertion keeps the first k
        mask = keep.reshape(B, steps + 1, 1, gh, gw).float().to(x.device)  # (B, S+1, 1, gh, gw)
        ph, pw = x.shape[-2] // gh, x.shape[-1] // gw
        mask = mask.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)  # (B, S+1, 1, H, W)
        imgs = x[:, None] * mask if base is None else x[:, None] * mask + base[:, None] * (1 - mask)
        imgs = imgs.flatten(0, 1)  # (B*(S+1), 3, H, W)
        tgt = targets.to(x.device).repeat_interleave(steps + 1)  # (B*(S+1),)
        probs = []
        with torch.no_grad():
            for i in range(0, len(imgs), chunk):
                logits = model(imgs[i:i + chunk]).float()  # (b, C)
                p = to_probs(logits) if to_probs is not None else logits.softmax(-1)  # (b, C)
                probs.append(p.gather(1, tgt[i:i + chunk, None].to(p.device))[:, 0].float().cpu())
        out.append(torch.cat(probs).reshape(B, steps + 1))
    return out[0], out[1]


def auc(curve: torch.Tensor) -> float:
    """Area under the mean curve over x = 0..1 (trapezoid rule); curve (B, S+1)."""
    y = curve.double().mean(dim=0)  # (S+1,)
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


def faithfulness(model: nn.Module, batches, methods: list[str], steps: int, to_probs=None,
                 seed: int = 0, baseline: str = "blur") -> dict[str, Any]:
    """Deletion and insertion curves and AUCs per method and for a random order, over normalised image
    batches (B, 3, H, W); the target is each image's predicted class."""
    import torch

    sums: dict[str, list[torch.Tensor]] = {m: [] for m in [*methods, "random"]}
    images = 0
    for bi, x in enumerate(batches):
        targets, grid, base = None, None, None
        for m in methods:
            maps, logits, targets = explain(model, x, m, targets)
            grid = tuple(maps.shape[-2:])
            base = baseline_image(x, baseline, grid, seed + bi) if base is None else base
            sums[m].append(torch.stack(curves(model, x, ranking(maps, seed + bi), targets, grid, steps,
                                              to_probs, base=base)))  # (2, B, S+1)
        order = random_ranking(len(x), grid[0] * grid[1], seed + 1000 + bi)
        sums["random"].append(torch.stack(curves(model, x, order, targets, grid, steps, to_probs, base=base)))
        images += len(x)
    result: dict[str, Any] = {"images": images, "steps": steps, "baseline": baseline, "methods": {}}
    for m, parts in sums.items():
        c = torch.cat(parts, dim=1)  # (2, images, S+1)
        result["methods"][m] = {"deletion_auc": auc(c[0]), "insertion_auc": auc(c[1]),
                                "deletion_curve": c[0].mean(0).tolist(), "insertion_curve": c[1].mean(0).tolist()}
    return result
