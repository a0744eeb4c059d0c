"""The dependency rules of docs/architecture.md: import-linter's contracts (pyproject.toml), and the rules it
cannot state — no module imports another's private name, no module-level dict carries values into a flow, no
library file is longer than a reader can hold, and the CLI's help imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("quantmill", "flows", "tasks", "hydra_plugins")
MAX_LINES = 400
HEAVY = ("torch", "prefect", "transformers", "hydra", "omegaconf", "numpy", "boto3", "llama_cpp", "mlx", "safetensors")


def _sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "6 kept" in proc.stdout, proc.stdout[-2000:]


def _private_imports(path: Path) -> list[str]:
    """``from other import _name`` and ``other._name`` where ``other`` is a module of the project."""
    own = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in (*PACKAGES, "tests"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != own:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [hit for path in _sources(*PACKAGES, "tests", "bench") for hit in _private_imports(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_no_module_level_dict_carries_values_into_a_flow():
    """Flows take what they need as parameters (the plan included): an empty module-level dict in the flows, the
    tasks or the Prefect wing is a channel around them."""
    found = []
    for path in _sources("flows", "tasks", "quantmill/prefect"):
        for node in ast.parse(path.read_text()).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            empty_dict = (isinstance(value, ast.Dict) and not value.keys) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in ("dict", "defaultdict") and not value.args and not value.keywords)
            if empty_dict:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, "module-level dicts filled at run time:\n" + "\n".join(found)


@pytest.mark.parametrize("path", _sources(*PACKAGES), ids=lambda p: str(p.relative_to(REPO)))
def test_library_files_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it by concern (at most {MAX_LINES})"


def test_the_cli_parser_imports_nothing_heavy():
    """``quantmill --help`` builds every command's parser: it must not import a framework (seconds each)."""
    code = ("import sys; from quantmill.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "", f"building the CLI's parsers imported: {proc.stdout.strip()}"
