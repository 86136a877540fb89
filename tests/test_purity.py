"""compression/ and privacy/ are pure libraries: they import no orchestration or tracking code."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"prefect", "mlflow", "flows", "tasks"}


@pytest.mark.parametrize("package", ["compression", "privacy"])
def test_library_imports_no_orchestration(package):
    offenders = []
    for source in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{source.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_tasks_do_not_import_flows():
    for source in (ROOT / "tasks").rglob("*.py"):
        tree = ast.parse(source.read_text())
        mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if m.split(".")[0] == "flows"], source
