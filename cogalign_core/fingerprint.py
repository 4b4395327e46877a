"""Code fingerprints: what ``code/<stage>.json`` holds, derived from the code itself.

:func:`cogalign_core.stage.code_fingerprint` builds the record from :func:`source_hashes`.
A stage's code is the import closure of its entry module within ``cogalign_core`` (plus the
``cogalign_core.stage`` runner that calls it), read from the sources with :mod:`ast` without
importing anything: every ``import`` statement counts, including those inside functions (lazy
imports still run), except under ``if TYPE_CHECKING:``. Each module brings its parent packages'
``__init__`` (Python runs them on import). Stages whose closure holds the recipe loader also depend
on the selected recipe family's folder and the accelerate configs its recipes name, and on no other
recipe. Nothing is hand-listed, so a module added or renamed under ``train/`` is covered at once.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path

PACKAGE = "cogalign_core"
RUNNER = "cogalign_core.stage"
RECIPE_LOADER = "cogalign_core.train.recipe"
RECIPES_PACKAGE = "cogalign_core.recipes"  # = recipe.RECIPES_PACKAGE (tested), named here to stay import-free
DATA_PACKAGES = (RECIPES_PACKAGE, "cogalign_core.sample_data")  # files, not code: recipes are added by family
ACCELERATE_DIR = "accelerate"
ACCELERATE_KEY = "accelerate_config"


@cache
def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` inside the package (``__init__.py`` for a package), or None."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = _package_root().joinpath(*name.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield from [sub] if isinstance(sub, ast.Import | ast.ImportFrom) else _import_nodes(sub)
        else:
            yield from _import_nodes(child)


def direct_imports(name: str) -> frozenset[str]:
    """Package modules ``name`` imports (``from pkg import mod`` counts ``pkg.mod`` when it is a module)."""
    path = module_file(name)
    if path is None:
        return frozenset()
    stat = path.stat()
    return _direct_imports(name, path, stat.st_mtime_ns, stat.st_size)


@cache
def _direct_imports(name: str, path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`direct_imports`, parsed once per file version (a long-lived ``cogalign serve`` sees edits)."""
    del mtime_ns, size  # cache key only
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return frozenset(m for m in found if module_file(m) is not None and not _is_data(m))


def _is_data(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in DATA_PACKAGES)


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(*roots: str) -> list[str]:
    """Sorted package modules ``roots`` import directly or transitively, parent packages included."""
    seen: set[str] = set()
    todo = [m for r in roots for m in _with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo += [m for imported in direct_imports(name) for m in _with_parents(imported)]
    return sorted(seen)


def stage_modules(entry: str) -> list[str]:
    """The modules a stage runs: the closure of its entry module (``module:function``) and the runner."""
    return import_closure(entry.split(":", 1)[0], RUNNER)


def read_source(path: Path) -> bytes:
    """The bytes a fingerprint hashes (one place, so a test can simulate an edit without touching the tree)."""
    return path.read_bytes()


def recipe_files(family: str) -> dict[str, Path]:
    """``recipes/<family>/*`` and the accelerate configs its recipes name, keyed ``recipes/<path>``."""
    import yaml

    root = Path(str(resources.files(RECIPES_PACKAGE)))
    folder = root / family
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    accelerate: set[str] = set()
    for item in sorted(p for p in folder.iterdir() if p.is_file()):
        out[f"recipes/{family}/{item.name}"] = item
        if item.suffix in (".yaml", ".yml"):
            accelerate |= set(_values_of(yaml.safe_load(read_source(item)), ACCELERATE_KEY))
    for name in sorted(accelerate):
        config = root / ACCELERATE_DIR / f"{name}.yaml"
        if config.is_file():
            out[f"recipes/{ACCELERATE_DIR}/{name}.yaml"] = config
    return out


def _values_of(node: object, key: str) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _values_of(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values_of(v, key)


def source_hashes(entry: str, recipe: str | None = None) -> dict[str, str]:
    """SHA-256 of every file a stage with entry point ``entry`` runs, keyed by module name or recipe path.

    Args:
        entry: the stage's ``module:function``.
        recipe: the workspace's ``model.recipe``; its folder counts only for stages that load recipes.
    """
    modules = stage_modules(entry)
    files: dict[str, Path] = {name: module_file(name) for name in modules}  # type: ignore[misc]
    if recipe is not None and RECIPE_LOADER in modules:
        files |= recipe_files(recipe)
    return dict(sorted((key, hashlib.sha256(read_source(path)).hexdigest()) for key, path in files.items()))
