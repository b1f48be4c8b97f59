"""Typed configuration: dataclasses, YAML loading, dotted overrides and validation.

Precedence: dataclass defaults < YAML file < command-line flags and `--set key=value`.
Unknown keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcli.console import CONTROL
from vitcli.errors import VitcliError, clip, first_line, shown

AUTO_INTS = {"data.batch_size"}  # integer keys that also take the word auto (resolved before they are used)
MAX_YAML_BYTES = 1 << 20  # a config file larger than this is not a config file
MAX_YAML_NODES = 100_000  # values after expanding YAML aliases (a "billion laughs" file expands to 10^9)


@dataclass
class DataConfig:
    img_size: int = 224  # side of the square network input, pixels
    batch_size: int = 64  # images per optimisation step (per process under torchrun); auto = fill the matrix units
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
    color_jitter: float = 0.0  # brightness, contrast, saturation each times a random factor in [1-x, 1+x]; 0 = off
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
    pretrained: str = "auto"  # timm weights: true | false | auto (photos: a small pretrained ViT when cached or online)
    pretrained_file: str = ""  # local .safetensors/.pth/.pt weights to start from; head adapted if needed
    embed_dim: int = 0  # token width; 0 = from the preset
    depth: int = 0  # number of encoder blocks; 0 = from the preset
    num_heads: int = 0  # attention heads per block; 0 = from the preset
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of embed_dim
    global_pool: str = "token"  # classifier input: token (class token) | avg (mean of patch tokens)
    pos_embed: str = "learn"  # position embedding: learn | sincos (fixed 2-D sine-cosine)
    stem: str = "patch"  # scratch ViT tokeniser: patch (one strided conv) | conv (3x3 conv stack, stride = patch)
    pos_conv: bool = False  # scratch ViT: a 3x3 depthwise conv of the token grid after the first block (CPVT)
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
    time: str = ""  # wall-clock budget for the whole command (e.g. 300s, 5m, 1h): fits the epochs; "" = off
    seed: int = 0  # seeds every random number generator
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (multi-label: targets 0/1 -> e/2, 1-e/2)
    loss: str = "auto"  # auto (ce for one label per image, bce for multi-label) | ce | bce | asl (asymmetric)
    ema_decay: float = 0.0  # exponential moving average of weights per step, e.g. 0.999; 0 = off
    patience: int = 0  # stop after this many epochs without a better val best_metric; 0 = off
    best_metric: str = "acc"  # acc | loss | macro_f1: validation metric that picks best.pt and drives patience
    calibrate: bool = True  # at the end, fit a temperature and conformal scores on val (stored in best/last.pt)
    ood_keep: float = 0.95  # out-of-distribution thresholds keep this share of validation images answered
    accum_steps: int = 1  # gradient accumulation: optimiser step every N batches
    compile: str = "auto"  # torch.compile the training step: auto (when the run pays for the compile) | on | off
    channels_last: bool = False  # channels-last memory format for the patch embedding input
    output: str = "runs"  # folder that holds run folders
    name: str = "train"  # run folder name; -2, -3, ... is appended when it exists
    save_every_steps: int = 0  # also write last.pt every N steps inside an epoch; 0 = end of epoch only
    recipe: str = "auto"  # auto | scratch-small | scratch | finetune | none: fills the keys you did not set
    freeze_epochs: int = 0  # train only the classifier head for the first N epochs, then everything
    threads: int = 0  # CPU threads for tensor ops; 0 = torch's default (one per core); -1 = auto: 1 or all, timed
    log: list[str] = field(default_factory=lambda: ["csv"])  # metric sinks: csv (always) + tensorboard, mlflow
    log_every_steps: int = 50  # tensorboard / mlflow: training loss and lr every N optimiser steps; 0 = off
    report: bool = True  # at the end: eval of best.pt on val, figures and a self-contained report.html
    teacher: str = ""  # distil from: a run folder, vitcli checkpoint, exported .onnx/TorchScript file or timm/<name>
    distill: str = "soft"  # soft (KL at distill_temperature; +0.6 on small data) | hard (teacher's class, DeiT's)
    distill_weight: float = 0.8  # share of the loss on the teacher (distillation token or the one head); rest: labels
    distill_temperature: float = 2.0  # soft distillation: softmax temperature of teacher and student logits

    @property
    def seconds(self) -> float:
        """`time` in seconds (0 when off): the one reading of the budget string."""
        return parse_duration(self.time) if self.time else 0.0


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
    "model.pretrained": ("auto", "true", "false"),
    "model.global_pool": ("token", "avg"),
    "model.pos_embed": ("learn", "sincos"),
    "model.stem": ("patch", "conv"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile": ("auto", "on", "off"),
    "train.loss": ("auto", "ce", "bce", "asl"),
    "train.recipe": ("auto", "scratch-small", "scratch", "finetune", "none"),
    "train.best_metric": ("acc", "loss", "macro_f1"),
    "train.distill": ("hard", "soft"),
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
            valid = RANGES.get(f"{section}.{key}", "").split(" (")[0]
            if note and valid:
                note += f"; valid {valid}"
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
    if key in AUTO_INTS and value == "auto":
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if inner is str and isinstance(value, str):  # --set train.log=csv,tensorboard
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise VitcliError(f"{source}: '{key}' must be a list of {inner.__name__}, got {shown(value)}")
        return [_coerce(key, v, inner, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # not used by the dataclasses above
    if tp in (int, float) and isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string: the number the user meant
        if tp is int and value.is_integer():
            value = int(value)
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
        if isinstance(value, bool) and "true" in CHOICES.get(key, ()):  # true / false among other words
            return "true" if value else "false"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(tp, "__name__", str(tp)) + (" or auto" if key in AUTO_INTS else "")
    raise VitcliError(f"{source}: '{key}' must be {name}, got {shown(value)}")


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _fields(cfg):
        raise VitcliError(f"{source}: unknown config key '{clip(key)}'; {_suggest(key, _all_keys(cfg))}")
    section = getattr(cfg, parts[0])
    fields = _fields(section)
    if parts[1] not in fields:
        raise VitcliError(f"{source}: unknown config key '{clip(key)}'; {_suggest(key, _all_keys(cfg))}")
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
            raise VitcliError(f"{source}: unknown config key '{clip(str(section))}'; "
                              f"{_suggest(str(section), _all_keys(cfg))}")
        for k, v in values.items():
            _set(cfg, f"{section}.{k}", v, source)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, YAML-parsed value)."""
    import yaml

    if "=" not in text:
        raise VitcliError(f"--set '{clip(text)}': expected KEY=VALUE, e.g. --set optim.lr=5e-4")
    key, raw = text.split("=", 1)
    try:
        value = safe_yaml(raw, f"--set {shown(text)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value  # a numeric string such as 5e-4 becomes a number in _coerce


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return len(raw) < 400  # float() of a 10^6-digit string is slow and no config value is that long
    except ValueError:
        return False


_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str, key: str = "train.time") -> float:
    """'5m', '300s', '1.5h', '90' (seconds) -> seconds; a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise VitcliError(f"'{key}' {text!r} is not a duration; use a number with s, m or h, e.g. 300s, 5m, 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, refusing a document that expands (through aliases) to more than MAX_YAML_NODES values."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise VitcliError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values through "
                              "aliases (&anchor / *alias); a config needs a few dozen")
        return loader.construct_document(node)
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise VitcliError(f"{source}: a value cannot be read: {clip(str(e))}") from None
    except RecursionError:
        raise VitcliError(f"{source}: the YAML is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _expanded_size(node: Any, memo: dict[int, int] | None = None) -> int:
    """Values in the document once every alias is replaced by what it names (an alias reuses the node)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a node that contains itself expands without end
    kids = node.value if isinstance(node.value, list) else []
    flat = [n for kid in kids for n in (kid if isinstance(kid, tuple) else (kid,))]  # mapping: (key, value)
    total = 1
    for kid in flat:
        total += _expanded_size(kid, memo)
        if total > MAX_YAML_NODES:
            break
    memo[id(node)] = total
    return total


def read_yaml(path: str | Path) -> Any:
    import yaml

    p = Path(path)
    if not p.exists():
        raise VitcliError(f"config file '{p}' does not exist")
    if not p.is_file():
        raise VitcliError(f"config file '{p}' is not a regular file")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise VitcliError(f"config file '{p}' is {p.stat().st_size:,} bytes; a config is at most "
                          f"{MAX_YAML_BYTES:,}")
    try:
        with open(p, encoding="utf-8") as f:
            return safe_yaml(f.read(), f"config file '{p}'")
    except OSError as e:
        raise VitcliError(f"config file '{p}' cannot be read: {e.strerror or type(e).__name__}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        problem = problem[:200]
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
        _set(cfg, key, value, f"--set {clip(text)}")
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


# Every numeric key's valid range (interval notation; a list key's range holds for each element). validate()
# checks them all, so no value can reach the trainer that makes it crash, hang or fill the memory.
RANGES: dict[str, str] = {
    "data.img_size": "[8, 4096]",
    "data.batch_size": "[1, 65536]",
    "data.val_fraction": "[0, 1)",
    "data.num_workers": "[-1, 256] (-1 = auto)",
    "data.cache_max_gb": "[0, 1e6]",
    "data.crop_pct": "[0.25, 1]",
    "data.mean": "[-10, 10]",
    "data.std": "[0.001, 10]",
    "data.scale_min": "(0, 1]",
    "data.ratio_max": "[1, 10]",
    "data.hflip": "[0, 1]",
    "data.translate": "[0, 0.5]",
    "data.rotate": "[0, 180]",
    "data.color_jitter": "[0, 1] (0 = off)",
    "data.mixup": "[0, 100] (0 = off)",
    "data.cutmix": "[0, 100] (0 = off)",
    "data.reprob": "[0, 1]",
    "data.max_bad_fraction": "[0, 1]",
    "data.shuffle_buffer": "[0, 10000000] (0 = shard order only)",
    "model.embed_dim": "[0, 16384] (0 = from the preset)",
    "model.depth": "[0, 1024] (0 = from the preset)",
    "model.num_heads": "[0, 1024] (0 = from the preset)",
    "model.mlp_ratio": "[0.25, 64]",
    "model.drop_rate": "[0, 1)",
    "model.drop_path_rate": "[0, 1)",
    "optim.lr": "(0, 10]",
    "optim.weight_decay": "[0, 100]",
    "optim.betas": "[0, 1)",
    "optim.warmup_epochs": "[0, 1e6]",
    "optim.warmup_lr_ratio": "[0, 1]",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.clip_grad": "[0, 1e6] (0 = off)",
    "optim.layer_decay": "[0, 1] (0 = off)",
    "train.epochs": "[1, 1000000]",
    "train.seed": "[0, 4294967295]",
    "train.label_smoothing": "[0, 1)",
    "train.ood_keep": "(0, 1)",
    "train.ema_decay": "[0, 1) (0 = off)",
    "train.patience": "[0, 1000000] (0 = off)",
    "train.accum_steps": "[1, 65536]",
    "train.save_every_steps": "[0, 1000000000] (0 = off)",
    "train.freeze_epochs": "[0, 1000000] (0 = off)",
    "train.threads": "[-1, 1024] (0 = torch's default, -1 = auto)",
    "train.log_every_steps": "[0, 1000000000] (0 = off)",
    "train.distill_weight": "[0, 1]",
    "train.distill_temperature": "(0, 100]",
}
LIST_LENGTHS = {"data.mean": 3, "data.std": 3, "optim.betas": 2}
MAX_NAME = 100  # characters in train.name (a folder name; file systems allow 255 bytes)


def parse_range(spec: str) -> tuple[float, float, bool, bool, str]:
    """'(0, 10] (note)' -> (0.0, 10.0, low open, high open, 'note')."""
    import re

    m = re.fullmatch(r"([\[(])([^,]+), ([^\])]+)([\])])(?: \((.*)\))?", spec)
    assert m, spec
    return float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", m[5] or ""


def describe_range(key: str, is_int: bool) -> str:
    """'at least 1 and at most 65536', '> 0 and <= 10'; with the note, e.g. '(0 = off)'."""
    lo, hi, lo_open, hi_open, note = parse_range(RANGES[key])
    num = (lambda v: f"{v:g}") if not is_int else (lambda v: str(int(v)))
    low = f"> {num(lo)}" if lo_open else (f"at least {num(lo)}" if is_int else f">= {num(lo)}")
    high = f"< {num(hi)}" if hi_open else (f"at most {num(hi)}" if is_int else f"<= {num(hi)}")
    return f"{low} and {high}" + (f" ({note})" if note else "")


def in_range(key: str, value: float) -> bool:
    lo, hi, lo_open, hi_open, _ = parse_range(RANGES[key])
    if not math.isfinite(value):
        return False
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


def _check_ranges(cfg: Config) -> None:
    hints = {s: typing.get_type_hints(type(getattr(cfg, s))) for s in _fields(cfg)}
    for key in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in AUTO_INTS and value == "auto":
            continue
        is_int = hints[section][name] is int
        values = value if isinstance(value, list) else [value]
        what = describe_range(key, is_int)
        if key in LIST_LENGTHS:
            n = LIST_LENGTHS[key]
            if len(values) != n or not all(in_range(key, v) for v in values):
                raise VitcliError(f"'{key}' must be a list of {n} numbers, each {what}, got {shown(value)}")
        elif not in_range(key, value):
            raise VitcliError(f"'{key}' must be {what}, got {shown(value)}")


def validate(cfg: Config) -> None:
    """Range and choice checks; each error names the key, the value and what is valid."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise VitcliError(f"'{key}' must be {what}, got {shown(value)}")

    for key, choices in CHOICES.items():
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) in choices, key, "one of " + ", ".join(choices))
    _check_ranges(cfg)
    m, t = cfg.model, cfg.train
    if t.time:
        parse_duration(t.time)
    need(bool(m.name.strip()) and len(m.name) <= 200 and not CONTROL.search(m.name), "model.name",
         "a preset like vit-tiny/16 or timm/<name>")
    need(bool(t.name.strip()) and "/" not in t.name and "\\" not in t.name and t.name not in (".", "..")
         and len(t.name) <= MAX_NAME and not CONTROL.search(t.name), "train.name",
         f"a plain folder name of at most {MAX_NAME} characters")
    need(not CONTROL.search(t.output), "train.output", "a folder path without control characters")
    need(all(x in LOGGERS for x in t.log), "train.log", "a list of " + ", ".join(LOGGERS))
    dev = t.device
    ok_dev = dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())
    need(ok_dev, "train.device", "one of auto, cpu, cuda, cuda:N, mps")
    from vitcli.models import backend_for_name  # light: no torch import

    backend_for_name(m.name).check_config(cfg.model, cfg.data.img_size)
