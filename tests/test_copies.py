"""Method scripts copy code from coop.py instead of importing it; each copy is marked `# Copied from coop.py: NAME`.

This test finds every marker and checks that the function or class that follows it is character-for-character
the one in coop.py (the repo's "repeat yourself, but check the copies" rule). Run: python -m pytest tests/test_copies.py
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from (\w+\.py): (\w+)\s*$")


def definitions(path):
    """name -> source text of every top-level function and class in a file."""
    source = path.read_text()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def copies():
    """(copy file, line number, origin file, name) for every marker in the top-level scripts."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = MARKER.match(line)
            if m:
                found.append((path.name, i, m.group(1), m.group(2)))
    return found


@pytest.mark.parametrize("copy_file,line,origin,name", copies())
def test_copy_is_identical(copy_file, line, origin, name):
    lines = (ROOT / copy_file).read_text().splitlines()
    nxt = lines[line].lstrip()  # the definition must follow the marker directly
    assert re.match(rf"(def|class) {name}\b", nxt), f"{copy_file}:{line}: marker for {name} is not followed by its definition"
    origin_defs = definitions(ROOT / origin)
    assert name in origin_defs, f"{copy_file}:{line}: {origin} has no top-level {name}"
    assert definitions(ROOT / copy_file)[name] == origin_defs[name], \
        f"{copy_file}: {name} differs from {origin}; copy it again or drop the marker"


def test_every_marker_is_seen():
    """Each '# Copied from' line is one the regex reads (a broken regex would leave the test above with nothing to
    check), and the copies the method files are known to carry are among them."""
    written = [(p.name, i) for p in sorted(ROOT.glob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
               if line.startswith("# Copied from")]
    assert written == [(f, i) for f, i, _, _ in copies()]
    assert {("capt.py", "PromptLearner"), ("sempt.py", "PromptLearner"), ("sempt.py", "text_features"),
            ("sempt.py", "train")} <= {(f, name) for f, _, _, name in copies()}


def test_marker_regex_catches_a_changed_copy(tmp_path):
    """The comparison really detects a one-character change (guards the test above against passing vacuously)."""
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "b.py").write_text("# Copied from a.py: f\ndef f(x):\n    return x + 2\n")
    assert definitions(tmp_path / "a.py")["f"] != definitions(tmp_path / "b.py")["f"]
