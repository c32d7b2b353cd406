"""The command modules parse flags and print; the work is in the packages below them. A
function in autotune/cli past 60 lines, or one command reaching into another's private
helpers, is where orchestration has crept back into the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parents[2] / "autotune" / "cli"
MODULES = sorted(CLI.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_cli_function_over_60_lines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            and f.end_lineno - f.lineno + 1 > 60]
    assert not long, long


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_command_imports_another_commands_private_names(path: Path) -> None:
    tree = ast.parse(path.read_text())
    reached = [(node.module, a.name) for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autotune.cli.")
               and node.module.endswith("_cmd") for a in node.names if a.name.startswith("_")]
    assert not reached, reached
