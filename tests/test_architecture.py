"""The library's layering, checked on its source: which subpackage may import which, no import cycles, no
environment reads in library code, no oversized files or functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "ldmflow"
MAX_LINES = 500
MAX_FUNCTION_LINES = 60
# module:function -> why it may be longer than MAX_FUNCTION_LINES (a declaration table, say); keep it short
LONG_FUNCTIONS: dict[str, str] = {}

# subpackage -> subpackages (and top-level modules) it must never import
FORBIDDEN = {
    "models": ("training", "data", "stages", "evaluation", "diffusion"),
    "diffusion": ("models", "training", "data", "stages", "evaluation"),
    "data": ("models", "training", "stages", "evaluation", "diffusion"),
    "config": ("models", "training", "data", "stages", "evaluation", "diffusion"),
    "training": ("stages", "evaluation", "models", "data", "diffusion"),
    "evaluation": ("stages", "training"),
}
# Only these (and the CLI package's modules) may read the process environment (everything else takes it as an
# argument) or import the CLI. A write such as set_deterministic's os.environ.setdefault(CUBLAS_WORKSPACE_CONFIG)
# is not a read.
CLI = "ldmflow.cli"
ENVIRONMENT_EDGES = {CLI, "ldmflow.launch"}


def in_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


def is_edge(module: str) -> bool:
    return module in ENVIRONMENT_EDGES or in_cli(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The ldmflow modules a module imports, anywhere in its body (lazy imports count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: -node.level] if not name.endswith("__init__") else name.split(".")
                node_module = ".".join(base + ([node.module] if node.module else []))
            else:
                node_module = node.module or ""
            targets = [f"{node_module}.{a.name}" for a in node.names] + [node_module]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "ldmflow":
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, tree, known) for name, tree in mods.items()}


def subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_layers_import_only_downwards():
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
           if subpackage(d) in FORBIDDEN.get(subpackage(m), ())]
    bad += [f"{m} imports {d}" for m, deps in graph().items() for d in deps
            if in_cli(d) and not is_edge(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_library_code_does_not_read_the_environment():
    bad = []
    for name, tree in modules().items():
        if is_edge(name):
            continue
        writes = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Attribute) and n.func.attr == "setdefault"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and id(node) not in writes \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                bad.append(f"{name}:{node.lineno}")
    assert not bad, "os.environ / os.getenv outside the edges: " + ", ".join(bad)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_library_file_is_oversized(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def long_functions(name: str, tree: ast.Module, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:function (N lines)`` for every function, method and nested function over ``limit`` lines (from
    its ``def`` to its last line; decorators not counted) that LONG_FUNCTIONS does not excuse."""
    return [f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit and f"{name}:{node.name}" not in LONG_FUNCTIONS]


def test_no_library_function_is_longer_than_60_lines():
    bad = [entry for name, tree in modules().items() for entry in long_functions(name, tree)]
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(bad)


def test_the_length_check_sees_a_planted_long_method_and_nested_function():
    """A 61-line method and a 61-line nested function are caught; 60 lines under a decorator pass."""
    def body(n: int, indent: int) -> str:
        return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(n))

    source = ("class A:\n    def long(self):\n" + body(60, 8)
              + "@decorator\ndef at_the_limit():\n" + body(59, 4)
              + "def outer():\n    def inner():\n" + body(60, 8) + "    return inner\n")
    assert sorted(long_functions("ldmflow.x", ast.parse(source))) == [
        "ldmflow.x:inner (61 lines)", "ldmflow.x:long (61 lines)", "ldmflow.x:outer (63 lines)"]


def test_the_checker_sees_a_planted_violation(tmp_path):
    """The import walk finds a lazy import inside a function (so the layering test can fail)."""
    tree = ast.parse("def f():\n    from ldmflow.training.loop import fit\n")
    assert imported("ldmflow.models.x", tree,
                    {"ldmflow.training.loop", "ldmflow.models.x"}) == {"ldmflow.training.loop"}


# --------------------------------------------------------------------------------------------------
# Stages do not serve as each other's library; artifact metadata is read through its types
# --------------------------------------------------------------------------------------------------

STAGE_REGISTRY = "ldmflow.stages"  # the package's __init__ may list the stages
METADATA_MODULE = "ldmflow.metadata"
# what holds an artifact's metadata as a raw dict: a checkpoint's "extra", a store's zarr ".attrs" (and a
# copy of them), a judge's ".info", a checkpoint's provenance
METADATA_HOLDERS = {"extra", "attrs", "info", "provenance"}
PANDAS_FRAMES = {"frame"}  # a manifest DataFrame's .attrs is pandas' own metadata, not an artifact's


def stage_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in graph.items() for d in deps
            if m.startswith("ldmflow.stages.") and d.startswith("ldmflow.stages.") and m != STAGE_REGISTRY]


def test_no_stage_imports_another_stage():
    bad = stage_imports(graph())
    assert not bad, "shared code moves down a floor, out of ldmflow.stages:\n" + "\n".join(bad)


def _holder(node: ast.expr) -> str | None:
    """The name a metadata read goes through (``extra`` of ``extra["k"]``, ``attrs`` of ``store.attrs["k"]``)."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in PANDAS_FRAMES:
            return None
        name = node.attr
    else:
        return None
    return name if name in METADATA_HOLDERS or name.endswith("_extra") else None


def metadata_reads(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, key) of each read of artifact metadata by string key: ``extra["k"]``, ``store.attrs.get("k")``,
    ``base_extra["k"]``, and ``state["extra"]`` itself (key "extra")."""
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            holder, key = node.value, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args:
            holder, key = node.func.value, node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and (_holder(holder) or key.value == "extra"):
            reads.append((node.lineno, key.value))
    return sorted(reads)


# Loading a checkpoint's state reads its "extra" entry, to hand it to the metadata types (the loop compares
# the recorded inputs' sha256 on resume and writes the entry it is given).
READS_STATE_EXTRA = {"ldmflow.checkpoints", "ldmflow.training.loop"}


def test_artifact_metadata_is_read_only_through_its_types():
    bad = [f"{name}:{line} ({key!r})" for name, tree in modules().items() if name != METADATA_MODULE
           for line, key in metadata_reads(tree) if not (key == "extra" and name in READS_STATE_EXTRA)]
    assert not bad, "read artifact metadata through ldmflow.metadata, not by string key: " + ", ".join(bad)


def test_the_metadata_checker_sees_planted_violations():
    """Each way of reading metadata by key is caught, and what is not metadata is not."""
    planted = ast.parse("def f(state, store, frame, meta):\n"
                        "    a = state['extra']['num_classes']\n"
                        "    b = store.attrs.get('channels', 3)\n"
                        "    c = base_extra['latent_size']\n"
                        "    d = frame.attrs['source']\n"
                        "    e = meta.num_classes\n")
    assert metadata_reads(planted) == [(2, "extra"), (3, "channels"), (4, "latent_size")]
    assert stage_imports({"ldmflow.stages.a": {"ldmflow.stages.b", "ldmflow.artifacts"},
                          "ldmflow.stages": {"ldmflow.stages.a"}}) == ["ldmflow.stages.a imports ldmflow.stages.b"]
