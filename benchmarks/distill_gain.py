"""Does distillation (`train.teacher`) help? A small student trained alone and distilled from a larger vitcli run,
same recipe, epochs and seed, scored on a held-out TEST split.

    python benchmarks/distill_gain.py generate          # MNIST-like 28 px digits (benchmarks/small_data.py)
    python benchmarks/distill_gain.py DATA              # a folder with train/ and test/ class folders
    python benchmarks/distill_gain.py DATA --teacher runs/big   # reuse a teacher run instead of training one

In one run:
  1. the teacher: `vitcli train DATA --epochs TEACHER_EPOCHS [TEACHER_SETS]` (by default the no-flags model,
     width 128, 4 blocks, 30 epochs: its recipe adds mixup, random erasing, stochastic depth and EMA);
  2. for each seed: the student (`--student`, default width 64, 4 blocks, 2 heads, 8 epochs: small and short
     enough to leave it room below the teacher) alone, and distilled from the teacher with each `--variant`
     (default: vitcli's defaults, i.e. soft distillation at temperature 2, weight 0.8, and DeiT's hard
     distillation at weight 0.5), the same epochs; `--control` runs the student alone with other settings;
  3. `vitcli eval` of every run's best.pt (picked on the validation split vitcli holds out of train/) and
     last.pt on test/;
and prints a table of test top-1 per seed, the means and the mean gain of each variant over the student alone.
Every run goes through the CLI as a user runs it. Runs go two at a time (`--jobs`), one thread each.
Generated data and runs go under examples/generated/distill_gain/ (git ignores it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "generated" / "distill_gain"
STUDENT = "model.embed_dim=64 model.depth=4 model.num_heads=2"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sets(text: str) -> list[str]:
    """'a=1 b=2' -> ['--set', 'a=1', '--set', 'b=2']."""
    return [a for s in text.split() for a in ("--set", s)]


def train(data: Path, runs: Path, name: str, args: list[str], log: Path) -> tuple[Path, float]:
    """`vitcli train DATA ARGS` into runs/name: (run folder, seconds)."""
    cmd = [sys.executable, "-m", "vitcli", "train", str(data), "--output", str(runs), "--name", name,
           "--set", "train.report=false", "--set", "train.threads=1", *args]
    t0 = time.time()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=_env())
    return runs / name, time.time() - t0


def test_top1(data: Path, run: Path, ckpt: str) -> float:
    """`vitcli eval DATA --model run/ckpt` on DATA's test/ split: top-1."""
    out = run / f"test-{ckpt}.json"
    subprocess.run([sys.executable, "-m", "vitcli", "eval", str(data), "--model", str(run / ckpt), "--json-out",
                    str(out), "--output", str(run / f"eval-{ckpt}")], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=_env())
    return json.loads(out.read_text())["top1"]


def labelled(specs: list[str]) -> list[tuple[str, str]]:
    """['LABEL: k=v k=v', ...] -> [(LABEL, 'k=v k=v'), ...]."""
    return [(v.split(":", 1)[0].strip(), v.split(":", 1)[1] if ":" in v else "") for v in specs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="folder with train/ and test/ class folders, or 'generate' (MNIST-like digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=8, help="student epochs, alone and distilled (default 8)")
    ap.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default 30)")
    ap.add_argument("--teacher-sets", default="", help="the teacher's --set keys, 'k=v k=v' (default: no flags)")
    ap.add_argument("--teacher", type=Path, help="an existing teacher run folder instead of training one")
    ap.add_argument("--student", default=STUDENT, help=f"the student's --set keys (default '{STUDENT}')")
    ap.add_argument("--variant", action="append", default=[],
                    help="'LABEL: k=v k=v' distillation settings to compare (repeatable; default: vitcli's "
                         "defaults and hard)")
    ap.add_argument("--control", action="append", default=[],
                    help="'LABEL: k=v k=v' the student alone with other settings, no teacher (repeatable): is a "
                         "variant's gain the teacher's or its settings'?")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    if args.data == "generate":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from small_data import make_digits28

        data = args.out / "digits28"
        if not (data / "test").is_dir():
            make_digits28(data)
    else:
        data = Path(args.data).resolve()
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        sys.exit(f"{data} needs train/ and test/ class folders")
    runs = args.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs.mkdir(parents=True)
    variants = labelled(args.variant) or [("distilled (defaults: soft, T=2, weight 0.8)", ""),
                            ("distilled, hard (DeiT's: weight 0.5)", "train.distill=hard train.distill_weight=0.5")]
    controls = labelled(args.control)
    t_start = time.time()

    teacher = args.teacher.resolve() if args.teacher else None
    if teacher is None:
        teacher, sec = train(data, runs, "teacher", ["--epochs", str(args.teacher_epochs), *sets(args.teacher_sets)],
                             runs / "teacher.log")
        print(f"teacher trained in {sec:.0f} s", flush=True)
    t_best, t_last = test_top1(data, teacher, "best.pt"), test_top1(data, teacher, "last.pt")
    print(f"teacher {teacher}: test top-1 best.pt {t_best:.2%}, last.pt {t_last:.2%}", flush=True)

    jobs = []  # (label, seed, name, args)
    for seed in args.seeds:
        base = ["--epochs", str(args.epochs), *sets(args.student), "--set", f"train.seed={seed}"]
        jobs.append(("alone", seed, f"alone-s{seed}", base))
        for i, (label, extra) in enumerate(variants):
            jobs.append((label, seed, f"distilled{i}-s{seed}",
                         [*base, "--set", f"train.teacher={teacher}", *sets(extra)]))
        for i, (label, extra) in enumerate(controls):
            jobs.append((label, seed, f"control{i}-s{seed}", [*base, *sets(extra)]))

    def one(job):
        label, seed, name, a = job
        run, sec = train(data, runs, name, a, runs / f"{name}.log")
        res = (label, seed, test_top1(data, run, "best.pt"), test_top1(data, run, "last.pt"), sec)
        print(f"{label:<24} seed {seed}: test top-1 best.pt {res[2]:.2%}, last.pt {res[3]:.2%}, {sec:.0f} s",
              flush=True)
        return res

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))

    labels = ["alone"] + [v[0] for v in variants + controls]
    seeds = args.seeds
    table = {(r[0], r[1]): r for r in results}
    print(f"\nteacher: test top-1 {t_best:.2%} (best.pt), {t_last:.2%} (last.pt); students {args.epochs} epochs, "
          f"'{args.student}'; data {data}; {time.time() - t_start:.0f} s in all\n")
    head = " | ".join(f"seed {s} best / last" for s in seeds)
    print(f"| student | {head} | mean best / last | gain over alone, best / last |")
    print("| --- |" + " --- |" * (len(seeds) + 2))
    mean = {}
    for label in labels:
        rows = [table[(label, s)] for s in seeds]
        mean[label] = (sum(r[2] for r in rows) / len(rows), sum(r[3] for r in rows) / len(rows))
        cells = " | ".join(f"{r[2]:.2%} / {r[3]:.2%}" for r in rows)
        gain = ("-" if label == "alone" else
                f"{(mean[label][0] - mean['alone'][0]) * 100:+.2f} / {(mean[label][1] - mean['alone'][1]) * 100:+.2f}")
        print(f"| {label} | {cells} | {mean[label][0]:.2%} / {mean[label][1]:.2%} | {gain} |")
    (runs / "results.json").write_text(json.dumps({"teacher": [str(teacher), t_best, t_last], "runs": results},
                                                  indent=1))


if __name__ == "__main__":
    main()
