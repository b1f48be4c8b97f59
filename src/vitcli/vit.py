"""A Vision Transformer written from scratch (Dosovitskiy et al., 2021).

Parameter names match timm's `VisionTransformer`, so a timm state dict loads with `strict=True` and gives the
same logits. Attention has two paths: the fused `F.scaled_dot_product_attention` (default) and an explicit
softmax whose probabilities pass through the named submodule `attn_probs`, so a hook can read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Split the image into P x P patches and project each to D dims (a strided conv is that linear map)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} must be divisible by the patch size {self.patch_size}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def conv_stem_layout(patch_size: int, embed_dim: int, min_layers: int = 3) -> tuple[list[int], list[int]]:
    """(widths, strides) of ConvStem's 3x3 convs: widths doubling up to embed_dim, log2(patch) of stride 2."""
    if patch_size < 1 or patch_size & (patch_size - 1):
        raise ValueError(f"the conv stem needs a power-of-two patch size (its total stride), got {patch_size}")
    n_down = patch_size.bit_length() - 1
    n = max(min_layers, n_down)
    return [max(16, embed_dim >> (n - 1 - i)) for i in range(n)], [1] * (n - n_down) + [2] * n_down


class ConvStem(nn.Module):
    """Convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3 convs with
    BatchNorm and ReLU, halving the resolution log2(P) times up to a total stride P, then a 1x1 projection to D.
    Same output as PatchEmbed; a better start for ViTs trained from scratch on little data.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        widths, strides = conv_stem_layout(patch_size, embed_dim)
        self.patch_size = patch_size
        layers, c_in = [], in_chans
        for c_out, s in zip(widths, strides, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} must be divisible by the stem's stride {self.patch_size}")
        x = self.proj(self.convs(x))  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention; `fused_attn` picks SDPA, else the explicit softmax path."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_probs = nn.Identity()  # explicit path only: hook here to read (B, heads, N, N)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = self.attn_probs(attn.softmax(dim=-1))
            x = attn @ v  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))  # (B, N, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, *, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, drop_path: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, N, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, D)


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE / big_vision), shape (gh*gw, dim)."""
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for sincos position embeddings")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None]  # (N, D/4)
    x = x.flatten()[:, None] * omega[None]  # (N, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, D)


def on_grid(x: torch.Tensor, k: int, grid: tuple[int, int], fn) -> torch.Tensor:
    """`fn` applied to the patch tokens of `x` (B, K + gh*gw, D) laid out as an image (B, D, gh, gw); the K prefix
    tokens pass through. Returns (B, K + N', D), N' the patch count of `fn`'s output."""
    B, _, D = x.shape
    patches = fn(x[:, k:].transpose(1, 2).reshape(B, D, *grid))  # (B, D, gh', gw')
    return torch.cat([x[:, :k], patches.flatten(2).transpose(1, 2)], dim=1)  # (B, K + N', D)


class VisionTransformer(nn.Module):
    """ViT classifier with timm-compatible parameter names.

    Args:
        img_size: side of the square training input in pixels; other sizes work by interpolating positions.
        patch_size: side of each square patch in pixels.
        in_chans: input channels.
        num_classes: classes of the linear head (0 = no head, features only).
        embed_dim: token width D.
        depth: number of encoder blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the query/key/value projection.
        drop_rate: dropout probability in MLPs, projections and before the head.
        drop_path_rate: stochastic-depth rate of the last block, rising linearly from 0 over the blocks.
        global_pool: "token" classifies the class token; "avg" the mean of patch tokens (timm's fc_norm).
        pos_embed: "learn" (trainable) or "sincos" (fixed 2-D sine-cosine).
        stem: "patch" (one strided conv, timm's PatchEmbed) or "conv" (ConvStem of total stride patch_size).
        pos_conv: add a 3x3 depthwise conv of the token grid to the patch tokens after the first block (CPVT's
            position encoding generator, Chu et al. 2021): position from each token's neighbours, at any size.
        distill_token: add DeiT's distillation token and its head (Touvron et al. 2021); the model then predicts
            with the mean of both heads, and returns both while training with `distilled_training` set.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        pos_embed: str = "learn",
        stem: str = "patch",
        pos_conv: bool = False,
        distill_token: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} must be divisible by patch size {patch_size}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_classes, self.embed_dim, self.global_pool = num_classes, embed_dim, global_pool
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 2 if distill_token else 1  # class token (+ distillation token)
        self.distilled_training = False  # set by the trainer: forward returns both heads' logits while training

        stem_cls = ConvStem if stem == "conv" else PatchEmbed
        self.patch_embed = stem_cls(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distill_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.pos_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim) if pos_conv else None
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  drop=drop_rate, drop_path=rates[i])
            for i in range(depth)
        ])
        # timm: final norm before a class-token head, or fc_norm after pooling for "avg"
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "token" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if distill_token:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(pos_embed)

    def _init_weights(self, pos_embed: str) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if pos_embed == "sincos":
            k = self.num_prefix_tokens
            with torch.no_grad():
                self.pos_embed[0, k:] = sincos_pos_embed(self.embed_dim, self.grid_size)
                self.pos_embed[0, :k] = 0.0
            self.pos_embed.requires_grad_(False)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        k = self.num_prefix_tokens  # K: class (+ distillation) token
        pos = self.pos_embed  # (1, K + gh*gw, D)
        if grid != self.grid_size:  # another resolution: resample the patch positions bicubically
            pos = on_grid(pos, k, self.grid_size,
                          lambda g: F.interpolate(g, size=grid, mode="bicubic", align_corners=False))
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        prefix = [t.expand(x.shape[0], -1, -1) for t in prefix]  # K x (B, 1, D)
        return torch.cat([*prefix, x], dim=1) + pos  # (B, K + N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)  # (B, N, D)
        x = self.pos_drop(self._pos_embed(x, grid))  # (B, K + N, D)
        if self.pos_conv is None:
            return self.norm(self.blocks(x))  # (B, K + N, D)
        x = on_grid(self.blocks[0](x), self.num_prefix_tokens, grid, lambda g: g + self.pos_conv(g))  # (B, K + N, D)
        return self.norm(self.blocks[1:](x))  # (B, K + N, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Logits (B, num_classes); with a distillation token the mean of both heads, or both heads' logits
        while training with `distilled_training` set."""
        feats = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]  # (B, D)
        feats = self.head_drop(self.fc_norm(feats))
        if self.dist_token is None:
            return feats if pre_logits else self.head(feats)  # (B, num_classes)
        dist = self.head_drop(self.fc_norm(x[:, 1]))  # (B, D) the distillation token
        if pre_logits:
            return (feats + dist) / 2
        cls_logits, dist_logits = self.head(feats), self.head_dist(dist)  # (B, num_classes) each
        if self.distilled_training and self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}
