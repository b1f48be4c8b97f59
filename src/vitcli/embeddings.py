"""Embeddings: the penultimate features of a model over a list of images (the pooled, normalised token the
head reads: `forward_head(forward_features(x), pre_logits=True)`, the same call for both backends), model-free
pixel thumbnails, nearest neighbours by cosine similarity and k-centre greedy selection.

A service shared by `vitcli embed`, `search`, `select` and `inspect data` (near-duplicates across splits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from vitcli.inference import Loaded

THUMB = 16  # side in pixels of the model-free thumbnail features used for near-duplicates without a model


@dataclass
class Embedded:
    paths: list[Path]  # the readable images, in input order
    features: np.ndarray  # (N, D) float32 penultimate features
    probs: np.ndarray | None = None  # (N, C) calibrated probabilities of the same forward pass
    bad: list[str] = field(default_factory=list)  # one message per unreadable image


def image_paths(source: str | Path) -> list[Path]:
    """The images a DATA argument names: an image file, a folder (recursive, every split) or a label file."""
    from vitcli.folders import list_images
    from vitcli.manifest import is_manifest, parse_manifest

    source = Path(source)
    if is_manifest(source):
        return [p for p, _, _ in parse_manifest(source)[1]]
    if source.is_dir():
        found = list_images(source)
        if not found:
            raise VitcliError(f"'{source}': the folder holds no images")
        return found
    if source.is_file():
        return [source]
    raise VitcliError(f"'{source}': no such file or folder")


def embed_images(loaded: Loaded, paths: list[Path], batch_size: int = 64, progress: bool = True) -> Embedded:
    """Penultimate features and calibrated probabilities of `loaded`'s model over `paths` (unreadable files are
    listed in `bad` and left out)."""
    import torch

    from vitcli.augment import eval_transform
    from vitcli.console import progress_bar
    from vitcli.inference import decoded
    from vitcli.ood import features_and_logits

    pre, model = loaded.pre, loaded.model
    feats, probs, keep, bad, batch = [], [], [], [], []

    def flush() -> None:
        x = eval_transform(torch.stack([img for _, img in batch]).to(loaded.device), pre)  # (B, 3, H, W)
        with torch.inference_mode():
            f, logits = features_and_logits(model, x)  # (B, D), (B, C)
            feats.append(f.cpu())
            probs.append(loaded.probs(logits).cpu())
        keep.extend(p for p, _ in batch)
        batch.clear()

    with progress_bar(transient=True) as bar:
        task = bar.add_task("embedding", total=len(paths)) if progress and len(paths) > batch_size else None
        for path, img, err in decoded(paths, pre["resize_size"], pre["interpolation"],
                                      min(4, os.cpu_count() or 1), window=2 * batch_size):
            if err is not None:
                bad.append(err)
            else:
                batch.append((path, img))
            if len(batch) == batch_size:
                flush()
            if task is not None:
                bar.advance(task)
        if batch:
            flush()
    if not keep:
        raise VitcliError("none of the images could be read" + (f" (first: {bad[0]})" if bad else ""))
    return Embedded(keep, torch.cat(feats).numpy(), torch.cat(probs).double().numpy(), bad)


def thumbnails(paths: list[Path], side: int = THUMB) -> Embedded:
    """Model-free features: each image shrunk to side x side RGB, minus its own mean, flattened (cosine
    similarity is then the correlation of the thumbnails; re-encoded, resized or slightly edited copies of an
    image score near 1)."""
    from vitcli.decode import BadImage, decode_square

    feats, keep, bad = [], [], []
    for p in paths:
        try:
            x = decode_square(p, side, "bilinear").float().flatten().numpy()  # (3 * side * side,)
        except BadImage as e:
            bad.append(str(e))
            continue
        feats.append(x - x.mean())
        keep.append(p)
    return Embedded(keep, np.stack(feats).astype(np.float32) if feats else np.zeros((0, 3 * side * side)), None, bad)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(queries: np.ndarray, base: np.ndarray, k: int, itself: list[int | None] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `base` most cosine-similar to each query: (similarities (Q, k), indices (Q, k)), most
    similar first (ties: lower index first). `itself[q]`, the base row that is query q's own file, comes first
    even when identical copies tie with it."""
    sims = unit(queries) @ unit(base).T  # (Q, N)
    order = -sims
    for q, j in enumerate(itself or []):
        if j is not None:
            order[q, j] = -np.inf
    k = min(k, sims.shape[1])
    idx = np.argsort(order, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(sims, idx, axis=1), idx


def cross_group_pairs(features: np.ndarray, groups: list[str], threshold: float, chunk: int = 1024
                      ) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity), i < j, from different groups (splits) with cosine similarity >= threshold,
    most similar first."""
    f = unit(features)  # (N, D)
    g = np.asarray([hash(x) for x in groups])
    pairs = []
    for start in range(0, len(f), chunk):
        sims = f[start:start + chunk] @ f.T  # (B, N)
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c and g[i] != g[c]:
                pairs.append((i, c, float(sims[r, c])))
    return sorted(pairs, key=lambda t: -t[2])


def k_centre_greedy(features: np.ndarray, n: int, first: int = 0, centres: np.ndarray | None = None) -> list[int]:
    """n row indices, each the row farthest (cosine distance) from every row picked so far and from `centres`
    (M, D), e.g. the images already labelled (Sener & Savarese 2018); starts at `first` when no centres."""
    f = unit(features)  # (N, D)
    n = min(n, len(f))
    dist = np.full(len(f), np.inf)
    if centres is not None and len(centres):
        c = unit(centres)
        for s in range(0, len(c), 1024):
            dist = np.minimum(dist, 1.0 - (f @ c[s:s + 1024].T).max(1))
    picked: list[int] = []
    nxt = first if not np.isfinite(dist).any() else int(np.argmax(dist))
    while len(picked) < n:
        picked.append(nxt)
        dist = np.minimum(dist, 1.0 - f @ f[nxt])  # (N,)
        dist[picked] = -np.inf
        nxt = int(np.argmax(dist))
    return picked


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (N,): small = the model hesitates between two classes."""
    top = np.sort(np.asarray(probs, dtype=np.float64), axis=1)
    return top[:, -1] - top[:, -2] if top.shape[1] > 1 else top[:, -1]


def badge(probs: np.ndarray, features: np.ndarray, n: int, seed: int = 0, multilabel: bool = False,
          centres: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
    """n rows by k-means++ seeding on gradient embeddings g = (p - y_hat) (x) z (Ash et al. 2020, BADGE): the
    loss gradient of the head's weights if the model's own prediction y_hat were the label. Its length grows with
    uncertainty, its direction differs between unlike images, so the picks are both. Distances come from
    ||g_i - g_j||^2 = |a_i|^2 |z_i|^2 + |a_j|^2 |z_j|^2 - 2 (a_i . a_j)(z_i . z_j), never forming the (C x D)
    vectors. `centres`: (probs, features) of images already labelled, which the picks keep away from."""
    def grad_parts(p: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(p, dtype=np.float64)
        y = (p >= 0.5) if multilabel else np.eye(p.shape[1])[p.argmax(1)]  # (N, C) the model's own labels
        return p - y, np.asarray(z, dtype=np.float64)  # (N, C), (N, D)

    a, z = grad_parts(probs, features)
    sq = (a * a).sum(1) * (z * z).sum(1)  # (N,) |g|^2

    def dist2(ac: np.ndarray, zc: np.ndarray) -> np.ndarray:  # (N,) squared distance to one gradient embedding
        return np.maximum(sq + (ac @ ac) * (zc @ zc) - 2 * (a @ ac) * (z @ zc), 0.0)

    d2 = np.full(len(a), np.inf)
    if centres is not None and len(centres[0]):
        ca, cz = grad_parts(*centres)
        for i in range(len(ca)):
            d2 = np.minimum(d2, dist2(ca[i], cz[i]))
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    while len(picked) < min(n, len(a)):
        if not np.isfinite(d2).any():
            nxt = int(np.argmax(sq))  # the first pick: the largest gradient
        else:
            w = np.where(np.isfinite(d2), d2, 0.0)
            w[picked] = 0.0
            nxt = int(rng.choice(len(a), p=w / w.sum())) if w.sum() > 0 else int(np.argmax(np.where(
                np.isin(np.arange(len(a)), picked), -np.inf, sq)))
        picked.append(nxt)
        d2 = np.minimum(d2, dist2(a[nxt], z[nxt]))
    return picked
