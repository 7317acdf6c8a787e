"""The code's shape as the project keeps it: no function over 45 lines and no line over 120 characters in
train_gpt.py (its bytes are the artifact's) and scripts/."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "train_gpt.py", *sorted((ROOT / "scripts").glob("*.py"))]
MAX_FUNCTION_LINES, MAX_LINE_CHARS = 45, 120


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_functions_and_lines_stay_short(path):
    source = path.read_text()
    long_functions = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
                      for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    long_lines = [i for i, line in enumerate(source.splitlines(), 1) if len(line) > MAX_LINE_CHARS]
    assert not long_functions, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
    assert not long_lines, f"{path.name}: lines over {MAX_LINE_CHARS} characters: {long_lines}"
