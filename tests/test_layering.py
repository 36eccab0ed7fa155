"""The architecture as a test: the import graph of ``lnorm`` and the length of its functions.

Read from the source with ``ast`` (every import, the ones inside functions included, since a lazy
import hides a cycle rather than removing it) and checked against the layers the README's
"Layout" section describes.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

import lnorm

SRC = Path(lnorm.__file__).parent
MAX_FUNCTION_LINES = 80
# the Numba kernels: flat loops over rows and features, kept whole so the compiler sees them whole
KERNEL_FILES = {"ops/_numba_kernels.py", "ops/_rnn_kernels.py"}

# Layers, lowest first: a module may import modules of its own layer or of a lower one.
LAYERS = [
    ("validation", "reference"),  # no lnorm imports
    ("ops",),
    ("functional",),
    ("nn",),
    ("__init__",),  # the flat API re-exports the layers above
    ("utils", "diagnostics", "convert", "audit", "distributed"),
    ("lab", "bench", "cli", "__main__"),
]
CORE = ("validation", "reference", "ops", "functional", "nn")
NEVER_FROM_CORE = ("lab", "bench", "audit")


def module_name(path: Path) -> str:
    parts = ["lnorm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def part(name: str) -> str:
    """The top-level part of lnorm a module belongs to (``lnorm`` itself is ``__init__``)."""
    return name.split(".")[1] if "." in name else "__init__"


def layer(name: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part(name) in parts)


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package(importer) else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every lnorm import in module ``name``."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "lnorm"]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node)
            if target.split(".")[0] == "lnorm":
                out += [(target, a.name, node.lineno) for a in node.names]
    return out


def edges(name: str) -> set[str]:
    """The lnorm modules ``name`` imports (``from pkg import mod`` is an edge to ``pkg.mod``)."""
    out = set()
    for target, attr, _ in imports(name):
        sub = f"{target}.{attr}" if attr else None
        out.add(sub if sub in MODULES else target)
    return out


GRAPH = {name: edges(name) for name in MODULES}


def test_the_graph_covers_every_module():
    assert "lnorm.ops.backend" in MODULES and "lnorm.lab.retrieval.train" in MODULES
    for name in MODULES:
        assert importlib.util.find_spec(name) is not None, name
        layer(name)  # every part of lnorm has a layer


def package_of(name: str) -> str:
    return name if is_package(name) else name.rpartition(".")[0]


def private(piece: str) -> bool:
    return piece.startswith("_") and not piece.startswith("__")


def private_module_allowed(importer: str, module: str) -> bool:
    """A private module (ops/_numba_kernels.py) is its package's business: its siblings may use it."""
    return module.rpartition(".")[0] == package_of(importer)


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name in MODULES:
        for target, attr, line in imports(name):
            pieces = target.split(".")
            for i, piece in enumerate(pieces):
                module = ".".join(pieces[: i + 1])
                if private(piece) and not private_module_allowed(name, module):
                    bad.append(f"{name}:{line} imports the private module {module}")
            if attr and private(attr):
                sub = f"{target}.{attr}"
                if sub not in MODULES:
                    bad.append(f"{name}:{line} imports {attr} from {target}")
                elif not private_module_allowed(name, sub):
                    bad.append(f"{name}:{line} imports the private module {sub}")
    assert not bad, "\n".join(bad)


def test_no_module_reads_a_private_attribute_of_another_lnorm_module():
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and resolve(name, node).split(".")[0] == "lnorm":
                for a in node.names:
                    target = f"{resolve(name, node)}.{a.name}"
                    if target in MODULES:
                        aliases[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "lnorm" and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                            and node.value.id in aliases and private(node.attr)):
                sub = f"{aliases[node.value.id]}.{node.attr}"
                if not (sub in MODULES and private_module_allowed(name, sub)):
                    bad.append(f"{name}:{node.lineno} reads {sub}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in GRAPH[v]:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    up = [t for t in GRAPH[name] if t in MODULES and layer(t) > layer(name)]
    assert not up, f"{name} (layer {LAYERS[layer(name)]}) imports {up} from a higher layer"


def test_the_core_never_reaches_the_tools_or_the_lab():
    core = [n for n in MODULES if part(n) in CORE]
    for start in core:
        seen, todo = set(), [start]
        while todo:
            for w in GRAPH[todo.pop()]:
                if w in MODULES and w not in seen:
                    seen.add(w)
                    todo.append(w)
        assert not [w for w in seen if part(w) in NEVER_FROM_CORE], (start, sorted(seen))


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in MODULES.items():
        if str(path.relative_to(SRC)) in KERNEL_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} (line {node.lineno}): {n} lines")
    assert not long, "split into named steps:\n" + "\n".join(long)
