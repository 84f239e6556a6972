"""The layers of docs/architecture.md, checked on the source: imports go one way
(formats <- runtime <- qat <- integer <- experiments <- cli), nothing below experiments
imports the zoo, and the Quantizer asks no format which family it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "precsim"
LAYERS = ("formats", "runtime", "qat", "integer", "experiments", "cli")
ZOO_MAY_IMPORT = ("formats", "runtime", "qat")  # the zoo marks its models with qat/markers


def _layer(module: str) -> str | None:
    """The layer of ``precsim.<...>`` (None: the package's own __init__/__main__)."""
    parts = module.split(".")
    if parts[0] != "precsim" or len(parts) == 1:
        return None
    return parts[1]


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _imports(path: Path) -> list[str]:
    """Every precsim module ``path`` imports, at the top or inside a function (the package's
    ``__version__`` is metadata, not a layer)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "precsim" and [a.name for a in node.names] == ["__version__"]:
                continue
            for alias in node.names:  # ``from precsim.x import y`` may import the module precsim.x.y
                sub = f"{node.module}.{alias.name}"
                found.append(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [m for m in found if m == "precsim" or m.startswith("precsim.")]


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py") or p.parent != SRC)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_one_way(path: Path) -> None:
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    for module in _imports(path):
        target = _layer(module)
        assert target is not None, f"{path.name} imports the top-level precsim package ({module})"
        if own == "zoo":
            assert target in (*ZOO_MAY_IMPORT, "zoo"), f"zoo/{path.name} imports {module}"
            continue
        if target == "zoo":
            assert own in ("experiments", "cli"), f"{own}/{path.name} imports {module}"
            continue
        assert LAYERS.index(target) <= LAYERS.index(own), f"{own}/{path.name} imports {module}, a layer above"


def test_the_quantizer_asks_no_format_its_family() -> None:
    tree = ast.parse((SRC / "qat" / "quantizer.py").read_text())
    families = {"FloatFormat", "IntFormat", "DSEFormat", "BlockFormat"}
    named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not named & families


def _module_name(path: Path) -> str:
    parts = ("precsim", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles() -> None:
    """No module reaches itself through imports (a lazy import inside a function included: it
    only hides a cycle)."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py") if p.name != "__main__.py"}
    edges = {name: {m for m in _imports(p) if m in paths and m != name} for name, p in paths.items()}
    edges["precsim"] = set()  # the package re-exports every layer; nothing imports it back (above)
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError(" -> ".join((*path[path.index(name):], name)))
        if name in done:
            return
        for target in sorted(edges[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(edges):
        visit(name, ())
