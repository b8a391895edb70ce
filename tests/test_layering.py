"""Dependencies point one way: leaves <- db/ <- services <- cli (``/work/shared/DESIGN.md``).

Every module of ``rapidfire_state`` (and the migrations shipped as
``rapidfire_state.migrations``) is parsed with :mod:`ast`; nothing is imported,
so the test sees imports that only run inside a function, under
``if TYPE_CHECKING:`` or through ``importlib.import_module("literal")``.

The layers, each an explicit list below (a package named there takes its
submodules with it, so ``shm_manager`` may be a module or a package):

- **leaves** (``LEAVES``): import only other leaves -- no ``rapidfire_state.db``
  module, no service, not the CLI, not the package facade by name;
- **db** (everything under ``rapidfire_state/db/``): imports only leaves and
  ``db/`` itself; the migrations (``MIGRATIONS``) likewise, plus themselves;
- **services** (``SERVICES``): may import ``db/`` and leaves, but nothing from
  ``sqlalchemy`` or ``rapidfire_state.db.models`` (they run no SQL of their own;
  an ORM class imported from ``rapidfire_state.db``, which re-exports them,
  counts as an import of ``db.models``);
- **cli** (``CLI``): the only module importing a service and ``db/`` together with
  ``argparse``; no module imports it;
- **facade** (``FACADE``, ``rapidfire_state/__init__.py``): imports only leaves
  (the rest it resolves lazily, by name, on first use).

Also: no import cycle among the ``db/`` modules, and every module is in exactly
one layer (a new module fails :func:`test_every_module_is_in_a_layer`, saying
where to add it).

What counts as an import:

- imports inside functions count everywhere: a lazy import is still a dependency;
- imports under ``if TYPE_CHECKING:`` (*type-only*) count for every layer rule
  (a service annotating with an ORM class depends on the ORM), but **not for
  cycles**: they never run, and importing a type from a module that imports you
  is the usual way to annotate without a runtime cycle;
- importing ``a.b`` also runs ``a/__init__.py``; such implicit parent-package
  imports are not counted (else every ``db/`` submodule would form a cycle with
  ``db/__init__.py``, which imports the store).  ``from a import b`` is an import
  of the submodule ``a.b`` when it exists, else of ``a`` itself;
- not seen: ``importlib.import_module(variable)`` and attribute access on an
  imported package (``db.Experiment`` after ``import rapidfire_state.db as db``).
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: source directories and the package name each is installed as
SOURCES: tuple[tuple[Path, str], ...] = (
    (REPO / "rapidfire_state", "rapidfire_state"),
    (REPO / "migrations", "rapidfire_state.migrations"),  # [tool.setuptools.package-dir]
)


@dataclasses.dataclass(frozen=True)
class Layers:
    """The layer lists of one package (the real one below; a synthetic one in the self-test)."""

    facade: frozenset[str]
    leaves: frozenset[str]
    db: str  # the package; every module under it is in the db layer
    models: str  # the ORM module (or package) services must not import
    migrations: frozenset[str]
    services: frozenset[str]
    cli: frozenset[str]
    test_file: str = "tests/test_layering.py"


LAYERS = Layers(
    facade=frozenset({"rapidfire_state"}),
    leaves=frozenset(
        {
            "rapidfire_state.constants",
            "rapidfire_state.exceptions",
            "rapidfire_state.states",
            "rapidfire_state.validation",
            "rapidfire_state.datapaths",
            "rapidfire_state.serialize",
            "rapidfire_state.logging",
            "rapidfire_state.ping",
            "rapidfire_state.threads",
            "rapidfire_state.trainer_config",
            "rapidfire_state.automl_utils",
            "rapidfire_state.automl",  # the spec's alias of automl_utils
            "rapidfire_state.colab_helper",
        }
    ),
    db="rapidfire_state.db",
    models="rapidfire_state.db.models",
    migrations=frozenset({"rapidfire_state.migrations"}),
    services=frozenset(
        {
            "rapidfire_state.experiment_utils",
            "rapidfire_state.shm_manager",  # a module today, a package soon: both are covered
            "rapidfire_state.worker_manager",
            "rapidfire_state.metric_manager",
            "rapidfire_state.metric_flusher",  # delivers metric_manager's outbox
            "rapidfire_state.metric_mlflow_manager",  # the spec's alias of metric_manager
            "rapidfire_state.interactive",  # applies interactive-control requests in the controller
            "rapidfire_state.console",  # status, watch and doctor on the report methods; the live table
        }
    ),
    cli=frozenset({"rapidfire_state.cli", "rapidfire_state.cli_ic"}),
)


# --- the scan ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: Path
    where: str  # the path as the messages show it
    is_package: bool
    tree: ast.Module


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported module, resolved: ``target`` is a module of the package or an external dotted name."""

    importer: str
    target: str
    where: str  # "path:line"
    type_only: bool
    in_function: bool
    name: str = ""  # the name taken from ``target`` by ``from target import name``, if not a submodule
    via: str = ""  # how a name became this target, when it is not the plain module

    def describe(self) -> str:
        notes = [n for n, on in (("under TYPE_CHECKING", self.type_only), ("inside a function", self.in_function)) if on]
        if self.via:
            notes.append(self.via)
        text = f"{self.name} from {self.target}" if self.name else self.target
        return text + (f" ({'; '.join(notes)})" if notes else "")


def in_group(module: str, names: Iterable[str]) -> bool:
    """``module`` is one of ``names`` or inside one of them (a package's submodules)."""
    return any(module == name or module.startswith(name + ".") for name in names)


def load_modules(sources: Iterable[tuple[Path, str]], base: Path) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for root, package in sources:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            where = path.relative_to(base).as_posix()
            modules[name] = Module(name, path, where, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_classes(module: Module) -> set[str]:
    return {node.name for node in module.tree.body if isinstance(node, ast.ClassDef)}


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: Module, known: dict[str, Module], orm_names: dict[str, str], layers: Layers):
        self.module, self.known, self.orm_names, self.layers = module, known, orm_names, layers
        self.type_only = 0
        self.functions = 0
        self.found: list[Import] = []

    # context ---------------------------------------------------------------------------

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.type_only += 1
        for child in node.body:
            self.visit(child)
        self.type_only -= 1
        for child in node.orelse:  # the else branch runs
            self.visit(child)

    def _function(self, node: ast.AST) -> None:
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function  # type: ignore[assignment]

    # imports ---------------------------------------------------------------------------

    def _add(self, node: ast.AST, target: str, *, name: str = "", via: str = "") -> None:
        self.found.append(
            Import(
                importer=self.module.name,
                target=target,
                where=f"{self.module.where}:{node.lineno}",  # type: ignore[attr-defined]
                type_only=self.type_only > 0,
                in_function=self.functions > 0,
                name=name,
                via=via,
            )
        )

    def _known_prefix(self, dotted: str) -> str:
        """The longest prefix of ``dotted`` that is a module of the package, else ``dotted``."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.known:
                return candidate
        return dotted

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, self._known_prefix(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module.name.split(".")
            if not self.module.is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            source = ".".join(package + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source == "__future__":
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.known:
                self._add(node, submodule)
            elif (
                source in self.known
                and alias.name in self.orm_names
                and in_group(source, [self.layers.db])
                and not in_group(source, [self.layers.models])
            ):
                self._add(node, self.orm_names[alias.name], name=alias.name, via=f"re-exported by {source}")
            else:
                self._add(node, self._known_prefix(source), name=alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node, self._known_prefix(node.args[0].value), via=f"{name}() of a literal")
        self.generic_visit(node)


def scan(modules: dict[str, Module], layers: Layers) -> list[Import]:
    """Every import of every module, resolved (see the module docstring for what counts)."""
    orm_names = {
        cls: name for name, module in modules.items() if in_group(name, [layers.models]) for cls in _top_level_classes(module)
    }
    found: list[Import] = []
    for module in modules.values():
        visitor = _ImportVisitor(module, modules, orm_names, layers)
        visitor.visit(module.tree)
        found.extend(visitor.found)
    return found


def layer_of(module: str, layers: Layers) -> str | None:
    """The layer of a module of the package; None when it is in no list."""
    if module in layers.facade:
        return "facade"
    if in_group(module, layers.cli):
        return "cli"
    if in_group(module, layers.leaves):
        return "leaf"
    if in_group(module, [layers.db]):
        return "db"
    if in_group(module, layers.migrations):
        return "migrations"
    if in_group(module, layers.services):
        return "service"
    return None


# --- the rules -----------------------------------------------------------------------------------
#
# Each returns one line per violation: where, the module, the import, the rule.


def _violation(imp: Import, rule: str) -> str:
    return f"{imp.where}: {imp.importer} imports {imp.describe()} -- rule: {rule}"


def _internal(imp: Import, modules: dict[str, Module]) -> bool:
    return imp.target in modules


def check_classified(modules: dict[str, Module], layers: Layers) -> list[str]:
    return [
        f"{module.where}: {name} is in no layer -- rule: every module is classified; add it to "
        f"LEAVES, SERVICES or CLI in {layers.test_file} (or move it under {layers.db.replace('.', '/')}/), "
        "whichever its imports make it"
        for name, module in sorted(modules.items())
        if layer_of(name, layers) is None
    ]


def check_leaves(modules: dict[str, Module], imports: list[Import], layers: Layers) -> list[str]:
    rule = "leaf modules import only other leaves (no rapidfire_state.db module, no service, not the CLI or the facade)"
    return [
        _violation(imp, rule)
        for imp in imports
        if layer_of(imp.importer, layers) == "leaf"
        and _internal(imp, modules)
        and layer_of(imp.target, layers) != "leaf"
    ]


def check_db(modules: dict[str, Module], imports: list[Import], layers: Layers) -> list[str]:
    allowed = {"db": {"leaf", "db"}, "migrations": {"leaf", "db", "migrations"}}
    out = []
    for imp in imports:
        layer = layer_of(imp.importer, layers)
        if layer in allowed and _internal(imp, modules) and layer_of(imp.target, layers) not in allowed[layer]:
            what = "db/ modules" if layer == "db" else "the migrations"
            out.append(_violation(imp, f"{what} import only leaves and {'db/' if layer == 'db' else 'db/ or themselves'}"))
    return out


def check_services(imports: list[Import], layers: Layers) -> list[str]:
    rule = f"services run no SQL: they import nothing from sqlalchemy or {layers.models} (add a store method)"
    return [
        _violation(imp, rule)
        for imp in imports
        if layer_of(imp.importer, layers) == "service"
        and (in_group(imp.target, ["sqlalchemy"]) or in_group(imp.target, [layers.models]))
    ]


def check_cli(modules: dict[str, Module], imports: list[Import], layers: Layers) -> list[str]:
    out = []
    by_importer: dict[str, list[Import]] = {}
    for imp in imports:
        by_importer.setdefault(imp.importer, []).append(imp)
        if _internal(imp, modules) and layer_of(imp.target, layers) == "cli" and layer_of(imp.importer, layers) != "cli":
            out.append(_violation(imp, "the CLI sits on top: no module of the package imports it"))
    for importer, found in sorted(by_importer.items()):
        if layer_of(importer, layers) == "cli":
            continue
        parsing = [i for i in found if in_group(i.target, ["argparse"])]
        services = [i for i in found if _internal(i, modules) and layer_of(i.target, layers) == "service"]
        db = [i for i in found if _internal(i, modules) and layer_of(i.target, layers) == "db"]
        if parsing and services and db:
            out.append(
                f"{modules[importer].where}: {importer} imports argparse ({parsing[0].where}), "
                f"the service {services[0].describe()} ({services[0].where}) and {db[0].describe()} ({db[0].where}) "
                f"-- rule: only the CLI ({', '.join(sorted(layers.cli))}) combines argument parsing with services and db/"
            )
    return out


def check_facade(modules: dict[str, Module], imports: list[Import], layers: Layers) -> list[str]:
    rule = "the facade imports only leaves when it is imported (everything else lazily, inside functions)"
    return [
        _violation(imp, rule)
        for imp in imports
        if layer_of(imp.importer, layers) == "facade"
        and not imp.in_function
        and _internal(imp, modules)
        and layer_of(imp.target, layers) != "leaf"
    ]


def check_db_cycles(modules: dict[str, Module], imports: list[Import], layers: Layers) -> list[str]:
    """One line per cycle among db/ modules (type-only imports left out), each edge with its place."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if (
            not imp.type_only
            and _internal(imp, modules)
            and layer_of(imp.importer, layers) == "db"
            and layer_of(imp.target, layers) == "db"
        ):
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    out = []
    for component in _strongly_connected(edges):
        if len(component) == 1 and component[0] not in edges.get(component[0], {}):
            continue
        path = _cycle_through(component, edges)
        steps = ", ".join(
            f"{a} -> {b} ({edges[a][b].where}{', inside a function' if edges[a][b].in_function else ''})"
            for a, b in zip(path, path[1:])
        )
        out.append(f"import cycle {' -> '.join(path)}: {steps} -- rule: no import cycle among db/ modules")
    return out


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; components in a stable order."""
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def _cycle_through(component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest closed path inside one strongly connected component, from its first member."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    for node in queue:  # breadth-first; the queue grows while it is walked
        for target in sorted(edges.get(node, {})):
            if target not in members:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    raise AssertionError(f"no cycle through {component}")  # pragma: no cover - a component of >1 has one


def check_all(modules: dict[str, Module], layers: Layers) -> dict[str, list[str]]:
    imports = scan(modules, layers)
    return {
        "classified": check_classified(modules, layers),
        "leaves": check_leaves(modules, imports, layers),
        "db": check_db(modules, imports, layers),
        "services": check_services(imports, layers),
        "cli": check_cli(modules, imports, layers),
        "facade": check_facade(modules, imports, layers),
        "db_cycles": check_db_cycles(modules, imports, layers),
    }


# --- the package ---------------------------------------------------------------------------------


class _Scanned(tuple):
    """(modules, imports) of the real package; a short repr for pytest's failure reports."""

    def __repr__(self) -> str:
        return f"<{len(self[0])} modules, {len(self[1])} imports>"


@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Module], list[Import]]:
    modules = load_modules(SOURCES, REPO)
    return _Scanned((modules, scan(modules, LAYERS)))


def _report(violations: list[str]) -> str:
    return "\n" + "\n".join(violations)


def test_every_module_is_in_a_layer(package):
    modules, _ = package
    assert not (violations := check_classified(modules, LAYERS)), _report(violations)


def test_leaves_import_only_leaves(package):
    modules, imports = package
    assert not (violations := check_leaves(modules, imports, LAYERS)), _report(violations)


def test_db_imports_only_leaves_and_itself(package):
    modules, imports = package
    assert not (violations := check_db(modules, imports, LAYERS)), _report(violations)


def test_services_import_no_sqlalchemy_and_no_orm(package):
    _, imports = package
    assert not (violations := check_services(imports, LAYERS)), _report(violations)


def test_only_the_cli_combines_argparse_services_and_db(package):
    modules, imports = package
    assert not (violations := check_cli(modules, imports, LAYERS)), _report(violations)


def test_the_facade_imports_only_leaves(package):
    modules, imports = package
    assert not (violations := check_facade(modules, imports, LAYERS)), _report(violations)


def test_no_import_cycle_among_db_modules(package):
    modules, imports = package
    assert not (violations := check_db_cycles(modules, imports, LAYERS)), _report(violations)


def test_exceptions_and_validation_are_the_bottom(package):
    """Every module may use these two, so they may use nothing else of the package."""
    modules, imports = package
    allowed = {"rapidfire_state.exceptions": set(), "rapidfire_state.validation": {"rapidfire_state.exceptions"}}
    wrong = [
        _violation(imp, f"{imp.importer} imports {', '.join(sorted(allowed[imp.importer])) or 'nothing'} of the package")
        for imp in imports
        if imp.importer in allowed and _internal(imp, modules) and imp.target not in allowed[imp.importer]
    ]
    assert not wrong, _report(wrong)


def test_the_scan_sees_every_kind_of_import(package):
    """A guard on the real tree (the synthetic package below tests each kind precisely)."""
    modules, imports = package
    assert {"rapidfire_state", "rapidfire_state.db", "rapidfire_state.cli", "rapidfire_state.migrations.env"} <= set(modules)
    internal = [i for i in imports if _internal(i, modules)]
    assert len(internal) > 50
    assert any(i.in_function for i in internal) and any(i.type_only for i in internal)
    assert any(i.importer.startswith("rapidfire_state.migrations.") for i in internal)


# --- the checker itself, on a package that breaks every rule --------------------------------------


SYNTHETIC = {
    "__init__.py": """
        from pkg.leaf import X
        import pkg.svc  # at import time: beyond the leaves
        def __getattr__(name):
            from pkg.db import store  # lazily: fine
    """,
    "leaf.py": """
        X = 1
        def later():
            from pkg.db import store  # a leaf reaching into db/, lazily
    """,
    "leaf2.py": """
        from typing import TYPE_CHECKING
        import pkg.leaf
        if TYPE_CHECKING:
            from pkg.svc import Service  # type-only still counts for layers
        else:
            import json
    """,
    "db/__init__.py": "from pkg.db.store import Store\n",
    "db/models.py": "class Thing:\n    pass\n",
    "db/store.py": """
        from pkg.db import models, a
        from pkg import leaf
        class Store:
            def migrate(self):
                from pkg.db import migrate  # store -> migrate, lazily
    """,
    "db/migrate.py": """
        import pkg.db.store  # migrate -> store: a cycle with the lazy import back
    """,
    "db/a.py": """
        from typing import TYPE_CHECKING
        from . import b
        from .models import Thing
        import pkg.svc  # db/ importing a service
        if TYPE_CHECKING:
            from pkg.db.store import Store  # type-only: no cycle a -> store -> a
    """,
    "db/b.py": "from ..leaf import X\n",
    "svc.py": """
        import importlib
        from pkg.db import Thing, Store  # an ORM class through the db package, and a plain name
        class Service:
            def rows(self):
                from sqlalchemy import select
                return importlib.import_module("pkg.db.models")
    """,
    "svc2.py": """
        import argparse
        import pkg.svc
        from pkg.db import a
        from pkg import cli
    """,
    "cli.py": """
        import argparse
        from pkg import svc
        from pkg.db import store
    """,
    "stray.py": "import os\n",
}

SYNTHETIC_LAYERS = Layers(
    facade=frozenset({"pkg"}),
    leaves=frozenset({"pkg.leaf", "pkg.leaf2"}),
    db="pkg.db",
    models="pkg.db.models",
    migrations=frozenset(),
    services=frozenset({"pkg.svc", "pkg.svc2"}),
    cli=frozenset({"pkg.cli"}),
    test_file="the_layers.py",
)


@pytest.fixture()
def synthetic(tmp_path: Path) -> dict[str, list[str]]:
    root = tmp_path / "pkg"
    for relative, source in SYNTHETIC.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    return check_all(load_modules([(root, "pkg")], tmp_path), SYNTHETIC_LAYERS)


def _pairs(lines: list[str]) -> set[tuple[str, str]]:
    """(importer, import) of each violation line."""
    pairs = set()
    for line in lines:
        _, _, rest = line.partition(": ")
        importer, _, imported = rest.partition(" imports ")
        words = imported.split(" ")
        pairs.add((importer, words[2] if words[1:2] == ["from"] else words[0]))
    return pairs


def test_checker_finds_an_unclassified_module(synthetic):
    [line] = synthetic["classified"]
    assert line.startswith("pkg/stray.py: pkg.stray is in no layer") and "the_layers.py" in line and "pkg/db/" in line


def test_checker_finds_leaves_reaching_up_lazily_and_type_only(synthetic):
    assert _pairs(synthetic["leaves"]) == {("pkg.leaf", "pkg.db.store"), ("pkg.leaf2", "pkg.svc")}
    lazy, typed = sorted(synthetic["leaves"])
    assert lazy.startswith("pkg/leaf.py:3: pkg.leaf imports pkg.db.store (inside a function) -- rule: leaf modules")
    assert typed.startswith("pkg/leaf2.py:4: pkg.leaf2 imports Service from pkg.svc (under TYPE_CHECKING) -- rule: leaf")


def test_checker_finds_db_importing_a_service(synthetic):
    assert _pairs(synthetic["db"]) == {("pkg.db.a", "pkg.svc")}
    assert "db/ modules import only leaves" in synthetic["db"][0]


def test_checker_finds_services_running_sql(synthetic):
    assert _pairs(synthetic["services"]) == {("pkg.svc", "pkg.db.models"), ("pkg.svc", "sqlalchemy")}
    text = "\n".join(synthetic["services"])
    assert "pkg/svc.py:2: pkg.svc imports Thing from pkg.db.models (re-exported by pkg.db)" in text
    assert "pkg/svc.py:5: pkg.svc imports select from sqlalchemy (inside a function)" in text
    assert "(inside a function; import_module() of a literal)" in text
    assert len(synthetic["services"]) == 3 and "services run no SQL" in text


def test_checker_finds_a_second_cli_and_an_import_of_the_cli(synthetic):
    assert len(synthetic["cli"]) == 2
    on_top, combined = synthetic["cli"]
    assert on_top.startswith("pkg/svc2.py:4: pkg.svc2 imports pkg.cli -- rule: the CLI sits on top")
    assert combined.startswith("pkg/svc2.py: pkg.svc2 imports argparse (pkg/svc2.py:1), the service pkg.svc")
    assert "only the CLI (pkg.cli)" in combined


def test_checker_finds_the_facade_importing_beyond_leaves(synthetic):
    assert synthetic["facade"] == [
        "pkg/__init__.py:2: pkg imports pkg.svc -- rule: the facade imports only leaves when it is imported "
        "(everything else lazily, inside functions)"
    ]


def test_checker_finds_db_cycles_but_not_type_only_ones(synthetic):
    [line] = synthetic["db_cycles"]
    assert line.startswith("import cycle pkg.db.migrate -> pkg.db.store -> pkg.db.migrate: ")
    assert "pkg.db.store -> pkg.db.migrate (pkg/db/store.py:5, inside a function)" in line
    assert "pkg.db.a" not in line  # a -> store is type-only


def test_checker_resolves_relative_imports(tmp_path):
    root = tmp_path / "pkg"
    (root / "db").mkdir(parents=True)
    for relative, source in {
        "__init__.py": "",
        "db/__init__.py": "from . import x\nfrom .x import name\n",
        "db/x.py": "from .. import leaf\nfrom ..db import y\n",
        "db/y.py": "",
        "leaf.py": "",
    }.items():
        (root / relative).write_text(source, encoding="utf-8")
    modules = load_modules([(root, "pkg")], tmp_path)
    found = {(i.importer, i.target) for i in scan(modules, SYNTHETIC_LAYERS)}
    assert found == {("pkg.db", "pkg.db.x"), ("pkg.db.x", "pkg.leaf"), ("pkg.db.x", "pkg.db.y")}
