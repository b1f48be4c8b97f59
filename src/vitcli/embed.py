"""`vitcli embed` (write the penultimate features of a model over a dataset to .npy / .csv / .parquet) and
`vitcli search` (the images of a set nearest to query images by cosine similarity: a table, a figure, json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitcli.errors import VitcliError

EMBED_FORMATS = (".npy", ".csv", ".parquet")


def paths_sidecar(output: Path) -> Path:
    """Where `embed -o X.npy` lists the image of each row: X.paths.txt."""
    return output.with_suffix(".paths.txt")


def write_embeddings(output: Path, paths: list[Path], features: np.ndarray) -> list[Path]:
    """features (N, D) with their image paths: .npy + a .paths.txt sidecar, .csv (path, f0..), or .parquet
    (the same columns; needs pyarrow). Returns the files written."""
    from vitcli.files import atomic_write, atomic_write_text, write_csv

    suffix = output.suffix.lower()
    names = [str(p) for p in paths]
    cols = [f"f{i}" for i in range(features.shape[1])]
    if suffix == ".npy":
        atomic_write(output, lambda f: np.save(f, features.astype(np.float32)))
        atomic_write_text(paths_sidecar(output), "".join(n + "\n" for n in names))
        return [output, paths_sidecar(output)]
    if suffix == ".csv":
        write_csv(output, ["path", *cols], [[n, *(f"{v:.6g}" for v in row)]
                                             for n, row in zip(names, features.tolist(), strict=True)])
        return [output]
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise VitcliError(f"-o '{output}': writing parquet needs pyarrow (pip install pyarrow); or use .npy "
                              "or .csv") from None
        table = pa.table({"path": names, **{c: features[:, i].astype(np.float32) for i, c in enumerate(cols)}})
        atomic_write(output, lambda f: pq.write_table(table, f))
        return [output]
    raise VitcliError(f"-o '{output}': unknown embedding format '{output.suffix}'; valid: "
                      f"{', '.join(EMBED_FORMATS)}")


def run_embed(data: Path, output: Path, model: str | None = None, batch_size: int = 64, device: str = "auto"
              ) -> dict[str, Any]:
    """Embed every image DATA names and write them to `output`; returns a summary."""
    from vitcli.console import esc, info, warn
    from vitcli.embeddings import embed_images, image_paths
    from vitcli.files import refuse_inside
    from vitcli.inference import load

    if output.suffix.lower() not in EMBED_FORMATS:
        raise VitcliError(f"-o '{output}': unknown embedding format '{output.suffix or '(none)'}'; valid: "
                          f"{', '.join(EMBED_FORMATS)}")
    refuse_inside(output.parent, data, "-o")
    loaded = load(model, device=device)
    emb = embed_images(loaded, image_paths(data), batch_size)
    for msg in emb.bad:
        warn(f"skipped {msg}")
    files = write_embeddings(output, emb.paths, emb.features)
    info(f"{len(emb.paths)} images x {emb.features.shape[1]} features from {esc(str(loaded.run_dir))}")
    for f in files:
        info(f"wrote {esc(str(f))}")
    return {"images": len(emb.paths), "dim": int(emb.features.shape[1]), "skipped": emb.bad,
            "files": [str(f) for f in files]}


def run_search(images: list[Path], data: Path, model: str | None = None, k: int = 5, output: Path | None = None,
               batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """The k images of DATA nearest each query image; writes search.png into `output` (default: search/ in
    the model's run folder)."""
    from vitcli.embeddings import embed_images, image_paths, nearest
    from vitcli.figures import plot_gallery
    from vitcli.files import ensure_dir, refuse_inside
    from vitcli.inference import load

    if k < 1:
        raise VitcliError(f"--k {k}: must be at least 1")
    loaded = load(model, device=device)
    base = embed_images(loaded, image_paths(data), batch_size)
    queries = [p for src in images for p in image_paths(src)]
    q = embed_images(loaded, queries, batch_size, progress=False)
    row_of = {p.resolve(): i for i, p in enumerate(base.paths)}
    sims, idx = nearest(q.features, base.features, k, [row_of.get(p.resolve()) for p in q.paths])  # (Q, k)
    results = [{"query": str(p), "neighbours": [{"path": str(base.paths[j]), "similarity": round(float(s), 6)}
                                                 for s, j in zip(srow, irow, strict=True)]}
               for p, srow, irow in zip(q.paths, sims.tolist(), idx.tolist(), strict=True)]
    out_dir = output or loaded.run_dir / "search"
    refuse_inside(out_dir, data, "--output")
    ensure_dir(out_dir)
    rows = [[(Path(r["query"]), "query\n" + Path(r["query"]).name)]
            + [(Path(n["path"]), f"{n['similarity']:.3f}\n{Path(n['path']).name}") for n in r["neighbours"]]
            for r in results]
    plot_gallery(rows, out_dir / "search.png", loaded.pre, f"nearest images in {data} (cosine similarity)")
    return {"data": str(data), "k": k, "results": results, "skipped": base.bad + q.bad,
            "figure": str(out_dir / "search.png")}


def print_search(result: dict[str, Any]) -> None:
    from rich.table import Table

    from vitcli.console import esc, out

    for r in result["results"]:
        t = Table("#", "similarity", "image", title=f"nearest to {esc(r['query'])}")
        for i, n in enumerate(r["neighbours"], 1):
            t.add_row(str(i), f"{n['similarity']:.4f}", esc(n["path"]))
        out.print(t)
    for msg in result["skipped"]:
        out.print(f"[yellow]skipped[/] {esc(msg)}")
    out.print(f"wrote {esc(result['figure'])}")
