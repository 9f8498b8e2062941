"""The shape of the code, checked: the modules of minivl/, kernels/ and the trainers import each other in no circle,
kernels/ imports nothing from minivl/, the code names no working session, GPU model or document outside the
repository, README.md stays under 250 lines and the reference sampler (minivl/sampler.py) at most 300."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted([*ROOT.glob("minivl/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("train_*.py")])


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in CODE}


def imported(path):
    """The project modules that the file imports anywhere (at the top or inside a function), by name: for
    `from a.b import c` the module a.b.c if there is one, else a.b."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def test_no_import_cycle_and_kernels_import_nothing_from_minivl():
    graph = {name: imported(path) for name, path in MODULES.items()}
    assert {"minivl.sampler", "kernels.decode", "kernels.decode.rows", "train_sft"} <= set(graph)
    assert "kernels.decode.one_row" in graph["kernels.decode"]  # the walk sees imports inside functions
    for name, targets in graph.items():
        if name.startswith("kernels"):
            assert not [t for t in targets if t.startswith("minivl")], f"{name} imports {targets}"
    state = {}  # depth-first search: "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for t in sorted(graph[name]):
            assert state.get(t) != "open", "import cycle: " + " -> ".join(path + [t])
            if t not in state:
                visit(t, path + [t])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_code_names_no_session_gpu_or_outside_document():
    """Measurement history lives in benchmarks/NOTES_*.md: code gives the reason, never a session, a machine or
    a document the reader does not have."""
    pattern = re.compile(r"session [0-9]|H100|H200|facts §")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in CODE
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_and_reference_sampler_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
    assert len((ROOT / "minivl" / "sampler.py").read_text().splitlines()) <= 300
