"""The worker logs in to Redis as an ACL user: right password -> the cache serves repeats;
wrong password -> the worker refuses to run instead of silently computing without its cache."""

from __future__ import annotations

import asyncio

from tests.fleet import FleetIO
from tests.security.conftest import FleetFactory, RedisUser, wait_exit

EXIT_WITHIN_S = 30.0


async def test_worker_with_redis_acl_user_uses_the_cache(
    make_fleet: FleetFactory, redis_acl_user: RedisUser
) -> None:
    fleet = await make_fleet()
    worker = fleet.start_worker(
        env={
            "EMBEDFLEET_REDIS_USERNAME": redis_acl_user.username,
            "EMBEDFLEET_REDIS_PASSWORD": redis_acl_user.password,
        }
    )
    await fleet.wait_ready([worker])
    text = f"redis acl cache check {fleet.tag}"
    async with FleetIO(fleet) as io:
        first = (await io.wait_for(await io.send_texts([text]), timeout_s=60)).popitem()[1]
        second = (await io.wait_for(await io.send_texts([text]), timeout_s=60)).popitem()[1]
    assert "error" not in first and not first.get("cached"), first
    assert second.get("cached") is True, second
    assert worker.metric("embedfleet_cache_errors_total") == 0, worker.log()[-2000:]
    assert fleet.stop_worker(worker) == 0


async def test_wrong_redis_password_stops_the_worker(
    make_fleet: FleetFactory, redis_acl_user: RedisUser
) -> None:
    fleet = await make_fleet()
    wrong = "wrong-" + redis_acl_user.password[::-1]
    async with FleetIO(fleet) as io:
        ids = await io.send_texts(["must not be processed without the cache login"])
        worker = fleet.start_worker(
            env={"EMBEDFLEET_REDIS_USERNAME": redis_acl_user.username, "EMBEDFLEET_REDIS_PASSWORD": wrong}
        )
        # Until the worker exits, or (the failure) answers the request anyway.
        for _ in range(int(EXIT_WITHIN_S / 0.5)):
            if await wait_exit(worker, 0.5) or any(i in io.results for i in ids):
                break
        exited = await wait_exit(worker, 0.1)
        await asyncio.sleep(0.5)
        processed = any(i in io.results for i in ids)
    log = worker.log()
    assert wrong not in log and redis_acl_user.password not in log
    assert exited, f"worker still running after {EXIT_WITHIN_S:.0f}s:\n{log[-2000:]}"
    assert not processed, "a worker that cannot log in to Redis processed a request"
    assert worker.process.returncode != 0, log
    assert "redis" in log.lower() and "authentication" in log.lower(), log
    assert "Traceback" not in log, log
