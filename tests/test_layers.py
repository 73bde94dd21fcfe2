"""The layer order of `loratools.layers`, held: every import of every module (top level, inside functions and
under TYPE_CHECKING) goes to its own layer or one below, there is no cycle, and heavy or optional packages
are imported only by the modules that own them. The package is read as source (ast), so a violation fails
here even when the package still imports."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from loratools.layers import LAYERS, OWNERS

PACKAGE = Path(__file__).resolve().parent.parent / "loratools"


def module_name(path: Path) -> str:
    parts = [p for p in path.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}


def layer_of(module: str) -> int:
    for level, (_, patterns) in enumerate(LAYERS):
        if any(module == p or (p.endswith(".*") and fnmatch.fnmatch(module, p)) for p in patterns):
            return level
    raise AssertionError(f"loratools.{module} is in no layer of loratools/layers.py: add it to one")


def imports(module: str, source: str | None = None) -> tuple[set[str], set[str]]:
    """(loratools modules, third-party top-level packages) that `module` imports anywhere in its source."""
    path = MODULES[module]
    inner, outer = set(), set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(["loratools", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
            names += [f"{names[0]}.{a.name}" for a in node.names]
        for name in names:
            if name == "loratools" or name.startswith("loratools."):
                target = name.removeprefix("loratools").removeprefix(".")
                if target in MODULES and target != module:
                    inner.add(target)
            elif name:
                outer.add(name.split(".")[0])
    return inner, outer


GRAPH = {module: imports(module) for module in MODULES}


def test_the_layer_declaration_covers_every_module():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_climbs_a_layer(module):
    mine = layer_of(module)
    above = sorted(t for t in GRAPH[module][0] if layer_of(t) > mine)
    assert not above, (f"loratools.{module} ({LAYERS[mine][0]}) imports from a higher layer: "
                       + ", ".join(f"{t} ({LAYERS[layer_of(t)][0]})" for t in above))


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module][0]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("package", sorted(OWNERS))
def test_heavy_packages_are_imported_only_by_their_owners(package):
    owners = OWNERS[package]
    strays = sorted(m for m in MODULES if package in GRAPH[m][1]
                    and not any(m == o or (o.endswith(".*") and fnmatch.fnmatch(m, o)) for o in owners))
    assert not strays, f"{package} is imported outside {owners or 'any module'}: {strays}"


def test_the_reader_sees_imports_inside_functions_and_relative_ones():
    """The reader itself: an import inside a function, a relative import and a third-party one are all found."""
    source = ("def f():\n    from loratools.cli import render\n"
              "from .keys import PEFT_PREFIX\nfrom ..adapter import Adapter\nimport onnx.helper\n")
    inner, outer = imports("formats.peft", source)
    assert inner == {"cli", "cli.render", "formats.keys", "adapter"} and outer == {"onnx"}
    assert layer_of("cli.render") > layer_of("formats.peft")
