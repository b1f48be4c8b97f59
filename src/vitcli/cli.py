"""The Typer app: parse options, call one library function, print. No logic lives here.

Heavy modules (torch, timm, matplotlib) are imported inside the commands, so `vitcli --help` is instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from vitcli.errors import VitcliError

app = typer.Typer(
    name="vitcli",
    help="Train, evaluate, predict with and look inside Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@contextlib.contextmanager
def guard():
    """Turn project errors into one red line and exit code 1; interruptions into 130 / 143."""
    from vitcli.console import error

    try:
        yield
    except VitcliError as e:
        error(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # an Interrupted from the engine carries its own exit code
        code = getattr(e, "code", None)
        if type(e).__name__ == "Interrupted" and isinstance(code, int):
            raise typer.Exit(code) from None
        raise


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see `vitcli config`).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override one config key, e.g. --set optim.lr=5e-4 (repeatable).")]


@app.command()
def train(
    data: Annotated[Path | None, typer.Argument(
        help="Folder of class subfolders, or with train/ and val/ (and test/) subfolders.", show_default=False)
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(
        help="vit-tiny/16, vit-small/16, vit-base/16 (any patch size after /) or timm/<name>. [model.name]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set. [train.epochs]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step. [data.batch_size]")] = None,
    img_size: Annotated[int | None, typer.Option(help="Network input side in pixels. [data.img_size]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps. [train.device]")] = None,
    output: Annotated[str | None, typer.Option(help="Folder for run folders (default runs). [train.output]")] = None,
    name: Annotated[str | None, typer.Option(
        help="Run folder name; -2, -3... is appended if it exists (default train). [train.name]")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this folder (or its last.pt); with --epochs, extend a finished run.")] = None,
) -> None:
    """Train a ViT on a folder of images; everything lands in a new run folder."""
    from vitcli.config import load_config

    with guard():
        if data is None and resume is None:
            raise VitcliError("missing DATA: give the dataset folder, e.g. vitcli train examples/digits")
        flags = {"model.name": model, "train.epochs": epochs, "data.batch_size": batch_size,
                 "data.img_size": img_size, "train.device": device, "train.output": output, "train.name": name}
        if resume is not None:
            if config or set_ or any(v is not None for k, v in flags.items() if k != "train.epochs"):
                raise VitcliError("--resume continues a run with its saved config; only --epochs may change")
            from vitcli.engine import train as run_train

            run_train(None, data, resume=resume, epochs_override=epochs)
            return
        cfg = load_config(config, set_, flags)
        from vitcli.engine import train as run_train

        run_train(cfg, data)


@app.command("config")
def config_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the full config as YAML (defaults, or a file with overrides applied) to start from."""
    from vitcli.config import load_config, to_yaml
    from vitcli.console import out

    with guard():
        cfg = load_config(config, set_)
        out.print(to_yaml(cfg), end="", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
