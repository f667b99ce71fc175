"""One owner of the corpus layout: only `data_pipeline.corpus` parses a corpus's manifest (the
merge, which builds it, hands the dict to `Corpus.write_manifest`), and the data pipeline's
modules import each other one way (no cycle, lazy imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "pretrain", "launch", "benchmarks")
MANIFEST_READ = re.compile(r"""manifest\[|\.manifest\.get\(|["']manifest\.json["']""")
# the merge builds the manifest dict (and reports it) before `Corpus.write_manifest` writes it
BUILDS_THE_MANIFEST = re.compile(r"manifest\[")


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def test_only_the_corpus_module_reads_the_manifest():
    found = []
    for path in _sources(*PACKAGES):
        if path.name == "corpus.py" and path.parent.name in ("data_pipeline", "loading", "conversion"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits = [m.group() for m in MANIFEST_READ.finditer(code)]
            if path.name == "merge.py":
                hits = [h for h in hits if not BUILDS_THE_MANIFEST.fullmatch(h)]
            if hits:
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "ask data_pipeline.corpus.Corpus instead of parsing the manifest:\n" + "\n".join(found)


def _imports(path: Path, package_root: Path) -> set[str]:
    """Modules of the package that ``path`` imports (at any depth of its code)."""
    here = path.relative_to(package_root.parent).with_suffix("").parts
    package = here[:-1]  # a module's package, and an __init__'s own
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names.add(".".join(module))
            names.update(".".join(module + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _import_graph(*packages: str) -> dict[str, set[str]]:
    """{module: modules of ``packages`` it imports}; an edge into a package's ``__init__`` from the
    package's own modules is left out (the ``__init__`` re-exports them)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in _sources(*packages)}
    graph = {m: {n for n in _imports(p, REPO / m.split(".")[0]) if n in modules and n != m
                 and not n.endswith("__main__")}
             for m, p in modules.items()}
    for m in graph:
        graph[m] = {n for n in graph[m] if not (modules[n].name == "__init__.py" and m.startswith(n + "."))}
    return graph


@pytest.mark.parametrize("package", ["data_pipeline", "kernels", "pretrain"])
def test_modules_import_each_other_one_way(package):
    graph = _import_graph(package)
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [m, n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles (move what both sides need one layer down):\n" + "\n".join(cycles)


def test_the_layers_import_downwards_only():
    """`data_pipeline` and `kernels` never import `pretrain`; conversion never imports loading (a
    converter needs no torch); the model never imports the run configuration."""
    graph = _import_graph("data_pipeline", "kernels", "pretrain")
    rules = [("data_pipeline", "pretrain"), ("kernels", "pretrain"), ("kernels", "data_pipeline"),
             ("data_pipeline.conversion", "data_pipeline.loading"), ("pretrain.model", "pretrain.config"),
             ("pretrain.model", "pretrain.presets")]
    found = [f"{m} imports {n}" for m, targets in sorted(graph.items()) for n in sorted(targets)
             for low, high in rules if (m == low or m.startswith(low + ".")) and (n == high or n.startswith(high + "."))]
    assert not found, "an import runs upward (move the shared part down a layer):\n" + "\n".join(found)


def test_the_old_module_paths_the_readme_documented_still_import(recwarn):
    """`data_pipeline.{loader,epoch_plan,masking,normalize}` moved into `data_pipeline.loading`: the
    old paths give the same objects and a DeprecationWarning naming the new one; the package exports
    the names a training script needs."""
    import importlib
    import sys

    import data_pipeline
    from data_pipeline.loading import epoch_plan, loader, masking, normalize

    for old, new, name in (("loader", loader, "CellLoader"), ("epoch_plan", epoch_plan, "Batching"),
                           ("masking", masking, "Views"), ("normalize", normalize, "Normalization")):
        sys.modules.pop(f"data_pipeline.{old}", None)
        alias = importlib.import_module(f"data_pipeline.{old}")
        assert getattr(alias, name) is getattr(new, name)
        assert getattr(data_pipeline, name) is getattr(new, name)
        assert any(issubclass(w.category, DeprecationWarning) and f"data_pipeline.loading.{old}" in str(w.message)
                   for w in recwarn)
    assert sorted(data_pipeline.__all__) == data_pipeline.__all__
    for name in data_pipeline.__all__:
        assert getattr(data_pipeline, name).__name__ == name
