"""The package structure the README's module map promises: imports point down only (the
`embedfleet` command in worker/commands -> the worker runtime and the client -> schemas), and
each package has one exception root."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "worker": "worker.errors.WorkerError",
    "producer": "producer.errors.EmbeddingError",
    "schemas": "schemas.errors.SchemaError",
}
# package -> packages it must never import (at any depth, lazily or not)
FORBIDDEN = {"schemas": {"worker", "producer"}, "producer": {"worker"}}


def modules(package: str) -> list[str]:
    found = [package]
    for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
        found.append(info.name)
    return found


def imported_packages(module: str) -> set[str]:
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_only(package: str) -> None:
    offending = {
        module: sorted(imported_packages(module) & FORBIDDEN[package])
        for module in modules(package)
        if imported_packages(module) & FORBIDDEN[package]
    }
    assert offending == {}


def test_only_the_commands_use_the_client() -> None:
    """The `embedfleet` command (worker.commands) sits above both packages; the worker's runtime
    never imports the client."""
    offending = [
        module
        for module in modules("worker")
        if not module.startswith("worker.commands") and "producer" in imported_packages(module)
    ]
    assert offending == []


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_of_a_package_derives_from_its_root(package: str) -> None:
    module_name, _, root_name = ROOTS[package].rpartition(".")
    root = getattr(importlib.import_module(module_name), root_name)
    strays = []
    for name in modules(package):
        if name.startswith("producer.go"):
            continue
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and not issubclass(cls, root):
                strays.append(f"{name}.{cls.__name__}")
    assert strays == []
