"""Out-of-distribution scores: is an image like the training data at all, before asking which class it is?

Two scores, both "higher = more unusual", fitted at the end of training and stored in the checkpoint (`ood`):
- energy (Liu et al. 2020): -T * logsumexp(logits / T) with the model's own temperature; needs only logits, so
  every export carries it;
- knn (Sun et al. 2022): the cosine distance from the image's L2-normalised penultimate embedding to its k-th
  nearest neighbour among up to BANK_MAX training embeddings (seeded subsample, stored in fp16).
Each threshold keeps `keep` (default 95%) of the validation images: above it the image is called unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    import torch

SCORES = ("knn", "energy")  # the first is the default for --ood
KEEP = 0.95  # share of in-distribution (validation) images each threshold keeps answered
BANK_MAX = 4096  # training embeddings kept for the kNN score (fp16: 4096 x 192 x 2 bytes = 1.5 MB)
K = 10  # neighbour whose distance is the kNN score (Sun et al. use 50 with full CIFAR banks; banks here are small)


def features_and_logits(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate embedding (B, D) and logits (B, C) in one pass, for both model backends."""
    tokens = model.forward_features(x)  # (B, T, D), or pooled already for some timm models
    feats = model.forward_head(tokens, pre_logits=True)  # (B, D)
    head = getattr(model, "get_classifier", None)
    logits = head()(feats) if head is not None else model.head(feats)  # (B, C)
    return feats.float(), logits.float()


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, C) logits -> (B,) energy -T logsumexp(z / T): in-distribution images have the lower energy."""
    return -temperature * (logits.float() / temperature).logsumexp(-1)


def knn_distance(feats: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """(B, D) embeddings, (M, D) normalised bank -> (B,) cosine distance 1 - cos to the k-th nearest bank row."""
    import torch.nn.functional as F

    z = F.normalize(feats.float(), dim=-1)  # (B, D)
    sim = z @ bank.float().T  # (B, M)
    k = min(k + int(exclude_self), sim.shape[1])
    return 1.0 - sim.topk(k, dim=-1).values[:, -1]  # (B,)


def fit_ood(train_feats: torch.Tensor, val_feats: torch.Tensor, val_logits: torch.Tensor, temperature: float,
            keep: float = KEEP, seed: int = 0) -> dict[str, Any]:
    """The checkpoint's `ood` entry: a bank of training embeddings and, per score, the threshold above which
    an image is unknown (the `keep` quantile of the validation scores)."""
    import torch
    import torch.nn.functional as F

    if len(val_feats) == 0 or len(train_feats) == 0:
        raise VitcliError("out-of-distribution scores need training and validation images")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_feats), generator=g)[:BANK_MAX]
    bank = F.normalize(train_feats[pick].float(), dim=-1)  # (M, D)
    k = max(1, min(K, len(bank) // 20))  # a neighbour, not an outlier of a small bank
    scores = {"knn": knn_distance(val_feats, bank, k), "energy": energy(val_logits, temperature)}
    return {"keep": keep, "k": k, "temperature": temperature, "bank": bank.half(), "images": len(val_feats),
            "thresholds": {n: float(torch.quantile(s.double(), keep)) for n, s in scores.items()}}


def ood_scores(meta: dict[str, Any], feats: torch.Tensor | None, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score the stored `ood` entry supports for a batch (knn only when embeddings are given)."""
    out = {"energy": energy(logits, meta["temperature"])}
    if feats is not None and meta.get("bank") is not None:
        out["knn"] = knn_distance(feats, meta["bank"], meta["k"])
    return out


def ood_for_export(meta: dict[str, Any]) -> dict[str, Any]:
    """What an exported file carries: the logit score's threshold and temperature (no embedding bank: the
    exported graph returns logits only, so exports answer --ood with the energy score)."""
    return {"keep": meta["keep"], "k": meta["k"], "temperature": meta["temperature"], "images": meta["images"],
            "thresholds": {"energy": meta["thresholds"]["energy"]}}


def check_score(name: str, meta: dict[str, Any] | None, has_feats: bool, where: str) -> str:
    """The --ood-score a model can give, or one line saying why not."""
    if meta is None:
        raise VitcliError(f"{where} has no out-of-distribution thresholds (trained before vitcli fitted them, or "
                          "with train.calibrate false); retrain, or leave out --ood")
    if name == "auto":
        return "knn" if has_feats and meta.get("bank") is not None else "energy"
    if name not in SCORES:
        raise VitcliError(f"--ood-score {name!r} is not valid; use auto or one of {', '.join(SCORES)}")
    if name == "knn" and not (has_feats and meta.get("bank") is not None):
        raise VitcliError(f"{where} gives no embeddings for the knn score; use --ood-score energy")
    return name


# ----------------------------------------------------------------------------------------------- measuring
def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve of telling OOD (positive, higher score) from ID: the probability that a random
    OOD image scores above a random ID image (ties count half), by ranks."""
    import numpy as np

    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    both = np.concatenate([a, b])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties share their mean
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Share of OOD images still answered (false positives of "in-distribution") at the threshold that keeps
    `tpr` of the ID images answered."""
    import numpy as np

    t = np.quantile(np.asarray(id_scores, dtype=np.float64), tpr)
    return float((np.asarray(ood_scores) <= t).mean())


# ----------------------------------------------------------------------------------------------- fitting
def store_outputs(model, store, pre: dict, device, precision: str, batch_size: int, limit: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D), logits (N, C)) of a store's images with the eval transform; with `limit`, of a seeded
    random subset of at most that many (stores that cannot index stream all and keep a random share)."""
    import torch

    from vitcli.augment import eval_transform
    from vitcli.device import autocast

    n = len(store)
    g = torch.Generator().manual_seed(seed)
    if limit is not None and n > limit and hasattr(store, "batches"):
        idx = torch.randperm(n, generator=g)[:limit].sort().values.tolist()
        batches = store.batches([idx[i:i + batch_size] for i in range(0, len(idx), batch_size)])
    else:
        batches = store.eval_batches(batch_size)
    share = 1.0 if limit is None or n <= limit else limit / n
    feats, logits = [], []
    model.eval()
    with torch.inference_mode():
        for x, _ in batches:
            with autocast(device, precision):
                f, z = features_and_logits(model, eval_transform(x.to(device), pre))
            if share < 1.0 and not hasattr(store, "batches"):
                keep = torch.rand(len(f), generator=g) < share
                f, z = f[keep.to(f.device)], z[keep.to(z.device)]
            feats.append(f.cpu())
            logits.append(z.cpu())
    return torch.cat(feats), torch.cat(logits)


def fit_for_model(model, train_store, val_store, pre: dict, device, precision: str, batch_size: int,
                  temperature: float, keep: float = KEEP, seed: int = 0) -> dict[str, Any]:
    """The `ood` entry of a checkpoint for `model`: a bank from the training images, thresholds on validation."""
    train_feats, _ = store_outputs(model, train_store, pre, device, precision, batch_size, BANK_MAX, seed)
    val_feats, val_logits = store_outputs(model, val_store, pre, device, precision, batch_size)
    return fit_ood(train_feats, val_feats, val_logits, temperature, keep, seed)
