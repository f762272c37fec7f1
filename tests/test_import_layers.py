"""The package's subpackages import one way (docs/architecture.md).

Parses every module's import-time imports (module level and class bodies;
imports inside functions are the allowed facades) and checks the
subpackage graph against the rule, with a cycle check that is itself tested
on a graph known to have one.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_gemma2"

# Lower ranks never import higher ones; equal ranks never import each other.
RANKS = {
    "layers": 0,
    "models": 1,
    "generation": 2,
    "checkpoints": 2,
    "data": 2,
    "training": 3,
    "cli": 4,
}
# Leaf modules that several packages read: they import nothing of ours.
LEAVES = ("models/architecture.py", "models/weight_table.py", "models/json_file.py")


def _import_time_imports(tree):
    """Names imported when the module runs: not inside function bodies."""
    names, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        pending += list(ast.iter_child_nodes(node))
    return names


def _subpackage(module_name):
    """`"models"` for `keras_gemma2.models.backbone`; `None` for the root."""
    parts = module_name.split(".")
    if parts[0] != "keras_gemma2" or len(parts) < 2:
        return None
    return parts[1].removesuffix(".py")


def _module_name(path):
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def package_edges():
    """`{(importer subpackage, imported subpackage): example "file -> module"}`."""
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _subpackage(_module_name(path))
        if importer is None:
            continue  # keras_gemma2/__init__.py: the public facade
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _import_time_imports(tree):
            imported = _subpackage(name)
            if imported is not None and imported != importer and imported in RANKS:
                edges.setdefault((importer, imported), f"{path.name} -> {name}")
    return edges


def find_cycle(edges):
    """One cycle of the directed graph `edges` as a list of nodes, or `None`."""
    graph = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state:
                cycle = visit(target, trail + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_known_cycle():
    assert find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"), ("b", "c"), ("a", "c")}) is None


def test_parser_sees_module_level_and_skips_function_imports():
    tree = ast.parse(
        "import keras_gemma2.layers.x\n"
        "from keras_gemma2.models import y\n"
        "class A:\n    from keras_gemma2.data import z\n"
        "def f():\n    from keras_gemma2.cli import main\n"
    )
    packages = {_subpackage(name) for name in _import_time_imports(tree)}
    assert packages == {"layers", "models", "data"}


def test_no_import_cycle_between_subpackages():
    edges = package_edges()
    assert ("generation", "models") in edges  # the walk does see imports
    assert find_cycle(edges) is None, edges


def test_imports_run_one_way():
    upward = {
        edge: where
        for edge, where in package_edges().items()
        if RANKS[edge[1]] >= RANKS[edge[0]]
    }
    assert not upward, f"imports against docs/architecture.md: {upward}"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_ours(leaf):
    tree = ast.parse((PACKAGE / leaf).read_text())
    ours = [n for n in _import_time_imports(tree) if n.startswith("keras_gemma2")]
    assert ours == []
