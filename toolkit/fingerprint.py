"""Fingerprints of the toolkit code a stage runs: the part of a stage's artefact key that follows the code.

A stage's code is its module, toolkit/stages/<stage>.py, and every toolkit module that module reaches through its
static imports (at module level and inside functions), found with `ast`, never by importing anything.
`from toolkit.pkg import Name` follows Name to the submodule that defines it when the package's `__init__` only
re-exports it, so importing one name from `toolkit.train` does not pull in every training module; a name defined in
an `__init__` itself brings in that `__init__` (and what it imports). Imports made from strings
(`importlib.import_module`) are not followed: the library uses them only for the lazy top-level API in
toolkit/__init__.py, which no stage goes through.

What is hashed is each module's syntax tree without comments, docstrings or layout (`ast.dump`), so reformatting
or rewording a docstring reuses the cache while any change to what the code does rebuilds. The fingerprint is a
sha256 over the sorted (module name, tree hash) pairs. Upstream artefacts' keys already hold their own code (the
dense key holds the tokens key), so a stage hashes only its own closure. Sources are read from the files next to this
module, so an installed (non-editable) package fingerprints the code it runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

PACKAGE = "toolkit"
ROOT = Path(__file__).resolve().parent  # the toolkit package folder this code runs from


@dataclass(frozen=True)
class CodeFingerprint:
    """The code of one stage: `digest` over its modules, and each module's own hash (what a manifest records)."""

    digest: str
    modules: dict[str, str]  # module name -> 16 hex digits of its syntax tree's sha256

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.digest, "modules": self.modules}


class SourceTree:
    """The modules of one package folder (`root`, importable as `package`) and the imports between them."""

    def __init__(self, root: Path = ROOT, package: str = PACKAGE) -> None:
        self.root = Path(root)
        self.package = package

    def path(self, module: str) -> Path | None:
        """The file of `module` (a package's `__init__.py`), or None when it is not a module of this package."""
        parts = module.split(".")
        if parts[0] != self.package:
            return None
        base = self.root.joinpath(*parts[1:])
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    def is_package(self, module: str) -> bool:
        path = self.path(module)
        return path is not None and path.name == "__init__.py"

    @cache  # noqa: B019 - one tree per package folder, alive as long as the process
    def tree(self, module: str) -> ast.Module:
        path = self.path(module)
        assert path is not None, module
        return ast.parse(path.read_bytes(), filename=str(path))

    @cache  # noqa: B019
    def tree_hash(self, module: str) -> str:
        path = self.path(module)
        assert path is not None, module
        return hashlib.sha256(ast.dump(_without_docstrings(ast.parse(path.read_bytes()))).encode()).hexdigest()

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        here = module if self.is_package(module) else module.rsplit(".", 1)[0]
        base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
        return f"{base}.{node.module}" if node.module else base

    def _existing(self, module: str) -> str | None:
        """`module`, or its longest prefix that is a module of this package (`import toolkit.a.b.Name` styles)."""
        while module and self.path(module) is None:
            module = module.rpartition(".")[0]
        return module or None

    def defining(self, package: str, name: str, seen: frozenset[str] = frozenset()) -> str:
        """The module that defines `name` as seen from `package` (following the re-exports of its `__init__`)."""
        if package in seen:
            return package
        for node in self.tree(package).body:
            if not isinstance(node, ast.ImportFrom):
                continue
            for alias in node.names:
                if (alias.asname or alias.name) != name:
                    continue
                base = self._absolute(package, node)
                if self.path(base) is None:
                    return package  # re-exported from outside the package: the __init__ is what runs here
                return self.target(base, alias.name, seen | {package})
        return package

    def target(self, base: str, name: str, seen: frozenset[str] = frozenset()) -> str:
        """What `from base import name` runs: the submodule `base.name`, the definer of `name`, or `base`."""
        if self.path(f"{base}.{name}") is not None:
            return f"{base}.{name}"
        if self.is_package(base) and name != "*":
            return self.defining(base, name, seen)
        return base

    @cache  # noqa: B019
    def imports(self, module: str) -> frozenset[str]:
        """The modules of this package that `module`'s import statements (anywhere in it) run."""
        out: set[str] = set()
        for node in ast.walk(self.tree(module)):
            if isinstance(node, ast.Import):
                out.update(filter(None, (self._existing(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(module, node)
                if self.path(base) is not None:
                    out.update(self.target(base, a.name) for a in node.names)
        out.discard(module)
        return frozenset(out)

    def closure(self, module: str) -> list[str]:
        """`module` and every module of this package it reaches through imports, sorted."""
        if self.path(module) is None:
            raise ValueError(f"{module} is not a module under {self.root}")
        seen, todo = {module}, [module]
        while todo:
            for dep in self.imports(todo.pop()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return sorted(seen)

    def fingerprint(self, module: str) -> CodeFingerprint:
        modules = {name: self.tree_hash(name) for name in self.closure(module)}
        digest = hashlib.sha256(json.dumps(sorted(modules.items())).encode()).hexdigest()[:16]
        return CodeFingerprint(digest, {name: h[:16] for name, h in modules.items()})

    @cached_property
    def stages(self) -> frozenset[str]:
        folder = self.root / "stages"
        return frozenset(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    """`tree` with the docstrings of its module, classes and functions removed (they do not change what runs)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


_TREE = SourceTree()


def is_stage(stage: str) -> bool:
    """Whether toolkit/stages/<stage>.py exists (artefact stores in tests use other names)."""
    return stage in _TREE.stages


@cache
def stage_fingerprint(stage: str) -> CodeFingerprint:
    """The fingerprint of the code stage `stage` runs (toolkit/stages/<stage>.py and what it imports), computed
    once per process.

    Raises:
        ValueError: no module toolkit/stages/<stage>.py (every content-hashed stage has one, named like the stage).
    """
    if not is_stage(stage):
        raise ValueError(f"no stage module {PACKAGE}/stages/{stage}.py: a content-hashed stage is named after its "
                         f"module (known: {', '.join(sorted(_TREE.stages))})")
    return _TREE.fingerprint(f"{PACKAGE}.stages.{stage}")
