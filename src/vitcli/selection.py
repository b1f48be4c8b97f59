"""`vitcli select`: the unlabelled images most worth labelling next, both uncertain and diverse (near-copies of
one hard image are not all picked; with --labelled, nothing close to an image already labelled).

badge (the default): k-means++ seeding on loss-gradient embeddings (`embeddings.badge`). margin: the `pool` x N
images with the smallest margin between the two most likely classes (multi-label: the class probability nearest
0.5), then k-centre greedy on the model's embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitcli.errors import VitcliError


def uncertainty(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """(N,) in [0, 1], higher = less sure: 1 - (top-1 minus top-2 probability); multi-label: 1 - 2 |p - 0.5|
    of the least certain class."""
    from vitcli.embeddings import margins

    if multilabel:
        return 1.0 - 2.0 * np.abs(np.asarray(probs) - 0.5).min(1)
    return 1.0 - margins(probs)


STRATEGIES = ("badge", "margin")


def pick(emb, labelled, n: int, strategy: str, pool: float, multilabel: bool, seed: int = 0) -> list[int]:
    """Rows of `emb` (an Embedded with probabilities) to label next, in the order picked."""
    from vitcli.embeddings import badge, k_centre_greedy

    if strategy == "badge":
        return badge(emb.probs, emb.features, n, seed, multilabel,
                     None if labelled is None else (labelled.probs, labelled.features))
    unsure = uncertainty(emb.probs, multilabel)  # (N,)
    cand = np.argsort(-unsure, kind="stable")[:max(n, int(round(pool * n)))]  # the most uncertain first
    centres = None if labelled is None else labelled.features
    return [int(cand[i]) for i in k_centre_greedy(emb.features[cand], n, first=0, centres=centres)]


def run_select(unlabelled: Path, model: str | None, n: int, output: Path | None = None, pool: float = 3.0,
               labelled: Path | None = None, batch_size: int = 64, device: str = "auto", strategy: str = "badge",
               seed: int = 0) -> dict[str, Any]:
    """Pick `n` images of UNLABELLED; write selected.csv and selected.png into `output` (default: select/ in
    the model's run folder)."""
    from vitcli.embeddings import embed_images, image_paths
    from vitcli.figures import plot_gallery
    from vitcli.files import ensure_dir, refuse_inside, write_csv
    from vitcli.inference import load

    if n < 1:
        raise VitcliError(f"--n {n}: must be at least 1")
    if pool < 1:
        raise VitcliError(f"--pool {pool}: must be at least 1 (1 = uncertainty only)")
    if strategy not in STRATEGIES:
        raise VitcliError(f"--strategy {strategy!r}: valid: {', '.join(STRATEGIES)}")
    loaded = load(model, device=device)
    emb = embed_images(loaded, image_paths(unlabelled), batch_size)
    known = embed_images(loaded, image_paths(labelled), batch_size, progress=False) if labelled else None
    multilabel = not loaded.task.one_label
    picked = pick(emb, known, n, strategy, pool, multilabel, seed)
    unsure = uncertainty(emb.probs, multilabel)  # (N,)
    top = emb.probs.argmax(1)
    rows = [{"rank": r, "path": str(emb.paths[i]), "uncertainty": round(float(unsure[i]), 6),
             "predicted": loaded.classes[int(top[i])], "prob": round(float(emb.probs[i, top[i]]), 6)}
            for r, i in enumerate(picked, 1)]
    out_dir = output or loaded.run_dir / "select"
    refuse_inside(out_dir, unlabelled, "--output")
    ensure_dir(out_dir)
    write_csv(out_dir / "selected.csv", list(rows[0]), [list(r.values()) for r in rows])
    cells = [(Path(r["path"]), f"#{r['rank']} {r['predicted']} {r['prob']:.2f}") for r in rows[:24]]
    plot_gallery([cells[i:i + 6] for i in range(0, len(cells), 6)], out_dir / "selected.png", loaded.pre,
                 f"{n} images to label next (uncertainty, then k-centre diversity)")
    return {"unlabelled": str(unlabelled), "images": len(emb.paths), "n": len(rows), "selected": rows,
            "skipped": emb.bad, "files": [str(out_dir / "selected.csv"), str(out_dir / "selected.png")]}


def print_select(result: dict[str, Any]) -> None:
    from rich.table import Table

    from vitcli.console import esc, out

    t = Table("#", "uncertainty", "predicted", "image",
              title=f"{result['n']} of {result['images']} images to label next")
    for r in result["selected"]:
        t.add_row(str(r["rank"]), f"{r['uncertainty']:.3f}", f"{esc(r['predicted'])} ({r['prob']:.2f})",
                  esc(r["path"]))
    out.print(t)
    for f in result["files"]:
        out.print(f"wrote {esc(f)}")
