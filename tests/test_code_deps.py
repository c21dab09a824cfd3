"""dvc.yaml's code deps are each stage's import closure, so they cannot go stale.

`llm STAGE` runs llm/cli.py, which dispatches through llm/stages.py (STAGES: "module:function")
to the stage's module. Every llm/ module those import, transitively, at module level or inside a
function, is code the stage runs; the packages a module lives in (llm/__init__.py, ...) run too.
An edit to any of them must make `dvc status` name the stage, so dvc.yaml must list each one
(a listed directory covers what is inside it). The closure is found with `ast`, not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import pytest
import yaml

from llm.stages import STAGES
from tests.conftest import REPO

# The one kind of import not followed: imports of the CLI that serve its other commands and never
# run for `llm STAGE`. Following them would make every stage depend on the whole library (an
# edit to llm/report.py would rerun ingest). Keyed (file, enclosing function, module); each must
# still exist (test below), so this list cannot go stale either.
OTHER_COMMANDS = {
    ("llm/cli.py", "main", "llm.sample"): "llm sample",
    ("llm/cli.py", "run_ladder", "llm.ladder"): "llm ladder, llm scaling",
}
ENTRY = ["llm.cli", "llm.stages"]  # what `llm STAGE` runs before the stage's own module


def module_file(root: Path, module: str) -> Path | None:
    """llm.x as llm/x.py or llm/x/__init__.py; None for a name that is not a module (a function)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


class _Imports(ast.NodeVisitor):
    """Every import in a module as (enclosing function or "", imported name)."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.scope: list[str] = []
        self.found: list[tuple[str, str]] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(self.scope[0] if self.scope else "", alias.name) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the package, up level - 1
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        where = self.scope[0] if self.scope else ""
        # `from llm.x import y`: y is a submodule or a name in llm.x; module_file tells which.
        self.found += [(where, base)] + [(where, f"{base}.{alias.name}") for alias in node.names]


def imports(root: Path, module: str) -> list[tuple[str, str]]:
    path = module_file(root, module)
    assert path is not None, module
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor.found


def skipped(file: str, function: str, name: str, skip: dict) -> bool:
    """Whether name (a module, or a name imported from one) falls under a skipped import."""
    return any(file == f and function == fn and (name == m or name.startswith(m + ".")) for f, fn, m in skip)


def import_closure(root: Path, starts: list[str], package: str = "llm", skip: dict | None = None) -> set[str]:
    """The files (relative, posix) of `package` that the modules `starts` import, transitively,
    with the packages each lives in. skip: {(file, function, module)} imports not to follow."""
    skip = skip or {}
    seen: dict[str, Path] = {}
    todo = list(starts)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            module = ".".join(parts[:i])
            path = module_file(root, module)
            if path is None or module in seen:
                continue
            seen[module] = path
            rel = path.relative_to(root).as_posix()
            todo += [m for where, m in imports(root, module)
                     if m.split(".")[0] == package and not skipped(rel, where, m, skip)]
    return {p.relative_to(root).as_posix() for p in seen.values()}


def stage_closure(name: str) -> set[str]:
    return import_closure(REPO, [*ENTRY, STAGES[name].split(":")[0]], skip=OTHER_COMMANDS)


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    return any(PurePosixPath(path) == PurePosixPath(d) or PurePosixPath(d) in PurePosixPath(path).parents for d in deps)


def test_every_stage_runs_an_llm_stage_module():
    for name, stage in dvc_stages().items():
        assert stage["cmd"].split() == ["llm", name] and name in STAGES, (
            f"{name}: cmd {stage['cmd']!r} is not `llm {name}`: this test cannot find the code it runs")


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_dvc_yaml_lists_every_module_the_stage_imports(name: str):
    deps = dep_paths(dvc_stages()[name])
    missing = sorted(f for f in stage_closure(name) if not covered(f, deps))
    assert not missing, f"stage {name}: dvc.yaml's deps miss {missing}, which `llm {name}` imports"


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_dvc_yaml_lists_no_module_the_stage_does_not_import(name: str):
    """Precise as well as complete: a stale entry would rerun the stage for an unrelated edit."""
    closure = stage_closure(name)
    code = [d for d in dep_paths(dvc_stages()[name]) if d.startswith("llm/")]
    extra = sorted(d for d in code if d not in closure)
    assert not extra, f"stage {name}: dvc.yaml lists {extra}, which `llm {name}` does not import"


def test_the_imports_left_out_still_exist():
    for (file, function, module), command in OTHER_COMMANDS.items():
        name = file.removesuffix(".py").replace("/", ".")
        assert (function, module) in imports(REPO, name), f"{file}: {function}() no longer imports {module} (for {command})"


def test_the_closure_follows_every_kind_of_import(tmp_path: Path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub.c import g\n    return g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from . import d\nfrom ..e import h\n\ndef g():\n    import pkg.f\n",
        "pkg/sub/d.py": "",
        "pkg/e.py": "h = 1\n",
        "pkg/f.py": "class K:\n    def m(self):\n        import pkg.g\n",
        "pkg/g.py": "",
        "pkg/unused.py": "",
        "pkg/skipped.py": "",
        "pkg/h.py": "def run():\n    import pkg.skipped\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(tmp_path, ["pkg.a"], package="pkg") == {
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "pkg/sub/d.py",
        "pkg/e.py", "pkg/f.py", "pkg/g.py"}
    assert import_closure(tmp_path, ["pkg.h"], package="pkg", skip={("pkg/h.py", "run", "pkg.skipped")}) == {
        "pkg/__init__.py", "pkg/h.py"}
