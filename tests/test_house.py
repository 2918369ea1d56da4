"""The shape of the package: no import cycles, no private names imported across modules, and a
method registry that everything reads (CLI, validation, README).

The import graph is read from the source (every `import`, also those inside functions), so a
cycle hidden behind a lazy import is found too. `python tests/test_house.py` prints the graph's
cycles and private imports (none, when the house is clean).
"""
import ast
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "lorap"


def module_name(path: Path) -> str:
    parts = ["lorap", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict) -> list:
    """[(imported module, names taken from it)] for every import statement in the module."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names if alias.name.startswith("lorap")]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, name, path.name == "__init__.py")
            if not target.startswith("lorap"):
                continue
            names = tuple(alias.name for alias in node.names)
            # `from package import submodule` depends on the submodule
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found.append((target, tuple(n for n in names if f"{target}.{n}" not in known)))
            found += [(sub, ()) for sub in submodules]
    return found


def import_graph() -> dict:
    known = modules()
    return {name: sorted({target for target, _ in imports_of(name, path, known) if target in known and target != name})
            for name, path in known.items()}


def cycles(graph: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def private_imports() -> list:
    """(module, imported module, name) for each `_name` taken from another module of lorap."""
    known = modules()
    bad = []
    for name, path in known.items():
        for target, names in imports_of(name, path, known):
            bad += [(name, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    return bad


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "lorap.pipeline.run" in graph and "lorap.methods.registry" in graph["lorap.pipeline.config"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_a_private_name_from_another():
    assert private_imports() == []


def test_package_inits_import_nothing():
    """Subpackage __init__ files only describe their package: importing one module of a package
    never drags in the rest (and no parent-package edge can close a cycle)."""
    known = modules()
    for name, path in known.items():
        if path.name == "__init__.py" and name != "lorap":
            assert imports_of(name, path, known) == [], name


# Run in a fresh interpreter where importing any heavy library fails: the CLI must parse, print help
# and refuse bad arguments with what the standard library, the registry and the plan need alone.
CLI_WITHOUT_HEAVY_LIBRARIES = """
import sys
HEAVY = ("torch", "transformers", "numpy", "safetensors", "datasets", "accelerate", "peft", "lm_eval", "gguf")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError("imported before arguments were parsed: " + name)

sys.meta_path.insert(0, Refuse())
from lorap.cli import main
for argv in (["--help"], *([command, "--help"] for command in sys.argv[1:]), ["compress", "--out", "o", "--ratio", "x"],
             ["plan", "--ratio", "0.2", "--factorization", "nope"]):
    try:
        main(argv)
    except SystemExit as stop:
        print("exit:", argv[0], stop.code)
"""


def test_the_cli_parses_and_helps_without_torch():
    import subprocess

    from lorap.cli import build_parser

    commands = list(build_parser()._subparsers._group_actions[0].choices)
    done = subprocess.run([sys.executable, "-c", CLI_WITHOUT_HEAVY_LIBRARIES, *commands], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    codes = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("exit: ")]
    assert codes == [["--help", "0"], *([command, "0"] for command in commands), ["compress", "2"], ["plan", "2"]]
    assert "usage: lorap" in done.stdout and "invalid float value: 'x'" in done.stderr
    assert "invalid choice: 'nope'" in done.stderr and "imported before" not in done.stderr


if __name__ == "__main__":
    print("cycles:", cycles(import_graph()))
    print("private imports:", private_imports())
