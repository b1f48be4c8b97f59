"""build_model(cfg): the from-scratch ViT or any timm model behind one interface; presets; weight loading.

A model is described by a plain `spec` dict stored in every checkpoint, so it can be rebuilt without the
training config: {"backend": "scratch", "kwargs": {...}} or {"backend": "timm", "name": ..., "kwargs": {...}}.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from torch import nn

    from vitcli.config import ModelConfig

# name -> (embed_dim, depth, num_heads), as in the ViT and DeiT papers
PRESETS: dict[str, tuple[int, int, int]] = {
    "vit-tiny": (192, 12, 3),
    "vit-small": (384, 12, 6),
    "vit-base": (768, 12, 12),
    "vit-large": (1024, 24, 16),
}


def resolve_preset(m: ModelConfig, img_size: int) -> dict[str, Any]:
    """Decode `vit-small/16` plus the width/depth/head overrides into VisionTransformer kwargs."""
    base, _, patch = m.name.partition("/")
    if base not in PRESETS:
        valid = ", ".join(f"{p}/16" for p in PRESETS)
        raise VitcliError(f"'model.name' {m.name!r} is not a known model; use one of {valid} (any patch "
                          "size after the slash) or timm/<timm model name>")
    if patch and not patch.isdigit() or patch == "0":
        raise VitcliError(f"'model.name' {m.name!r}: the part after '/' must be a patch size, e.g. {base}/16")
    patch_size = int(patch) if patch else 16
    if img_size % patch_size:
        raise VitcliError(f"'data.img_size' {img_size} must be divisible by the patch size {patch_size} of "
                          f"model {m.name!r}")
    dim, depth, heads = PRESETS[base]
    dim, depth, heads = m.embed_dim or dim, m.depth or depth, m.num_heads or heads
    if dim % heads:
        raise VitcliError(f"'model.embed_dim' {dim} must be divisible by 'model.num_heads' {heads}")
    if m.stem == "conv" and patch_size & (patch_size - 1):
        raise VitcliError(f"'model.stem' conv needs a power-of-two patch size (its total stride); model "
                          f"{m.name!r} has patch {patch_size}")
    if m.pos_embed == "sincos" and dim % 4:
        raise VitcliError(f"'model.embed_dim' {dim} must be divisible by 4 with 'model.pos_embed: sincos'")
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=m.mlp_ratio, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate,
                global_pool=m.global_pool, pos_embed=m.pos_embed, stem=m.stem)


def model_spec(m: ModelConfig, num_classes: int, img_size: int) -> dict[str, Any]:
    """The plain, self-describing recipe of the model (stored in checkpoints)."""
    if m.name.startswith("timm/"):
        kwargs = dict(num_classes=num_classes, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)
        for key in ("embed_dim", "depth", "num_heads"):  # ViT-family size overrides (0 = timm's own)
            if getattr(m, key):
                kwargs[key] = getattr(m, key)
        return {"backend": "timm", "name": m.name[5:], "kwargs": kwargs, "img_size": img_size}
    kwargs = resolve_preset(m, img_size)
    kwargs["num_classes"] = num_classes
    return {"backend": "scratch", "name": m.name, "kwargs": kwargs, "img_size": img_size}


def model_from_spec(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Instantiate the module a spec describes (weights random or timm-pretrained)."""
    if spec["backend"] == "scratch":
        from vitcli.vit import VisionTransformer

        return VisionTransformer(**spec["kwargs"])
    if spec["backend"] != "timm":
        raise VitcliError(f"unknown model backend {spec['backend']!r} in checkpoint")
    import timm

    name = spec["name"]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise VitcliError(f"'model.name' timm/{name}: timm has no model called {name!r}{hint}")
    kwargs = dict(spec["kwargs"])
    if spec.get("img_size"):
        kwargs["img_size"] = spec["img_size"]
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError:  # models without an img_size argument (CNNs, some hybrids)
        kwargs.pop("img_size", None)
        spec.pop("img_size", None)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # network failures of pretrained=True and the like
        if pretrained:
            raise VitcliError(f"could not download pretrained weights for timm/{name}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; set "
                              "'model.pretrained_file' to a local weights file instead") from None
        raise


def build_model(m: ModelConfig, num_classes: int, img_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """Model + spec from the config; loads `pretrained_file` when set."""
    spec = model_spec(m, num_classes, img_size)
    if spec["backend"] == "scratch" and m.pretrained and not m.pretrained_file:
        raise VitcliError(f"'model.pretrained' needs a timm model (timm/<name>) or 'model.pretrained_file'; "
                          f"{m.name!r} is built from scratch")
    model = model_from_spec(spec, pretrained=m.pretrained and spec["backend"] == "timm")
    if m.pretrained_file:
        load_pretrained_file(model, m.pretrained_file)
    return model, spec


def read_state_dict(path: str | Path) -> dict:
    """Tensors from .safetensors, or from a .pth/.pt file loaded with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise VitcliError(f"'model.pretrained_file' {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise VitcliError(f"weights file '{p}' is not a readable safetensors file: {e}") from None
    from vitcli.checkpoint import safe_torch_load

    obj = safe_torch_load(p)
    for key in ("model", "state_dict", "model_state_dict", "ema"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise VitcliError(f"weights file '{p}' holds no state dict of tensors")
    return obj


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier, whose shape depends on the number of classes."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return [k for k in model.state_dict() if any(k == f"{n}.weight" or k == f"{n}.bias" for n in names)]


def load_pretrained_file(model: nn.Module, path: str | Path) -> None:
    """Load local weights: drop a head of another class count, resample position embeddings, load strictly."""
    import torch

    sd = read_state_dict(path)
    own = model.state_dict()
    heads = set(head_keys(model))
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    for k in list(sd):
        if k in heads and k in own and sd[k].shape != own[k].shape:
            del sd[k]  # another number of classes: keep the freshly initialised head
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1],
                                             getattr(model, "num_prefix_tokens", 1))
    bad = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        k = bad[0]
        raise VitcliError(f"weights file '{path}': '{k}' has shape {tuple(sd[k].shape)} but the model needs "
                          f"{tuple(own[k].shape)}; the file is for another architecture")
    missing = [k for k in own if k not in sd and k not in heads]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VitcliError(f"weights file '{path}' does not fit the model ({what}); "
                          "check 'model.name' against the architecture the file was saved from")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)


def resample_pos_embed(pos, num_tokens: int, num_prefix: int):
    """(1, prefix + g*g, D) -> (1, num_tokens, D) by bicubic interpolation of the square patch grid."""
    import math

    import torch
    import torch.nn.functional as F

    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old, new = int(math.isqrt(patches.shape[1])), int(math.isqrt(num_tokens - num_prefix))
    grid = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)
