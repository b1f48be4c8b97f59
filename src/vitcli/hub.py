"""Pretrained timm weights on disk: the local Hugging Face cache, a download into it, and the `pretrained_cfg`
(input size, mean/std, interpolation, crop) that describes them.

Tests and offline users steer it with the usual environment (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HOME), read at
each call; nothing here touches the network except `availability` (one metadata request) and `weights_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError, first_line

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repositories hold


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

    dc = resolve_data_config({}, pretrained_cfg=pcfg)
    out: dict[str, Any] = {"data.img_size": int(dc["input_size"][-1]), "data.crop_pct": float(dc["crop_pct"])}
    if len(dc["mean"]) == 3 and len(dc["std"]) == 3:  # RGB weights (vitcli feeds RGB)
        out["data.mean"] = [round(float(v), 6) for v in dc["mean"]]
        out["data.std"] = [round(float(v), 6) for v in dc["std"]]
    if dc["interpolation"]:
        out["data.interpolation"] = str(dc["interpolation"])
    return out
