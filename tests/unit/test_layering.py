"""The pure layers stay pure: ``qdb_client.protocol`` and ``qdb_client._policies``
import neither trio nor sockets nor a clock, and nothing above them.

Two checks: a scan of every import statement in their source (so a lazy
import inside a function counts too), and a fresh interpreter that imports
both packages and looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qdb_client"

#: Pure package -> qdb_client modules it may import (itself included).
PURE = {
    "protocol": {"qdb_client._error_base", "qdb_client.protocol"},
    "_policies": {
        "qdb_client._error_base",
        "qdb_client.errors",
        "qdb_client.protocol",
        "qdb_client._policies",
    },
}
#: Top-level modules pure code must never import. Time and randomness enter
#: pure code as arguments (``now: float``, a ``random.Random``), I/O not at all.
FORBIDDEN = {"trio", "socket", "ssl", "asyncio", "selectors", "select", "time", "anyio"}


def _pure_packages() -> list[str]:
    return [name for name in PURE if (PACKAGE / name).is_dir()]


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_parts = ["qdb_client", *path.relative_to(PACKAGE).with_suffix("").parts]
    if module_parts[-1] == "__init__":
        module_parts.pop()
        current_package = module_parts
    else:
        current_package = module_parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = current_package[: len(current_package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # ``from . import x`` / ``from .. import x`` may name submodules.
            if not node.module:
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _sources(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def test_pure_packages_exist() -> None:
    assert "protocol" in _pure_packages()


@pytest.mark.parametrize("package", _pure_packages())
def test_pure_package_imports(package: str) -> None:
    allowed = PURE[package]
    problems = []
    for path in _sources(package):
        for line, name in _imports(path, package):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            top = name.split(".")[0]
            if top in FORBIDDEN:
                problems.append(f"{where} imports {name}")
            elif top == "qdb_client" and not any(
                name == ok or name.startswith(ok + ".") for ok in allowed
            ):
                problems.append(f"{where} imports {name} (a layer above {package})")
    assert not problems, "pure code must stay pure:\n" + "\n".join(problems)


def test_import_scan_sees_relative_imports() -> None:
    """The scanner resolves relative imports (else the test above proves nothing)."""
    names = {name for _, name in _imports(PACKAGE / "protocol" / "frames.py", "protocol")}
    assert "qdb_client.protocol.errors" in names
    names = {name for _, name in _imports(PACKAGE / "protocol" / "__init__.py", "protocol")}
    assert "qdb_client.protocol.frames" in names


_PROBE = """
import importlib, json, sys, types
# Import the pure packages without running qdb_client/__init__.py, which
# (rightly) pulls in the trio-based client.
root = types.ModuleType("qdb_client")
root.__path__ = [sys.argv[1]]
sys.modules["qdb_client"] = root
for name in json.loads(sys.argv[2]):
    importlib.import_module("qdb_client." + name)
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_pure_packages_loads_no_io() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PACKAGE), json.dumps(_pure_packages())],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = set(json.loads(result.stdout))
    assert "qdb_client.protocol" in modules
    loaded = {m.split(".")[0] for m in modules}
    assert not loaded & {"trio", "socket", "ssl", "asyncio", "selectors", "sniffio", "outcome"}
    assert not any(m.startswith(("qdb_client._transport", "qdb_client.testing")) for m in modules)
