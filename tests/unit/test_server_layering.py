"""What ``qdb_client.testing`` may import, and the shape of its own import graph.

The test node checks the wire contract for real only if it is built on the
protocol layer and the public API, never on driver internals. And method
handlers see a narrow context: ``methods`` knows neither the node nor the
connection, so methods -> server -> session -> methods is no cycle.

Two checks, as in test_layering: a scan of every import statement (a lazy
or TYPE_CHECKING import counts too), and fresh interpreters that import
modules and look at ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qdb_client"
TESTING = PACKAGE / "testing"

#: The qdb_client modules the test node may import, beside itself.
ALLOWED = ("qdb_client.protocol", "qdb_client.errors", "qdb_client.config", "qdb_client.validation")
#: Third-party packages it may import (beside the standard library).
THIRD_PARTY = {"trio", "cbor2", "attrs"}


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module, under ``if TYPE_CHECKING``) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ["qdb_client", *path.relative_to(PACKAGE).parent.parts]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, id(node) in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name, id(node) in typing_only))
            if not node.module:  # ``from . import x`` may name submodules
                found += [
                    (node.lineno, f"{name}.{a.name}", id(node) in typing_only) for a in node.names
                ]
    return found


def _modules() -> list[Path]:
    return sorted(TESTING.rglob("*.py"))


def test_the_scan_resolves_relative_and_typing_only_imports() -> None:
    names = {name for _, name, _ in _imports(TESTING / "session.py")}
    assert "qdb_client.protocol" in names and "qdb_client.testing.methods" in names
    assert ("qdb_client.testing.server", True) in {
        (name, typing) for _, name, typing in _imports(TESTING / "session.py")
    }


def test_testing_imports_only_the_protocol_the_public_api_and_its_dependencies() -> None:
    problems = []
    for path in _modules():
        for line, name, _ in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            top = name.split(".")[0]
            if top == "qdb_client":
                if not name.startswith(("qdb_client.testing.", *(m + "." for m in ALLOWED))) and (
                    name not in ALLOWED and name != "qdb_client.testing"
                ):
                    problems.append(f"{where} imports {name}")
            elif top not in THIRD_PARTY and top not in sys.stdlib_module_names and top:
                problems.append(f"{where} imports {name}")
    assert not problems, "qdb_client.testing must not use driver internals:\n" + "\n".join(problems)


def test_methods_imports_neither_the_node_nor_the_connection() -> None:
    names = {name for _, name, _ in _imports(TESTING / "methods.py")}
    assert not names & {"qdb_client.testing.server", "qdb_client.testing.session"}


def test_session_imports_the_node_for_type_checking_only() -> None:
    runtime = {name for _, name, typing in _imports(TESTING / "session.py") if not typing}
    assert "qdb_client.testing.server" not in runtime


_PROBE = """
import importlib, json, sys, types
# Stub the packages so that their __init__ (which imports everything) does not run.
for name, path in (("qdb_client", sys.argv[1]), ("qdb_client.testing", sys.argv[1] + "/testing")):
    stub = types.ModuleType(name)
    stub.__path__ = [path]
    sys.modules[name] = stub
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by(module: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PACKAGE), module],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {m for m in json.loads(result.stdout) if m.startswith("qdb_client")}


def test_importing_methods_or_session_loads_no_node() -> None:
    methods = _loaded_by("qdb_client.testing.methods")
    assert not methods & {"qdb_client.testing.server", "qdb_client.testing.session"}
    assert "qdb_client.testing.server" not in _loaded_by("qdb_client.testing.session")


def test_importing_the_whole_package_loads_no_driver_internals() -> None:
    # The public modules may use their own internals (errors uses _error_base);
    # what testing adds on top of them must be testing itself.
    public = set().union(*(_loaded_by(m) for m in ALLOWED))
    added = _loaded_by("qdb_client.testing.cluster") - public
    assert added and all(m.startswith("qdb_client.testing") for m in added), sorted(added)
