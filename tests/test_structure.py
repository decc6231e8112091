"""Imports go one way: clip and files at the bottom, then world, data, eval, the harness (experiment.py and
harness/), and the scripts on top; no cycle, and no project module imported inside a function to dodge one.

The graph is read from the import statements of every project file (ast), so a test here fails on the code as
written, whatever happens to be imported already. Run: python -m pytest tests/test_structure.py
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each module may import modules of its own layer or of a lower one (never a higher one).
LAYERS = [
    {"files", "papers", "clip", "clip.clip", "clip.model", "clip.resnet", "clip.tokenizer"},
    {"world"},
    {"data"},
    {"eval"},
    {"experiment", "harness", "harness.folders", "harness.lock", "harness.runs", "harness.speed",
     "harness.torchrun"},
    {"coop", "capt", "sempt", "davpt", "lpclip", "bench", "descriptions.describe"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def project_files():
    """{module name: path} of every Python file of the project but the tests."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("clip/*.py"), *ROOT.glob("harness/*.py"), ROOT / "descriptions/describe.py"]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}


def imports(name, path, modules):
    """[(imported project module, line, inside a function?)] of one file; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            found.extend((t, child.lineno, inside) for t in targets if t in modules and t != name)
            visit(child, inside)
    visit(ast.parse(path.read_text()), False)
    return found


def graph():
    modules = project_files()
    return modules, {name: imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    modules, _ = graph()
    assert set(modules) <= set(LAYER), f"place these in LAYERS: {sorted(set(modules) - set(LAYER))}"


def test_no_project_import_inside_a_function():
    _, edges = graph()
    local = [f"{name}:{line} imports {target}" for name, found in edges.items() for target, line, inside in found
             if inside]
    assert not local, local


def test_imports_go_down_the_layers_and_never_in_a_cycle():
    _, edges = graph()
    upward = [f"{name} imports {target}" for name, found in edges.items() for target, _, _ in found
              if LAYER[target] > LAYER[name]]
    assert not upward, f"imports that go up: {upward}"
    done, path = set(), []

    def walk(name):  # depth-first: meeting a module that is still on the path is a cycle
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target, _, _ in edges[name]:
            walk(target)
        path.pop()
        done.add(name)
    for name in edges:
        walk(name)


def test_the_check_sees_a_cycle_and_a_local_import(tmp_path, monkeypatch):
    """The graph is real: a cycle and a function-local import written into files are found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert imports("a", modules["a"], modules) == [("b", 1, False)]
    assert imports("b", modules["b"], modules) == [("a", 2, True)]
