"""Typed configuration: dataclasses, YAML loading, dotted overrides and validation.

Precedence: dataclass defaults < YAML file < command-line flags and `--set key=value`.
Unknown keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcli.errors import VitcliError


@dataclass
class DataConfig:
    img_size: int = 224  # side of the square network input, pixels
    batch_size: int = 64  # images per optimisation step (per process under torchrun)
    val_fraction: float = 0.2  # share of each class held out for validation when DATA has no val/ folder
    num_workers: int = -1  # decoding processes when images are not cached; -1 = auto
    cache: str = "auto"  # keep decoded uint8 images in memory: auto (when they fit) | on | off
    cache_max_gb: float = 4.0  # memory budget for `cache: auto`, GiB
    crop_pct: float = 0.875  # eval: resize shorter side to img_size / crop_pct, then center crop img_size
    interpolation: str = "bicubic"  # resize filter: bicubic | bilinear | nearest
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel normalisation mean
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per-channel normalisation std
    scale_min: float = 0.08  # random-resized-crop: smallest crop area, as a fraction of the image
    ratio_max: float = 4 / 3  # random-resized-crop: largest aspect ratio (smallest is its inverse)
    hflip: float = 0.5  # probability of a horizontal flip while training
    translate: float = 0.0  # random shift of the training crop, up to this fraction of the side per axis
    rotate: float = 0.0  # random rotation of the training crop, up to +- this many degrees
    randaugment: str = ""  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"; "" = off
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    reprob: float = 0.0  # random-erasing probability; 0 = off
    max_bad_fraction: float = 0.1  # stop when more than this share of images cannot be read
    class_weights: str = "none"  # loss weights per class: none | auto (inverse frequency)
    balanced_sampler: bool = False  # draw training batches with equal probability per class
    val_csv: str = ""  # label file (.csv/.tsv/.jsonl) of the validation images when DATA is a label file
    shuffle_buffer: int = 1000  # shards: encoded images each DataLoader worker draws from at random


@dataclass
class ModelConfig:
    name: str = "vit-tiny/16"  # vit-tiny/16, vit-small/16, vit-base/16 (any /patch), or timm/<timm model name>
    pretrained: bool = False  # timm backend: download pretrained weights through timm (needs internet)
    pretrained_file: str = ""  # local .safetensors/.pth/.pt weights to start from; head adapted if needed
    embed_dim: int = 0  # token width; 0 = from the preset
    depth: int = 0  # number of encoder blocks; 0 = from the preset
    num_heads: int = 0  # attention heads per block; 0 = from the preset
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of embed_dim
    global_pool: str = "token"  # classifier input: token (class token) | avg (mean of patch tokens)
    pos_embed: str = "learn"  # position embedding: learn | sincos (fixed 2-D sine-cosine)
    drop_rate: float = 0.0  # dropout after the MLP and projection layers, probability
    drop_path_rate: float = 0.0  # stochastic depth rate of the last block (linear from 0), probability


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warmup
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not applied to biases, norms, tokens)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_epochs: float = 2.0  # linear warmup from lr * warmup_lr_ratio to lr, epochs
    warmup_lr_ratio: float = 0.01  # warmup start as a fraction of lr
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    clip_grad: float = 1.0  # max gradient L2 norm; 0 = off
    layer_decay: float = 0.0  # layer-wise lr decay for fine-tuning (e.g. 0.75); 0 = off


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    seed: int = 0  # seeds every random number generator
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (multi-label: targets 0/1 -> e/2, 1-e/2)
    loss: str = "auto"  # auto (ce for one label per image, bce for multi-label) | ce | bce | asl (asymmetric)
    ema_decay: float = 0.0  # exponential moving average of weights per step, e.g. 0.999; 0 = off
    patience: int = 0  # stop after this many epochs without a better val best_metric; 0 = off
    best_metric: str = "acc"  # acc | loss | macro_f1: validation metric that picks best.pt and drives patience
    calibrate: bool = True  # at the end, fit a temperature and conformal scores on val (stored in best/last.pt)
    accum_steps: int = 1  # gradient accumulation: optimiser step every N batches
    compile: bool = False  # torch.compile the model (slower start, faster steps on GPU)
    channels_last: bool = False  # channels-last memory format for the patch embedding input
    output: str = "runs"  # folder that holds run folders
    name: str = "train"  # run folder name; -2, -3, ... is appended when it exists
    save_every_steps: int = 0  # also write last.pt every N steps inside an epoch; 0 = end of epoch only
    recipe: str = "auto"  # auto | scratch-small | scratch | finetune | none: fills the keys you did not set
    freeze_epochs: int = 0  # train only the classifier head for the first N epochs, then everything
    threads: int = 0  # CPU threads for tensor ops; 0 = torch's default (one per core); 1 suits tiny models
    log: list[str] = field(default_factory=lambda: ["csv"])  # metric sinks: csv (always) + tensorboard, mlflow
    log_every_steps: int = 50  # tensorboard / mlflow: training loss and lr every N optimiser steps; 0 = off
    report: bool = True  # at the end: eval of best.pt on val, figures and a self-contained report.html


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


LOGGERS = ("csv", "tensorboard", "mlflow")  # train.log entries
CHOICES: dict[str, tuple[str, ...]] = {
    "data.cache": ("auto", "on", "off"),
    "data.interpolation": ("bicubic", "bilinear", "nearest"),
    "data.class_weights": ("none", "auto"),
    "model.global_pool": ("token", "avg"),
    "model.pos_embed": ("learn", "sincos"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.loss": ("auto", "ce", "bce", "asl"),
    "train.recipe": ("auto", "scratch-small", "scratch", "finetune", "none"),
    "train.best_metric": ("acc", "loss", "macro_f1"),
}


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def field_comments(section_cls: type) -> dict[str, str]:
    """The `# comment` written after each field in this file: the one place each key is documented."""
    import inspect

    out = {}
    for line in inspect.getsource(section_cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip()
    return out


def to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML text of the config, each key followed by its comment; loads back with load_config."""
    import yaml

    lines = []
    for section in _fields(cfg):
        obj = getattr(cfg, section)
        notes = field_comments(type(obj)) if comments else {}
        lines.append(f"{section}:")
        for key, value in to_dict(obj).items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            text = text.removesuffix("\n...").strip()
            note = f"  # {notes[key]}" if key in notes else ""
            lines.append(f"  {key}: {text}{note}")
    return "\n".join(lines) + "\n"


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(valid)


def _all_keys(cfg: Config) -> list[str]:
    return [f"{s}.{k}" for s in _fields(cfg) for k in _fields(getattr(cfg, s))]


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check `value` against the annotated type `tp`; convert where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if inner is str and isinstance(value, str):  # --set train.log=csv,tensorboard
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise VitcliError(f"{source}: '{key}' must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(key, v, inner, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # not used by the dataclasses above
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and "on" in CHOICES.get(key, ()):  # YAML 1.1 reads on / off as booleans
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise VitcliError(f"{source}: '{key}' must be {name}, got {value!r}")


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _fields(cfg):
        raise VitcliError(f"{source}: unknown config key '{key}'; {_suggest(key, _all_keys(cfg))}")
    section = getattr(cfg, parts[0])
    fields = _fields(section)
    if parts[1] not in fields:
        raise VitcliError(f"{source}: unknown config key '{key}'; {_suggest(key, _all_keys(cfg))}")
    hints = typing.get_type_hints(type(section))
    setattr(section, parts[1], _coerce(key, value, hints[parts[1]], source))
    user_keys(cfg).add(key)


def user_keys(cfg: Config) -> set[str]:
    """Keys set by a YAML file, a flag or --set (not defaults); training recipes leave these alone."""
    return cfg.__dict__.setdefault("_user_keys", set())


def apply_dict(cfg: Config, data: Any, source: str) -> None:
    """Apply a nested mapping such as a parsed YAML file."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise VitcliError(f"{source}: expected a mapping of sections (data, model, optim, train)")
    for section, values in data.items():
        if not isinstance(values, dict):
            if str(section) in _fields(cfg):
                raise VitcliError(f"{source}: section '{section}' must be a mapping of keys")
            raise VitcliError(f"{source}: unknown config key '{section}'; {_suggest(str(section), _all_keys(cfg))}")
        for k, v in values.items():
            _set(cfg, f"{section}.{k}", v, source)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, YAML-parsed value)."""
    import yaml

    if "=" not in text:
        raise VitcliError(f"--set '{text}': expected KEY=VALUE, e.g. --set optim.lr=5e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads "5e-4" as a string
    return key.strip(), value


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def read_yaml(path: str | Path) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VitcliError(f"config file '{p}' does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark and mark and cmark.line != mark.line:  # where the unclosed thing was opened
            problem += f" ({context} started at line {cmark.line + 1})"
        raise VitcliError(f"config file '{p}': YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise VitcliError(f"config file '{p}' is not UTF-8 text") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, flags: dict[str, Any] | None = None
) -> Config:
    """Build the config: defaults, then the YAML file, then flags, then `--set` overrides."""
    cfg = Config()
    if path:
        apply_dict(cfg, read_yaml(path), f"config file '{path}'")
    for key, value in (flags or {}).items():
        if value is not None:
            _set(cfg, key, value, f"flag for '{key}'")
    for text in overrides or []:
        key, value = parse_override(text)
        _set(cfg, key, value, f"--set {text}")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a checkpoint's plain dict (unknown keys from newer versions are ignored)."""
    cfg = Config()
    for section, values in (data or {}).items():
        if section in _fields(cfg) and isinstance(values, dict):
            for k, v in values.items():
                if k in _fields(getattr(cfg, section)):
                    _set(cfg, f"{section}.{k}", v, "checkpoint config")
    return cfg


def validate(cfg: Config) -> None:
    """Range and choice checks; each error names the key, the value and what is valid."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise VitcliError(f"'{key}' must be {what}, got {value!r}")

    for key, choices in CHOICES.items():
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) in choices, key, "one of " + ", ".join(choices))
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    need(d.img_size >= 1, "data.img_size", "a positive number of pixels")
    need(d.batch_size >= 1, "data.batch_size", "at least 1")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "in [0, 1)")
    need(d.num_workers >= -1, "data.num_workers", "-1 (auto) or a count >= 0")
    need(d.cache_max_gb >= 0, "data.cache_max_gb", ">= 0")
    need(0.0 < d.crop_pct <= 1.0, "data.crop_pct", "in (0, 1]")
    need(len(d.mean) == 3, "data.mean", "a list of 3 numbers")
    need(len(d.std) == 3 and all(s > 0 for s in d.std), "data.std", "a list of 3 positive numbers")
    need(0.0 < d.scale_min <= 1.0, "data.scale_min", "in (0, 1]")
    need(d.ratio_max >= 1.0, "data.ratio_max", ">= 1")
    need(0.0 <= d.hflip <= 1.0, "data.hflip", "a probability in [0, 1]")
    need(0.0 <= d.translate <= 0.5, "data.translate", "a fraction of the side in [0, 0.5]")
    need(0.0 <= d.rotate <= 180.0, "data.rotate", "degrees in [0, 180]")
    need(d.mixup >= 0 and d.cutmix >= 0, "data.mixup" if d.mixup < 0 else "data.cutmix", ">= 0")
    need(0.0 <= d.reprob <= 1.0, "data.reprob", "a probability in [0, 1]")
    need(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]")
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0 (0 = shard order only)")
    need(bool(m.name.strip()), "model.name", "a preset like vit-tiny/16 or timm/<name>")
    need(m.embed_dim >= 0, "model.embed_dim", ">= 0")
    need(m.depth >= 0, "model.depth", ">= 0")
    need(m.num_heads >= 0, "model.num_heads", ">= 0")
    need(m.mlp_ratio > 0, "model.mlp_ratio", "> 0")
    need(0.0 <= m.drop_rate < 1.0, "model.drop_rate", "in [0, 1)")
    need(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "in [0, 1)")
    need(o.lr > 0, "optim.lr", "> 0")
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0")
    need(0 <= o.warmup_lr_ratio <= 1, "optim.warmup_lr_ratio", "in [0, 1]")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]")
    need(o.clip_grad >= 0, "optim.clip_grad", ">= 0 (0 = off)")
    need(0 <= o.layer_decay <= 1, "optim.layer_decay", "in [0, 1] (0 = off)")
    need(t.epochs >= 1, "train.epochs", "at least 1")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", "in [0, 1)")
    need(0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1) (0 = off)")
    need(t.patience >= 0, "train.patience", ">= 0 (0 = off)")
    need(t.accum_steps >= 1, "train.accum_steps", "at least 1")
    need(t.save_every_steps >= 0, "train.save_every_steps", ">= 0")
    need(t.freeze_epochs >= 0, "train.freeze_epochs", ">= 0 (0 = off)")
    need(t.threads >= 0, "train.threads", ">= 0 (0 = torch's default)")
    need(all(x in LOGGERS for x in t.log), "train.log", "a list of " + ", ".join(LOGGERS))
    need(t.log_every_steps >= 0, "train.log_every_steps", ">= 0 (0 = off)")
    need(bool(t.name.strip()) and "/" not in t.name and "\\" not in t.name and t.name not in (".", ".."),
         "train.name", "a plain folder name")
    dev = t.device
    ok_dev = dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())
    need(ok_dev, "train.device", "one of auto, cpu, cuda, cuda:N, mps")
    from vitcli.models import backend_for_name  # light: no torch import

    backend_for_name(m.name).check_config(cfg.model, cfg.data.img_size)
