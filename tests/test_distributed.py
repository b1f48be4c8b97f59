"""torchrun on CPU (gloo): two real processes train one model, write one run, and stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, DatasetsUntouched, hang_dump, make_dataset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--redirects", "3"]


def torchrun(root: Path, *args: str) -> subprocess.Popen:
    """Start `torchrun --nproc_per_node=2 -m vitcli train` on the generated shapes; per-rank logs in root/logs."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    env["COLUMNS"] = "200"
    env = hang_dump(env, root)
    cmd = [*TORCHRUN, "--log-dir", str(root / "logs"), "-m", "vitcli", "train", str(root / "shapes"), *TINY,
           "--output", str(root / "runs"), *args]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_logs(root: Path, rank: int) -> str:
    """Everything one rank wrote to stdout and stderr (torchrun --redirects 3)."""
    files = sorted((root / "logs").glob(f"*/attempt_0/{rank}/std*.log"))
    assert len(files) == 2, files
    return "".join(f.read_text() for f in files)


def workers_of(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A torchrun run of 2 epochs that ends normally (with EMA weights and gradient accumulation), logging to
    TensorBoard and writing report.html."""
    root = tmp_path_factory.mktemp("ddp")
    make_dataset(root / "shapes")
    with DatasetsUntouched([root / "shapes"]):
        proc = torchrun(root, "--epochs", "2", "--set", "train.ema_decay=0.9", "--set", "train.accum_steps=2",
                        "--set", "train.log=[csv,tensorboard]", "--set", "train.report=true")
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + rank_logs(root, 0) + rank_logs(root, 1)
    return root


def test_torchrun_ranks_end_with_identical_weights(finished):
    import torch

    from vitcli.checkpoint import load_checkpoint
    from vitcli.distributed import weights_digest

    log = rank_logs(finished, 0)
    assert "all 2 processes hold identical weights" in log, log
    digest = log.split("identical weights (sha256 ", 1)[1][:16]
    last = load_checkpoint(finished / "runs" / "train" / "last.pt")
    assert weights_digest(last["model"]).startswith(digest)  # rank 0 saved what every rank held
    assert last["config"]["train"]["epochs"] == 2 and last["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_torchrun_writes_one_run_folder_and_one_set_of_checkpoints(finished):
    runs = finished / "runs"
    assert [p.name for p in runs.iterdir()] == ["train"]
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*.pt")) == ["train/best.pt", "train/last.pt"]
    assert not list(runs.rglob("*.tmp"))
    lines = (runs / "train" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3  # header + one row per epoch, written once
    assert len(list((runs / "train").glob("events.out.tfevents.*"))) == 1  # TensorBoard: rank 0 only
    assert (runs / "train" / "report.html").is_file()


def test_torchrun_only_rank_zero_prints(finished):
    assert "training summary" in rank_logs(finished, 0)
    assert rank_logs(finished, 1) == ""


def test_torchrun_checkpoint_loads_in_one_process_and_val_metric_matches_its_eval(finished):
    import torch

    from vitcli.checkpoint import load_model
    from vitcli.data import ImageStore, scan_dataset
    from vitcli.evaluation import run_eval

    model, ckpt, _ = load_model(finished / "runs" / "train" / "best.pt")
    cfg = ckpt["config"]
    ds = scan_dataset(finished / "shapes", cfg["data"]["val_fraction"], cfg["train"]["seed"])
    store = ImageStore(ds.val, ckpt["preprocess"]["resize_size"], cfg["data"]["interpolation"], True, 0)
    ev = run_eval(model, store, ckpt["preprocess"], torch.device("cpu"), "fp32", 7,
                  torch.nn.CrossEntropyLoss())
    assert ev.count == len(ds.val) == 18
    assert ev.correct / ev.count == ckpt["metrics"]["val_acc"]  # each rank evaluated half; sums all-reduced
    assert ev.loss_sum / ev.count == pytest.approx(ckpt["metrics"]["val_loss"], rel=1e-5)


def test_sigterm_to_one_rank_stops_every_rank_after_saving(tmp_path):
    from vitcli.checkpoint import load_checkpoint

    make_dataset(tmp_path / "shapes")
    proc = torchrun(tmp_path, "--epochs", "1000")
    run = tmp_path / "runs" / "train"
    try:
        deadline = time.time() + 180
        while not (run / "metrics.csv").exists():  # past start-up: both ranks are in the epoch loop
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        ranks = workers_of(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # torchrun reports its workers' exit code 143
    log0 = rank_logs(tmp_path, 0)
    assert "stopped at epoch" in log0 and "last.pt saved" in log0, log0 + out
    assert rank_logs(tmp_path, 1) == ""
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())
    progress = load_checkpoint(run / "last.pt")["train_state"]["progress"]
    assert 1 <= progress["epoch"] < 1000


def _decide_compile_on_rank(rank: int, init: str, out: str) -> None:
    """One gloo process: decide train.compile=auto for a run whose length differs by rank."""
    import torch
    import torch.distributed as dist

    from vitcli.config import Config
    from vitcli.engine import Env
    from vitcli.state import compile_wanted
    from vitcli.vit import VisionTransformer

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    cfg = Config()
    cfg.data.img_size, cfg.data.batch_size, cfg.train.compile = 32, 8, "auto"
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2)
    env = Env(torch.device("cpu"), "fp32", "test", rank, 2)
    batches = 10**7 if rank == 0 else 1  # rank 0 alone expects a run long enough to pay for a compile
    wanted = compile_wanted(model, cfg, env, "agree-test", batches)
    Path(out, f"rank{rank}").write_text(f"{int(wanted)} {cfg.train.compile}")
    dist.destroy_process_group()


def test_ranks_agree_on_compiling_as_rank_zero_decides(tmp_path, monkeypatch):
    """Ranks whose own guesses differ still all compile or all run eagerly (a compiled rank's warm-up and
    steps run other collectives than an eager one's, and the pair would wait on each other forever)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("VITCLI_CACHE_DIR", str(tmp_path / "cache"))
    mp.spawn(_decide_compile_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "1 on"
    assert (tmp_path / "rank1").read_text() == "1 on"


def _plan_on_rank(rank: int, init: str, out: str) -> None:
    """One gloo process: fit a time budget whose clock started 30 s later on rank 1 than on rank 0."""
    import time
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from vitcli.budget import TimeBudget
    from vitcli.config import load_config

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    cfg = load_config(overrides=["train.report=false", "data.batch_size=32", "train.epochs=1000"])
    run = SimpleNamespace(cfg=cfg, env=SimpleNamespace(world=2, rank=rank, device=torch.device("cpu")),
                          progress=SimpleNamespace(epoch=0, batch=0, step=0, plan=None), steps_per_epoch=20,
                          warmup_steps=10, set_schedule=lambda total, warmup: None)
    budget = TimeBudget(300, time.time() + 30 * rank, val_images=64)
    budget.step_s = 0.5  # 10 s an epoch: rank 1's later deadline alone would fit three more epochs
    budget.fit(run)
    Path(out, f"rank{rank}").write_text(str(cfg.train.epochs))
    dist.destroy_process_group()


def test_ranks_fit_one_plan_though_their_clocks_differ(tmp_path):
    """Each rank reads its own clock; the plan (epochs, schedule) must still be the same on every rank, or the rank
    with more epochs waits forever for a peer that has gone to the end of the run."""
    import torch.multiprocessing as mp

    mp.spawn(_plan_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    epochs = [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert epochs[0] == epochs[1] and 10 < epochs[0] < 1000, epochs
