"""The shape of the code: no import cycle between vitcli modules, short functions, and a step loop that does not
wait for the device."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import vitcli

SRC = Path(vitcli.__file__).parent
MAX_FUNCTION_LINES = 80


def _imports(path: Path) -> set[str]:
    """vitcli modules a file imports, at module level or inside functions; `if TYPE_CHECKING:` blocks skipped."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitcli"):
            mod = node.module.removeprefix("vitcli").lstrip(".")
            if mod:
                found.add(mod.split(".")[0])
            else:  # from vitcli import data
                found.update(a.name for a in node.names if (SRC / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vitcli."))
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in SRC.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_vitcli_modules():
    graph = import_graph()
    assert "models" in graph["config"] and "files" in graph["checkpoint"]  # function-level imports are read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The layers, top to bottom (README, "How the code is laid out"): a module imports only from its own layer or
# below, and command modules (one per CLI verb) never import one another. A new module must be placed here.
LAYERS: dict[str, set[str]] = {
    "app": {"__main__", "cli"},
    "commands": {"train", "predict", "evaluate", "export", "runs", "views", "datacheck", "lr_finder", "serve",
                 "shard_writer", "embed", "cv", "selection"},
    "services": {"engine", "state", "budget", "recipes", "defaults", "loggers", "html_report", "evaluation",
                 "inference", "formats", "quantize", "distill", "rundir", "figures", "attention", "explain", "optim",
                 "ood", "pretrained", "embeddings", "crossval", "confident"},
    "core": {"config", "data", "sources", "dataset", "folders", "manifest", "shards", "decode", "store", "augment",
             "looks", "task", "metrics", "calibrate", "models", "vit", "checkpoint", "device", "distributed", "files",
             "console", "signals", "errors", "hub", "speed", "threads", "__init__"},
}
MAX_CHAIN = 9  # modules in the longest import chain, from cli down to errors (today cli -> lr_finder -> engine ->
# recipes -> defaults -> config -> models -> files -> errors)


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def walk(m: str) -> list[str]:
        if m not in memo:
            memo[m] = [m] + max((walk(n) for n in graph.get(m, ())), key=len, default=[])
        return memo[m]

    return max((walk(m) for m in graph), key=len)


def test_every_module_has_one_layer():
    placed = [m for names in LAYERS.values() for m in names]
    assert len(placed) == len(set(placed))
    assert set(import_graph()) == set(placed), set(import_graph()) ^ set(placed)


def test_modules_import_only_their_layer_or_below_and_commands_never_each_other():
    rank = {m: i for i, names in enumerate(LAYERS.values()) for m in names}
    bad = [f"{m} -> {n}" for m, deps in import_graph().items() for n in deps
           if rank[n] < rank[m] or (n != m and n in LAYERS["commands"] and m in LAYERS["commands"])]
    assert not bad, bad


def test_the_import_house_is_low():
    assert len(longest_chain({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}})) == 3
    graph = import_graph()
    del graph["__main__"]  # `python -m vitcli`: two lines that call cli
    chain = longest_chain(graph)
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long


def test_backend_names_are_decided_only_in_models():
    offenders = [p.name for p in SRC.glob("*.py") if p.name != "models.py"
                 and any('"timm/"' in line or "'timm/'" in line for line in p.read_text().splitlines())]
    assert not offenders, offenders


def test_every_module_says_what_it_owns():
    missing = [p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py")
               and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def test_training_steps_read_the_device_once_per_log_interval(shapes, tmp_path, monkeypatch):
    """Count every call that would make a GPU host wait (tensor -> Python value) during training steps: with
    LOG_EVERY batches between reads, 2 * LOG_EVERY steps cost a bounded handful, not one or more per step."""
    from conftest import tiny_config
    from vitcli import engine
    from vitcli.config import to_dict

    counts = {"steps": 0, "syncs": 0}
    in_step = {"on": False}
    real_step = engine.train_step

    def counting_step(*args, **kwargs):
        counts["steps"] += 1
        in_step["on"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            in_step["on"] = False

    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, **k):
            if in_step["on"]:
                counts["syncs"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    monkeypatch.setattr(engine, "train_step", counting_step)
    monkeypatch.setattr(engine, "LOG_EVERY", 8)
    cfg = tiny_config(tmp_path / "runs", "sync", epochs=1, batch_size=2,
                      extra_sets=["data.mixup=0.2", "train.ema_decay=0.9", "optim.clip_grad=1.0"])
    assert to_dict(cfg)["data"]["mixup"] == 0.2
    engine.train(cfg, shapes)
    assert counts["steps"] >= 32  # 72 training images, batch 2
    assert counts["syncs"] == 0, counts  # the step itself never reads the device
