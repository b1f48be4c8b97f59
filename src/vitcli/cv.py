"""`vitcli cv`: k-fold cross-validation of a training config on a dataset (the runs, out-of-fold probabilities and
mean ± std of every metric, from the `crossval` service), printed as a table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import VitcliError

if TYPE_CHECKING:
    from vitcli.crossval import TrainFn


def run_cv(data: Path | None, folds: int, config: Path | None = None, sets: list[str] | None = None,
           flags: dict[str, Any] | None = None, resume: Path | None = None, train: TrainFn | None = None
           ) -> dict[str, Any]:
    """Start a cross-validation of DATA (or continue the one in `resume`), each fold trained by `train`
    (vitcli.train.train); returns its result."""
    from vitcli.console import esc, info
    from vitcli.crossval import CvSpec, cross_validate, read_state, start_cv

    if resume is not None:
        if data is not None or config or sets or any(v is not None for v in (flags or {}).values()):
            raise VitcliError("--resume continues a cross-validation with its saved data and config; give only "
                              "the run folder")
        read_state(resume)
        parent = resume
    else:
        if data is None:
            raise VitcliError("missing DATA: give the dataset folder or label file, e.g. vitcli cv data/ --folds 5")
        parent = start_cv(CvSpec.given(data, folds, config, sets, flags))
    info(f"[bold]cross-validation[/] in {esc(str(parent))}")
    return cross_validate(parent, train)


def print_cv(result: dict[str, Any]) -> None:
    from rich.table import Table

    from vitcli.console import esc, out

    folds = result["per_fold"]
    t = Table("metric", *(f"fold {k}" for k in range(1, len(folds) + 1)), "mean ± std", "pooled",
              title=f"{result['folds']}-fold cross-validation, {result['images']} images ({result['task']})")
    for key, s in result["summary"].items():
        t.add_row(key, *(f"{m.get(key, float('nan')):.4f}" for m in folds), f"{s['mean']:.4f} ± {s['std']:.4f}",
                  f"{result['pooled'].get(key, float('nan')):.4f}")
    out.print(t)
    out.print(f"out-of-fold probabilities: {esc(result['oof'])}")
