"""Shared fixtures: where the real services are, and fresh names so tests never collide.

The services are the project's local stack (`make stack-up`, started by `make test`). A test
that needs them fails with a clear message when they are down: it never mocks them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fleet import Fleet, running_fleet
from tests.helpers import create_topic, delete_topics
from worker.engine.bundle import Bundle, default_bundle_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def _port_of(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def _require_listening(address: str, what: str) -> None:
    host, port = _port_of(address)
    with socket.socket() as sock:
        sock.settimeout(1.0)
        if sock.connect_ex((host, port)) != 0:
            pytest.fail(
                f"{what} is not listening on {address}: start the local stack with "
                "`make stack-up` (make test does this for you)",
                pytrace=False,
            )


# A test that uses any of these (directly or through another fixture) needs the local stack.
STACK_FIXTURES = frozenset({"kafka_bootstrap", "redis_url"})
# A test that uses any of these loads the model bundle (or builds it, a minute or more on a fresh
# clone): seconds each, so `make unit` leaves them to `make test`.
SLOW_FIXTURES = frozenset({"model_dir", "bundle", "mpnet_bundle"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test that needs the stack `stack` and every test that needs the model `slow`,
    so `pytest -m 'not stack and not slow'` (`make unit`) runs the rest in seconds with no stack."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if STACK_FIXTURES & fixtures:
            item.add_marker(pytest.mark.stack)
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    address = os.environ.get("EMBEDFLEET_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    _require_listening(address.split(",")[0], "Kafka")
    return address


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("EMBEDFLEET_REDIS_URL", "redis://127.0.0.1:6379/0")
    hostport = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    _require_listening(hostport, "Redis")
    return url


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared next to the repository (or $EMBEDFLEET_SHARED): reference vectors and corpus."""
    path = Path(os.environ.get("EMBEDFLEET_SHARED", REPO_ROOT.parent / "shared"))
    if not (path / "reference").is_dir():
        pytest.skip(f"the shared reference data is not at {path}; set EMBEDFLEET_SHARED")
    return path


@pytest.fixture
def unique_name() -> Iterator[str]:
    yield f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def topic_factory(kafka_bootstrap: str) -> AsyncIterator[object]:
    """Creates fresh topics for one test and deletes them afterwards."""
    created: list[str] = []

    async def make(partitions: int = 1, configs: dict[str, str] | None = None) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        await create_topic(kafka_bootstrap, name, partitions, configs)
        created.append(name)
        return name

    yield make
    if created:
        await delete_topics(kafka_bootstrap, created)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default bundle, built by `make model` (make test does this first)."""
    path = Path(os.environ.get("EMBEDFLEET_MODEL") or default_bundle_dir())
    if not (path / "manifest.json").exists():
        pytest.fail(
            f"no model bundle at {path}: run `make model` (make test does this for you)", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def mpnet_bundle() -> Bundle:
    """The second model's bundle where `make model MODEL=all-mpnet-base-v2` puts it
    ($EMBEDFLEET_HOME/models/all-mpnet-base-v2): reused when current, else fetched (once, into
    $EMBEDFLEET_HOME/cache) and built there, so a second `make test` builds nothing and the fleet
    tests can start workers with `--model all-mpnet-base-v2`."""
    from worker.engine import build, fetch

    name = fetch.ALL_MPNET_BASE_V2.name
    source = build.source_of(name)
    current = build.current_bundle(default_bundle_dir(name), source, build.ALL_VARIANTS)
    if current is not None:
        return current
    return build.build_from_source(default_bundle_dir(name), source, name)


@pytest.fixture(scope="module")
async def fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """Two real workers on fresh topics, shared by the tests of one module."""
    log_dir = tmp_path_factory.mktemp("fleet-logs")
    async with running_fleet(kafka_bootstrap, redis_url, model_dir, log_dir, workers=2) as running:
        yield running
