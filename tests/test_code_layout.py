"""The project's rule on the code's shape (issue 19): no function outside tests and benchmarks is longer
than a reader follows in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Lines from `def` to the function's last line, docstring included.
MAX_FUNCTION_LINES = 100


def test_no_function_of_the_package_or_scripts_is_over_100_lines():
    too_long = []
    for path in sorted([*(ROOT / "show_attend_tell").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "split these into functions a reader follows:\n" + "\n".join(too_long)
