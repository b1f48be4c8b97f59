"""Pretrained weights: whether a run fine-tunes them (`model.pretrained: auto`), where the file comes from (the
local Hugging Face cache, else a download into it), and the data config the weights were trained with.

timm describes each set of weights with a `pretrained_cfg` (input size, mean/std, interpolation, crop); as timm's
`resolve_data_config` does, training takes those for every data key the user did not set, and the checkpoint's
preprocessing, which predict, eval, inspect and every export read, records what was used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from vitcli.config import Config
    from vitcli.defaults import DataFacts

DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # photos: a 5.7 M-parameter ViT from ImageNet-21k
FINETUNE_EPOCHS = 5  # epochs of a fine-tuning run the user gave no number for (the weights need few)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repositories hold
DATA_KEYS = ("data.img_size", "data.mean", "data.std", "data.interpolation", "data.crop_pct")  # from the weights


@dataclass
class Decision:
    """What `model.pretrained: auto` chose, and why (one clause)."""

    pretrained: bool  # fine-tune pretrained weights (else from scratch)
    why: str  # the reason, printed
    values: dict[str, Any] = field(default_factory=dict)  # config key -> value (keys the user did not set)


def hub_settings() -> tuple[bool, str]:
    """(offline, cache folder) as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ
    offline = env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)
    home = env.get("HF_HOME")
    cache = env.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else constants.HF_HUB_CACHE)
    return offline, cache


def hub_repo(name: str) -> str | None:
    """The Hugging Face repository of timm model `name`'s pretrained weights (its tag, or timm's default tag)."""
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    return (pcfg.hf_hub_id or None) if pcfg is not None else None


def cached_weights(repo: str) -> Path | None:
    """The weights file of `repo` in the local Hugging Face cache, if there."""
    from huggingface_hub import try_to_load_from_cache

    _, cache = hub_settings()
    for filename in WEIGHT_FILES:
        path = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(path, str):
            return Path(path)
    return None


def availability(name: str) -> tuple[str, str]:
    """('cached' | 'download' | '', why) for the pretrained weights of timm model `name`; never downloads."""
    from vitcli.formats import first_line

    repo = hub_repo(name)
    if repo is None:
        return "", f"timm has no pretrained weights for {name}"
    if cached_weights(repo):
        return "cached", f"{repo} is in the local Hugging Face cache"
    offline, cache = hub_settings()
    if offline:
        return "", f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache {cache}"
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        meta = get_hf_file_metadata(hf_hub_url(repo, WEIGHT_FILES[0]), timeout=5)
    except Exception as e:  # no network, a proxy, the hub down: all mean "not now"
        return "", f"{repo} is not cached and cannot be downloaded ({first_line(e)})"
    return "download", f"{repo} can be downloaded ({(meta.size or 0) / 1e6:.0f} MB, cached in {cache})"


def weights_file(name: str) -> Path:
    """The local weights file of timm model `name`: from the Hugging Face cache, else downloaded into it."""
    from vitcli.console import info
    from vitcli.formats import first_line

    repo = hub_repo(name)
    if repo is None:
        raise VitcliError(f"'model.pretrained' true: timm has no pretrained weights for {name!r}; set it to "
                          "false or 'model.pretrained_file' to a local weights file")
    path = cached_weights(repo)
    if path is not None:
        return path
    offline, cache = hub_settings()
    if offline:
        raise VitcliError(f"'model.pretrained' true: HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face "
                          f"cache {cache}; unset HF_HUB_OFFLINE or set 'model.pretrained_file'")
    info(f"downloading pretrained weights {repo} into the Hugging Face cache {cache}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, WEIGHT_FILES[0], cache_dir=cache))  # shows its own progress bar
    except Exception as e:
        raise VitcliError(f"could not download pretrained weights {repo}: {first_line(e)}; set "
                          "'model.pretrained_file' to a local weights file instead") from None


def weights_pretrained_cfg(name: str, weights: str | Path | None = None) -> dict[str, Any] | None:
    """The `pretrained_cfg` that describes a set of weights: config.json beside the file (timm's Hugging Face
    layout, as in the cache) when there is one; for timm's own weights (`weights` None) else timm's registry
    entry for `name`; None when nothing describes them (a bare local file keeps the config's data keys)."""
    own = weights is None
    if own:
        repo = hub_repo(name)
        weights = cached_weights(repo) if repo else None
    side = Path(weights).parent / "config.json" if weights else None
    if side is not None and side.is_file() and side.stat().st_size < 1 << 20:
        try:
            pcfg = json.loads(side.read_text()).get("pretrained_cfg")
        except (ValueError, OSError, AttributeError) as e:
            raise VitcliError(f"'{side}' is not a timm config.json ({e})") from None
        if isinstance(pcfg, dict):
            return pcfg
    if not own:
        return None
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    return pcfg.to_dict() if pcfg is not None else None


def weights_data_config(pcfg: dict[str, Any]) -> dict[str, Any]:
    """Config key -> value of the data config timm's `resolve_data_config` derives from a `pretrained_cfg`."""
    from timm.data import resolve_data_config

    from vitcli.config import CHOICES

    dc = resolve_data_config({}, pretrained_cfg=pcfg)
    out: dict[str, Any] = {"data.img_size": int(dc["input_size"][-1]), "data.crop_pct": float(dc["crop_pct"])}
    if len(dc["mean"]) == 3 and len(dc["std"]) == 3:  # RGB weights (vitcli feeds RGB)
        out["data.mean"] = [round(float(v), 6) for v in dc["mean"]]
        out["data.std"] = [round(float(v), 6) for v in dc["std"]]
    if dc["interpolation"] in CHOICES["data.interpolation"]:
        out["data.interpolation"] = dc["interpolation"]
    return out


def looks_like_photos(facts: DataFacts | None) -> bool:
    """Whether the scanned images are photos (the data-aware defaults' verdict when they give one)."""
    if facts is None:
        return False
    verdict = getattr(facts, "photos", None)
    if verdict is not None:
        return bool(verdict)
    from vitcli.defaults import PHOTO_SIDE, median_side

    return median_side(facts.sizes) >= PHOTO_SIDE


def resolve_pretrained(cfg: Config, facts: DataFacts | None, photos: bool) -> Decision | None:
    """What `model.pretrained: auto` means for this model, data and device; None when the user said true/false.

    Photos (or a timm model the user named) fine-tune pretrained weights when they are in the local Hugging Face
    cache or can be downloaded; else, and for glyph-like images or vitcli's own ViT, training starts from scratch.
    """
    from vitcli.config import user_keys
    from vitcli.models import TIMM_PREFIX, backend_for_name

    m = cfg.model
    if m.pretrained != "auto":
        return None
    if m.pretrained_file:
        return Decision(False, f"'model.pretrained_file' {m.pretrained_file} gives the weights")
    named = "model.name" in user_keys(cfg)
    if named and backend_for_name(m.name).from_scratch:
        return Decision(False, f"{m.name} is vitcli's own ViT, built from scratch")
    if not named and not photos:
        return Decision(False, "the images do not look like photos, where pretrained features help most")
    name = m.name.removeprefix(TIMM_PREFIX) if named else DEFAULT_MODEL
    how, why = availability(name)
    if not how:
        return Decision(False, why)
    values: dict[str, Any] = {} if named else {"model.name": TIMM_PREFIX + name}
    budget, reason = finetune_budget(cfg, facts, name)
    return Decision(True, why + reason, values | budget)


def finetune_budget(cfg: Config, facts: DataFacts | None, name: str) -> tuple[dict[str, Any], str]:
    """Epochs and input size of a fine-tuning run the user left unset, and why: on a CPU, small images are
    upsampled toward the weights' own size only as far as the run's multiply-add budget allows."""
    from vitcli.config import parse_duration, user_keys
    from vitcli.defaults import CPU_MACS_PER_S, CPU_RUN_MACS, median_side

    mine = user_keys(cfg)
    out: dict[str, Any] = {} if "train.epochs" in mine else {"train.epochs": FINETUNE_EPOCHS}
    epochs = out.get("train.epochs", cfg.train.epochs)
    pcfg = weights_pretrained_cfg(name) or {}
    native = int((pcfg.get("input_size") or (3, 224, 224))[-1])
    if "data.img_size" in mine or facts is None or facts.device_type != "cpu" or not facts.n_train:
        return out, ""
    patch, params = vit_shape(name)
    lo = min(native, max(2 * patch, math.ceil(median_side(facts.sizes) / patch) * patch))
    budget = parse_duration(cfg.train.time) * CPU_MACS_PER_S if cfg.train.time else CPU_RUN_MACS

    def cost(size: int) -> float:  # multiply-adds of the run: forward + backward ~ 3x forward
        return 3.0 * params * ((size // patch) ** 2 + 1) * facts.n_train * epochs

    size = next((s for s in range(native, lo - 1, -patch) if cost(s) <= budget), lo)
    if size >= native:
        return out, ""
    out["data.img_size"] = size
    return out, (f"; {size} px rather than the weights' {native}: {epochs} epochs of {facts.n_train:,} images at "
                 f"{native} px would cost {cost(native) / budget:.0f}x what this CPU run may spend")


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
    """The data keys the run's weights come with: timm's weights, or a local file with a timm config.json."""
    from vitcli.models import TIMM_PREFIX, backend_for_name

    m = cfg.model
    if backend_for_name(m.name).from_scratch:
        return {}
    name = m.name.removeprefix(TIMM_PREFIX)
    if m.pretrained_file:
        pcfg = weights_pretrained_cfg(name, m.pretrained_file)
    else:
        pcfg = weights_pretrained_cfg(name) if m.pretrained == "true" else None
    return weights_data_config(pcfg) if pcfg else {}


def apply_pretrained(cfg: Config, facts: DataFacts | None, quiet: bool = False) -> list[str]:
    """Resolve `model.pretrained: auto`, then take the weights' data config for the keys the user did not set;
    returns (and prints) one line for each."""
    from vitcli.config import user_keys
    from vitcli.console import esc, info

    mine, lines = user_keys(cfg), []
    decision = resolve_pretrained(cfg, facts, looks_like_photos(facts))
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
