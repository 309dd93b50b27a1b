"""The package layout holds: imports go service -> engine -> runtime, never back.

Read from the source with ``ast`` (every import, also those inside functions and
``TYPE_CHECKING`` blocks), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONSUMER = REPO / "consumer"
# The wiring at the top of consumer/ may import every layer.
TOP_LEVEL = {
    "__init__",
    "__main__",
    "app",
    "settings",
    "settings_doc",
    "logging_setup",
    "tracing_setup",
}
LAYERS = ("service", "engine", "runtime")
# What each layer must never import (the layers above it, the wiring, the benchmarks).
FORBIDDEN = {
    "service": ("consumer.runtime", "consumer.app", "consumer.settings"),
    "engine": ("consumer.service", "consumer.app", "consumer.settings"),
    "runtime": ("consumer.service", "consumer.engine", "consumer.app", "consumer.settings"),
}
# The engine's threads and queues run without these (the runtime brings torch).
ENGINE_NEVER_IMPORTS = ("torch", "transformers", "aiokafka", "prometheus_client")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(layer: str) -> list[Path]:
    return sorted((CONSUMER / layer).rglob("*.py"))


def starts_with_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_never_imports_the_ones_above_it(layer: str) -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules_of(layer)
        for name in imported_modules(path)
        if starts_with_any(name, FORBIDDEN[layer])
    }
    assert not wrong, sorted(wrong)


def test_the_engine_imports_neither_torch_nor_kafka() -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules_of("engine")
        for name in imported_modules(path)
        if starts_with_any(name, ENGINE_NEVER_IMPORTS)
    }
    assert not wrong, sorted(wrong)


def test_no_runtime_module_is_a_benchmark() -> None:
    """Benchmarks live in benchmarks/; the installed package never imports them."""
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in CONSUMER.rglob("*.py")
        for name in imported_modules(path)
        if starts_with_any(name, ("benchmarks",))
    }
    assert not wrong, sorted(wrong)
    named_like_one = [p.name for p in CONSUMER.rglob("*.py") if "bench" in p.stem]
    assert not named_like_one


def test_the_top_of_consumer_holds_only_the_wiring() -> None:
    modules = {p.stem for p in CONSUMER.glob("*.py")}
    folders = {p.name for p in CONSUMER.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules == TOP_LEVEL
    assert folders == set(LAYERS)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The check itself: a lazy import inside a function is still found."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from consumer.service.worker import Worker\n")
    assert "consumer.service.worker" in imported_modules(module)


def test_the_gateway_needs_only_the_sdk_and_an_http_server() -> None:
    """rerank-gateway installs without the GPU stack: it never imports the worker's code."""
    never = ("consumer", "benchmarks", "torch", "transformers", "pydantic_settings")
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in (REPO / "gateway").rglob("*.py")
        for name in imported_modules(path)
        if starts_with_any(name, never)
    }
    assert not wrong, sorted(wrong)


def test_test_modules_have_unique_names() -> None:
    """The test folders are not packages: pytest cannot collect two files of one name."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
