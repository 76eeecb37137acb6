"""Workers log in to Kafka with SASL (SCRAM-SHA-512, PLAIN) on the local stack's SASL listener.

The tests produce and read over PLAINTEXT (9092) like any other client; only the worker under test
goes through SASL_PLAINTEXT (9094), as the stack's user ``embedfleet``.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fleet import FleetIO
from tests.security.conftest import FleetFactory, SaslCredentials, wait_exit

EXIT_WITHIN_S = 30.0


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
async def test_worker_over_sasl_processes_requests(
    make_fleet: FleetFactory, sasl_credentials: SaslCredentials, mechanism: str
) -> None:
    fleet = await make_fleet()
    worker = fleet.start_worker(env=sasl_credentials.worker_env(mechanism))
    await fleet.wait_ready([worker])
    async with FleetIO(fleet) as io:
        ids = await io.send_texts([f"sasl {mechanism} text {i}" for i in range(5)])
        results = await io.wait_for(ids, timeout_s=60)
    assert all("error" not in r and len(r["vector"]) == 384 for r in results.values()), results
    assert fleet.stop_worker(worker) == 0
    assert "SaslAuthenticationFailed" not in worker.log()


async def test_wrong_sasl_password_exits_with_a_clear_error(
    make_fleet: FleetFactory, sasl_credentials: SaslCredentials
) -> None:
    fleet = await make_fleet()
    wrong = "not-the-password-" + sasl_credentials.password[:4][::-1]
    async with FleetIO(fleet) as io:
        ids = await io.send_texts(["must not be processed"])
        worker = fleet.start_worker(env=sasl_credentials.worker_env("SCRAM-SHA-512", password=wrong))
        exited = await wait_exit(worker, EXIT_WITHIN_S)
        assert exited, f"worker still running after {EXIT_WITHIN_S:.0f}s:\n{worker.log()[-2000:]}"
        await asyncio.sleep(1.0)
        assert not any(i in io.results for i in ids), "a worker that cannot log in produced a result"
    log = worker.log()
    assert worker.process.returncode != 0, log
    assert "authentication" in log.lower(), log
    assert "Traceback" not in log, log
    assert wrong not in log and sasl_credentials.password not in log
