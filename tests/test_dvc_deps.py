"""dvc.yaml lists the code each stage runs: every ftq source file a stage's command pulls in is one of the
stage's deps, or inside a folder that is. Otherwise a change to that file leaves the stage's outputs
stale while `dvc status` calls them up to date.

What a stage pulls in is found two ways, both needed: importing the stage's module in a fresh
interpreter shows what its top level imports (whatever form the import takes), and reading the source
follows the imports made inside functions (most of ftq's imports are lazy, to keep torch out of
commands that never use it) from the stage's `run` to every function and class it names, module by
module. A module imported by a name computed at run time (ftq.quantize's backends) is not seen: stages
that use one depend on its whole folder."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src"
TOP = ""  # a module's top level, which runs when it is imported


def dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """Each stage's command and deps as DVC resolves dvc.yaml (vars, foreach, YAML anchors), one
    `foreach` entry standing for all: the code they run is the same."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            stages.setdefault(stage.name.split("@")[0], (stage.cmd, [str(d.def_path) for d in stage.deps]))
    return stages


def stage_module(cmd: str) -> str:
    """bin/ftq <command> ... runs ftq.stages.<command> (ftq.cli: cmd_<command> calls its run)."""
    command = cmd.split()[1]
    return f"ftq.stages.{command.replace('-', '_')}"


def imported_at_start(module: str) -> set[str]:
    """The ftq files a fresh interpreter loads to import `module` (this checkout's, as bin/ftq runs it)."""
    code = ("import sys, {0}; print('\\n'.join(m.__file__ for m in list(sys.modules.values()) "
            "if getattr(m, '__file__', None)))").format(module)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=REPO, env=env).stdout
    files = [Path(f).resolve() for f in out.splitlines()]
    return {str(f.relative_to(REPO)) for f in files if f.is_relative_to(SRC / "ftq")}


@cache
def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.exists()), None)


def imports(node: ast.AST) -> list[tuple[str, str | None]]:
    """(dotted name, the local name it is bound to) for each ftq name an import statement imports."""
    if isinstance(node, ast.Import):
        return [(a.name, a.asname) for a in node.names if a.name.split(".")[0] == "ftq"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ftq":
        return [(node.module, None)] + [(f"{node.module}.{a.name}", a.asname or a.name) for a in node.names]
    return []


class Source:
    """One module's top-level definitions, the code that runs at import, and the names it binds to ftq
    modules (`from ftq.stages import evaluate` makes `evaluate.run` a reference into that module)."""

    def __init__(self, name: str):
        tree = ast.parse(module_file(name).read_text())
        self.name = name
        self.defs = {n.name: n for n in tree.body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        self.top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for definition in self.defs.values():  # decorators and base classes run at import too
            self.top += definition.decorator_list + getattr(definition, "bases", [])
        self.modules = {bound: target for node in ast.walk(tree) for target, bound in imports(node)
                        if bound and module_file(target)}

    def reached(self, nodes: list[ast.AST]) -> set[tuple[str, str]]:
        """The (module, definition) pairs that `nodes` import or name; TOP for a module's import."""
        found = set()
        for node in (n for root in nodes for n in ast.walk(root)):
            for target, _ in imports(node):
                parent, _, name = target.rpartition(".")
                found |= {(target, TOP)} if module_file(target) else {(parent, TOP), (parent, name)}
            if isinstance(node, ast.Name) and node.id in self.defs:
                found.add((self.name, node.id))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in self.modules:
                found.add((self.modules[node.value.id], node.attr))
        return found


def reached_from_run(module: str) -> set[str]:
    """The ftq files that the code reachable from `module.run` lives in, following lazy imports."""
    sources, seen, todo = {}, set(), [(module, TOP), (module, "run")]
    while todo:
        name, what = item = todo.pop()
        if item in seen or not module_file(name):
            continue
        seen.add(item)
        parts = name.split(".")
        todo += [(".".join(parts[:i]), TOP) for i in range(1, len(parts))]  # a package runs before its modules
        source = sources.setdefault(name, Source(name))
        nodes = source.top if what == TOP else [source.defs[what]] if what in source.defs else []
        todo += source.reached(nodes)
    return {str(module_file(name).relative_to(REPO)) for name in sources}


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    return sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


STAGES = dvc_stages()


@cache
def runs(stage: str) -> set[str]:
    module = stage_module(STAGES[stage][0])
    return imported_at_start(module) | reached_from_run(module)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_deps_cover_the_code_it_runs(stage):
    files = runs(stage)
    assert str(module_file(stage_module(STAGES[stage][0])).relative_to(REPO)) in files
    assert uncovered(files, STAGES[stage][1]) == [], f"dvc.yaml: stage {stage} runs these files: add them to its deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_no_source_file_it_does_not_run(stage):
    """A source file listed that the stage no longer runs reruns it for nothing when the file changes (a
    folder may hold more than the stage runs: its deps say so on purpose)."""
    files = runs(stage)
    stale = [d for d in STAGES[stage][1] if d.startswith("src/") and d.endswith(".py") and d not in files]
    assert stale == [], f"dvc.yaml: stage {stage} does not run these files: remove them from its deps"


def test_the_walk_follows_imports_made_inside_functions():
    """ftq.stages.reference imports ftq.quantize.distance and ftq.runtimes only inside run()."""
    files = reached_from_run("ftq.stages.reference")
    assert {"src/ftq/quantize/distance.py", "src/ftq/runtimes/__init__.py", "src/ftq/runtimes/llamacpp.py"} <= files
    assert "src/ftq/quantize/distance.py" not in imported_at_start("ftq.stages.reference")
    assert uncovered({"src/ftq/a/b.py", "src/ftq/c.py"}, ["src/ftq/a"]) == ["src/ftq/c.py"]
