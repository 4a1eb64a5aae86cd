"""One-way imports: toolkit never imports launch/tune/export, and inside toolkit a package or module imports only
from the ones before it in `ORDER` (the foundation first, the stages and the pipeline last), so no library ever
imports a stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules and packages of toolkit, from the foundation up; imports flow from later to earlier entries.
ORDER = ["config", "files", "runlock", "distributed", "console", "fingerprint", "artifacts", "data", "model", "cache",
         "train", "qp", "metrics", "runs", "explain", "stages", "pipeline"]
APPS = ("launch", "tune", "export", "serve")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "toolkit"]
    return names


def violations(package: Path, order: list[str] = ORDER) -> list[str]:
    """Every import in `package` (a toolkit source tree) that breaks the layering, as readable lines."""
    out: list[str] = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        me = rel.parts[0].removesuffix(".py")
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in APPS:
                out.append(f"{rel}: imports the entry point {name}")
            if parts[0] != "toolkit" or len(parts) < 2 or parts[1] == "__version__":
                continue
            dep = parts[1]
            if me in ("__init__", "__main__") or dep == me:
                continue
            if me not in order:
                out.append(f"{rel}: toolkit.{me} is not in the module map ORDER")
            elif dep not in order:
                out.append(f"{rel}: imports toolkit.{dep}, which is not in the module map ORDER")
            elif order.index(dep) > order.index(me):
                out.append(f"{rel}: toolkit.{me} imports toolkit.{dep}, which comes after it")
    return out


def test_toolkit_imports_flow_one_way() -> None:
    assert violations(ROOT / "toolkit") == []


def test_every_toolkit_module_is_in_the_map() -> None:
    tops = {p.name.removesuffix(".py") for p in (ROOT / "toolkit").iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())} - {"__init__", "__main__", "__pycache__"}
    assert tops == set(ORDER)


def test_layering_check_fails_on_a_library_importing_a_stage(tmp_path: Path) -> None:
    # The checker itself must be able to fail: a library (model) that imports a stage, and one that imports an
    # entry point, are both flagged; the same imports the other way round are fine.
    (tmp_path / "model").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "model" / "bad.py").write_text("from toolkit.stages.dense import run_dense\nimport launch.train\n")
    (tmp_path / "stages" / "good.py").write_text("from toolkit.model import DinoQPM\nfrom toolkit.stages import x\n")
    found = violations(tmp_path)
    assert any("toolkit.model imports toolkit.stages" in v for v in found), found
    assert any("entry point launch.train" in v for v in found), found
    assert not any("good.py" in v for v in found), found


def test_the_service_is_torch_free() -> None:
    # serve/ runs where only the exported graph is deployed: it may use export's torch-free modules (predict.py's
    # session, preprocessing and drawing; the metadata reader) and nothing that pulls in torch.
    heavy = ("torch", "torchvision", "timm", "deepspeed", "toolkit")
    allowed_export = {"export.predict", "export._metadata"}
    found = [f"serve/{p.name}: {name}" for p in sorted((ROOT / "serve").glob("*.py")) for name in _imports(p)
             if name.split(".")[0] in heavy or (name.startswith("export") and name not in allowed_export)]
    found += [f"export/{m}.py: {name}" for m in ("predict", "_metadata", "_triton")
              for name in _imports(ROOT / "export" / f"{m}.py") if name.split(".")[0] in heavy]
    assert found == []
