"""`model.pretrained: auto`: whether a run fine-tunes pretrained timm weights, at what input size and for how
many epochs on this device; then the data config the weights were trained with, for every key the user left.

As timm's `resolve_data_config` does, mean, std, input size, interpolation and crop come from the weights'
`pretrained_cfg` (hub.py); the checkpoint's preprocessing, which predict, eval, inspect and every export read,
records what training used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitcli.hub import availability, weights_data_config, weights_pretrained_cfg

if TYPE_CHECKING:
    from vitcli.config import Config

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # photos: a 5.7 M-parameter ViT from ImageNet-21k
FINETUNE_EPOCHS = 5  # epochs of a fine-tuning run the user gave no number for (the weights need few)


@dataclass
class Facts:
    """What the decision reads from the data scan and the device (defaults.finetune_facts fills it)."""

    n_train: int  # training images
    photos: bool = False  # the images are photos (pretrained photo features help most)
    side: int = 224  # median shorter side of the images, pixels
    cpu_macs: float = 0.0  # multiply-adds a CPU run may spend; 0 = not a CPU (no cap on the input size)


@dataclass
class Decision:
    """What `model.pretrained: auto` chose, and why (one clause)."""

    pretrained: bool  # fine-tune pretrained weights (else from scratch)
    why: str  # the reason, printed
    values: dict[str, Any] = field(default_factory=dict)  # config key -> value (keys the user did not set)


def resolve_pretrained(cfg: Config, facts: Facts) -> Decision | None:
    """What `model.pretrained: auto` means for this model, data and device; None when the user said true/false.

    Photos (or a timm model the user named) fine-tune pretrained weights when they are in the local Hugging Face
    cache or can be downloaded; else, and for glyph-like images or vitcli's own ViT, training starts from scratch.
    `train.recipe: none` decides nothing (auto then builds the model without pretrained weights).
    """
    from vitcli.config import user_keys
    from vitcli.models import TIMM_PREFIX, backend_for_name

    m = cfg.model
    if m.pretrained != "auto" or cfg.train.recipe == "none":
        return None
    if m.pretrained_file:
        return Decision(False, f"'model.pretrained_file' {m.pretrained_file} gives the weights")
    named = "model.name" in user_keys(cfg)
    if named and backend_for_name(m.name).from_scratch:
        return Decision(False, f"{m.name} is vitcli's own ViT, built from scratch")
    if not named and not facts.photos:
        return Decision(False, "the images do not look like photos, where pretrained features help most")
    name = m.name.removeprefix(TIMM_PREFIX) if named else DEFAULT_MODEL
    how, why = availability(name)
    if not how:
        return Decision(False, why)
    values: dict[str, Any] = {} if named else {"model.name": TIMM_PREFIX + name}
    budget, reason = finetune_budget(cfg, facts, name)
    return Decision(True, why + reason, values | budget)


def finetune_budget(cfg: Config, facts: Facts, name: str) -> tuple[dict[str, Any], str]:
    """Epochs and input size of a fine-tuning run the user left unset, and why: on a CPU, small images are
    upsampled toward the weights' own size only as far as the run's multiply-add budget allows."""
    from vitcli.config import user_keys

    mine = user_keys(cfg)
    out: dict[str, Any] = {} if "train.epochs" in mine else {"train.epochs": FINETUNE_EPOCHS}
    epochs = out.get("train.epochs", cfg.train.epochs)
    pcfg = weights_pretrained_cfg(name) or {}
    native = int((pcfg.get("input_size") or (3, 224, 224))[-1])
    if "data.img_size" in mine or not facts.cpu_macs or not facts.n_train:
        return out, ""
    patch, params = vit_shape(name)
    lo = min(native, max(2 * patch, math.ceil(facts.side / patch) * patch))
    budget = facts.cpu_macs

    def cost(size: int) -> float:  # multiply-adds of the run: forward + backward ~ 3x forward
        return 3.0 * params * ((size // patch) ** 2 + 1) * facts.n_train * epochs

    size = next((s for s in range(native, lo - 1, -patch) if cost(s) <= budget), lo)
    if size >= native:
        return out, ""
    out["data.img_size"] = size
    return out, (f"; {size} px rather than the weights' {native}: {epochs} epochs of {facts.n_train:,} images at "
                 f"{native} px would cost {cost(native) / budget:.1f}x what this CPU run may spend")


def vit_shape(name: str) -> tuple[int, int]:
    """(patch size, parameters that run once per token) of timm model `name`, built without memory (meta)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    p = getattr(getattr(model, "patch_embed", None), "patch_size", None) or 16
    patch = int(p[0] if isinstance(p, (tuple, list)) else p)
    skip = ("head", "pos_embed", "cls_token", "reg_token", "patch_embed")
    return patch, sum(t.numel() for n, t in model.named_parameters() if not n.startswith(skip))


def model_data_config(cfg: Config) -> dict[str, Any]:
    """The data keys the run's weights come with: timm's weights, or a local file with a timm config.json (a
    resize filter vitcli lacks, such as timm's 'random', leaves the config's)."""
    from vitcli.config import CHOICES
    from vitcli.models import TIMM_PREFIX, backend_for_name

    m = cfg.model
    if backend_for_name(m.name).from_scratch:
        return {}
    name = m.name.removeprefix(TIMM_PREFIX)
    if m.pretrained_file:
        pcfg = weights_pretrained_cfg(name, m.pretrained_file)
    else:
        pcfg = weights_pretrained_cfg(name) if m.pretrained == "true" else None
    data = weights_data_config(pcfg) if pcfg else {}
    if data.get("data.interpolation", "bicubic") not in CHOICES["data.interpolation"]:
        del data["data.interpolation"]
    return data


def apply_pretrained(cfg: Config, n_train: int, *, photos: bool = False, side: int = 224, cpu_macs: float = 0.0,
                     quiet: bool = False) -> list[str]:
    """Resolve `model.pretrained: auto` for `n_train` images (`photos` of about `side` px; `cpu_macs`: what a CPU
    run may spend, 0 off a CPU), then take the weights' data config for the keys the user did not set; returns
    (and prints) one line for each."""
    from vitcli.config import user_keys
    from vitcli.console import esc, info

    mine, lines = user_keys(cfg), []
    decision = resolve_pretrained(cfg, Facts(n_train, photos, side, cpu_macs))
    if decision is not None:
        cfg.model.pretrained = "true" if decision.pretrained else "false"
        _assign(cfg, decision.values)
        what = f"fine-tuning {cfg.model.name}" if decision.pretrained else "from scratch"
        lines.append(f"[bold]pretrained[/] auto: {esc(what)}: {esc(decision.why)}")
    chosen = set(decision.values) if decision else set()
    data = {k: v for k, v in model_data_config(cfg).items() if k not in mine and k not in chosen}
    _assign(cfg, data)
    if data:
        shown = ", ".join(f"{k.removeprefix('data.')}={_fmt(v)}" for k, v in data.items())
        lines.append(f"[bold]data config[/] from the weights' pretrained_cfg: {esc(shown)}")
    for line in lines if not quiet else []:
        info(line)
    return lines


def _assign(cfg: Config, values: dict[str, Any]) -> None:
    for key, value in values.items():
        section, attr = key.split(".")
        setattr(getattr(cfg, section), attr, value)


def _fmt(v: Any) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
