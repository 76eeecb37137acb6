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
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.config import ClientConfig
from tests.fleet import Fleet, WorkerProcess
from tests.helpers import load_script


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


# --- roles (issue 25): principals of their own, enforced by Kafka's authorizer and Redis ACLs ----

ROLES_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "roles.py"
STACK_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.py"
# Two client principals of the tests (besides the stack's embedfleet-client): each owns the reply
# topics {results}.<name>-*, so one can try the other's.
TEST_CLIENTS = ("embedfleet-test-client-a", "embedfleet-test-client-b")


def roles_module() -> Any:
    """deploy/local/roles.py, the one definition of the roles' ACLs and Redis rules."""
    module = sys.modules.get("roles")
    if module is not None and Path(module.__file__ or "") == ROLES_SCRIPT:
        return module
    return load_script(ROLES_SCRIPT, "roles")


@dataclass(frozen=True)
class StackRoles:
    """The role principals `embedfleet stack roles` set up (their passwords from roles.json)."""

    bootstrap: str  # the SASL_PLAINTEXT listener
    kafka_passwords: dict[str, str]  # principal -> password
    redis_url: str

    def kafka_env(self, principal: str) -> dict[str, str]:
        """A worker's (or gateway's) settings to log in as ``principal`` (SCRAM-SHA-512)."""
        return {
            "EMBEDFLEET_KAFKA_BOOTSTRAP": self.bootstrap,
            "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "EMBEDFLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "EMBEDFLEET_KAFKA_SASL_USERNAME": principal,
            "EMBEDFLEET_KAFKA_SASL_PASSWORD": self.kafka_passwords[principal],
        }

    def client_settings(self, principal: str) -> dict[str, Any]:
        """ClientConfig settings of a client logged in as ``principal``."""
        return {
            "kafka_bootstrap": self.bootstrap,
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": principal,
            "kafka_sasl_password": self.kafka_passwords[principal],
            # Its reply topic {results}.<principal>-<id> is under the prefix it owns.
            "client_id": f"{principal}-{uuid.uuid4().hex[:8]}",
        }

    def aiokafka_options(self, principal: str) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": principal,
            "sasl_plain_password": self.kafka_passwords[principal],
        }


@pytest.fixture(scope="session")
def stack_roles(sasl_credentials: SaslCredentials, redis_url: str) -> StackRoles:
    """`embedfleet stack roles` (idempotent) with the tests' two client principals, on the running
    stack: fails with what to run when the broker has no authorizer."""
    done = subprocess.run(
        [sys.executable, str(STACK_SCRIPT), "roles", "--state-dir", str(stack_dir())]
        + [arg for client in TEST_CLIENTS for arg in ("--client", client)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"`embedfleet stack roles` failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}", pytrace=False
        )
    record = json.loads((stack_dir() / "roles.json").read_text())
    passwords = {name: entry["password"] for name, entry in record["kafka"]["users"].items()}
    assert all(p not in done.stdout + done.stderr for p in passwords.values()), "a password was printed"
    return StackRoles(record["kafka"]["bootstrap"], passwords, redis_url)


@dataclass
class SecureFleet:
    """A fleet whose worker and clients log in as their roles, with ACLs for its own topics."""

    fleet: Fleet
    roles: StackRoles
    names: Any  # roles.FleetNames
    redis_worker: RedisUser
    redis_reader: RedisUser
    acls: list[Any]

    @property
    def worker_principal(self) -> str:
        return str(roles_module().WORKER)

    def worker_env(self, **extra: str) -> dict[str, str]:
        return {
            **self.roles.kafka_env(self.worker_principal),
            "EMBEDFLEET_REDIS_USERNAME": self.redis_worker.username,
            "EMBEDFLEET_REDIS_PASSWORD": self.redis_worker.password,
            **extra,
        }

    def client_config(self, principal: str, **overrides: Any) -> ClientConfig:
        """A real producer/client.py config: SCRAM as ``principal``, the read-only Redis user."""
        return self.fleet.client_config(
            **self.roles.client_settings(principal),
            redis_username=self.redis_reader.username,
            redis_password=self.redis_reader.password,
            **overrides,
        )


SecureFleetFactory = Callable[[], Awaitable[SecureFleet]]


@pytest.fixture
async def make_secure_fleet(
    make_fleet: FleetFactory, stack_roles: StackRoles, kafka_bootstrap: str
) -> AsyncIterator[SecureFleetFactory]:
    """Fresh topics; the worker, KEDA and test client principals get the ACLs of their roles for
    these topics only, and two Redis users (worker, read-only reader) for this cache prefix.
    Everything granted is revoked afterwards."""
    roles = roles_module()
    made: list[SecureFleet] = []
    admin = {"bootstrap_servers": kafka_bootstrap}  # PLAINTEXT: a super user
    client = redis.Redis.from_url(stack_roles.redis_url)

    async def make() -> SecureFleet:
        fleet = await make_fleet()
        names = roles.FleetNames.for_fleet(
            fleet.requests_topic, fleet.results_topic, fleet.dlq_topic, fleet.group_id
        )
        roles.check_prefixes(names, TEST_CLIENTS)
        acls = [*roles.worker_acls(roles.WORKER, names), *roles.keda_acls(roles.KEDA, names)]
        for principal in TEST_CLIENTS:
            acls.extend(roles.client_acls(principal, names))
        await roles.grant(admin, acls)
        users = []
        for role, rules in (
            ("w", roles.redis_worker_rules(fleet.cache_prefix)),
            ("r", roles.redis_reader_rules(fleet.cache_prefix)),
        ):
            user = RedisUser(f"embedfleet-test-{role}-{fleet.tag}", secrets.token_urlsafe(18))
            roles.set_redis_user(client, user.username, user.password, rules)
            users.append(user)
        secure = SecureFleet(fleet, stack_roles, names, users[0], users[1], acls)
        made.append(secure)
        # The controller commits the ACLs; the broker's authorizer applies them a moment later.
        await asyncio.sleep(1.0)
        return secure

    try:
        yield make
    finally:
        for secure in made:
            secure.fleet.stop_all()
            await roles.revoke(admin, secure.acls)
            for user in (secure.redis_worker, secure.redis_reader):
                client.acl_deluser(user.username)
        client.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault report's rows of the refused forgeries (tests/faults prints them itself when
    its conftest is loaded in the same run)."""
    from tests.faults import conftest as faults

    if terminalreporter.config.pluginmanager.is_registered(faults) or not SECURITY_ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault-injection report, security rows (sent / answered / error results / missing / duplicates)")
    for row in SECURITY_ROWS:
        write(
            f"{row.scenario:54} {row.sent:6d} {row.answered:9d} {row.errors:6d} {row.missing:8d} "
            f"{row.duplicates:6d}  {row.notes}"
        )


SECURITY_ROWS: list[Any] = []  # FaultReport rows this directory added to the fault ledger
