"""Fixtures for the engine tests: the shared data directory and one built default bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from worker.engine.build import BUILDER_VERSION, build_from_source
from worker.engine.bundle import (
    MANIFEST_FILE,
    Bundle,
    BundleError,
    default_bundle_dir,
    load_bundle,
    sha256_file,
    write_manifest,
)
from worker.engine.embedder import Embedder
from worker.engine.export import WEIGHTS_FILE, default_source_dir


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The default bundle: reuse the built one (`make model`) when it is built from the same
    weights by the same builder version (an older bundle has the older INT8 scheme)."""
    fingerprint = sha256_file(default_source_dir() / WEIGHTS_FILE)
    try:
        existing = load_bundle(default_bundle_dir())
    except BundleError:
        existing = None
    if (
        existing is not None
        and existing.manifest.fingerprint == fingerprint
        and existing.manifest.builder_version == BUILDER_VERSION
    ):
        return existing
    return build_from_source(tmp_path_factory.mktemp("bundle") / "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def fp32(bundle: Bundle) -> Embedder:
    return Embedder.from_bundle(bundle.path, variant="fp32")


@pytest.fixture(scope="session")
def int8(bundle: Bundle) -> Embedder:
    return Embedder.from_bundle(bundle.path, variant="int8")


DeriveBundle = Callable[..., Path]


@pytest.fixture
def derive_bundle(bundle: Bundle, tmp_path: Path) -> DeriveBundle:
    """Make bundles sharing the default bundle's files (symlinks), with manifest changes."""
    counter = iter(range(1_000))

    def make(**changes: Any) -> Path:
        target = tmp_path / f"derived{next(counter)}"
        target.mkdir()
        for item in bundle.path.iterdir():
            if item.name != MANIFEST_FILE:
                (target / item.name).symlink_to(item)
        write_manifest(target, msgspec.structs.replace(bundle.manifest, **changes))
        return target

    return make
