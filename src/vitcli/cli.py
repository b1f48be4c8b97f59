"""The Typer app: parse options, call one library function, print. No logic lives here.

Heavy modules (torch, timm, matplotlib) are imported inside the commands, so `vitcli --help` is instant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from vitcli.errors import VitcliError

app = typer.Typer(
    name="vitcli",
    help="Train, evaluate, predict with and look inside Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@contextlib.contextmanager
def guard():
    """Turn project errors into one red line and exit code 1; interruptions into 130 / 143."""
    from vitcli.console import error
    from vitcli.signals import Stopped, stop_handlers

    try:
        with stop_handlers():
            yield
    except VitcliError as e:
        error(str(e))
        raise typer.Exit(1) from None
    except Stopped as e:
        error(("interrupted" if e.code == 130 else f"stopped by {e.name}") + e.detail)
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:  # a file system error no library function turned into a message (safety net)
        error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or type(e).__name__}")
        raise typer.Exit(1) from None
    except Exception as e:  # an Interrupted from the engine carries its own exit code
        code = getattr(e, "code", None)
        if type(e).__name__ == "Interrupted" and isinstance(code, int):
            raise typer.Exit(code) from None
        raise


@contextlib.contextmanager
def results_on_stderr(active: bool):
    """While JSON goes to stdout (--json), what a command prints for people goes to stderr."""
    if not active:
        yield
        return
    from vitcli.console import out

    out.stderr = True  # rich then writes to whatever sys.stderr is at each print
    try:
        yield
    finally:
        out.stderr = False


def data_path(data: str | None, name: str = "DATA") -> Path | None:
    """A path argument; '' is an error (Path('') would silently mean the current folder)."""
    if data is not None and not data.strip():
        raise VitcliError(f"{name} is empty (''); give a path (use . for the current folder)")
    return None if data is None else Path(data)


# Machine-readable output, one convention for every command: --json prints JSON on stdout (anything for people
# then goes to stderr), --json-out PATH writes it to a file.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout (tables go to stderr).")]
JsonOutOpt = Annotated[Path | None, typer.Option("--json-out", help="Write the results as JSON to this file.")]


class LegacyJsonPath(TyperCommand):
    """Reads the old `--json PATH` of eval and inspect faithfulness as `--json-out PATH`, with a one-line
    deprecation warning: when the word after --json is not an option and ends in .json or is no existing path
    (DATA and images exist), it is the old file argument."""

    def parse_args(self, ctx, args):
        from vitcli.console import warn

        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            value = a[len("--json="):] if a.startswith("--json=") else args[i + 1] if a == "--json" and \
                i + 1 < len(args) and not args[i + 1].startswith("-") else None
            if value is not None and (value.lower().endswith(".json") or not Path(value).exists()):
                warn(f"--json PATH is deprecated: use --json-out {value} (--json alone prints JSON on stdout)")
                args[i] = "--json-out" if a == "--json" else f"--json-out={value}"
        return super().parse_args(ctx, args)


def show(result, json_out: bool, json_path: Path | None, printer) -> None:
    """A command's result: JSON on stdout (--json) or through its rich printer; with --json-out also to a file."""
    import json

    text = json.dumps(result, indent=1)
    if json_path is not None:
        from vitcli.console import esc, info
        from vitcli.files import write_output

        write_output(json_path, (text + "\n").encode(), "--json-out")
        info(f"wrote {esc(str(json_path))}")
    if json_out:
        typer.echo(text)
    else:
        printer(result)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see `vitcli config`).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override one config key, e.g. --set optim.lr=5e-4 (repeatable).")]
# train and cv: flags that set one config key each
BatchOpt = Annotated[int | None, typer.Option(help="Images per step. [data.batch_size]")]
TrainSizeOpt = Annotated[int | None, typer.Option(help="Network input side in pixels. [data.img_size]")]
TrainDeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps. [train.device]")]
RunsOpt = Annotated[str | None, typer.Option(help="Folder for run folders (default runs). [train.output]")]


@app.command(short_help="Train a ViT on a folder of images.")
def train(
    data: Annotated[str | None, typer.Argument(
        help="Folder of class subfolders, or with train/ and val/ (and test/) subfolders; a .csv/.tsv/.jsonl "
             "label file; or a shard folder from vitcli shard (or a brace pattern of its .tar files).",
        show_default=False)
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(
        help="vit-tiny/16, vit-small/16, vit-base/16 (any patch size after /) or timm/<name>. [model.name]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set. [train.epochs]")] = None,
    time: Annotated[str | None, typer.Option(
        "--time", help="Time budget for the whole command, e.g. 5m, 300s, 1h: fits the epochs. [train.time]")] = None,
    batch_size: BatchOpt = None,
    img_size: TrainSizeOpt = None,
    device: TrainDeviceOpt = None,
    output: RunsOpt = None,
    name: Annotated[str | None, typer.Option(
        help="Run folder name; -2, -3... is appended if it exists (default train). [train.name]")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this folder (or its last.pt); with --epochs, extend a finished run.")] = None,
    find_lr: Annotated[bool, typer.Option(
        "--find-lr", help="Instead of training, sweep the learning rate, plot loss vs lr and suggest optim.lr.")
    ] = False,
) -> None:
    """Train a ViT on a folder of images; everything lands in a new run folder."""
    from vitcli.config import load_config

    with guard():
        data = data_path(data)
        if data is None and resume is None:
            raise VitcliError("missing DATA: give the dataset folder, e.g. vitcli train examples/digits")
        flags = {"model.name": model, "train.epochs": epochs, "train.time": time, "data.batch_size": batch_size,
                 "data.img_size": img_size, "train.device": device, "train.output": output, "train.name": name}
        if resume is not None:
            if config or set_ or find_lr or any(v is not None for k, v in flags.items()
                                                 if k not in ("train.epochs", "train.time")):
                raise VitcliError("--resume continues a run with its saved config; only --epochs and --time may "
                                  "change")
            if time is not None:
                from vitcli.config import parse_duration

                parse_duration(time, "--time")
            from vitcli.train import train as run_train

            run_train(None, data, resume=resume, epochs_override=epochs, time_override=time)
            return
        cfg = load_config(config, set_, flags)
        if find_lr:
            from vitcli.lr_finder import find_lr as run_find_lr

            run_find_lr(cfg, data)
            return
        from vitcli.train import train as run_train

        run_train(cfg, data)


@app.command(short_help="K-fold cross-validation: mean ± std, out-of-fold probabilities.")
def cv(
    data: Annotated[str | None, typer.Argument(
        help="Class folders (train/ and val/ are pooled; test/ stays out) or a .csv/.tsv/.jsonl label file.",
        show_default=False)] = None,
    folds: Annotated[int, typer.Option("--folds", "-k", help="Folds: one training run each.")] = 5,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="As for train. [model.name]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of each fold. [train.epochs]")] = None,
    time: Annotated[str | None, typer.Option(
        "--time", help="Time budget for all folds together, e.g. 10m (shared out as the folds start).")] = None,
    batch_size: BatchOpt = None,
    img_size: TrainSizeOpt = None,
    device: TrainDeviceOpt = None,
    output: RunsOpt = None,
    name: Annotated[str | None, typer.Option(help="Parent run folder name (default cv). [train.name]")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the cross-validation in this folder (finished folds are kept, a stopped one resumes).")
    ] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
) -> None:
    """Train one run per stratified, seeded fold under one parent run folder; print every metric per fold with
    mean ± std, and write out-of-fold probabilities for every image (oof.csv)."""
    with guard():
        from vitcli.cv import print_cv, run_cv
        from vitcli.train import train as run_train

        flags = {"model.name": model, "train.epochs": epochs, "train.time": time, "data.batch_size": batch_size,
                 "data.img_size": img_size, "train.device": device, "train.output": output, "train.name": name}
        show(run_cv(data_path(data), folds, config, set_, flags, resume, run_train), json_out, json_path, print_cv)


@app.command(short_help="Pack a dataset into tar shards for streaming.")
def shard(
    data: Annotated[Path, typer.Argument(
        help="Folder of class subfolders, with train/ and val/, or a .csv/.tsv/.jsonl label file.",
        show_default=False)],
    out: Annotated[Path, typer.Argument(help="New (or empty) folder for the shards.", show_default=False)],
    size: Annotated[str, typer.Option(help="Bytes per shard, e.g. 1GB, 500MB, 64KiB.")] = "1GB",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write WebDataset-style tar shards (split as training would make it) and index.json; reads DATA only.
    Train on them with `vitcli train OUT` (or a brace pattern of shard files)."""
    from vitcli.config import load_config

    with guard():
        cfg = load_config(config, set_)
        from vitcli.shard_writer import write_shards

        write_shards(data, out, size, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                     val_csv=cfg.data.val_csv or None, max_bad_fraction=cfg.data.max_bad_fraction)


@app.command("config", short_help="Print the full config as YAML.")
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


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Checkpoint file or run folder (its best.pt); default: the newest run under runs/.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 where fast, else fp32), fp32, bf16 or fp16.")]
TtaOpt = Annotated[bool | None, typer.Option(
    "--tta/--no-tta", help="Average the logits of the image and its mirror (and, for models trained on small "
    "cropped photos, both shifted four ways: 10 views); default: on for models trained on mirrored images.",
    show_default=False)]


@app.command(short_help="Classify images, folders and globs.")
def predict(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (searched recursively) and glob patterns, in any mix.", show_default=False)
    ] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint, run folder, .onnx or TorchScript file; default: the newest run.")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.")] = 1,
    format_: Annotated[str, typer.Option("--format", "-f", help="table, json, jsonl or csv.")] = "table",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write results to this file instead of stdout.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout (same as --format json).")
                        ] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json-out", help="Write JSON to this file (same as --format json -o PATH).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    tta: TtaOpt = None,
    min_prob: Annotated[list[str] | None, typer.Option(
        "--min-prob", help="Answer 'unknown' when the top probability is below P; CLASS=P sets one class's "
                           "threshold (repeatable). Multi-label: a label below P is 'unsure'.")] = None,
    coverage: Annotated[float | None, typer.Option(
        help="Add the smallest set of classes that holds the true class with this probability, e.g. 0.9 "
             "(split conformal on the validation split).")] = None,
    ood: Annotated[bool, typer.Option(
        "--ood", help="Score how unlike the training data each image is; answer --ood-word above the model's "
                      "threshold (which keeps 95% of validation images answered).")] = False,
    ood_score: Annotated[str, typer.Option(
        help="auto (knn where the model gives embeddings, else energy), knn or energy.")] = "auto",
    ood_word: Annotated[str, typer.Option(help="The answer for out-of-distribution images.")] = "unknown",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Classify images; unreadable files are reported one by one and make the exit code 2."""
    with guard():
        from vitcli.predict import run_predict

        if json_out or json_path is not None:
            if format_ not in ("table", "json") or (output is not None and json_path is not None):
                raise VitcliError("--json / --json-out print or write JSON; they do not go with --format "
                                  f"{format_} or --output")
            format_, output = "json", json_path if json_path is not None else output
        code = run_predict(inputs or [], model, top_k, format_, output, batch_size, tta, device, precision,
                           min_prob=min_prob, coverage=coverage, ood=ood_score if ood else None, unknown=ood_word)
    raise typer.Exit(code)


@app.command(short_help="Serve a model over HTTP (POST /predict), batching concurrent requests.")
def serve(
    model: Annotated[str | None, typer.Argument(
        help="Checkpoint, run folder, .onnx or TorchScript file; default: the newest run.", show_default=False)
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; any but loopback requires --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass (1: no batching).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests, ms.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Images held at once; beyond them requests get 503.")] = 256,
    max_files: Annotated[int, typer.Option(help="Images per request.")] = 16,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit, MiB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Pixels per image (decompression bombs).")] = 40_000_000,
    read_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its body.")] = 10.0,
    max_connections: Annotated[int, typer.Option(help="Open connections; beyond them requests get 503.")] = 200,
    threads: Annotated[int, typer.Option(help="Image decoding threads (0: up to 4, one per CPU).")] = 0,
    token: Annotated[str | None, typer.Option(
        envvar="VITCLI_SERVE_TOKEN", help="Bearer token required on /predict and /info.", show_default=False)
    ] = None,
    tta: TtaOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Serve MODEL: POST /predict, GET /health, GET /info, docs at /docs; SIGTERM finishes requests, exit 0."""
    with guard():
        from vitcli.serve import ServeConfig, run_serve

        cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_files=max_files, max_body_mb=max_body_mb, max_pixels=max_pixels,
                          read_timeout_s=read_timeout, max_connections=max_connections, threads=threads,
                          token=token, tta=tta)
        code = run_serve(model, cfg, device, precision)
    raise typer.Exit(code)


@app.command("eval", short_help="Evaluate a model on labelled images.", cls=LegacyJsonPath)
def eval_cmd(
    data: Annotated[str, typer.Argument(
        help="Class subfolders, a dataset folder with test/ (else val/), or a .csv/.tsv/.jsonl label file.",
        show_default=False)],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint, run folder, .onnx or TorchScript file; default: the newest run.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for the figures (default: a new runs/eval folder).")] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    tta: TtaOpt = None,
    coverage: Annotated[float | None, typer.Option(help="Target coverage of the conformal prediction sets whose "
                                                      "empirical coverage is reported (default 0.9).")] = None,
    ood_data: Annotated[Path | None, typer.Option(
        help="Images of another kind (a folder or file): AUROC and FPR at 95% TPR of each out-of-distribution "
             "score against DATA's images, and the share answered unknown.")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Loss, top-1/top-5, per-class P/R/F1, confusion matrix, calibration, prediction-set coverage and worst
    mistakes on labelled data."""
    with guard(), results_on_stderr(json_out):
        from vitcli.evaluate import evaluate

        report = evaluate(data_path(data), model, batch_size, device, precision, output, json_path, tta=tta,
                          coverage=coverage, ood_data=ood_data)
    if json_out:
        import json

        typer.echo(json.dumps(report, indent=1))


@app.command(short_help="Export to ONNX or TorchScript.")
def export(
    model: ModelOpt = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "onnx",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="File to write (default beside the model: model.onnx, model.int8.onnx, "
                               "model.fp16.onnx or model.torchscript.pt).")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    int8: Annotated[bool, typer.Option("--int8", help="ONNX with int8 weights and activations.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="ONNX with fp16 weights and arithmetic.")] = False,
    int8_method: Annotated[str, typer.Option(
        help="auto (measure static and dynamic, keep the more faithful), static (calibrated on training images) "
             "or dynamic.")] = "auto",
    max_drop: Annotated[float, typer.Option(
        help="Refuse an --int8/--fp16 file losing more top-1 points than this on the run's validation images.")
    ] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Write an --int8/--fp16 file even past --max-drop.")] = False,
    data: Annotated[str | None, typer.Option(
        "--data", help="Labelled images for the --int8/--fp16 check (class folders, or test/ else val/), instead "
                       "of the run's validation split.")] = None,
) -> None:
    """Export to ONNX (dynamic batch) or TorchScript with class names and preprocessing; verified by running it.
    --int8 / --fp16 files are checked against the float model on the run's validation images."""
    with guard():
        from vitcli.export import export_model

        if int8 and fp16:
            raise VitcliError("--int8 and --fp16 are exclusive; give one")
        precision = "int8" if int8 else "fp16" if fp16 else "fp32"
        export_model(model, format_, output, opset, precision, int8_method, max_drop, force, data_path(data, "--data"))


@app.command("runs", short_help="List training runs, newest first.")
def runs_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder that holds run folders.")] = Path("runs"),
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
) -> None:
    """Name, date, model, data, epochs, best val accuracy, wall time and status (finished / interrupted /
    running / unreadable) of every run folder under FOLDER."""
    with guard():
        from vitcli.runs import list_runs, print_runs

        show(list_runs(folder), json_out, json_path, print_runs)


@app.command(short_help="Compare two runs on the same images (McNemar test).")
def compare(
    run_a: Annotated[str, typer.Argument(help="Run folder or checkpoint A.", show_default=False)],
    run_b: Annotated[str, typer.Argument(help="Run folder or checkpoint B.", show_default=False)],
    data: Annotated[str | None, typer.Argument(
        help="Labelled images (class folders, or test/ else val/); default: the runs' validation images.")
    ] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Config diff, per-class metric deltas and an exact McNemar test on the paired predictions (multi-label
    models: on exact matches, every label of an image right)."""
    with guard():
        from vitcli.runs import compare_runs, print_compare

        show(compare_runs(run_a, run_b, data_path(data), device, precision, batch_size), json_out, json_path,
             print_compare)


@app.command(short_help="Write report.html for a run folder.")
def report(
    run: Annotated[Path, typer.Argument(help="Run folder.", show_default=False)],
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Evaluate the run's best.pt on its validation images and write figures and a self-contained report.html
    into the run folder (training does this at the end unless train.report is false)."""
    with guard():
        from vitcli.html_report import run_report

        _print_paths([run_report(run, device, precision)["report"]])


@app.command(short_help="Write a model's image embeddings to .npy / .csv / .parquet.")
def embed(
    data: Annotated[str, typer.Argument(
        help="Images: a folder (searched recursively), a .csv/.tsv/.jsonl label file or one image.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="File to write: .npy (rows; paths in <name>.paths.txt), .csv (path, f0, f1, ...) "
                               "or .parquet (the same columns; needs pyarrow).", show_default=False)],
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """The penultimate features (the pooled token the classifier head reads) of every image, one row each."""
    with guard():
        from vitcli.embed import run_embed

        run_embed(data_path(data), output, model, batch_size, device)


@app.command(short_help="Find the images of a set nearest to query images.")
def search(
    images: Annotated[list[str], typer.Argument(help="Query images (files or folders).", show_default=False)],
    in_: Annotated[str, typer.Option(
        "--in", help="Images to search: a folder (recursive) or a .csv/.tsv/.jsonl label file.", show_default=False)],
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours per query.")] = 5,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for search.png (default: search/ in the model's run folder).")] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Nearest images by cosine similarity of the model's embeddings (an image of the set finds itself first)."""
    with guard():
        from vitcli.embed import print_search, run_search

        show(run_search([data_path(i, "IMAGE") for i in images], data_path(in_, "--in"), model, k, output,
                        batch_size, device), json_out, json_path, print_search)


@app.command("select", short_help="Pick the unlabelled images most worth labelling next.")
def select_cmd(
    unlabelled: Annotated[str, typer.Argument(
        help="Unlabelled images: a folder (searched recursively) or a label file.", show_default=False)],
    n: Annotated[int, typer.Option("--n", "-n", help="Images to pick.")] = 100,
    model: ModelOpt = None,
    pool: Annotated[float, typer.Option(
        help="--strategy margin: diversity among the POOL x N most uncertain images (1: uncertainty only).")] = 3.0,
    strategy: Annotated[str, typer.Option(
        help="badge (k-means++ on loss-gradient embeddings, seeded by --seed) or margin (the --pool x N smallest "
             "top-1 minus top-2 margins, then k-centre greedy on the embeddings).")] = "badge",
    seed: Annotated[int, typer.Option(help="Seed of the badge sampling.")] = 0,
    labelled: Annotated[str | None, typer.Option(
        help="Images already labelled (folder or label file): picks stay away from them.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for selected.csv and selected.png (default: select/ in the model's run "
                               "folder).")] = None,
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Uncertain and diverse images by the model's probabilities and embeddings: a list and a figure."""
    with guard():
        from vitcli.selection import print_select, run_select

        show(run_select(data_path(unlabelled, "UNLABELLED"), model, n, output, pool,
                        data_path(labelled, "--labelled"), batch_size, device, strategy, seed), json_out,
             json_path, print_select)


inspect_app = typer.Typer(help="Look inside a ViT: attention maps, architecture, the ViT paper's analyses, data.",
                          no_args_is_help=True)
app.add_typer(inspect_app, name="inspect", short_help="Look inside a ViT: attention, embeddings, data.")
ImagesArg = Annotated[list[str], typer.Argument(help="Image files and folders.", show_default=False)]
InspectOutOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Folder for the PNGs (default: inspect/ in the model's run folder).")]
ImgSizeOpt = Annotated[int | None, typer.Option(
    help="Run the model at this input side in pixels (default: the side it was trained at).")]


def _print_paths(paths) -> None:
    from vitcli.console import esc, out

    for p in paths:
        out.print(f"wrote {esc(str(p))}")


@inspect_app.command("attention", short_help="Attention maps overlaid on images.")
def inspect_attention_cmd(
    images: ImagesArg,
    model: ModelOpt = None,
    output: InspectOutOpt = None,
    method: Annotated[str, typer.Option(
        help="all (rollout + last block per head + block x head grid), rollout, raw (attention of "
             "--layer/--head), or a class-specific map: grad-rollout, gradcam, chefer.")] = "all",
    layer: Annotated[str | None, typer.Option(
        help="Blocks, 0-based: all, last, N or N,M. rollout: blocks 0..N (default all); raw: default last.")
    ] = None,
    head: Annotated[str | None, typer.Option(
        help="Heads, 0-based: all, N or N,M (default all; rollout fuses all heads or uses the one given).")
    ] = None,
    fusion: Annotated[str, typer.Option(help="Rollout head fusion: mean, max or min.")] = "mean",
    discard: Annotated[float, typer.Option(
        help="Rollout: share of the weakest attention weights per row set to 0, in [0, 1).")] = 0.9,
    class_: Annotated[str | None, typer.Option(
        "--class", help="Class to explain with grad-rollout, gradcam or chefer (default: the predicted one).")
    ] = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Attention overlays on each image, with the predicted class and its probability in the title."""
    with guard():
        from vitcli.views import inspect_attention

        paths = [data_path(i, "IMAGE") for i in images]
        _print_paths(inspect_attention(paths, model=model, output=output, method=method, layer=layer,
                                       head=head, fusion=fusion, discard=discard, img_size=img_size,
                                       device=device, target=class_))


@inspect_app.command("faithfulness", short_help="How faithful each explanation is (deletion/insertion).",
                     cls=LegacyJsonPath)
def inspect_faithfulness_cmd(
    data: ImagesArg,
    model: ModelOpt = None,
    output: InspectOutOpt = None,
    method: Annotated[str, typer.Option(
        help="all, or a comma list of rollout, grad-rollout, gradcam, chefer.")] = "all",
    max_images: Annotated[int, typer.Option(help="Use at most this many images, spread over the set.")] = 100,
    steps: Annotated[int, typer.Option(help="Points on each curve after the first (at most one per patch).")] = 16,
    baseline: Annotated[str, typer.Option(
        help="What a removed patch shows: blur (the image blurred, sigma = one patch), noise (random pixels) "
             "or mean (the dataset mean).")] = "blur",
    json_out: JsonOpt = False,
    json_path: JsonOutOpt = None,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Deletion and insertion tests (RISE): AUC per explanation method beside a random patch order."""
    with guard(), results_on_stderr(json_out):
        from vitcli.views import inspect_faithfulness

        images = [data_path(d) for d in data]
        res, paths = inspect_faithfulness(images, model=model, output=output, method=method, max_images=max_images,
                                          steps=steps, img_size=img_size, device=device, json_path=json_path,
                                          baseline=baseline)
        _print_paths(paths)
    if json_out:
        import json

        typer.echo(json.dumps(res, indent=1))


@inspect_app.command("model", short_help="Architecture, parameters and FLOPs.")
def inspect_model_cmd(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint, run folder, or a model name (vit-small/16, timm/<name> or a timm "
                              "name; random weights); default: the newest run.")] = None,
    config: ConfigOpt = None,
    img_size: Annotated[int | None, typer.Option(
        help="Input side in pixels (default: the checkpoint's or config's; 224 for a model name).")] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the head for --config or a model name.")] = 1000,
) -> None:
    """Architecture summary: parameters per part, FLOPs per image, tokens, patch grid, per-block table."""
    with guard():
        from vitcli.views import inspect_model

        inspect_model(model=model, config=config, img_size=img_size, num_classes=num_classes)


@inspect_app.command("posembed", short_help="Position-embedding similarity.")
def inspect_posembed_cmd(model: ModelOpt = None, output: InspectOutOpt = None) -> None:
    """Cosine similarity of each patch's position embedding with every other (ViT paper, figure 7 centre)."""
    with guard():
        from vitcli.views import inspect_posembed

        _print_paths(inspect_posembed(model=model, output=output))


@inspect_app.command("distance", short_help="Mean attention distance per head.")
def inspect_distance_cmd(
    data: ImagesArg,
    model: ModelOpt = None,
    output: InspectOutOpt = None,
    max_images: Annotated[int, typer.Option(help="Use at most this many images, spread over the set.")] = 64,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Mean attention distance per head and block (ViT paper, figure 7 right): scatter PNG, CSV and table."""
    with guard():
        from vitcli.views import inspect_distance

        _print_paths(inspect_distance([data_path(d) for d in data], model=model, output=output, max_images=max_images,
                                      img_size=img_size, device=device))


@inspect_app.command("filters", short_help="Patch-embedding filters (PCA).")
def inspect_filters_cmd(
    model: ModelOpt = None,
    output: InspectOutOpt = None,
    components: Annotated[int, typer.Option(help="Principal components to show.")] = 28,
) -> None:
    """Principal components of the patch-embedding filters as RGB tiles (ViT paper, figure 7 left)."""
    with guard():
        from vitcli.views import inspect_filters

        _print_paths(inspect_filters(model=model, output=output, components=components))


@inspect_app.command("data", short_help="Check a dataset before training; find wrong labels.")
def inspect_data_cmd(
    data: Annotated[str, typer.Argument(help="Dataset folder or label file, as vitcli train takes it.",
                                        show_default=False)],
    near: Annotated[float, typer.Option(
        help="Report images in different splits at least this cosine-similar as near-duplicates (above 1: off).")
    ] = 0.97,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Compare embeddings of this checkpoint or run folder for near-duplicates "
                              "(default: 16x16 pixel thumbnails, no model needed).")] = None,
    label_errors: Annotated[bool, typer.Option(
        "--label-errors", help="Rank the images most likely mislabelled (confident learning on out-of-fold "
                               "probabilities; runs a cross-validation unless --from gives one).")] = False,
    from_run: Annotated[Path | None, typer.Option(
        "--from", help="A `vitcli cv` run folder (its oof.csv) to find label errors with.")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation run without --from.")] = 5,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of each fold without --from. [train.epochs]")] = None,
    time: Annotated[str | None, typer.Option(
        "--time", help="Time budget for all folds without --from, e.g. 10m.")] = None,
    rank_by: Annotated[str, typer.Option(help="self_confidence or normalized_margin.")] = "self_confidence",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for the label-error files (default: label_errors/ in the cv run).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the label errors as JSON on stdout (tables go to stderr).")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json-out", help="Write the label errors as JSON to this file.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Check a dataset before training: class balance, sizes, modes, unreadable/disguised files, exact and
    near duplicates; with --label-errors, the images whose label is most likely wrong. Never writes into DATA."""
    with guard():
        from vitcli.datacheck import inspect_data, print_label_errors
        from vitcli.datacheck import label_errors as find_errors
        from vitcli.train import train as run_train

        if (from_run is not None or json_out or json_path is not None) and not label_errors:
            raise VitcliError("--from, --json and --json-out go with --label-errors")
        if not json_out:
            inspect_data(data_path(data), near=near, model=model, device=device)
        if label_errors:
            rep = find_errors(data_path(data), from_run, folds, config, set_,
                              {"train.epochs": epochs, "train.time": time}, rank_by, output, run_train)
            show(rep, json_out, json_path, print_label_errors)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
