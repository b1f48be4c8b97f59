"""Training recipes by situation: the regularisation and schedule that suit the data and the model.

A recipe is a set of config values chosen from the number of training images and whether the model starts
from pretrained weights. It fills only the keys the user did not set (YAML file, flags, `--set`), so an
explicit setting always wins; `train.recipe: none` turns recipes off. The choice and the reason are printed.

- scratch-small: from scratch on fewer than SMALL_DATA images. The DeiT regime (RandAugment, mixup/cutmix,
  random erasing, label smoothing, stochastic depth, EMA, long warmup), as strong as the run is long, plus
  small-data ViT choices: patches small enough for an 8x8 token grid, global average pooling, fixed 2-D
  sine-cosine position embeddings and a depthwise conv of the token grid after the first block (CPVT).
- scratch: from scratch on more data: the DeiT regime, as strong as the run is long.
- finetune: pretrained weights: lower learning rate, layer-wise lr decay, short warmup, light augmentation
  (no mixup/cutmix), a little stochastic depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitcli.config import user_keys, validate
from vitcli.defaults import BIG_IMAGES, augment_level, model_width, strength
from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from torch import nn

    from vitcli.config import Config
    from vitcli.defaults import Choice, DataFacts

SMALL_DATA = 20_000  # training images below which from-scratch training uses scratch-small
WARMUP_SHARE = 0.15  # from scratch: warmup as a share of the run (at most 10 epochs); a one-cycle run's 15%


@dataclass
class Recipe:
    name: str  # scratch-small | scratch | finetune | none
    why: str  # one sentence: what about the data / model chose it
    applied: dict[str, Any] = field(default_factory=dict)  # key -> value the recipe set
    kept: list[str] = field(default_factory=list)  # recipe keys left as the user set them
    defaults: list[Choice] = field(default_factory=list)  # data-aware choices made first (defaults.py)
    hint: str | None = None  # e.g. the command that fine-tunes pretrained weights instead


def choose(cfg: Config, n_train: int) -> tuple[str, str]:
    """(recipe name, why) for this config and training-set size."""
    m = cfg.model
    if cfg.train.recipe != "auto":
        return cfg.train.recipe, f"'train.recipe' is {cfg.train.recipe}"
    if m.pretrained == "true" or m.pretrained_file:
        source = f"'{m.pretrained_file}'" if m.pretrained_file else "timm's pretrained weights"
        return "finetune", f"the model starts from {source}"
    level, capped = augment_level(cfg.train.epochs, model_width(cfg), cfg.data.img_size)
    medium = ": RandAugment at magnitude 6, erasing 0.25, no mixup" if level == "medium" else ""
    length = f"{cfg.train.epochs} epochs: {level} augmentation{medium}{capped}"
    if n_train < SMALL_DATA:
        return "scratch-small", (f"from scratch on {n_train:,} training images (fewer than {SMALL_DATA:,}), "
                                 f"{length}")
    return "scratch", f"from scratch on {n_train:,} training images, {length}"


def ema_decay_for(total_steps: int) -> float:
    """EMA whose horizon 1 / (1 - decay) is a tenth of the run, within [0.98, 0.9999]."""
    return round(min(0.9999, max(0.98, 1.0 - 10.0 / max(1, total_steps))), 5)


def recipe_values(name: str, cfg: Config, n_train: int, world: int = 1) -> dict[str, Any]:
    """The config values a recipe wants (before the user's own settings are honoured)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if name == "none":
        return {}
    from vitcli.models import backend_for_name

    scratch_backend = backend_for_name(m.name).from_scratch
    total_steps = max(1, n_train // (d.batch_size * world * t.accum_steps)) * t.epochs
    if name == "finetune":
        return {
            # half the from-scratch default (MAE/BEiT's fine-tuning lr), and lower still in early blocks:
            # layer decay scales block i of D by 0.75 ** (D + 1 - i)
            "optim.lr": 5e-4,
            "optim.layer_decay": 0.75,  # blocks near the input keep more of what they learnt
            "optim.warmup_epochs": min(1.0, 0.1 * t.epochs),
            "optim.weight_decay": 0.05,
            "data.randaugment": "",
            "data.mixup": 0.0,  # no heavy mixing: the features are already good
            "data.cutmix": 0.0,
            "data.reprob": 0.0,
            "train.label_smoothing": 0.1,
            "model.drop_path_rate": 0.1,
        }
    small = name == "scratch-small"
    level = strength(t.epochs, model_width(cfg), d.img_size)
    big_images = d.img_size >= BIG_IMAGES
    values: dict[str, Any] = {
        "train.label_smoothing": 0.1,
        "optim.weight_decay": 0.05,
        "optim.warmup_epochs": round(min(10.0, WARMUP_SHARE * t.epochs), 2),  # long warmup, however short the run
        "model.drop_path_rate": 0.0 if level == "minimal" else 0.1,
        # mmax9: at magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow refuses
        "data.randaugment": {"heavy": "rand-m9-mstd0.5-inc1-mmax9", "medium": "rand-m6-n2-mstd0.5-inc1"}.get(level, "")
        if big_images else "",
        # medium: RandAugment and erasing instead of mixup (mixup on top held a 128-wide model 2 points lower)
        "data.mixup": {"minimal": 0.0, "light": 0.2, "medium": 0.0, "heavy": 0.8}[level],
        "data.cutmix": 1.0 if level == "heavy" and big_images else 0.0,
        "data.reprob": {"minimal": 0.0, "light": 0.1, "medium": 0.25, "heavy": 0.25}[level],
        # an average of the weights helps once the run is long enough for one
        "train.ema_decay": ema_decay_for(total_steps) if level != "minimal" and total_steps >= 500 else 0.0,
    }
    if small and scratch_backend:
        values["model.global_pool"] = "avg"
        values["model.pos_embed"] = "sincos"
        values["model.pos_conv"] = True  # +1 point on CIFAR-10 at 10 min, +3.4 on clutter; ~1% of a step
        from vitcli.defaults import divisor_patch, patch_size
        from vitcli.models import parse_preset, with_patch

        patch = divisor_patch(d.img_size, patch_size(d.img_size, at_most=parse_preset(m.name)[1] or 16))
        values["model.name"] = with_patch(m.name, patch)
    return values


def apply_recipe(cfg: Config, *, n_train: int, world: int = 1, quiet: bool = False,
                 facts: DataFacts | None = None) -> Recipe:
    """Fill the keys the user did not set with the chosen recipe's values; print the choice and why.

    With `facts` from the data scan, a from-scratch run first gets the data-aware defaults (defaults.py):
    input size, token grid, model size, stem, small-image augmentation and epochs; the recipe leaves those."""
    from vitcli.config import DataConfig
    from vitcli.defaults import apply_defaults, auto_batch, data_defaults, finetune_facts, photo_hint
    from vitcli.models import backend_for_name
    from vitcli.pretrained import apply_pretrained

    apply_pretrained(cfg, n_train, **finetune_facts(cfg, facts), quiet=quiet)  # `model.pretrained: auto`; data config
    name, why = choose(cfg, n_train)
    mine = user_keys(cfg)
    recipe = Recipe(name, why)
    auto = cfg.data.batch_size == "auto"
    if auto:  # the defaults run with the usual batch; the size follows from the input they choose
        cfg.data.batch_size = DataConfig.batch_size
    if facts is not None and name in ("scratch-small", "scratch") and backend_for_name(cfg.model.name).from_scratch:
        recipe.defaults = apply_defaults(cfg, name, facts, world)
        recipe.hint = photo_hint(cfg, facts)
        name, why = choose(cfg, n_train)  # the chosen epochs set the augmentation strength
        recipe.why = why
    elif facts is not None and name in ("scratch-small", "scratch"):  # a timm model without pretrained weights
        recipe.defaults = data_defaults(cfg, facts)
    if facts is not None:
        recipe.defaults[:0] = facts.split
    if auto:
        choice = auto_batch(cfg, n_train, facts.device_type if facts else _device_type(cfg), world)
        cfg.data.batch_size = choice.applied["data.batch_size"] = choice.values["data.batch_size"]
        recipe.defaults.append(choice)
    chosen = {k for c in recipe.defaults for k in c.applied}
    for key, value in recipe_values(name, cfg, n_train, world).items():
        section, attr = key.split(".")
        if key in mine:
            recipe.kept.append(key)
        elif key in chosen:
            continue
        elif getattr(getattr(cfg, section), attr) != value:
            setattr(getattr(cfg, section), attr, value)
            recipe.applied[key] = value
    cfg.train.recipe = name  # config.yaml records the recipe that was used
    validate(cfg)
    if cfg.train.freeze_epochs and world > 1:
        raise VitcliError(f"'train.freeze_epochs' {cfg.train.freeze_epochs} is not supported with several "
                          "processes (torchrun); set it to 0")
    if not quiet:
        _print(recipe)
    return recipe


def _device_type(cfg: Config) -> str:
    """The device type training will use (for `data.batch_size: auto` without a data scan)."""
    from vitcli.device import pick_device

    return pick_device(cfg.train.device).type


def _print(recipe: Recipe) -> None:
    from vitcli.console import esc, info

    if recipe.name == "none":
        info("[bold]recipe[/] none ('train.recipe: none'): only your settings and the defaults")
        for c in recipe.defaults:
            info("  " + ", ".join(f"{k}={esc(_fmt(v))}" for k, v in c.applied.items()) + f": {esc(c.why)}")
        return
    if recipe.defaults:
        info("[bold]defaults[/] from the data, for the keys you did not set:")
    for c in recipe.defaults:
        info("  " + ", ".join(f"{k}={esc(_fmt(v))}" for k, v in c.applied.items()) + f": {esc(c.why)}")
    if recipe.hint:
        info(f"[bold]hint[/] {esc(recipe.hint)}")
    info(f"[bold]recipe[/] {recipe.name}: {esc(recipe.why)}")
    if recipe.applied:
        info("  sets " + ", ".join(f"{k}={esc(_fmt(v))}" for k, v in recipe.applied.items()))
    if recipe.kept:
        info("  keeps your " + ", ".join(recipe.kept))


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return repr(v) if v == "" else v
    return f"{v:g}" if isinstance(v, float) else str(v)


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Frozen: only the classifier head trains (the rest gets no gradients); else everything trains."""
    from vitcli.models import head_keys

    heads = set(head_keys(model))
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name in heads)
