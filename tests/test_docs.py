"""The docs stay true to the code: every path, config key, make target, console script and command-line flag that
README.md, BENCHMARKS.md and docs/*.md mention exists.

What is checked, in inline code, fenced code blocks and link targets:
- inline code stays on one line (a span split over two lines could not be checked);
- paths: a relative path whose first part is a file or folder of the repository (or that ends in `.py`) exists;
  `<placeholder>` parts and `*` match anything. Link targets exist relative to the page, and their `#anchor` is a
  heading of the target page. Paths under folders that runs write or users provide are not in the repository
  (`NOT_IN_REPO`, with the reason for each).
- config keys: `section.key` for a section of toolkit/config.py's RunConfig names one of its fields (`*` globs).
- make targets: `make TARGET` is a target of the Makefile.
- console scripts: `dinoqpm-NAME` is in pyproject.toml's [project.scripts].
- flags: `--flag` after a command of this repository (`python launch/train.py`, `python -m toolkit.qp`,
  `dinoqpm-export`, `benchmarks/*.py`, ...) is an option of that command's argparse parser, which is read by calling
  its `main` with `parse_args` intercepted (nothing runs). A flag shown without its command belongs to one of the
  commands named on the same page. Lines of other programs (pip, pytest, deepspeed's own flags) are not checked.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from toolkit.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# First path parts that name no folder of the repository: what runs write and what users bring.
NOT_IN_REPO = {
    "runs": "run directories (runtime.output_dir)",
    "sweeps": "sweep output folders (tune/sweep.py --output)",
    ".cache": "content-hashed artefacts and converted weights (cache.root)",
    "data": "the user's CUB / Cars archives (data.root)",
}
# Pages other work writes; an entry whose file exists must be removed, so the real file is checked from then on.
PENDING: dict[str, str] = {}
EXTERNAL = {"pip", "apt-get", "pytest", "ruff", "git", "tensorboard", "chromium", "bash", "curl", "cd", "ls",
            "ray", "docker", "uptime", "export", "deepspeed", "torchrun", "python3", "sudo", "sbatch", "scancel",
            "printf"}
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "md", "html", "png", "txt", "npy", "npz", "onnx", "safetensors", "toml"}
SECTIONS = {name: set(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()}
KEY = re.compile(r"(?<![\w./$<-])(" + "|".join(SECTIONS) + r")\.([A-Za-z_][\w*]*)")


# -------------------------------------------------------------------------------------------- what a page says


def code_of(text: str) -> tuple[list[str], list[str]]:
    """(inline code spans, lines of fenced code blocks without their # comments)."""
    blocks, spans, inside = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            blocks.append(re.split(r"\s#\s", line, maxsplit=1)[0])
        else:
            spans.extend(re.findall(r"`([^`]+)`", line))
    return spans, blocks


def links_of(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)}


def words(code: str) -> list[str]:
    try:
        raw = shlex.split(code, posix=True)
    except ValueError:
        raw = code.split()
    return [w.strip("[](),;|'\"") for w in raw if w.strip("[](),;|'\"")]


# ---------------------------------------------------------------------------------------- what the repo has


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


@cache
def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _intercept(load: Callable[[], Any]) -> argparse.ArgumentParser:
    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _Parser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
        try:
            load()
        except _Parser as found:
            return found.parser
    raise AssertionError(f"{load} built no argparse parser")


def _call_main(module: Any) -> None:
    main = module.main
    main([]) if inspect.signature(main).parameters else main()


@cache
def options_of(program: str) -> frozenset[str]:
    """The option strings of a program: "script:path/x.py", "module:a.b" or "entry:a.b:main"."""
    kind, _, name = program.partition(":")
    if kind == "entry":
        module, _, func = name.partition(":")
        parser = _intercept(lambda: getattr(importlib.import_module(module), func)([]))
    elif kind == "module":
        target = name + ".__main__" if (ROOT / name.replace(".", "/") / "__main__.py").is_file() else name
        parser = _intercept(lambda: _call_main(importlib.import_module(target)))
    else:
        path = ROOT / name
        dotted = name.removesuffix(".py").replace("/", ".")
        if (path.parent / "__init__.py").is_file():
            parser = _intercept(lambda: _call_main(importlib.import_module(dotted)))
        else:
            spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
            try:
                with mock.patch.object(sys, "path", [str(path.parent), *sys.path]):  # as `python path/x.py` runs it
                    parser = _intercept(lambda: (spec.loader.exec_module(module), _call_main(module)))
            finally:
                sys.modules.pop(spec.name, None)
    return frozenset(s for action in parser._actions for s in action.option_strings)


def program_at(tokens: list[str], i: int) -> str | None:
    """The repository command that tokens[i] starts, if any: a script or module after python (or a launcher), or
    a console script."""
    word = tokens[i]
    launched = any(Path(t).name.startswith("python") or t in ("deepspeed", "torchrun") for t in tokens[:i])
    if launched and word.endswith(".py") and (ROOT / word).is_file():
        return f"script:{word}"
    if launched and word == "-m" and i + 1 < len(tokens):
        path = ROOT / tokens[i + 1].replace(".", "/")
        if path.is_dir() or path.with_suffix(".py").is_file():
            return f"module:{tokens[i + 1]}"
    if word in console_scripts():
        return f"entry:{console_scripts()[word]}"
    return None


# ------------------------------------------------------------------------------------------------ the checker


def commands(code: str) -> Iterator[tuple[str | None, list[str], bool]]:
    """(program, flags after it, external) per command of a line (split on && and ;)."""
    for part in re.split(r"&&|;", code):
        tokens = words(part)
        if not tokens:
            continue
        first = Path(tokens[0]).name
        program, flags = None, []
        for i in range(len(tokens)):
            if tokens[i] == "-m" and i + 1 < len(tokens) and tokens[i + 1] in {"pytest", "venv", "pip"}:
                break  # an outside tool run through python -m
            program = program_at(tokens, i)
            if program:
                flags = [t.split("=", 1)[0] for t in tokens[i + 1:] if t.startswith("--")]
                break
        if program is None:
            flags = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
        external = program is None and (first in EXTERNAL or first == "make" or " -m " in f" {part} ")
        yield program, flags, external


def link_problems(page: Path, rel: Path, text: str) -> list[str]:
    out = []
    for target in links_of(text):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        shown = str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else path
        if shown in PENDING and not dest.exists():
            continue
        if not dest.exists():
            out.append(f"{rel}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{rel}: link to {target}: {shown} has no heading #{anchor}")
    return out


def code_problems(rel: Path, code: str) -> list[str]:
    """Paths, config keys, make targets and console scripts of one span or code line."""
    out = []
    for word in words(code):
        word = word.split("::", 1)[0].split("#", 1)[0].rstrip(".:")  # tests/x.py::test_y, docs/x.md#anchor
        if "/" not in word or "://" in word or word.startswith(("/", "$", "~", ".venv")) or "=" in word:
            continue
        head = word.split("/", 1)[0]
        if head in NOT_IN_REPO or word in PENDING:
            continue
        if (ROOT / head).exists() or word.endswith(".py"):
            pattern = re.sub(r"<[^>]*>", "*", word)
            if not list(ROOT.glob(pattern)) and not (ROOT / pattern).exists():
                out.append(f"{rel}: path {word} does not exist")
    for section, key in KEY.findall(code):
        if key in FILE_SUFFIXES or (ROOT / section / f"{key}.py").exists() or (ROOT / section / key).is_dir():
            continue  # a file name or a module (export._quant), not a key
        if not fnmatch.filter(SECTIONS[section], key):
            out.append(f"{rel}: config key {section}.{key} is not a field of RunConfig.{section}")
    for target in re.findall(r"(?:^|\s)make\s+([a-z][\w-]*)", code):
        if target not in make_targets():
            out.append(f"{rel}: make target {target} is not in the Makefile")
    for script in re.findall(r"(?<![\w/.])(dinoqpm-[a-z][\w-]*)", code):
        if script not in console_scripts() and script != "dinoqpm-toolkit":
            out.append(f"{rel}: console script {script} is not in pyproject.toml")
    return out


def flag_problems(rel: Path, codes: list[str]) -> list[str]:
    """Flags after a command must be its options; flags shown alone, options of a command the page names."""
    named = {p for code in codes for p, _, _ in commands(code) if p}
    out = []
    for code in codes:
        for program, flags, external in commands(code):
            if external or not flags:
                continue
            known = options_of(program) if program else frozenset().union(*(options_of(p) for p in named))
            where = program.split(":", 1)[1] if program else "any command on this page (" + ", ".join(
                sorted(p.split(":", 1)[1] for p in named)) + ")"
            out.extend(f"{rel}: flag {flag} is not an option of {where}" for flag in flags if flag not in known)
    return out


def problems(page: Path, text: str) -> list[str]:
    """Everything on a page that names a path, key, target, script or flag that does not exist."""
    rel = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    spans, blocks = code_of(text)
    split = [f"{rel}:{n}: inline code split over two lines (keep each `span` on one line, so it can be checked)"
             for n, line in enumerate(text.splitlines(), 1)
             if line.count("`") % 2 and not line.lstrip().startswith("```")]
    return (split + link_problems(page, rel, text) + [p for code in spans + blocks for p in code_problems(rel, code)]
            + flag_problems(rel, spans + blocks))


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_everything_a_page_mentions_exists(page: Path) -> None:
    found = problems(page, page.read_text(encoding="utf-8"))
    assert not found, "\n".join(found)


def test_pending_pages_are_still_pending() -> None:
    written = [p for p in PENDING if (ROOT / p).exists()]
    assert not written, f"{written} exist now: remove them from PENDING in tests/test_docs.py so they are checked"


def test_the_checker_finds_made_up_paths_keys_targets_scripts_and_flags() -> None:
    page = ROOT / "docs" / "made-up.md"
    text = """# Made up

See [method](method.md#model), [nothing](nothing.md) and [method](method.md#no-such-heading).

```bash
python launch/train.py --config configs/demo.yaml --dry-run --no-such-flag qp.n_features=40
python -m toolkit.qp --inputs x.npz --n-features 5 --no-such-qp-flag
dinoqpm-export --run runs/demo-<hash> --out x.onnx --fp16 --no-such-export-flag
dinoqpm-nothing --help
make test-fast && make no-such-target
pip install --no-deps whatever          # another program's flags are not checked
python benchmarks/gpu_check.py --cpu-smoke --no-such-check-flag
```

`toolkit/no_such_module.py`, `configs/no_such.yaml`, `docs/method.md`, `runs/demo-<hash>/report.html`,
`tune/spaces/*.yaml`, `qp.n_features`, `qp.no_such_key`, `export.int8_*`, `export.int9_*`, `export._quant`,
`--resume`, `--no-such-bare-flag`, `a span split over
two lines`.
"""
    found = "\n".join(problems(page, text))
    for made_up in ("link to nothing.md", "#no-such-heading", "--no-such-flag is not an option of launch/train.py",
                    "--no-such-qp-flag is not an option of toolkit.qp",
                    "--no-such-export-flag is not an option of export.to_onnx", "console script dinoqpm-nothing",
                    "make target no-such-target", "--no-such-check-flag", "path toolkit/no_such_module.py",
                    "path configs/no_such.yaml", "config key qp.no_such_key", "config key export.int9_*",
                    "flag --no-such-bare-flag", "md:17: inline code split over two lines"):
        assert made_up in found, f"the checker missed {made_up!r}:\n{found}"
    for real in ("--dry-run", "--config ", "--n-features", "--fp16", "--cpu-smoke", "--no-deps", "test-fast",
                 "path docs/method.md", "runs/", "tune/spaces", "qp.n_features", "export.int8_*", "export._quant",
                 "--resume", "#model"):
        assert real not in found, f"the checker flagged the real {real!r}:\n{found}"
    assert len(found.splitlines()) == 15, found  # the split span's two lines
