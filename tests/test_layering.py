"""One-way imports (style.md module map): toolkit never imports launch/tune/export, and inside toolkit a module
imports only modules that come before it in the data flow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Data flows down this list; config/artifacts/runtime are the foundation every module may use.
ORDER = ["config", "runtime", "_deepspeed", "artifacts", "_datasets", "data", "_imgfocus", "backbone", "cache",
         "adapter", "model", "losses", "checkpoint", "loop", "dense", "qp_inputs", "qp", "finetune", "metrics",
         "explain", "evaluate", "pipeline"]
APPS = ("launch", "tune", "export")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "toolkit")
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "toolkit"]
    return names


def test_toolkit_never_imports_apps() -> None:
    for path in (ROOT / "toolkit").rglob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in APPS, f"{path}: imports {name}"


def test_toolkit_imports_flow_one_way() -> None:
    for path in (ROOT / "toolkit").rglob("*.py"):
        me = _module_of(path)
        if me in ("__init__", "__main__") or me not in ORDER:
            assert me in ("__init__", "__main__"), f"toolkit/{me} is not in the module map ORDER of this test"
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "toolkit" or len(parts) < 2 or parts[1] == "__version__":
                continue
            dep = parts[1]
            if dep == me:
                continue
            assert dep in ORDER, f"{path}: imports toolkit.{dep}, which is not in the module map"
            assert ORDER.index(dep) < ORDER.index(me), f"{path} ({me}) imports toolkit.{dep}, which comes after it"


def test_layering_check_catches_a_backwards_import(tmp_path: Path) -> None:
    # The checker itself must be able to fail: an import of a later module is flagged.
    fake = tmp_path / "x.py"
    fake.write_text("from toolkit.pipeline import run_pipeline\nimport launch.train\n")
    names = _imports(fake)
    assert "toolkit.pipeline" in names and "launch.train" in names
