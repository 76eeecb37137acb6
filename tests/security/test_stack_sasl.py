"""The local stack's SASL listener: its credentials file, its status line, and a broker that
accepts the stack's user on both mechanisms and refuses a wrong password."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from tests.fleet import REPO_ROOT
from tests.security.conftest import SaslCredentials, stack_dir

STACK_SCRIPT = REPO_ROOT / "deploy" / "local" / "stack.py"


def test_credentials_and_config_are_private(sasl_credentials: SaslCredentials) -> None:
    kafka_home = stack_dir() / "kafka"
    for name in ("sasl.json", "server.properties"):  # both hold the password
        mode = stat.S_IMODE((kafka_home / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    assert sasl_credentials.username == "embedfleet" and len(sasl_credentials.password) >= 16


def test_status_names_the_sasl_listener(sasl_credentials: SaslCredentials) -> None:
    result = subprocess.run(
        [sys.executable, str(STACK_SCRIPT), "status", "--service", "kafka"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"SASL_PLAINTEXT {sasl_credentials.bootstrap}" in result.stdout, result.stdout
    assert "not open" not in result.stdout
    assert sasl_credentials.password not in result.stdout + result.stderr


async def login(credentials: SaslCredentials, mechanism: str, password: str) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=credentials.bootstrap,
        request_timeout_ms=5000,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_plain_username=credentials.username,
        sasl_plain_password=password,
    )
    try:
        await admin.start()
        await admin.describe_cluster()
    finally:
        await admin.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
async def test_broker_checks_the_password(sasl_credentials: SaslCredentials, mechanism: str) -> None:
    await login(sasl_credentials, mechanism, sasl_credentials.password)
    with pytest.raises(KafkaConnectionError):
        await login(sasl_credentials, mechanism, sasl_credentials.password + "-wrong")
