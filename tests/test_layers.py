"""What import-linter cannot express (it forbids only whole external packages): the worker
handler, and every module of ours it imports, imports nothing from django.db. Django itself loads
that module when it is set up; the handler never uses it."""

import ast
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def _path(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_the_worker_handler_imports_nothing_from_django_db():
    graph = grimp.build_graph("sending")
    handler = {"sending.worker", *graph.find_descendants("sending.worker")}
    modules = handler | graph.find_upstream_modules("sending.worker", as_package=True)
    assert {"sending.worker.loop", "sending.providers", "sending.rendering"} <= modules
    offending = {
        module: sorted(name for name in _imports(_path(module)) if name.startswith("django.db"))
        for module in modules
    }
    assert {module: names for module, names in offending.items() if names} == {}
