"""Distillation (train.teacher): a DeiT distillation token learns from a frozen teacher (a pooled student: its one
head), the student predicts with both heads, it resumes bit-exactly and fits --time; without a teacher the ViT is
timm's, unchanged."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, fitted_run_folder, make_dataset, run_cli, tiny_config
from vitcli.files import safe_torch_load
from vitcli.train import train

CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return fitted_run_folder(tmp_path_factory.mktemp("teacher"), CLASSES)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """Shapes whose labels are 45% wrong: in each class folder, 9 of 20 images show the previous class's colour."""
    root = make_dataset(tmp_path_factory.mktemp("noisy") / "d", CLASSES, per_class=20, seed=5)
    for i, c in enumerate(CLASSES):
        nxt = CLASSES[(i + 1) % len(CLASSES)]
        for f in sorted((root / c).glob("*.png"))[:9]:
            f.rename(root / nxt / f"moved_{f.name}")
    return root


def train_student(noisy: Path, name: str, *sets: str) -> tuple[Path, str]:
    """The TINY model (patch stem and no position conv, as timm's ViT) for 6 epochs on the noisy shapes, from the
    current folder."""
    res = run_cli("train", noisy, *TINY, "--epochs", "6", "--name", name, "--set", "data.val_fraction=0.1",
                  "--set", "model.stem=patch", "--set", "model.pos_conv=false",
                  *[a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    return Path("runs").resolve() / name, res.output


@pytest.fixture(scope="module")
def students(tmp_path_factory, teacher, noisy) -> dict[str, tuple[Path, str]]:
    """The same student trained alone and distilled from the teacher, same recipe and epochs."""
    root, cwd = tmp_path_factory.mktemp("students"), os.getcwd()
    os.chdir(root)
    try:
        return {"alone": train_student(noisy, "alone"),
                "taught": train_student(noisy, "taught", f"train.teacher={teacher}", "train.distill_weight=0.7",
                                        "model.global_pool=token", "train.distill=hard"),
                "pooled": train_student(noisy, "pooled", f"train.teacher={teacher}", "train.distill_weight=0.7",
                                        "train.distill=hard")}
    finally:
        os.chdir(cwd)


TTA_FLAG = ("--no-tta",)  # one view: the two trainings are compared, not test-time augmentation


def top1(run: Path, clean: Path) -> float:
    res = run_cli("eval", clean, "--model", run, "--json", f"{run.name}.json", "--output", f"eval-{run.name}",
                  *TTA_FLAG)
    assert res.exit_code == 0, res.output
    return json.loads(Path(f"{run.name}.json").read_text())["top1"]


def test_distilling_a_clean_teacher_beats_noisy_labels_and_predicts_with_both_heads(tmp_path, teacher, students):
    (alone, _), (taught, out) = students["alone"], students["taught"]
    assert f"teacher {teacher}" in out and "hard distillation into the distillation token" in out
    losses = [float(r["train_loss"]) for r in csv.DictReader((taught / "metrics.csv").open())]
    assert losses[-1] < losses[0]
    clean = make_dataset(tmp_path / "clean", CLASSES, per_class=10, seed=11)
    acc_taught, acc_alone = top1(taught, clean), top1(alone, clean)
    assert acc_taught >= acc_alone + 0.1, (acc_taught, acc_alone)

    from vitcli.checkpoint import load_model

    model, ckpt, _ = load_model(taught)
    assert ckpt["model_spec"]["kwargs"]["distill_token"] is True and ckpt["config"]["train"]["teacher"] == str(teacher)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        feats = model.forward_features(x)  # (3, 2 + N, D): class and distillation token first
        pooled = feats[:, 2:].mean(1) if model.global_pool == "avg" else feats[:, 0]
        cls_logits = model.head(model.fc_norm(pooled))
        both = (cls_logits + model.head_dist(model.fc_norm(feats[:, 1]))) / 2
        assert torch.allclose(model(x), both, atol=1e-6)
        assert not torch.allclose(cls_logits, both, atol=1e-3)  # the distillation head counts
    model.train().distilled_training = True
    assert isinstance(model(x), tuple) and len(model(x)) == 2


def test_a_pooled_student_learns_from_the_teacher_on_its_one_head(tmp_path, teacher, students):
    """The recipe's average-pooling student gets no distillation token (a token read alone trains slower than
    the pooled patch tokens): it learns labels and teacher on its one head and stays timm's ViT."""
    (alone, _), (pooled, out) = students["alone"], students["pooled"]
    assert "hard distillation into the one head (it reads the mean of the patch tokens" in out
    scored = re.search(r"; (\d+\.\d\d)% top-1 on this run's (\d+) validation images", out)
    assert scored and int(scored[2]) == 6 and float(scored[1]) >= 50, out  # right where the labels are (55%)
    assert "warning: the teacher" not in out  # 6 images (whose labels are 45% wrong) decide nothing
    clean = make_dataset(tmp_path / "clean", CLASSES, per_class=10, seed=11)
    acc_pooled, acc_alone = top1(pooled, clean), top1(alone, clean)
    assert acc_pooled >= acc_alone + 0.1, (acc_pooled, acc_alone)
    assert_timms_vit(pooled)


def test_without_a_teacher_the_checkpoint_is_timms_vit_unchanged(students):
    assert_timms_vit(students["alone"][0])


def assert_timms_vit(run: Path) -> None:
    """The run's checkpoint has no distillation token and loads strictly into timm's ViT, same outputs."""
    import timm

    from vitcli.checkpoint import load_model

    model, ckpt, _ = load_model(run)
    k = ckpt["model_spec"]["kwargs"]
    assert "distill_token" not in k and model.num_prefix_tokens == 1
    assert not any(name.startswith(("dist_token", "head_dist")) for name in ckpt["model"])
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=k["embed_dim"], depth=k["depth"], num_heads=k["num_heads"], num_classes=3,
                            global_pool=k["global_pool"]).eval()
    ref.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(ref(x), model(x), atol=1e-5)


def test_a_distilled_run_resumes_bit_exactly(tmp_path, teacher):
    data = make_dataset(tmp_path / "d", CLASSES, per_class=8)
    sets = [f"train.teacher={teacher}", "train.distill=soft", "train.distill_temperature=2", "data.mixup=0.2",
            "model.global_pool=token"]
    ref = train(tiny_config(tmp_path / "runs", "ref", epochs=2, batch_size=4, extra_sets=sets), data)
    cut = train(tiny_config(tmp_path / "runs", "cut", epochs=2, batch_size=4, extra_sets=sets), data,
                stop_after_steps=5)
    train(None, None, resume=cut.run_dir)
    a, b = safe_torch_load(ref.run_dir / "last.pt"), safe_torch_load(cut.run_dir / "last.pt")
    assert "dist_token" in a["model"] and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_distillation_fits_a_time_budget_and_says_what_it_learns_from(tmp_path, teacher):
    data = make_dataset(tmp_path / "d", CLASSES, per_class=8)
    onnx_teacher = tmp_path / "t.onnx"
    assert run_cli("export", "-m", teacher, "-o", onnx_teacher).exit_code == 0
    res = run_cli("train", data, *TINY, "--time", "20s", "--set", f"train.teacher={onnx_teacher}")
    assert res.exit_code == 0, res.output
    # the defaults: soft at temperature 2, weight 0.8, into the pooled student's one head
    assert f"teacher {onnx_teacher} (onnx, fp32): soft distillation into the one head" in res.output
    assert "weight 0.8, temperature 2" in res.output
    assert "time budget" in res.output
    assert (Path("runs") / "train" / "best.pt").is_file()


def test_a_teacher_no_better_than_its_student_is_named_at_the_end(tmp_path, teacher):
    """The teacher learnt red/green/blue; here each folder holds the next colour, so it is wrong on every
    validation image: its score is printed with the teacher line, and the student, which learns the labels too,
    ends above it, with a warning."""
    data = make_dataset(tmp_path / "d", CLASSES, per_class=85)  # 51 validation images: enough to judge
    for c in CLASSES:
        (data / c).rename(data / f"_{c}")
    for i, c in enumerate(CLASSES):
        (data / f"_{CLASSES[(i + 1) % len(CLASSES)]}").rename(data / c)  # 'red' holds the green shapes, ...
    res = run_cli("train", data, *TINY, "--epochs", "6", "--set", f"train.teacher={teacher}",
                  "--set", "train.distill_weight=0.2")
    assert res.exit_code == 0, res.output
    scored = re.search(r"; (\d+\.\d\d)% top-1 on this run's \d+ validation images", res.output)
    assert scored and float(scored[1]) < 20, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("warning: the teacher"))
    assert f"the teacher {teacher} scored {scored[1]}% on the 51 validation images and its student" in line
    assert "distillation helps only when the teacher knows more" in line


@pytest.mark.parametrize("setting, message", [
    ("train.teacher=nowhere", "'train.teacher' 'nowhere' does not exist"),
    ("train.distill=medium", "'train.distill' must be one of hard, soft"),
    ("train.distill_weight=2", "'train.distill_weight' must be"),
])
def test_a_teacher_that_cannot_teach_is_one_line(tmp_path, setting, message):
    data = make_dataset(tmp_path / "d", CLASSES, per_class=4)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--set", setting)
    assert res.exit_code == 1 and message in res.output, res.output


def test_a_teacher_of_other_classes_is_refused(tmp_path, teacher):
    data = make_dataset(tmp_path / "d", ("red", "green", "yellow"), per_class=4)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--set", f"train.teacher={teacher}")
    assert res.exit_code == 1 and "the teacher must know the same classes" in res.output, res.output
    shutil.rmtree("runs", ignore_errors=True)
