"""Fixtures for the security tests: the local stack's SASL user, fresh fleets, Redis ACL users.

The SASL listener and its credentials come from the local stack (`deploy/local/stack.py` writes
``$EMBEDFLEET_HOME/stack/kafka/sasl.json``). Nothing is mocked: a missing listener fails the tests
with what to run.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.fleet import Fleet, WorkerProcess


@dataclass(frozen=True)
class SaslCredentials:
    bootstrap: str
    username: str
    password: str

    def worker_env(self, mechanism: str, *, password: str | None = None) -> dict[str, str]:
        return {
            "EMBEDFLEET_KAFKA_BOOTSTRAP": self.bootstrap,
            "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "EMBEDFLEET_KAFKA_SASL_MECHANISM": mechanism,
            "EMBEDFLEET_KAFKA_SASL_USERNAME": self.username,
            "EMBEDFLEET_KAFKA_SASL_PASSWORD": self.password if password is None else password,
        }


def stack_dir() -> Path:
    if os.environ.get("EMBEDFLEET_STACK_DIR"):
        return Path(os.environ["EMBEDFLEET_STACK_DIR"])
    home = os.environ.get("EMBEDFLEET_HOME") or str(Path.home() / ".cache" / "embedfleet")
    return Path(home) / "stack"


@pytest.fixture(scope="session")
def sasl_credentials(kafka_bootstrap: str) -> SaslCredentials:
    path = stack_dir() / "kafka" / "sasl.json"
    restart = (
        "`embedfleet stack down --service kafka && embedfleet stack up` "
        "(a broker started before SASL was configured has no SASL listener)"
    )
    if not path.exists():
        pytest.fail(f"no SASL credentials at {path}: restart the local stack with {restart}", pytrace=False)
    record = json.loads(path.read_text())
    host, _, port = record["bootstrap"].rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(1.0)
        if sock.connect_ex((host, int(port))) != 0:
            pytest.fail(
                f"no SASL listener on {record['bootstrap']}: restart the local stack with {restart}",
                pytrace=False,
            )
    return SaslCredentials(record["bootstrap"], record["username"], record["password"])


FleetFactory = Callable[..., Awaitable[Fleet]]


async def wait_exit(worker: WorkerProcess, timeout_s: float) -> bool:
    """Whether the worker process exits within ``timeout_s``."""
    try:
        await asyncio.to_thread(worker.process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.fixture
async def make_fleet(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> AsyncIterator[FleetFactory]:
    """Fresh topics (created over PLAINTEXT); the test starts its workers with its own env."""
    fleets: list[Fleet] = []

    async def make(**extra_env: str) -> Fleet:
        fleet = Fleet(
            kafka_bootstrap,
            redis_url,
            model_dir,
            tmp_path / f"fleet-{len(fleets)}",
            extra_env=dict(extra_env),
        )
        await fleet.create_topics()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop_all()
        await fleet.cleanup()


@dataclass(frozen=True)
class RedisUser:
    username: str
    password: str


@pytest.fixture
def redis_acl_user(redis_url: str) -> Iterator[RedisUser]:
    """A Redis ACL user with a password, made through the default connection; deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    user = RedisUser(f"embedfleet-test-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(18))
    client.acl_setuser(
        user.username,
        enabled=True,
        reset=True,
        passwords=[f"+{user.password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-@dangerous"],
    )
    try:
        yield user
    finally:
        client.acl_deluser(user.username)
        client.close()
