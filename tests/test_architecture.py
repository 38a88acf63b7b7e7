"""The package's architecture, checked from the source text (nothing is imported): no import cycles, a layering
that lower modules never break, terminal output only in the CLI, the trainer never imported to read a run, and run
folders read only through ``malaria_cells.run``, and no library module printing.

Every import counts, at module level or inside a function, ``TYPE_CHECKING`` blocks included. Some rules still have
known offenders that other work is removing. Each ``KNOWN_*`` set is checked both ways: a new offender fails the test,
and so does a listed offender that no longer offends, so these sets can only shrink until they are empty.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "malaria_cells"
PACKAGE = "malaria_cells"

# Lower never imports higher; a module may import its own level (cycles are ruled out separately).
LEVELS: dict[str, int] = {
    # 0: foundations, importing nothing of the package above them
    **dict.fromkeys(
        (
            "__init__",
            "errors",
            "io",
            "metrics",
            "preprocess",
            "segment",
            "progress",
            "fetch",
            "boxes",
            "overlay",
            "ood",
            "stain",
        ),
        0,
    ),
    # 1: data, models and their plain helpers
    **dict.fromkeys(
        ("data", "split", "cache", "augment", "models", "weights", "config", "plots", "distributed"),
        1,
    ),
    # 2: run folders and the transfer-learning machinery
    **dict.fromkeys(("run", "transfer"), 2),
    # 3: inference back ends and input collection
    **dict.fromkeys(("backends", "inputs", "detect"), 3),
    # 4: the commands' library functions
    **dict.fromkeys(("train", "evaluate", "export", "explain", "predict", "ensemble", "card", "reproduce"), 4),
    # 4: temperature scaling (fits on a split's logits through a backend; adapt's operating-points step uses it)
    "calibrate": 4,
    "heatmaps": 4,  # occlusion heatmaps (any backend) and the drawing explain shares
    # 4: patient-level cross-validation (above reproduce's training helpers) and the label audit of its predictions
    **dict.fromkeys(("cv", "audit"), 4),
    # 4: field photos: the detector's trainer, the smear pipeline (above predict's Classifier) and its evaluation
    **dict.fromkeys(("detect_train", "smear", "smear_eval", "adapt"), 4),
    # 5: the web service
    # 5: the web service: its answers' shapes and its guards (middleware, error handlers) below the app itself
    **dict.fromkeys(("serve_schema", "serve_guard"), 5),
    **dict.fromkeys(("serve", "serve_adapt"), 5),
    # 6: the command line, its terminal rendering and its output formats (only the CLI imports these)
    **dict.fromkeys(("cli", "terminal", "render"), 6),
}
# Who may import malaria_cells.train: the trainer is for training; reading a run goes through malaria_cells.run.
# (benchmarks/ are outside the package and may import it too.)
TRAIN_IMPORTERS = frozenset({"train", "cli", "reproduce", "cv"})
# The library never prints: only the command line's own modules use rich (cli; terminal, its progress bars and log
# handler; render, its output formats), and only cli imports terminal or render.
TERMINAL_SIDE = frozenset({"cli", "terminal", "render"})
CLI_ONLY = frozenset({"terminal", "render"})

# ---- known offenders: the lead empties these as the work lands; they may only shrink -------------------------------
# Import cycles (each a strongly connected component of the import graph).
KNOWN_CYCLES: set[frozenset[str]] = set()
# (importer, imported) pairs where a lower level imports a higher one.
KNOWN_UPWARD: set[tuple[str, str]] = set()
# Library modules (outside TERMINAL_SIDE) importing rich, or modules other than cli importing terminal / render.
KNOWN_TERMINAL: set[str] = set()
# Library modules (outside TERMINAL_SIDE) calling print() or writing to sys.stdout / sys.stderr.
KNOWN_PRINTERS: set[str] = set()
# Modules importing malaria_cells.train besides TRAIN_IMPORTERS (they read runs through the trainer).
KNOWN_TRAIN_IMPORTERS: set[str] = set()
# Modules other than run.py that json.load(s) a metadata.json.
KNOWN_METADATA_READERS: set[str] = set()
# (importer, "module.name") of `from malaria_cells.module import name` where the module defines no such name;
# importers are package modules ("predict") and scripts ("benchmarks/report.py", "tests/test_x.py").
KNOWN_MISSING_NAMES: set[tuple[str, str]] = set()


def _modules(src: Path = SRC) -> list[str]:
    return sorted(p.stem for p in src.glob("*.py"))


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _tree(module: str, src: Path = SRC) -> ast.Module:
    return _parse(src / f"{module}.py")


def _imports(module: str, src: Path = SRC) -> list[tuple[str, tuple[str, ...]]]:
    """Every import of a module as (imported module, names taken from it): ``import a.b`` -> ("a.b", ()),
    ``from a.b import c, d`` -> ("a.b", ("c", "d")); relative imports resolved against the package."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(_tree(module, src)):
        if isinstance(node, ast.Import):
            out += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from .x import y, inside the package
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            out.append((base, tuple(alias.name for alias in node.names)))
    return out


def _internal(module: str, src: Path = SRC) -> set[str]:
    """The package modules a module imports (``from malaria_cells import x`` counts when x is a module)."""
    known = set(_modules(src))
    deps = set()
    for name, names in _imports(module, src):
        if name == PACKAGE:
            deps.update(n for n in names if n in known)
            if any(n not in known for n in names):
                deps.add("__init__")
        elif name.startswith(f"{PACKAGE}."):
            deps.add(name.split(".")[1])
    deps.discard(module)
    return deps


def _graph() -> dict[str, set[str]]:
    return {m: _internal(m) for m in _modules()}


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _check_known(found: set, known: set, what: str) -> None:
    """Fail on an offender that is not listed, and on a listed one that no longer offends."""
    new, fixed = found - known, known - found
    assert not new, f"new {what}: {sorted(map(str, new))}"
    assert not fixed, f"fixed {what} (remove from the KNOWN list in this file): {sorted(map(str, fixed))}"


# ---- the checker itself -------------------------------------------------------------------------------------------
def test_cycle_finder_finds_cycles_and_only_them() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert _cycles(graph) == {frozenset("abc"), frozenset("ef")}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


def test_known_offender_lists_can_only_shrink() -> None:
    _check_known({"a"}, {"a"}, "thing")
    with pytest.raises(AssertionError, match="new thing"):
        _check_known({"a", "b"}, {"a"}, "thing")
    with pytest.raises(AssertionError, match="fixed thing"):
        _check_known(set(), {"a"}, "thing")


def test_import_parser_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text(
        "import os\nfrom malaria_cells import y\n\n\ndef f():\n    from malaria_cells.z import g\n"
        "    from .w import h\n    import malaria_cells.v.sub\n\n\nclass C:\n    def m(self):\n"
        "        from malaria_cells import __version__\n"
    )
    for m in ("y", "z", "w", "v", "__init__"):
        (tmp_path / f"{m}.py").write_text("")
    assert _internal("x", tmp_path) == {"y", "z", "w", "v", "__init__"}


# ---- the rules ----------------------------------------------------------------------------------------------------
def test_no_import_cycles() -> None:
    _check_known(_cycles(_graph()), KNOWN_CYCLES, "import cycle(s)")


def test_every_module_has_a_level() -> None:
    missing = [m for m in _modules() if m not in LEVELS]
    assert not missing, f"give these modules a level in LEVELS (tests/test_architecture.py): {missing}"


def test_lower_levels_never_import_higher_ones() -> None:
    upward = {
        (m, dep)
        for m, deps in _graph().items()
        for dep in deps
        if m in LEVELS and dep in LEVELS and LEVELS[dep] > LEVELS[m]
    }
    _check_known(upward, KNOWN_UPWARD, "upward import(s) (importer, imported)")


def test_only_the_cli_imports_the_terminal_or_rich() -> None:
    uses_rich = {m for m in _modules() for name, _ in _imports(m) if name.split(".")[0] == "rich"}
    imports_cli_side = {m for m, deps in _graph().items() if deps & CLI_ONLY}
    offenders = (uses_rich - TERMINAL_SIDE) | (imports_cli_side - {"cli"})
    _check_known(offenders, KNOWN_TERMINAL, "module(s) printing through rich / terminal / render")


def _prints(module: str, src: Path = SRC) -> bool:
    """Whether a module calls print() or writes to sys.stdout / sys.stderr."""
    for node in ast.walk(_tree(module, src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            return True
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("stdout", "stderr")
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            return True
    return False


def test_the_library_never_prints() -> None:
    offenders = {m for m in _modules() if m not in TERMINAL_SIDE and _prints(m)}
    _check_known(offenders, KNOWN_PRINTERS, "library module(s) printing (log through logging instead)")


def test_print_detector(tmp_path: Path) -> None:
    cases = {
        "p": "def f():\n    print('x')\n",
        "w": "import sys\n\ndef f():\n    sys.stderr.write('x')\n",
        "log": "import logging\nlog = logging.getLogger(__name__)\n\ndef f():\n    log.warning('x')\n",
    }
    for name, text in cases.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert {name for name in cases if _prints(name, tmp_path)} == {"p", "w"}


def test_the_trainer_is_imported_only_to_train() -> None:
    offenders = {m for m, deps in _graph().items() if "train" in deps} - TRAIN_IMPORTERS
    _check_known(offenders, KNOWN_TRAIN_IMPORTERS, "importer(s) of malaria_cells.train")


METADATA_PATH = re.compile(r"(.*/)?metadata\.json")  # a path string; a message naming the file is not one


def _reads_metadata(module: str, src: Path = SRC) -> bool:
    """Whether one function (or the module body) of ``module`` both calls json.load/json.loads and names a
    ``metadata.json`` path: a string that is, or ends in, ``/metadata.json`` (messages and docstrings do not)."""
    tree = _tree(module, src)
    from_json = {n for mod, names in _imports(module, src) if mod == "json" for n in names}
    scopes: list[ast.AST] = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)  # their functions are scopes of their own
    scopes.append(ast.Module(body=[n for n in tree.body if not isinstance(n, definitions)], type_ignores=[]))
    for scope in scopes:
        loads = names_file = False
        for node in ast.walk(scope):
            if isinstance(node, ast.Call):
                f = node.func
                loads |= (
                    isinstance(f, ast.Attribute)
                    and f.attr in ("load", "loads")
                    and isinstance(f.value, ast.Name)
                    and f.value.id == "json"
                ) or (isinstance(f, ast.Name) and f.id in ("load", "loads") and f.id in from_json)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names_file |= METADATA_PATH.fullmatch(node.value) is not None
        if loads and names_file:
            return True
    return False


def test_metadata_reader_detector(tmp_path: Path) -> None:
    cases = {
        "reads": 'import json\n\ndef a(run):\n    p = run / "metadata.json"\n    return json.loads(p.read_text())\n',
        "reads_bare": 'from json import load\n\ndef a(run):\n    return load(open(f"{run}/x/metadata.json"))\n',
        "reads_at_top": 'import json\nMETA = json.loads(open("run/metadata.json").read())\n',
        "message": 'import json\n\ndef b(run, x):\n    """Reads metadata.json."""\n    json.loads(x)\n'
        '    raise ValueError(f"{run}: no metadata.json")\n',
        "apart": "import json\n\ndef c(x):\n    return json.loads(x)\n\ndef d(run):\n"
        '    return (run / "metadata.json").exists()\n',
        "apart_in_class": "import json\n\nclass K:\n    def c(self, x):\n        return json.loads(x)\n\n"
        '    def d(self, run):\n        return (run / "metadata.json").exists()\n',
    }
    for name, text in cases.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert {name for name in cases if _reads_metadata(name, tmp_path)} == {"reads", "reads_bare", "reads_at_top"}


def test_metadata_is_read_only_through_run() -> None:
    offenders = {m for m in _modules() if m != "run" and _reads_metadata(m)}
    _check_known(offenders, KNOWN_METADATA_READERS, "module(s) reading metadata.json with json.load(s)")


@cache
def _defined(module: str) -> frozenset[str] | None:
    """Top-level names a package module defines (None when it defines ``__getattr__`` or star-imports)."""
    names: set[str] = set()

    def scan(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name == "__getattr__":
                    return False
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                if any(a.name == "*" for a in node.names):
                    return False
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
                blocks += [h.body for h in getattr(node, "handlers", [])]
                if not all(scan(b) for b in blocks):
                    return False
        return True

    return frozenset(names) if scan(_tree(module).body) else None


ROOT = SRC.parents[1]
# Outside the package, scripts that import from it: names they import must exist too (benchmarks are not run by
# the test suite, so a stale import there would otherwise go unnoticed until someone reruns them).
IMPORTERS_OUTSIDE = ("benchmarks", "tests")


def test_imported_names_exist() -> None:
    """``from malaria_cells.X import name`` names something X defines: in the package (also in functions no test
    runs), in benchmarks/ and in tests/."""
    known = set(_modules())
    importers = [(m, SRC / f"{m}.py") for m in _modules()]
    for folder in IMPORTERS_OUTSIDE:
        importers += [(f"{folder}/{p.name}", p) for p in sorted((ROOT / folder).glob("*.py"))]
    missing = set()
    for label, path in importers:
        for node in ast.walk(_parse(path)):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith(f"{PACKAGE}."):
                continue
            parts = node.module.split(".")
            if len(parts) != 2:
                continue
            target = parts[1]
            if target not in known:
                missing.add((label, target))
                continue
            defined = _defined(target)
            if defined is not None:
                missing.update((label, f"{target}.{a.name}") for a in node.names if a.name not in defined)
    _check_known(missing, KNOWN_MISSING_NAMES, "import(s) of names that do not exist")


@pytest.mark.parametrize("module", ["io", "errors", "progress", "metrics", "fetch"])
def test_foundations_import_nothing_above_them(module: str) -> None:
    assert {d for d in _internal(module) if LEVELS.get(d, 99) > 0} == set()


def test_the_registry_does_not_depend_on_weight_loading() -> None:
    # models.py names each architecture once; weights.py reads it from there, never the other way round.
    assert "weights" not in _internal("models")
    assert "models" in _internal("weights")
