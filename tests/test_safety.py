"""Inputs are never unpickled, evaluated or handed to a shell: an AST scan of the product's
packages for the calls that would do it. The scanner is checked on planted examples first,
so a scan finding nothing means something."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autotune", "profilers", "cost_models", "kernels", "suites")
PICKLERS = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def _name(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain or a name; "" otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str) -> list[str]:
    """Each call that could run what an input says: eval/exec, pickle and its kin, YAML's
    full loaders, os.system/popen, a subprocess with shell=True, torch.load without
    weights_only=True, numpy.load without allow_pickle=False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.append(node.module)
            found += [f"import {m}" for m in mods if m.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in {"eval", "exec", "os.system", "os.popen", "yaml.load", "yaml.unsafe_load",
                    "yaml.full_load", "pd.read_pickle", "pandas.read_pickle"}:
            found.append(name)
        elif last in {"run", "Popen", "call", "check_call", "check_output"} and (
                (shell := _kw(node, "shell")) is not None
                and not (isinstance(shell, ast.Constant) and shell.value is False)):
            found.append(f"{name}(shell=...)")
        elif name == "torch.load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append("torch.load without weights_only=True")
        elif name in {"np.load", "numpy.load"}:
            ap = _kw(node, "allow_pickle")
            if not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append("np.load without allow_pickle=False")
    return found


@pytest.mark.parametrize("planted", [
    "import pickle", "from joblib import load", "eval(text)", "exec(code)", "os.system(cmd)",
    "yaml.load(f)", "yaml.unsafe_load(f)", "subprocess.run(cmd, shell=True)",
    "subprocess.Popen(cmd, shell=flag)", "torch.load(path)", "np.load(path)",
    "np.load(path, allow_pickle=True)", "pd.read_pickle(p)",
])
def test_the_scanner_finds_planted_unsafe_calls(planted: str) -> None:
    assert unsafe_calls(planted), planted


@pytest.mark.parametrize("fine", [
    "yaml.safe_load(f)", "subprocess.run([exe, arg], check=False)",
    "subprocess.run(argv, shell=False)", "torch.load(p, weights_only=True)",
    "np.load(p, allow_pickle=False)", "model.eval()",
])
def test_the_scanner_passes_safe_calls(fine: str) -> None:
    assert unsafe_calls(fine) == [], fine


def test_the_product_never_unpickles_evaluates_or_uses_a_shell() -> None:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 50  # the packages are where this test thinks they are
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := unsafe_calls(p.read_text()))}
    assert found == {}
