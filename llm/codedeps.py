"""The code a stage runs: the llm/ files `llm STAGE` imports, found with `ast` (nothing is imported).

`llm STAGE` runs llm/cli.py, which dispatches through llm/stages.py to the stage's module. Every
llm/ module those import, transitively, at module level or inside a function, is code the stage
runs (an import under `if TYPE_CHECKING:` is not); so are the packages a module lives in
(llm/__init__.py, ...). These files are the stage's
code deps in dvc.yaml (written by `llm stages --write`), and `code_version` hashes them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

from llm.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent  # the directory that holds llm/
PACKAGE = "llm"
ENTRY = ("llm.cli", "llm.stages")  # what `llm STAGE` runs before the stage's own module

# The one kind of import not followed: imports of the CLI that serve its other commands and never
# run for `llm STAGE`. Following them would make every stage depend on the whole library (an
# edit to llm/report.py would rerun ingest). Keyed (file, enclosing function, module); each must
# still exist (`missing_exceptions`), so this list cannot go stale either.
OTHER_COMMANDS = {
    ("llm/cli.py", "main", "llm.sample"): "llm sample",
    ("llm/cli.py", "run_ladder", "llm.ladder"): "llm ladder, llm scaling",
    ("llm/cli.py", "list_stages", "llm.dvcyaml"): "llm stages",
    ("llm/cli.py", "print_params", "llm.paramdocs"): "llm params --docs",
}
# And the MLflow worker, which llm/stages.py starts only for the stages that log to the run
# (Stage.logs_to_run): code the other stages never run.
RUN_LOG_WORKER = {("llm/stages.py", "run", "llm.stage_log"): "the stages that log to the MLflow run"}


def module_file(root: Path, module: str) -> Path | None:
    """llm.x as llm/x.py or llm/x/__init__.py; None for a name that is not a module (a function)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


class _Imports(ast.NodeVisitor):
    """Every import in a module as (enclosing top-level function or "", imported name)."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.scope: list[str] = []
        self.found: list[tuple[str, str]] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        """`if TYPE_CHECKING:` imports never run: only its else branch counts."""
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

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
    """The imports of one module of root as (enclosing top-level function or "", imported name)."""
    path = module_file(root, module)
    if path is None:
        raise FileNotFoundError(f"no module {module} under {root}")
    return list(_parsed_imports(module, path.name == "__init__.py", path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=1024)
def _parsed_imports(module: str, is_package: bool, source: str) -> tuple[tuple[str, str], ...]:
    """Keyed by the source itself: a module read again after an edit is parsed again."""
    visitor = _Imports(module, is_package)
    visitor.visit(ast.parse(source, filename=module))
    return tuple(visitor.found)


def _skipped(file: str, function: str, name: str, skip: Iterable[tuple[str, str, str]]) -> bool:
    """Whether name (a module, or a name imported from one) falls under a skipped import."""
    return any(file == f and function == fn and (name == m or name.startswith(m + ".")) for f, fn, m in skip)


def import_closure(root: Path, starts: Iterable[str], package: str = PACKAGE,
                   skip: Iterable[tuple[str, str, str]] = ()) -> set[str]:
    """The files (relative to root, posix) of `package` that the modules `starts` import,
    transitively, with the packages each lives in. skip: (file, function, module) imports not to follow."""
    skip = tuple(skip)
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
                     if m.split(".")[0] == package and not _skipped(rel, where, m, skip)]
    return {p.relative_to(root).as_posix() for p in seen.values()}


def missing_exceptions(root: Path = ROOT) -> list[str]:
    """The entries of OTHER_COMMANDS and RUN_LOG_WORKER whose import is gone, as messages (none when
    all still exist)."""
    missing = []
    for (file, function, module), command in {**OTHER_COMMANDS, **RUN_LOG_WORKER}.items():
        if (function, module) not in imports(root, file.removesuffix(".py").replace("/", ".")):
            missing.append(f"{file}: {function}() no longer imports {module} (for {command}): update llm/codedeps.py")
    return missing


def stage_code_files(stage: str, root: Path = ROOT) -> list[str]:
    """The llm/ files `llm STAGE` runs, relative to root (posix), sorted."""
    module = STAGES[stage].target.split(":")[0]
    skip = OTHER_COMMANDS if STAGES[stage].logs_to_run else {**OTHER_COMMANDS, **RUN_LOG_WORKER}
    return sorted(import_closure(Path(root), [*ENTRY, module], skip=skip))


def code_version(stage: str, root: Path = ROOT) -> str:
    """sha256 of the names and bytes of the stage's code files: it changes when, and only when, one
    of the files `llm STAGE` runs changes (or one is added or dropped)."""
    digest = hashlib.sha256()
    for rel in stage_code_files(stage, root):
        data = (Path(root) / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()[:16]
