"""Layers point one way (docs/architecture.md): no import cycle among amllm's modules, and neither the
optimizers nor the model import a distributed backend. Read from the source with ``ast`` (every import,
module-level or inside a function: a lazy import is still an arrow), not by importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "amllm"

#: What the optimizers and the model must never import: amllm's backends and the libraries that
#: distribute a model. (The optimizers' reducer does use torch.distributed's collectives: it is given a
#: process group or DTensors by the caller, see amllm/optim/reduce.py.)
BACKENDS = ("amllm.parallel", "amllm.distributed", "amllm.checkpointer", "deepspeed", "torch.distributed.fsdp",
            "torch.nn.parallel")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from X import name`` counts X and, where it is a module, X.name)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imp in _imports(path):
            while imp and imp not in modules:  # amllm.x.func -> amllm.x
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is not an arrow
                targets.add(imp)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_amllm_modules():
    graph = _graph()
    assert "amllm.parallel.backend" in graph and graph["amllm.checkpointer"]  # the parse found the package
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = _graph()
    graph["amllm.checkpoint.store"] = graph["amllm.checkpoint.store"] | {"amllm.checkpointer"}  # an upward arrow
    assert any("amllm.checkpointer" in c and "amllm.checkpoint.store" in c for c in _cycles(graph))


def test_optimizers_and_model_import_no_distributed_backend():
    bad = []
    for path in [*(PACKAGE / "optim").rglob("*.py"), PACKAGE / "model.py"]:
        for imp in _imports(path):
            if any(imp == b or imp.startswith(b + ".") for b in BACKENDS):
                bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert bad == []


def test_lower_layers_do_not_import_upper_ones():
    """The checkpoint protocol sits below the backends, the backends below the Checkpointer, and
    amllm/distributed.py at the bottom: no arrow goes up."""
    graph = _graph()
    below = {"amllm.distributed": ("amllm.",), "amllm.checkpoint": ("amllm.parallel", "amllm.checkpointer"),
             "amllm.parallel": ("amllm.checkpointer", "amllm.evaluate")}
    up = [f"{m} -> {t}" for m, targets in graph.items() for low, banned in below.items()
          if m == low or m.startswith(low + ".") for t in targets
          if any(t.startswith(b) for b in banned) and not (low == "amllm.distributed" and t == "amllm.config")]
    assert up == []


def test_train_main_reads_in_one_sitting():
    """train.py's main() stays at most 100 lines, the step (micro-batch loop, backward, optimizer step)
    and the cadence inline; set-up lives in amllm/trainer.py."""
    tree = ast.parse((ROOT / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100
    body = ast.get_source_segment((ROOT / "train.py").read_text(), main)
    for inline in ("for i, (x, y) in enumerate(micro_batches)", "backend.backward(loss, accum)",
                   "backend.optimizer_step(", "Cadence.at(", "evaluate(", "checkpointer.save("):
        assert inline in body, inline
