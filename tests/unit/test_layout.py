"""The package layout holds: imports go service -> engine -> runtime, never back; no module
imports one that imports it back; the architecture map names every module.

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


PACKAGES = ("consumer", "producer_sdk", "kafka_common", "gateway", "schemas", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "results" not in path.relative_to(REPO).parts
    }


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (any import, anywhere)."""
    modules = project_modules()
    return {
        name: {imported for imported in imported_modules(path) if imported in modules} - {name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the modules along it, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in visiting:
            return [*visiting[visiting.index(name) :], name]
        if name in done:
            return None
        visiting.append(name)
        for imported in sorted(graph.get(name, ())):
            if (cycle := visit(imported)) is not None:
                return cycle
        visiting.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if (cycle := visit(name)) is not None:
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    """The check itself, on the cycle the service once had."""
    graph = {"delivery": {"tracing"}, "tracing": {"processing", "delivery"}, "processing": set()}
    assert find_cycle(graph) == ["delivery", "tracing", "delivery"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_worker_never_imports_the_client_sdk() -> None:
    """Shared Kafka plumbing lives in kafka_common; the SDK is for callers."""
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in CONSUMER.rglob("*.py")
        for name in imported_modules(path)
        if starts_with_any(name, ("producer_sdk",))
    }
    assert not wrong, sorted(wrong)


# The parts of the SDK a caller uses: the client, a call's options, its results and errors.
GATEWAY_MAY_IMPORT = ("client", "request", "result", "errors")


def test_the_gateway_uses_the_sdk_only_as_a_client() -> None:
    allowed = tuple(f"producer_sdk.{module}" for module in GATEWAY_MAY_IMPORT)
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in (REPO / "gateway").rglob("*.py")
        for name in imported_modules(path)
        if starts_with_any(name, ("producer_sdk",))
        and not starts_with_any(name, allowed)
        and name != "producer_sdk"
    }
    assert not wrong, sorted(wrong)


ARCHITECTURE = REPO / "docs" / "architecture.md"
MAPPED = ("consumer", "producer_sdk", "kafka_common", "gateway")


def architecture_map() -> str:
    """The first code block of docs/architecture.md, which must open the page."""
    lines = ARCHITECTURE.read_text(encoding="utf-8").splitlines()
    opening = lines.index("```")
    assert opening < 10, "the map is the first screen of docs/architecture.md"
    closing = lines.index("```", opening + 1)
    return "\n".join(lines[opening + 1 : closing])


def test_the_architecture_map_names_every_module() -> None:
    words = set(architecture_map().replace("/", " ").split())
    missing = sorted(
        module_name(path)
        for package in MAPPED
        for path in (REPO / package).rglob("*.py")
        if path.stem not in words and path.stem != "__init__"
    )
    assert not missing, f"docs/architecture.md's map does not name: {missing}"
    folders = {p.name for p in (REPO / "deploy").iterdir() if p.is_dir()}
    assert folders <= words, "the map describes every folder of deploy/"
