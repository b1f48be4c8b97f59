"""vitcli predict: inputs, outputs, per-file errors, model resolution, and a start-up without timm/torchvision."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_dataset, run_cli
from vitcli.predict import collect_inputs

CLASSES = ("blue", "green", "red")
_FITTED: dict[tuple[str, str], Path] = {}


def fitted_checkpoint(tmp_path_factory, backend: str = "scratch") -> Path:
    """A vitcli checkpoint (run folder with best.pt) fitted in ~1 s to tell the shape colours apart.

    Built once per test session: a few full-batch AdamW steps on 36 generated images, saved in the
    format `vitcli train` writes, so predict/eval/export see exactly what they get after training.
    """
    import torch

    from vitcli import data as D
    from vitcli.checkpoint import make_checkpoint, save_checkpoint
    from vitcli.config import ModelConfig
    from vitcli.models import build_model

    key = (str(tmp_path_factory.getbasetemp()), backend)
    if key in _FITTED:
        return _FITTED[key]
    root = tmp_path_factory.mktemp(f"fitted-{backend}")
    classes, split = D.scan_classes(make_dataset(root / "data", CLASSES, per_class=12, seed=1))
    pre = D.preprocess_info(32, 0.8, "bicubic", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # resize 40, crop 32
    x = D.eval_transform(torch.stack([D.decode_square(p, pre["resize_size"]) for p in split.paths]), pre)
    y = torch.tensor(split.labels)
    torch.manual_seed(0)
    name = "vit-tiny/8" if backend == "scratch" else "timm/vit_tiny_patch16_224"
    cfg = ModelConfig(name=name, embed_dim=32, depth=2, num_heads=2)
    model, spec = build_model(cfg, len(classes), 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if backend == "scratch" else 1e-3)
    for _ in range(40):  # one torch thread: the session fixture in conftest
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = make_checkpoint(model_spec=spec, classes=classes, preprocess=pre, epoch=1, step=40,
                           metrics={"val_acc": 1.0}, state_dict=model.eval().state_dict())
    save_checkpoint(root / "runs" / "fit" / "best.pt", ckpt)
    _FITTED[key] = root / "runs" / "fit"
    return _FITTED[key]


@pytest.fixture
def run(tmp_path_factory) -> Path:
    return fitted_checkpoint(tmp_path_factory)


def test_predict_json_gives_class_names_and_probabilities_that_sum_to_one(tmp_path, run):
    fresh = make_dataset(tmp_path / "fresh", CLASSES, per_class=4, size=48, seed=7, ext=".jpg")
    res = run_cli("predict", fresh, "--model", run, "--top-k", "3", "--format", "json", "--output", "p.json",
                  "--precision", "fp32")
    assert res.exit_code == 0, res.output
    preds = json.loads(Path("p.json").read_text())
    assert len(preds) == 12
    for p in preds:
        probs = [t["prob"] for t in p["top"]]
        assert sorted(t["class"] for t in p["top"]) == list(CLASSES)
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert p["class"] == p["top"][0]["class"]
    right = sum(p["class"] == Path(p["file"]).parent.name for p in preds)
    assert right >= 11, preds  # the colour is easy: the fitted model must read new images correctly


def test_predict_matches_the_validation_pipeline_of_training(tmp_path, run):
    """Predict decodes and normalises exactly as validation during training (engine.run_eval) does."""
    import torch

    from vitcli import data as D
    from vitcli.checkpoint import load_model
    from vitcli.evaluation import run_eval
    from vitcli.inference import load_predictor, predict_images

    fresh = make_dataset(tmp_path / "fresh", CLASSES, per_class=3, size=57, seed=3)
    model, ckpt, _ = load_model(run)
    _, split = D.scan_classes(fresh, ckpt["classes"])
    pre = ckpt["preprocess"]
    store = D.ImageStore(split, pre["resize_size"], pre["interpolation"], cache=True, num_workers=0)
    ref = run_eval(model, store, pre, torch.device("cpu"), "fp32", 4, keep_logits=True).logits.softmax(-1)
    pred = load_predictor(str(run), "cpu", "fp32")
    got = list(predict_images(pred, split.paths, top_k=3, batch_size=4, threads=2))
    assert [g.file for g in got] == [str(p) for p in split.paths]
    for g, r in zip(got, ref.tolist(), strict=True):
        by_name = dict(g.top)
        for name, q in zip(ckpt["classes"], r, strict=True):
            assert by_name[name] == pytest.approx(q, abs=2e-6)


def test_csv_and_jsonl_outputs_parse(tmp_path, run):
    fresh = make_dataset(tmp_path / "fresh", CLASSES, per_class=2, seed=5)
    res = run_cli("predict", fresh, "-m", run, "-k", "2", "-f", "csv", "-o", "p.csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(Path("p.csv").read_text())))
    assert len(rows) == 6
    assert set(rows[0]) == {"file", "class_1", "prob_1", "class_2", "prob_2", "error"}
    assert all(r["class_1"] in CLASSES and 0 < float(r["prob_2"]) <= float(r["prob_1"]) <= 1 for r in rows)
    res = run_cli("predict", fresh, "-m", run, "-f", "jsonl", "-o", "p.jsonl", "--tta")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in Path("p.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(line["class"] in CLASSES and len(line["top"]) == 1 for line in lines)


def test_unreadable_file_is_reported_while_the_others_are_predicted(tmp_path, run):
    folder = make_dataset(tmp_path / "imgs", ("red", "green"), per_class=3, seed=2)
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "green" / "empty.png").write_bytes(b"")
    res = run_cli("predict", folder, "missing.png", "-m", run, "-f", "json", "-o", "p.json")
    assert res.exit_code == 2, res.output
    entries = {Path(e["file"]).name: e for e in json.loads(Path("p.json").read_text())}
    assert len(entries) == 9
    errors = {name for name, e in entries.items() if "error" in e}
    assert errors == {"broken.jpg", "empty.png", "missing.png"}
    assert "broken.jpg" in entries["broken.jpg"]["error"]
    assert all(e["class"] in CLASSES for name, e in entries.items() if name not in errors)
    assert "3 of 9 inputs could not be predicted" in res.output
    # the table format reports the same per-file errors and exit code
    res = run_cli("predict", folder, "-m", run)
    assert res.exit_code == 2 and "broken.jpg" in res.output and "red_000.png" in res.output


def test_inputs_mix_files_folders_and_globs_without_duplicates(tmp_path):
    folder = make_dataset(tmp_path / "imgs", ("red", "green"), per_class=2)
    (folder / "notes.txt").write_text("not an image")
    (folder / "red" / "deep").mkdir()
    (folder / "red" / "green_000.png").write_bytes((folder / "green" / "green_000.png").read_bytes())
    paths, errors = collect_inputs([str(folder / "red" / "red_000.png"), str(folder / "green"),
                                    str(folder / "*" / "red_*.png"), str(folder / "nothing*.png")])
    names = [p.relative_to(folder).as_posix() for p in paths]
    assert names == ["red/red_000.png", "green/green_000.png", "green/green_001.png", "red/red_001.png"]
    assert len(errors) == 1 and "nothing*.png" in errors[0].error
    everything, _ = collect_inputs([str(folder)])
    assert len(everything) == 5 and not any(p.suffix == ".txt" for p in everything)


def test_default_model_is_the_newest_run(tmp_path, run):
    import shutil

    for name in ("old", "new"):
        shutil.copytree(run, Path("runs") / name)
    now = time.time()
    os.utime(Path("runs/old/best.pt"), (now, now))
    os.utime(Path("runs/new/best.pt"), (now + 10, now + 10))
    img = make_dataset(tmp_path / "one", ("red",), per_class=1) / "red" / "red_000.png"
    res = run_cli("predict", img)
    assert res.exit_code == 0, res.output
    assert str(Path("runs/new/best.pt")) in res.output and "runs/old" not in res.output
    shutil.rmtree("runs")
    res = run_cli("predict", img)
    assert res.exit_code == 1 and "no trained model found under 'runs/'" in res.output


def _subprocess(code: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch_and_one_image_predict_imports_no_timm_or_torchvision(tmp_path, run):
    img = make_dataset(tmp_path / "one", ("red",), per_class=1) / "red" / "red_000.png"
    heavy = "['torch', 'timm', 'torchvision', 'matplotlib', 'onnxruntime']"
    check = (f"import contextlib, io, json, sys\nfrom vitcli.cli import main\n"
             f"sys.argv = ['vitcli'] + {{args}}\n"
             f"with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    try:\n        main()\n    except SystemExit as e:\n        code = e.code\n"
             f"print(json.dumps({{{{'code': code, 'loaded': [m for m in {heavy} if m in sys.modules]}}}}))")
    for args in (["--help"], ["predict", "--help"]):
        res = _subprocess(check.format(args=args), tmp_path)
        assert res == {"code": 0, "loaded": []}
    res = _subprocess(check.format(args=["predict", str(img), "--model", str(run)]), tmp_path)
    assert res == {"code": 0, "loaded": ["torch"]}


def test_a_long_prediction_runs_a_compiled_frozen_graph_that_agrees_with_eager(run):
    """A pass long enough to pay for a compile runs the frozen graph (weights folded in as constants); its logits
    match the eager model's, the last short batch (padded) included."""
    import torch

    from vitcli.inference import load_predictor

    eager, fast = load_predictor(str(run), "cpu"), load_predictor(str(run), "cpu")
    how = fast.prepare(10**9, 8)  # a billion images: any compile pays for itself
    assert "compiled" in how and not fast.fwd.failed, how
    side = fast.preprocess["resize_size"]
    x = torch.randint(0, 256, (5, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want, got = eager.logits(x), fast.logits(x)
    assert got.shape == want.shape == (5, len(CLASSES))
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
