"""The package's imports, read from its source: no cycle, and no import from a layer to a higher one.

The layers are the list in ``docs/index.md`` (written once there). Imports are read with ``ast``
from every module of ``cxrloc/``: at module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxrloc"
INDEX = ROOT / "docs" / "index.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from cxrloc.x import y`` counts
    ``cxrloc.x.y`` when that is a module, else ``cxrloc.x``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "cxrloc")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "cxrloc":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def read_layers() -> list[list[str]]:
    """The layer list of docs/index.md: ``N. title: `mod`, `mod` ...`` lines after the marker."""
    lines = INDEX.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- layers"))
    layers = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        assert re.match(r"\d+\. ", line), f"docs/index.md layer line {line!r} is not 'N. title: `module`, ...'"
        layers.append(re.findall(r"`(cxrloc[\w.]*)`", line.partition(":")[2]))
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The layer of the longest listed prefix of ``module`` (``cxrloc`` alone only for itself)."""
    best, best_len = -1, -1
    for i, prefixes in enumerate(layers):
        for prefix in prefixes:
            match = module == prefix or (prefix != "cxrloc" and module.startswith(prefix + "."))
            if match and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return [
        f"{m} (layer {layer_of(m, layers) + 1}) imports {d} (layer {layer_of(d, layers) + 1})"
        for m, deps in sorted(graph.items()) for d in sorted(deps)
        if layer_of(d, layers) > layer_of(m, layers)
    ]


def test_every_module_has_a_layer() -> None:
    layers = read_layers()
    assert len(layers) >= 5, layers
    missing = [m for m in package_modules() if layer_of(m, layers) < 0]
    assert not missing, f"modules in no layer of docs/index.md: {missing}"


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    bad = upward_imports(import_graph(), read_layers())
    assert not bad, "imports upwards:\n" + "\n".join(bad)


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    """The checks themselves, on a graph made by hand: they could not pass by finding nothing."""
    layers = [["cxrloc", "cxrloc.utils"], ["cxrloc.data"], ["cxrloc.cli"]]
    graph = {"cxrloc.data.a": {"cxrloc.data.b"}, "cxrloc.data.b": {"cxrloc.utils", "cxrloc.data.c"},
             "cxrloc.data.c": {"cxrloc.data.a"}, "cxrloc.utils": set()}
    assert find_cycle(graph) == ["cxrloc.data.a", "cxrloc.data.b", "cxrloc.data.c", "cxrloc.data.a"]
    assert find_cycle({"cxrloc.data.a": {"cxrloc.utils"}, "cxrloc.utils": set()}) is None
    assert upward_imports({"cxrloc.utils": {"cxrloc.cli.x"}, "cxrloc.cli.x": {"cxrloc.utils"}}, layers) == [
        "cxrloc.utils (layer 1) imports cxrloc.cli.x (layer 3)"
    ]
    assert layer_of("cxrloc.data.nih", layers) == 1 and layer_of("cxrloc.other", layers) == -1


def test_imports_inside_functions_are_read(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from cxrloc.data import nih\n    import cxrloc.utils\n")
    known = {"cxrloc.data", "cxrloc.data.nih", "cxrloc.utils"}
    assert imported_modules(src, "cxrloc.x", known) == {"cxrloc.data.nih", "cxrloc.utils"}


@pytest.mark.parametrize("module", ["cxrloc.decision", "cxrloc.data.boxes"])
def test_bottom_modules_import_no_stage(module: str) -> None:
    layers = read_layers()
    deps = import_graph()[module]
    assert all(layer_of(d, layers) <= layer_of(module, layers) for d in deps), deps


# --------------------------------------------------------------------------- sizes
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

# Modules or functions still over the limits: empty since issue 21 was finished; keep it that way (an
# entry may only shrink, and one that fits again must go). Anything not listed that is too long fails.
KNOWN_LONG: dict[str, int] = {}


def too_long(root: Path) -> dict[str, int]:
    """Modules over :data:`MAX_MODULE_LINES` lines and functions (``def`` to last line, docstring
    included) over :data:`MAX_FUNCTION_LINES`, as ``path`` / ``path:function`` -> lines."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root.parent).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[f"{rel}:{node.name}"] = lines
    return out


def test_no_module_or_function_too_long() -> None:
    found = too_long(PACKAGE)
    grown = {k: n for k, n in found.items() if n > KNOWN_LONG.get(k, 0)}
    assert not grown, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function: {grown}"
    fixed = sorted(set(KNOWN_LONG) - set(found))
    assert not fixed, f"now within the limits, remove from KNOWN_LONG: {fixed}"


def test_the_size_check_catches_a_long_module_and_function(tmp_path: Path) -> None:
    pkg = tmp_path / "cxrloc"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    (pkg / "long_function.py").write_text(f"def f():\n{body}\n")
    (pkg / "long_module.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "fine.py").write_text("def g():\n" + "\n".join(f"    y{i} = {i}" for i in range(79)) + "\n")
    assert too_long(pkg) == {"cxrloc/long_function.py:f": 81, "cxrloc/long_module.py": MAX_MODULE_LINES + 1}
