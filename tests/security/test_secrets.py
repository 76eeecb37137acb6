"""Credentials never reach the worker's log or its printed configuration."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

from tests.fleet import EMBEDFLEET, REPO_ROOT, FleetIO
from tests.security.conftest import FleetFactory, RedisUser, SaslCredentials


async def test_worker_never_logs_its_passwords(
    make_fleet: FleetFactory, sasl_credentials: SaslCredentials, redis_acl_user: RedisUser
) -> None:
    fleet = await make_fleet()
    env = {
        **sasl_credentials.worker_env("SCRAM-SHA-512"),
        "EMBEDFLEET_REDIS_USERNAME": redis_acl_user.username,
        "EMBEDFLEET_REDIS_PASSWORD": redis_acl_user.password,
        "EMBEDFLEET_LOG_LEVEL": "DEBUG",
    }
    worker = fleet.start_worker(env=env)
    await fleet.wait_ready([worker])
    async with FleetIO(fleet) as io:
        await io.wait_for(await io.send_texts(["secret check one", "secret check two"]), timeout_s=60)
        await io.send(b"\xff not a request")  # an error path too
        await io.wait_for_dead_letters(1)
    assert fleet.stop_worker(worker) == 0
    log = worker.log()
    assert "started" in log  # the log is really there, at DEBUG
    for secret in (sasl_credentials.password, redis_acl_user.password):
        assert secret not in log


def test_print_config_masks_the_passwords() -> None:
    kafka_password, redis_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "EMBEDFLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "EMBEDFLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "EMBEDFLEET_KAFKA_SASL_USERNAME": "embedfleet",
        "EMBEDFLEET_KAFKA_SASL_PASSWORD": kafka_password,
        "EMBEDFLEET_REDIS_USERNAME": "cache-user",
        "EMBEDFLEET_REDIS_PASSWORD": redis_password,
    }
    result = subprocess.run(
        [EMBEDFLEET, "worker", "--print-config"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = json.loads(result.stdout)
    assert shown["kafka_sasl_password"] == "***" and shown["redis_password"] == "***"
    assert shown["kafka_sasl_username"] == "embedfleet" and shown["redis_username"] == "cache-user"
    for secret in (kafka_password, redis_password):
        assert secret not in result.stdout + result.stderr
