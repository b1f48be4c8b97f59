"""`vitcli inspect`: attention maps and the ViT paper's analyses, plus a dataset check before training.

Every drawing analysis writes PNGs into `--output` (default `<run folder>/inspect/`) and returns their paths.
Both model backends go through the same code: `vitcli.attention` reads any supported ViT's attention.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.console import esc, out
from vitcli.errors import VitcliError, at_least
from vitcli.figures import DPI, decode_batch, fig_label, overlay, panel_figure
from vitcli.inference import Loaded, load

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS = ("all", "rollout", "raw", "grad-rollout", "gradcam", "chefer")


def output_dir(output: str | Path | None, run_dir: Path) -> Path:
    from vitcli.files import ensure_dir

    return ensure_dir(Path(output) if output else run_dir / "inspect", "--output")


def collect_images(items: list[Path]) -> list[Path]:
    """Image files named directly, plus every image under named folders."""
    from vitcli.decode import IMAGE_EXTS
    from vitcli.folders import list_images

    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise VitcliError(f"folder '{p}' holds no images (extensions: {', '.join(sorted(IMAGE_EXTS))})")
            found += files
        elif p.exists():  # a FIFO or device is reported (and skipped) when it is decoded, never opened
            found.append(p)
        else:
            raise VitcliError(f"image '{p}' does not exist")
    if not found:
        raise VitcliError("no images given; name image files or folders")
    return found


# ----------------------------------------------------------------------------------------------- attention
def parse_indices(text: str | None, n: int, flag: str, default: str) -> list[int]:
    """'all' | 'last' | 'N' | 'N,M,...' (0-based, negative counts from the end) -> sorted indices < n."""
    text = (text or default).strip().lower()
    if text == "all":
        return list(range(n))
    if text == "last":
        return [n - 1]
    idx = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise VitcliError(f"{flag} {text!r}: use all, last, or 0-based numbers like 0,3,-1") from None
        if not -n <= i < n:
            raise VitcliError(f"{flag} {i} is out of range: the model has {n} (0..{n - 1})")
        idx.append(i % n)
    return sorted(set(idx))


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def inspect_attention(images: list[Path], *, model: str | None = None, output: str | Path | None = None,
                      method: str = "all", layer: str | None = None, head: str | None = None,
                      fusion: str = "mean", discard: float = 0.9, img_size: int | None = None,
                      device: str = "cpu", batch_size: int = 16, target: str | None = None) -> list[Path]:
    """Attention overlays for each image: rollout, the source token's attention per head of the chosen
    layer(s), and the full layer x head grid, or a class-specific map for `target` (default: the predicted
    class) (`method` picks). Returns the PNG paths written."""
    from vitcli.attention import FUSIONS, capture_attention, head_maps, rollout_map
    from vitcli.explain import CLASS_METHODS
    from vitcli.figures import save_figure

    if method not in METHODS:
        raise VitcliError(f"--method {method!r} is not valid; use one of {', '.join(METHODS)}")
    if method in CLASS_METHODS:
        return explain_images(images, model=model, output=output, method=method, target=target,
                              img_size=img_size, device=device, batch_size=batch_size)
    if target is not None:
        raise VitcliError(f"--class explains one class; it needs --method {' or '.join(CLASS_METHODS)} (attention "
                          "maps are the same for every class)")
    if fusion not in FUSIONS:
        raise VitcliError(f"--fusion {fusion!r} is not valid; use one of {', '.join(FUSIONS)}")
    if not 0.0 <= discard < 1.0:
        raise VitcliError(f"--discard {discard} must be in [0, 1)")
    ld, out_dir, batches = loaded_batches(images, model, img_size, device, output, batch_size)
    written: list[Path] = []
    used: set[str] = set()
    for keep, photos, x in batches:
        cap = capture_attention(ld.model, x.to(ld.device))
        depth, heads = len(cap.attentions), cap.attentions[0].shape[1]
        layers = parse_indices(layer, depth, "--layer", "all" if method == "rollout" else "last")
        head_idx = parse_indices(head, heads, "--head", "all")
        probs = ld.probs(cap.logits)  # (B, C), as predict reports them
        for b, path in enumerate(keep):
            p, c = probs[b].max(dim=0)
            name = f"{fig_label(path.name)}: {fig_label(ld.classes[int(c)])} ({float(p):.1%})"  # drawn, cut
            stem = _unique_stem(path, used)
            if method in ("all", "rollout"):
                if len(layers) > 1 and layers != list(range(depth)) or 1 < len(head_idx) < heads:
                    raise VitcliError("rollout takes one --layer (roll out blocks 0..N; default all) and one "
                                      "--head (default all: fuse the heads)")
                upto = layers[-1] + 1
                one_head = head_idx[0] if len(head_idx) == 1 and heads > 1 else None
                how = f"head {one_head}" if one_head is not None else f"{fusion} fusion"
                heat = rollout_map(cap, fusion=fusion, discard_ratio=discard, layers=upto, head=one_head)[b]
                fig, axes = panel_figure(1, 2, f"{name}\nrollout of blocks 0-{upto - 1}, {how}, discard {discard}")
                axes[0, 0].imshow(photos[b].permute(1, 2, 0).cpu().numpy())
                axes[0, 0].set_title("input", fontsize=8)
                axes[0, 1].imshow(overlay(photos[b], heat))
                axes[0, 1].set_title("rollout", fontsize=8)
                written.append(out_dir / f"{stem}_rollout.png")
                save_figure(fig, written[-1], dpi=DPI, tight=False)
            if method in ("all", "raw"):
                raw_layers = layers if method == "raw" or layer else [depth - 1]
                written.append(_draw_heads(cap, b, photos[b], raw_layers, head_idx, name,
                                           out_dir / f"{stem}_attention.png", head_maps))
            if method == "all":
                written.append(_draw_heads(cap, b, photos[b], list(range(depth)), list(range(heads)), name,
                                           out_dir / f"{stem}_grid.png", head_maps))
    return written


def class_maps(ld: Loaded, x: torch.Tensor, method: str, target: str | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps (B, gh, gw), calibrated probabilities (B, C), target indices (B,)) for normalised images x."""
    import torch

    from vitcli.explain import explain

    targets = None
    if target is not None:
        if target not in ld.classes:
            raise VitcliError(f"--class {target!r} is not a class of the model; use one of "
                              f"{', '.join(ld.classes[:30])}")
        targets = torch.full((len(x),), ld.classes.index(target), dtype=torch.long)
    maps, logits, t = explain(ld.model, x.to(ld.device), method, targets)
    return maps, ld.probs(logits).cpu(), t.cpu()


def loaded_batches(images: list[Path], model: str | None, img_size: int | None, device: str,
                   output: str | Path | None, batch_size: int):
    """(loaded model, output folder, decoded batches): what every per-image view starts from; each batch is
    (paths that decoded, uint8 photos, model input)."""
    paths = collect_images(images)
    ld = load(model, img_size, device)
    out_dir = output_dir(output, ld.run_dir)
    return ld, out_dir, (decode_batch(paths[s:s + batch_size], ld.pre) for s in range(0, len(paths), batch_size))


def explain_images(images: list[Path], *, model: str | None, output: str | Path | None, method: str,
                   target: str | None, img_size: int | None, device: str, batch_size: int = 16) -> list[Path]:
    """One PNG per image: the input and the `method` map for class `target` (default: the predicted class),
    named <image>_<method>_<class>.png."""
    import re

    from vitcli.figures import save_figure

    ld, out_dir, batches = loaded_batches(images, model, img_size, device, output, batch_size)
    written: list[Path] = []
    used: set[str] = set()
    for keep, photos, x in batches:
        maps, probs, targets = class_maps(ld, x, method, target)
        for b, path in enumerate(keep):
            p, c = probs[b].max(dim=0)
            t = int(targets[b])
            title = (f"{path.name}: {ld.classes[int(c)]} ({float(p):.1%})\n{method} for class "
                     f"{ld.classes[t]} (p={float(probs[b, t]):.1%})")
            fig, axes = panel_figure(1, 2, title)
            axes[0, 0].imshow(photos[b].permute(1, 2, 0).cpu().numpy())
            axes[0, 0].set_title("input", fontsize=8)
            axes[0, 1].imshow(overlay(photos[b], maps[b]))
            axes[0, 1].set_title(method, fontsize=8)
            safe = re.sub(r"[^\w.-]+", "_", ld.classes[t])
            written.append(out_dir / f"{_unique_stem(path, used)}_{method}_{safe}.png")
            save_figure(fig, written[-1], dpi=DPI, tight=False)
    return written


def parse_methods(text: str) -> list[str]:
    """--method for faithfulness: all, or a comma list of rollout, grad-rollout, gradcam, chefer."""
    from vitcli.explain import MAP_METHODS

    if text.strip() == "all":
        return list(MAP_METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in MAP_METHODS]
    if bad or not methods:
        raise VitcliError(f"--method {text!r}: use all or a comma list of {', '.join(MAP_METHODS)}")
    return list(dict.fromkeys(methods))


def inspect_faithfulness(data: list[Path], *, model: str | None = None, output: str | Path | None = None,
                         method: str = "all", max_images: int = 100, steps: int = 16, img_size: int | None = None,
                         device: str = "cpu", json_path: str | Path | None = None, baseline: str = "blur",
                         batch_size: int = 16) -> tuple[dict[str, Any], list[Path]]:
    """Deletion / insertion AUC per method beside a random order (printed, drawn, optionally as JSON)."""
    import json

    from rich.table import Table

    from vitcli.explain import BASELINES, faithfulness

    methods = parse_methods(method)
    if baseline not in BASELINES:
        raise VitcliError(f"--baseline {baseline!r} is not valid; use one of {', '.join(BASELINES)}")
    at_least("--max-images", max_images)
    at_least("--steps", steps)
    paths = collect_images(data)
    if len(paths) > max_images:  # spread over the set (class folders are listed in order)
        paths = [paths[i * len(paths) // max_images] for i in range(max_images)]
    ld = load(model, img_size, device)
    from vitcli.attention import patch_size_of

    ph, pw = patch_size_of(ld.model)
    steps = min(steps, (ld.pre["img_size"] // ph) * (ld.pre["img_size"] // pw))  # at most one patch a step

    def batches():
        for start in range(0, len(paths), batch_size):
            yield decode_batch(paths[start:start + batch_size], ld.pre)[2].to(ld.device)

    res = faithfulness(ld.model, batches(), methods, steps, ld.probs, baseline=baseline)
    res = {"model": str(ld.run_dir), "target": "predicted class", **res}
    tab = Table(title=f"faithfulness on {res['images']} images (target: predicted class; removed patches show: "
                      f"{baseline}; deletion: lower is better, insertion: higher is better)", title_justify="left")
    for col in ("method", "deletion AUC", "insertion AUC"):
        tab.add_column(col, justify="left" if col == "method" else "right")
    rnd = res["methods"]["random"]
    for m, r in res["methods"].items():
        d_ok = m != "random" and r["deletion_auc"] < rnd["deletion_auc"]
        i_ok = m != "random" and r["insertion_auc"] > rnd["insertion_auc"]
        tab.add_row(m, f"{'[green]' if d_ok else ''}{r['deletion_auc']:.4f}",
                    f"{'[green]' if i_ok else ''}{r['insertion_auc']:.4f}")
    out.print(tab)
    path = output_dir(output, ld.run_dir) / "faithfulness.png"
    _draw_curves(res, path)
    written = [path]
    if json_path:
        from vitcli.files import write_output  # a file the user named: written through, never replaced

        write_output(json_path, json.dumps(res, indent=1).encode(), "--json-out")
        written.append(Path(json_path))
    return res, written


def _draw_curves(res: dict[str, Any], path: Path) -> None:
    from vitcli.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for m, r in res["methods"].items():
            y = r[f"{kind}_curve"]
            x = [i / (len(y) - 1) for i in range(len(y))]
            ax.plot(x, y, "k--" if m == "random" else "-", label=f"{m} (AUC {r[f'{kind}_auc']:.3f})")
        ax.set_xlabel(f"share of patches {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _draw_heads(cap, b: int, photo, layers: list[int], heads: list[int], name: str, path: Path,
                head_maps) -> Path:
    from vitcli.figures import save_figure

    src = "patch tokens" if cap.source is None else "class token"
    fig, axes = panel_figure(len(layers), len(heads), f"{name}\nattention of the {src} per block and head")
    for r, layer in enumerate(layers):
        maps = head_maps(cap, layer)[b]  # (heads, gh, gw)
        for c, h in enumerate(heads):
            axes[r, c].imshow(overlay(photo, maps[h]))
            axes[r, c].set_title(f"block {layer} head {h}", fontsize=8)
    save_figure(fig, path, dpi=DPI, tight=False)
    return path


# ----------------------------------------------------------------------------------------------- model
def model_for_summary(model: str | None, config: Path | None, img_size: int | None,
                      num_classes: int) -> tuple[nn.Module, int, str]:
    """(model, input side, description) from a checkpoint/run, a config file, or a model name."""
    from vitcli.config import ModelConfig, load_config
    from vitcli.models import canonical_name, model_from_spec, model_spec

    if config is not None:
        if model is not None:
            raise VitcliError("give --model or --config, not both")
        cfg = load_config(config)
        size = img_size or cfg.data.img_size
        spec = model_spec(cfg.model, num_classes, size)
        return model_from_spec(spec, pretrained=False).eval(), size, f"config '{config}' ({cfg.model.name})"
    if model is None or Path(model).exists():
        ld = load(model, img_size)
        return ld.model, ld.pre["img_size"], f"checkpoint in '{ld.run_dir}'"
    name = canonical_name(model)
    size = img_size or 224
    spec = model_spec(ModelConfig(name=name), num_classes, size)  # raises for unknown names
    return model_from_spec(spec, pretrained=False).eval(), size, f"{name} (random weights)"


def count_flops(model: nn.Module, img_size: int) -> tuple[int, dict[str, int]]:
    """FLOPs for one image (torch's flop counter, a multiply-add = 2) and per module name."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vitcli.attention import explicit_attention

    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    # the explicit path, because the flop counter has no formula for every fused attention kernel
    with torch.no_grad(), explicit_attention(model), FlopCounterMode(display=False) as fc:
        model(x)
    prefix = type(model).__name__ + "."
    per = {k.removeprefix(prefix): int(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    return int(fc.get_total_flops()), per


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def summarize_model(model: nn.Module, img_size: int) -> dict[str, Any]:
    """Parameters per part, FLOPs per image, tokens, patch grid and a per-block table."""
    from vitcli.attention import model_grid, patch_size_of

    parts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        parts[name.split(".")[0]] += p.numel()
    ph, pw = patch_size_of(model)
    grid = (img_size // ph, img_size // pw)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    total, per = count_flops(model, img_size)
    blocks = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        attn = blk.attn
        blocks.append({"block": i, "params": sum(p.numel() for p in blk.parameters()),
                       "flops": per.get(f"blocks.{i}", 0), "heads": attn.num_heads, "head_dim": attn.head_dim,
                       "mlp_hidden": blk.mlp.fc1.out_features})
    return {"type": type(model).__name__, "params": sum(parts.values()), "parts": dict(parts), "flops": total,
            "img_size": img_size, "patch": (ph, pw), "grid": grid, "trained_grid": model_grid(model),
            "prefix_tokens": prefix, "tokens": prefix + grid[0] * grid[1],
            "embed_dim": getattr(model, "embed_dim", None), "blocks": blocks}


def inspect_model(*, model: str | None = None, config: Path | None = None, img_size: int | None = None,
                  num_classes: int = 1000) -> dict[str, Any]:
    """Print the architecture summary of a run, a config or a model name; returns it as a dict."""
    from rich.table import Table

    net, size, what = model_for_summary(model, config, img_size, num_classes)
    s = summarize_model(net, size)
    out.print(f"[bold]{esc(s['type'])}[/] from {esc(what)}")
    out.print(f"input {size}x{size} px, patch {s['patch'][0]}x{s['patch'][1]}, grid {s['grid'][0]}x{s['grid'][1]}"
              f", tokens {s['tokens']} ({s['prefix_tokens']} prefix + {s['grid'][0] * s['grid'][1]} patches), "
              f"width {s['embed_dim']}, {len(s['blocks'])} blocks")
    out.print(f"parameters {s['params']:,} ({human(s['params'])}), FLOPs per image {human(s['flops'])} "
              "(torch.utils.flop_counter; a multiply-add counts 2)")
    t = Table("part", "parameters", "share", title="parameters per part")
    for k, v in s["parts"].items():
        t.add_row(esc(k), f"{v:,}", f"{v / max(s['params'], 1):.1%}")
    out.print(t)
    t = Table("block", "parameters", "FLOPs", "heads", "head dim", "MLP hidden", title="blocks")
    for b in s["blocks"]:
        t.add_row(str(b["block"]), f"{b['params']:,}", human(b["flops"]), str(b["heads"]), str(b["head_dim"]),
                  str(b["mlp_hidden"]))
    out.print(t)
    return s


# ----------------------------------------------------------------------------------------------- posembed
def posembed_similarity(model: nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cosine similarity of every patch's position embedding with every other: (gh, gw, gh, gw)."""
    import torch.nn.functional as F

    from vitcli.attention import model_grid

    pos = getattr(model, "pos_embed", None)
    if pos is None:
        raise VitcliError(f"model {type(model).__name__} has no learned absolute position embedding")
    gh, gw = model_grid(model)
    patch = pos.detach().float().cpu()[0, -gh * gw:]  # (N, D): prefix-token entries, if any, come first
    patch = F.normalize(patch, dim=-1)
    return (patch @ patch.T).reshape(gh, gw, gh, gw), (gh, gw)


def inspect_posembed(*, model: str | None = None, output: str | Path | None = None) -> list[Path]:
    """One PNG: for each patch position, a tile of its position embedding's similarity with all others."""
    from vitcli.figures import pyplot, save_figure

    ld = load(model)
    sim, (gh, gw) = posembed_similarity(ld.model)
    plt = pyplot()
    tile = max(0.25, min(1.0, 10 / max(gh, gw)))
    fig, axes = plt.subplots(gh, gw, figsize=(gw * tile + 1.2, gh * tile + 0.6), squeeze=False)
    for r in range(gh):
        for c in range(gw):
            im = axes[r, c].imshow(sim[r, c].numpy(), vmin=-1, vmax=1, cmap="viridis")
            axes[r, c].set_axis_off()
    fig.suptitle("position embedding similarity (cosine), one tile per patch position", fontsize=9)
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    path = output_dir(output, ld.run_dir) / "posembed.png"
    save_figure(fig, path)
    return [path]


# ----------------------------------------------------------------------------------------------- distance
def attention_distances(ld: Loaded, paths: list[Path], batch_size: int = 16) -> torch.Tensor:
    """Mean attention distance in pixels, (layers, heads), averaged over the images."""
    import torch

    from vitcli.attention import capture_attention, mean_attention_distance, patch_size_of

    total, n = None, 0
    patch = patch_size_of(ld.model)
    for start in range(0, len(paths), batch_size):
        keep, _, x = decode_batch(paths[start:start + batch_size], ld.pre)
        cap = capture_attention(ld.model, x.to(ld.device))
        d = torch.stack([mean_attention_distance(a, cap.num_prefix, cap.grid, patch).sum(0).cpu()
                         for a in cap.attentions])  # (layers, heads)
        total = d if total is None else total + d
        n += len(keep)
    return total / n


def inspect_distance(data: list[Path], *, model: str | None = None, output: str | Path | None = None,
                     max_images: int = 64, img_size: int | None = None, device: str = "cpu") -> list[Path]:
    """Scatter PNG + CSV of mean attention distance per head and block over up to `max_images` images
    (evenly spread over the sorted list); prints the table."""
    from rich.table import Table

    from vitcli.figures import pyplot, save_figure

    at_least("--max-images", max_images)
    paths = collect_images(data)
    if len(paths) > max_images:
        paths = [paths[int(i * len(paths) / max_images)] for i in range(max_images)]
    ld = load(model, img_size, device)
    dist = attention_distances(ld, paths)  # (L, H)
    L, H = dist.shape
    out_dir = output_dir(output, ld.run_dir)
    csv = out_dir / "attention_distance.csv"
    lines = ["block,head,mean_distance_px"] + [f"{i},{h},{float(dist[i, h]):.3f}" for i in range(L) for h in range(H)]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for h in range(H):
        ax.scatter(range(L), dist[:, h].numpy(), s=18, label=f"head {h}")
    side = ld.pre["img_size"]
    ax.set(xlabel="block (network depth)", ylabel="mean attention distance (pixels)",
           title=f"mean attention distance over {len(paths)} images at {side} px", ylim=(0, None))
    ax.grid(alpha=0.3)
    if H <= 16:
        ax.legend(fontsize=6, ncol=2)
    png = out_dir / "attention_distance.png"
    save_figure(fig, png)
    t = Table("block", *[f"head {h}" for h in range(H)], "mean", title="mean attention distance (pixels)")
    for i in range(L):
        t.add_row(str(i), *[f"{float(v):.1f}" for v in dist[i]], f"{float(dist[i].mean()):.1f}")
    out.print(t)
    return [png, csv]


# ----------------------------------------------------------------------------------------------- filters
def filter_components(model: nn.Module, k: int) -> torch.Tensor:
    """The top-k principal components of the filters that read the pixels (the patch projection, or a conv
    stem's first 3x3 layer) as RGB tiles (k, ph, pw, 3) in [0, 1]."""
    import torch

    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3]
    w = convs[0].weight if convs else None
    if w is None or w.ndim != 4 or w.shape[1] != 3:
        raise VitcliError(f"model {type(model).__name__} has no RGB convolutional patch embedding to show")
    D, C, ph, pw = w.shape
    flat = w.detach().float().cpu().reshape(D, C * ph * pw)  # (D, 3*ph*pw)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: principal directions
    comps = vh[:min(k, vh.shape[0])].reshape(-1, C, ph, pw)  # (k, 3, ph, pw)
    lo = comps.amin(dim=(1, 2, 3), keepdim=True)
    hi = comps.amax(dim=(1, 2, 3), keepdim=True)
    return ((comps - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1)  # (k, ph, pw, 3)


def inspect_filters(*, model: str | None = None, output: str | Path | None = None,
                    components: int = 28) -> list[Path]:
    """One PNG of the principal components of the patch-embedding filters (the ViT paper's figure 7, left)."""
    from vitcli.figures import pyplot, save_figure

    at_least("--components", components)
    ld = load(model)
    tiles = filter_components(ld.model, components)
    n = tiles.shape[0]
    cols = min(7, n)
    rows = math.ceil(n / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(tiles[i].numpy(), interpolation="nearest")
    fig.suptitle(f"patch-embedding filters: first {n} principal components", fontsize=9)
    path = output_dir(output, ld.run_dir) / "filters.png"
    save_figure(fig, path)
    return [path]


