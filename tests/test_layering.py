"""The dependency rules of the tree: core and models are leaves, routers reach Redis only through services."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
STATES = "app.services.queue.states"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute or relative, at any depth of the file."""
    package = ".".join(path.relative_to(APP.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _files(folder: str) -> list[Path]:
    files = sorted((APP / folder).rglob("*.py"))
    assert files, folder
    return files


def _offending(folder: str, forbidden: str, allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out = {}
    for path in _files(folder):
        bad = sorted(
            m for m in _imports(path)
            if (m == forbidden or m.startswith(forbidden + ".")) and not any(
                m == a or m.startswith(a + ".") for a in allowed
            )
        )
        if bad:
            out[str(path.relative_to(APP))] = bad
    return out


def test_core_imports_no_service_and_no_router() -> None:
    assert _offending("core", "app.services") == {}
    assert _offending("core", "app.routers") == {}


def test_models_import_only_the_state_vocabulary() -> None:
    assert _offending("models", "app.services", allowed=(STATES,)) == {}
    assert _offending("models", "app.routers") == {}


def test_states_is_a_leaf() -> None:
    path = APP / "services" / "queue" / "states.py"
    assert {m for m in _imports(path) if m.startswith("app")} == set()


def test_routers_reach_redis_only_through_services() -> None:
    assert _offending("routers", "app.services.queue.store") == {}
    assert _offending("routers", "redis") == {}
    touching = [p.name for p in _files("routers") if "state.redis" in p.read_text() or ".store" in p.read_text()]
    assert touching == []
