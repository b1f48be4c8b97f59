"""Model backends: the from-scratch ViT and timm models behind one interface; presets; weight loading.

This module owns every difference between the backends (building, pretrained weights, attention capture,
patch grid, resolution change, layer ids for lr decay): nothing else in vitcli checks which one it holds.
A model is described by a plain `spec` dict stored in every checkpoint, so it can be rebuilt without the
training config: {"backend": "scratch", "kwargs": {...}} or {"backend": "timm", "name": ..., "kwargs": {...}}.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcli.config import ModelConfig

# name -> (embed_dim, depth, num_heads), as in the ViT and DeiT papers
PRESETS: dict[str, tuple[int, int, int]] = {
    "vit-tiny": (192, 12, 3),
    "vit-small": (384, 12, 6),
    "vit-base": (768, 12, 12),
    "vit-large": (1024, 24, 16),
}


def parse_preset(name: str) -> tuple[str, int | None]:
    """A preset name -> (base, patch size): `vit-tiny/4` -> ('vit-tiny', 4); no or no valid patch -> None."""
    base, _, patch = name.partition("/")
    return base, int(patch) if patch.isdigit() and int(patch) > 0 else None


def with_patch(name: str, patch: int) -> str:
    """The preset name with another patch size (`vit-tiny/16`, 4 -> `vit-tiny/4`)."""
    return f"{name.partition('/')[0]}/{patch}"


def fit_heads(dim: int, heads: int) -> int:
    """`heads` when they divide the width, else heads of 32 dims (or one): for a width set without its heads."""
    return next(h for h in (heads, max(1, dim // 32), 1) if dim % h == 0)


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
    dim, depth, heads = m.embed_dim or dim, m.depth or depth, m.num_heads or fit_heads(m.embed_dim or dim, heads)
    if dim % heads:
        raise VitcliError(f"'model.embed_dim' {dim} must be divisible by 'model.num_heads' {heads}")
    if m.stem == "conv" and patch_size & (patch_size - 1):
        raise VitcliError(f"'model.stem' conv needs a power-of-two patch size (its total stride); model "
                          f"{m.name!r} has patch {patch_size}")
    if m.pos_embed == "sincos" and dim % 4:
        raise VitcliError(f"'model.embed_dim' {dim} must be divisible by 4 with 'model.pos_embed: sincos'")
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=m.mlp_ratio, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate,
                global_pool=m.global_pool, pos_embed=m.pos_embed, stem=m.stem, pos_conv=m.pos_conv)


class Backend:
    """One family of models (the from-scratch ViT, timm) behind the surface the rest of vitcli uses.

    Training, predict, eval, export and inspect never ask which family a model is: they call these methods
    on `backend_for_name(name)`, `backend_of_spec(spec)` or `backend_of(model)`.
    """

    name = ""  # key in BACKENDS and the spec's "backend" value
    from_scratch = True  # built from a vitcli preset (the small-data recipe may pick patch, pooling, positions)
    downloads_pretrained = False  # `model.pretrained: true` fetches weights (Hugging Face cache, else download)
    has_distill_token = False  # can add DeiT's distillation token (else a teacher distils into the one head)

    def claims(self, model_name: str) -> bool:
        """Whether `model.name` names a model of this family."""
        raise NotImplementedError

    def check_config(self, m: ModelConfig, img_size: int) -> None:
        """Raise VitcliError when the model settings cannot build a model (cheap: no torch import)."""

    def spec(self, m: ModelConfig, num_classes: int, img_size: int) -> dict[str, Any]:
        """The plain, self-describing recipe of the model (stored in checkpoints)."""
        raise NotImplementedError

    def create(self, spec: dict[str, Any], pretrained: bool) -> nn.Module:
        """Instantiate the module a spec describes (weights random or library-pretrained)."""
        raise NotImplementedError

    def holds(self, model: nn.Module) -> bool:
        """Whether `model` is of this family."""
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Self-attention modules in block order."""
        raise NotImplementedError

    @contextlib.contextmanager
    def explicit_attention(self, model: nn.Module, store: list, keep_graph: bool = False) -> Iterator[None]:
        """While inside, attention runs on the explicit softmax path and appends its probabilities
        (B, heads, T, T) to `store` (detached, unless `keep_graph`); the fused path is restored on exit."""
        raise NotImplementedError
        yield

    def patch_size(self, model: nn.Module) -> tuple[int, int]:
        """(ph, pw): input pixels per token along each axis."""
        p = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if p is None:
            raise VitcliError(f"model {type(model).__name__} has no patch embedding with a patch size")
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    def grid(self, model: nn.Module) -> tuple[int, int]:
        """The token grid the model was built for (its position embeddings)."""
        g = getattr(model, "grid_size", None) or getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if g is None:
            raise VitcliError(f"model {type(model).__name__} has no fixed patch grid")
        return int(g[0]), int(g[1])

    def set_input_size(self, model: nn.Module, img_size: int) -> None:
        """Make the model run at `img_size` px (position embeddings resampled)."""
        raise NotImplementedError

    def layer_id(self, param_name: str, depth: int) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, 1..depth blocks, depth + 1 head."""
        if param_name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        if param_name.startswith("pos_conv"):
            return 1  # beside the first block, whose output it reads
        return depth + 1


class ScratchBackend(Backend):
    """vitcli's own ViT (`vitcli.vit`), named by preset: vit-tiny/16, vit-small/8, ..."""

    name = "scratch"
    has_distill_token = True

    def claims(self, model_name: str) -> bool:
        return not model_name.startswith(TIMM_PREFIX)

    def check_config(self, m: ModelConfig, img_size: int) -> None:
        kw = resolve_preset(m, img_size)
        if int(kw["embed_dim"] * m.mlp_ratio) < 1:
            raise VitcliError(f"'model.mlp_ratio' {m.mlp_ratio:g} gives an MLP of 0 units at embed_dim "
                              f"{kw['embed_dim']}; raise it")

    def spec(self, m: ModelConfig, num_classes: int, img_size: int) -> dict[str, Any]:
        kwargs = resolve_preset(m, img_size)
        kwargs["num_classes"] = num_classes
        return {"backend": self.name, "name": m.name, "kwargs": kwargs, "img_size": img_size}

    def create(self, spec: dict[str, Any], pretrained: bool) -> nn.Module:
        from vitcli.vit import VisionTransformer

        return VisionTransformer(**spec["kwargs"])

    def holds(self, model: nn.Module) -> bool:
        from vitcli.vit import VisionTransformer

        return isinstance(model, VisionTransformer)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        from vitcli.vit import Attention

        return [m for m in model.modules() if isinstance(m, Attention)]

    @contextlib.contextmanager
    def explicit_attention(self, model: nn.Module, store: list, keep_graph: bool = False) -> Iterator[None]:
        mods = self.attention_modules(model)
        fused = [m.fused_attn for m in mods]
        hooks = [m.attn_probs.register_forward_hook(
            lambda _m, _i, out: store.append(out if keep_graph else out.detach())) for m in mods]
        try:
            for m in mods:
                m.fused_attn = False
            yield
        finally:
            for m, f in zip(mods, fused, strict=True):
                m.fused_attn = f
            for h in hooks:
                h.remove()

    def set_input_size(self, model: nn.Module, img_size: int) -> None:
        pass  # the scratch ViT resamples its position embeddings to any input it is given


class TimmBackend(Backend):
    """Any timm model, named timm/<timm model name>; attention capture for the ViT family."""

    name = "timm"
    from_scratch = False
    downloads_pretrained = True

    def claims(self, model_name: str) -> bool:
        return model_name.startswith(TIMM_PREFIX)

    def check_config(self, m: ModelConfig, img_size: int) -> None:
        if m.stem != "patch":
            raise VitcliError(f"'model.stem' {m.stem} is for vitcli's own ViT presets (vit-tiny/16, ...); timm "
                              f"model {m.name!r} keeps its own stem")
        if m.pos_conv:
            raise VitcliError(f"'model.pos_conv' is for vitcli's own ViT presets (vit-tiny/16, ...); timm model "
                              f"{m.name!r} keeps its own position embedding")

    def spec(self, m: ModelConfig, num_classes: int, img_size: int) -> dict[str, Any]:
        kwargs = dict(num_classes=num_classes, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)
        for key in ("embed_dim", "depth", "num_heads"):  # ViT-family size overrides (0 = timm's own)
            if getattr(m, key):
                kwargs[key] = getattr(m, key)
        return {"backend": self.name, "name": m.name.removeprefix(TIMM_PREFIX), "kwargs": kwargs,
                "img_size": img_size}

    def create(self, spec: dict[str, Any], pretrained: bool) -> nn.Module:
        import timm

        name = spec["name"]
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise VitcliError(f"'model.name' {TIMM_PREFIX}{name}: timm has no model called {name!r}{hint}")
        kwargs = dict(spec["kwargs"])
        if pretrained:  # timm loads (head dropped, positions resampled) the file from the Hugging Face cache
            from vitcli.hub import weights_file

            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file(name)), "custom_load": False}
        if spec.get("img_size"):
            kwargs["img_size"] = spec["img_size"]
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError:  # models without an img_size argument (CNNs, some hybrids)
            kwargs.pop("img_size", None)
            spec.pop("img_size", None)
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as e:  # a cached weights file that does not fit, and the like
            if pretrained:
                raise VitcliError(f"could not load pretrained weights for {TIMM_PREFIX}{name}: {first_line(e)}; set "
                                  "'model.pretrained_file' to a local weights file instead") from None
            raise

    def holds(self, model: nn.Module) -> bool:
        return not ScratchBackend().holds(model)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        try:
            from timm.models.vision_transformer import Attention
        except ImportError:  # timm missing: no timm model can exist either
            return []
        return [m for m in model.modules() if isinstance(m, Attention)]

    @contextlib.contextmanager
    def explicit_attention(self, model: nn.Module, store: list, keep_graph: bool = False) -> Iterator[None]:
        mods = self.attention_modules(model)
        forward = _explicit_timm_forward(store, keep_graph) if mods else None
        try:
            for m in mods:
                m.forward = types.MethodType(forward, m)  # instance attribute shadows the class method
            yield
        finally:
            for m in mods:
                m.__dict__.pop("forward", None)

    def set_input_size(self, model: nn.Module, img_size: int) -> None:
        if not hasattr(model, "set_input_size"):
            raise VitcliError(f"--img-size {img_size}: model {type(model).__name__} only runs at the size it was "
                              "built for")
        model.set_input_size(img_size=(img_size, img_size))


def _explicit_timm_forward(store: list, keep_graph: bool = False):
    """A replacement for timm's `Attention.forward` that computes softmax(QK^T * scale) explicitly."""
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        store.append(attn if keep_graph else attn.detach())
        x = self.attn_drop(attn) @ v  # (B, heads, N, head_dim)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))  # (B, N, heads*hd)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))  # (B, N, D)

    return forward


TIMM_PREFIX = "timm/"
BACKENDS: dict[str, Backend] = {b.name: b for b in (ScratchBackend(), TimmBackend())}


def backend_for_name(model_name: str) -> Backend:
    """The backend a `model.name` value belongs to (timm/<name> -> timm, else the scratch presets)."""
    return BACKENDS["timm"] if BACKENDS["timm"].claims(model_name) else BACKENDS["scratch"]


def backend_of_spec(spec: dict[str, Any]) -> Backend:
    if spec.get("backend") not in BACKENDS:
        raise VitcliError(f"unknown model backend {spec.get('backend')!r} in checkpoint; this vitcli knows "
                          f"{', '.join(BACKENDS)}")
    return BACKENDS[spec["backend"]]


def backend_of(model: nn.Module) -> Backend:
    """The backend of a built model (unwrapped from DDP / torch.compile first)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return BACKENDS["scratch"] if BACKENDS["scratch"].holds(model) else BACKENDS["timm"]


def canonical_name(name: str) -> str:
    """A bare timm model name (`vit_small_patch16_224`) -> timm/<name>; presets and timm/ names as given."""
    if TIMM_PREFIX in name or "/" in name.rstrip("0123456789"):
        return name
    import timm

    return f"{TIMM_PREFIX}{name}" if timm.is_model(name) else name


def model_spec(m: ModelConfig, num_classes: int, img_size: int) -> dict[str, Any]:
    """The plain, self-describing recipe of the model (stored in checkpoints)."""
    return backend_for_name(m.name).spec(m, num_classes, img_size)


def model_from_spec(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Instantiate the module a spec describes (weights random or library-pretrained)."""
    return backend_of_spec(spec).create(spec, pretrained)


def build_model(m: ModelConfig, num_classes: int, img_size: int, distill_token: bool = False
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Model + spec from the config (with a distillation token when asked, the backend has one and the class head
    reads a token: a student that averages its patch tokens learns labels and teacher on its one head, since a
    second token read alone trains slower than the pooled features); loads `pretrained_file` when set."""
    backend = backend_for_name(m.name)
    if m.pretrained == "true" and not backend.downloads_pretrained and not m.pretrained_file:
        raise VitcliError(f"'model.pretrained' needs a timm model ({TIMM_PREFIX}<name>) or 'model.pretrained_file'; "
                          f"{m.name!r} is built from scratch")
    spec = backend.spec(m, num_classes, img_size)
    if distill_token and backend.has_distill_token and m.global_pool == "token":
        spec["kwargs"]["distill_token"] = True
    model = backend.create(spec, pretrained=m.pretrained == "true" and backend.downloads_pretrained)
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
    from vitcli.files import safe_torch_load

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
