"""Layers only look down, and the pure layers stay pure.

``qdb_client.protocol`` and ``qdb_client._policies`` import neither trio nor
sockets nor a clock, and nothing above them: a scan of every import
statement in their source (so a lazy import inside a function counts too),
and a fresh interpreter that imports both packages and looks at
``sys.modules``. Every other driver module imports only the layers below
its own (``LAYERS``), and ``qdb_client.testing`` only the protocol and the
public API, never a private module of the client.
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


# ------------------------------------------------------------ every layer

#: The driver's layers, bottom first. A module may import modules of lower
#: layers and of its own package, never a layer above it (docs: architecture).
LAYERS: list[set[str]] = [
    {"_error_base", "_version", "_nursery", "_metrics", "metrics", "_preview"},
    {"protocol"},
    {"errors"},
    {"validation", "values"},
    {"uri"},
    {"_options"},
    {"config", "results", "events"},
    {"_arguments"},
    {"_policies"},
    {"_transport"},
    {"_pool"},
    {"_cluster"},
    {"_request"},
    {"_streams"},
    {"_transaction", "_prepared"},
    {"_client_core"},
    {"_client"},
    {"__init__"},
    # Applications of the public API shipped with it (the qdb command, the saga
    # helper, the exporters): they use qdb_client as any application would.
    {"cli", "saga", "prometheus", "otel"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    """``qdb_client.x.y`` -> ``x``; ``__init__`` for the package itself and for a
    name imported from it (``from qdb_client import open_client``)."""
    parts = module.split(".")
    if len(parts) < 2:
        return "__init__"
    name = parts[1]
    is_module = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()
    return name if is_module else "__init__"


def _driver_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts)


def test_every_driver_module_belongs_to_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in _driver_sources()}
    assert tops - {"py"} <= set(RANK), f"modules without a layer: {tops - set(RANK)}"


@pytest.mark.parametrize(
    "path", _driver_sources(), ids=lambda p: str(p.relative_to(PACKAGE.parent))
)
def test_layers_only_look_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    rank = RANK[own]
    problems = []
    for line, name in _imports(path, own):
        if name.split(".")[0] != "qdb_client":
            continue
        other = _top(name)
        if other == own:
            continue
        if other == "testing" or RANK.get(other, len(LAYERS)) >= rank:
            problems.append(f"line {line}: {name} is not below {own}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted((PACKAGE / "testing").rglob("*.py")), ids=lambda p: p.name)
def test_testing_uses_only_the_protocol_and_the_public_api(path: Path) -> None:
    """``qdb_client.testing`` checks the wire contract for real: it may use the
    protocol layer and public modules, never the client's internals."""
    problems = [
        f"line {line}: {name}"
        for line, name in _imports(path, "testing")
        if name.split(".")[0] == "qdb_client"
        and _top(name) != "testing"
        and _top(name).startswith("_")
    ]
    assert not problems, "private imports in qdb_client.testing:\n" + "\n".join(problems)
