"""Slow and broken connections, through the stack's fault proxy (Toxiproxy, `tests/toxiproxy.py`).

Two workers reach Kafka and Redis only through Toxiproxy (the broker's PROXIED listener advertises
the proxy's port, so the workers' reconnections stay behind it); the test's own producer and
reader go to the broker directly, so the stall it measures is the workers'. Each scenario sends
2000 good requests at a steady rate (a quarter of them repeat a text sent 100 requests earlier, so
the cache is read as well as written) so that requests are in flight for the whole fault, then
audits the real results topic per id: every id answered, no error result, duplicates counted (0
where nothing forces a redelivery, and in exactly-once mode), repeated texts answered with the
same vector (a cache reply read by the wrong command would give a text another text's vector),
both workers alive, and the fault seen by the workers (their error counters moved).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.faults.conftest import FaultLedger, FaultReport, audit_fleet, scenario_texts
from tests.fleet import EMBEDFLEET, REPO_ROOT, Fleet, FleetIO
from tests.stack.test_cluster_id import load_stack_script
from tests.toxiproxy import AcceptedConnections, Toxiproxy

REQUESTS = 2000
RATE = 50.0  # requests per second: 40 s of traffic, so the 20 s faults hit requests in flight
FAULT_S = 20.0
# Counters whose movement shows that a fault reached the workers.
CACHE_ERRORS = "embedfleet_cache_errors_total"
FETCH_ERRORS = "embedfleet_fetch_errors_total"
PUBLISH_RETRIES = "embedfleet_publish_retries_total"
ASSIGNMENTS = "embedfleet_assignments_total"


@pytest.fixture
async def toxiproxy() -> AsyncIterator[Toxiproxy]:
    """The stack's Toxiproxy, without toxics before and after the test."""
    proxy = Toxiproxy()
    try:
        await proxy.version()
    except httpx.HTTPError:
        pytest.fail(
            f"Toxiproxy is not answering on {proxy.api}: start the local stack with `make stack-up` "
            "(make test does this for you)",
            pytrace=False,
        )
    await proxy.reset()
    yield proxy
    await proxy.reset()


StartProxied = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def proxied(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path, toxiproxy: Toxiproxy
) -> AsyncIterator[StartProxied]:
    """Starts proxied fleets for one test (worker env as keywords); stops and cleans them after."""
    started: list[Fleet] = []

    async def start(**env: str) -> Fleet:
        fleet = await proxied_fleet(kafka_bootstrap, redis_url, model_dir, tmp_path, toxiproxy, **env)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        fleet.stop_all()
        await fleet.cleanup()


async def proxied_fleet(
    kafka_bootstrap: str,
    redis_url: str,
    model_dir: Path,
    log_dir: Path,
    toxiproxy: Toxiproxy,
    **env: str,
) -> Fleet:
    """Two workers whose Kafka and Redis connections all go through Toxiproxy; the fleet's own
    address (topics, the test's IO, the audit, cleanup) stays direct."""
    fleet = Fleet(
        kafka_bootstrap,
        redis_url,
        model_dir,
        log_dir,
        extra_env={
            "EMBEDFLEET_KAFKA_BOOTSTRAP": await toxiproxy.address("kafka"),
            "EMBEDFLEET_REDIS_URL": f"redis://{await toxiproxy.address('redis')}/0",
            **env,
        },
    )
    await fleet.create_topics()
    for _ in range(2):
        fleet.start_worker()
    await fleet.wait_ready()
    return fleet


def proxy_texts(shared_dir: Path, count: int = REQUESTS, lag: int = 100) -> list[str]:
    """Fresh texts (cache misses), every fourth one after the first ``lag`` a repeat of the text
    sent ``lag`` requests earlier (about 2 s before: a cache hit when the cache answers)."""
    fresh = scenario_texts(shared_dir, count)
    texts: list[str] = []
    for i in range(count):
        texts.append(texts[i - lag] if i >= lag and i % 4 == 3 else fresh[i])
    return texts


@dataclass
class PacedRun:
    ids: list[str]
    results: dict[str, list[dict[str, Any]]]
    stall: float  # the longest gap between results after the fault began
    answered_during: int  # results that arrived while the fault was on
    reconnections: Counter[str]  # connections Toxiproxy accepted per proxy while the fault was on
    notes: str


async def run_paced(
    fleet: Fleet,
    texts: list[str],
    fault: Callable[[], Awaitable[str]],
    *,
    rate: float = RATE,
    start_at: float = 0.2,
    timeout_s: float = 300,
) -> PacedRun:
    """Sends ``texts`` at ``rate`` per second; once ``start_at`` of them are answered, runs
    ``fault`` (while the rest are still being sent); then waits for every id."""
    async with FleetIO(fleet) as io:
        ids: list[str] = []

        async def send_all() -> None:
            chunk = 10
            started = time.monotonic()
            for n in range(0, len(texts), chunk):
                ids.extend(await io.send_texts(texts[n : n + chunk]))
                # On schedule: a slow send does not lower the rate.
                await asyncio.sleep(max(0.0, started + (n + chunk) / rate - time.monotonic()))

        sender = asyncio.create_task(send_all())
        try:
            deadline = time.monotonic() + timeout_s
            while sum(1 for i in ids if i in io.results) < len(texts) * start_at:
                assert time.monotonic() < deadline, "the fleet never got going"
                if sender.done():
                    sender.result()  # raises what stopped the sender
                await asyncio.sleep(0.05)
            fault_at = time.monotonic()
            accepted = AcceptedConnections()
            notes = await fault()
            fault_end = time.monotonic()
            reconnections = accepted.count()
            await sender
        finally:
            sender.cancel()
        await io.wait_for(ids, timeout_s=timeout_s)
        after = sorted(t for t in io.arrivals if t >= fault_at)
        gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
        during = sum(1 for t in io.arrivals if fault_at <= t < fault_end)
        return PacedRun(list(ids), dict(io.results), max(gaps, default=0.0), during, reconnections, notes)


def _vector(result: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    if result.get("vector") is not None:
        return np.asarray(result["vector"], np.float32)
    if result.get("vector_b64"):
        return np.frombuffer(base64.b64decode(result["vector_b64"]), "<f4")
    return None


def vector_check(results: dict[str, list[dict[str, Any]]]) -> tuple[int, int, int]:
    """(texts answered more than once, those answered with differing vectors, cached answers)."""
    by_key: dict[str, list[np.ndarray[Any, np.dtype[np.float32]]]] = {}
    cached = 0
    for answers in results.values():
        for result in answers:
            vector = _vector(result)
            if vector is None or result.get("error"):
                continue
            cached += bool(result.get("cached"))
            by_key.setdefault(str(result.get("key")), []).append(vector)
    repeated = [vectors for vectors in by_key.values() if len(vectors) > 1]
    differing = 0
    for first, *others in repeated:
        cosines = [float(first @ v) / float(np.linalg.norm(first) * np.linalg.norm(v)) for v in others]
        differing += min(cosines) < 0.999
    return len(repeated), differing, cached


@dataclass
class Counters:
    values: dict[str, float]

    @classmethod
    def read(cls, fleet: Fleet) -> Counters:
        return cls(
            {name: fleet.metric(name) for name in (CACHE_ERRORS, FETCH_ERRORS, PUBLISH_RETRIES, ASSIGNMENTS)}
        )

    def since(self, earlier: Counters) -> dict[str, float]:
        return {name: self.values[name] - earlier.values[name] for name in self.values}


async def check_and_record(
    ledger: FaultLedger,
    scenario: str,
    fleet: Fleet,
    run: PacedRun,
    moved: dict[str, float],
    *,
    duplicates_allowed: bool,
) -> FaultReport:
    """Audits the real topics, records the report row, then asserts what must hold for any fault."""
    found = await audit_fleet(fleet)
    errors = found.error_codes(run.ids)
    repeated, differing, cached = vector_check(run.results)
    row = FaultReport(
        scenario,
        len(run.ids),
        found.answered(run.ids),
        found.missing(run.ids),
        found.duplicates(run.ids),
        run.stall,
        f"{run.notes}; {run.answered_during} answered during the fault; cached {cached}; "
        f"reconnections kafka {run.reconnections['kafka']}, redis {run.reconnections['redis']}; "
        f"cache errors {moved[CACHE_ERRORS]:.0f}, fetch errors {moved[FETCH_ERRORS]:.0f}, "
        f"publish retries {moved[PUBLISH_RETRIES]:.0f}, new assignments {moved[ASSIGNMENTS]:.0f}",
        errors=sum(errors.values()),
        dlq=len(found.dead_letters),
        peak_rss_mb=fleet.peak_rss_mb(),
    )
    ledger.rows.append(row)
    exited = [f"{w.name}: {w.process.returncode}\n{w.log()[-2000:]}" for w in fleet.workers if not w.alive]
    assert not exited, "a worker exited: " + "\n".join(exited)
    assert row.missing == 0
    assert not errors, f"good requests answered with errors: {dict(errors)}"
    assert row.dlq == 0, found.dlq_codes()
    assert differing == 0, f"{differing} of {repeated} repeated texts got different vectors"
    if not duplicates_allowed:
        assert row.duplicates == 0
    return row


# --- the stack's wiring -----------------------------------------------------------------------


def test_the_single_node_has_a_listener_behind_the_proxy_and_a_cluster_has_none(tmp_path: Path) -> None:
    stack = load_stack_script()
    credentials = stack.SaslCredentials("embedfleet", "pw-" + "x" * 20)

    def listeners(brokers: int, kafka_port: int) -> dict[str, str]:
        settings = stack.StackSettings(
            state_dir=tmp_path / str(brokers), kafka_port=kafka_port, controller_port=kafka_port + 1,
            redis_port=6379, sasl_port=kafka_port + 2, kafka_heap="256m", kafka_brokers=brokers,
        )  # fmt: skip
        node = stack.KafkaService(settings, 1, brokers)
        node.home.mkdir(parents=True, exist_ok=True)
        node.render_config(credentials)
        pairs = (line.split("=", 1) for line in node.config.read_text().splitlines() if line[:1] not in "#")
        return {k: v for k, v in pairs if k.startswith(("listeners", "advertised", "listener.security"))}

    single = listeners(1, 9092)
    assert "PROXIED://127.0.0.1:9095" in single["listeners"]
    assert "PROXIED://127.0.0.1:9096" in single["advertised.listeners"]  # the proxy's port
    assert "PROXIED:PLAINTEXT" in single["listener.security.protocol.map"]
    clustered = listeners(3, 19092)
    assert all("PROXIED" not in value for value in clustered.values())
    default_ports = stack.StackSettings(
        state_dir=tmp_path, kafka_port=9092, controller_port=9093, redis_port=6379, sasl_port=9094,
        kafka_heap="1g",
    )  # fmt: skip
    toxiproxy = stack.ToxiproxyService(default_ports)
    assert {p["name"]: (p["listen"], p["upstream"]) for p in toxiproxy.proxies()} == {
        "kafka": ("127.0.0.1:9096", "127.0.0.1:9095"),
        "redis": ("127.0.0.1:6380", "127.0.0.1:6379"),
    }


def test_a_taken_toxiproxy_port_is_a_one_line_error_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [EMBEDFLEET, "stack", "up", "--service", "toxiproxy", "--toxiproxy-port", str(port),
             "--state-dir", str(tmp_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is taken" in lines[0], done.stderr
    assert "EMBEDFLEET_TOXIPROXY_PORT" in lines[0] and "Traceback" not in done.stderr


async def test_clients_that_bootstrap_through_the_proxy_stay_behind_it(
    kafka_bootstrap: str, toxiproxy: Toxiproxy
) -> None:
    address = await toxiproxy.address("kafka")
    admin = AIOKafkaAdminClient(bootstrap_servers=address, request_timeout_ms=10000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    assert {f"{b['host']}:{b['port']}" for b in cluster["brokers"]} == {address}


# --- faults -----------------------------------------------------------------------------------


async def test_redis_answering_300_ms_late_for_20_s(
    proxied: StartProxied,
    shared_dir: Path,
    toxiproxy: Toxiproxy,
    fault_ledger: FaultLedger,
) -> None:
    fleet = await proxied()
    before = Counters.read(fleet)

    async def late_redis() -> str:
        async with toxiproxy.toxic("redis", "latency", stream="downstream", latency=300):
            await asyncio.sleep(FAULT_S)
        return f"every Redis reply 300 ms late for {FAULT_S:.0f} s (the cache's timeout is 250 ms)"

    run = await run_paced(fleet, proxy_texts(shared_dir), late_redis)
    moved = Counters.read(fleet).since(before)
    await check_and_record(
        fault_ledger, "Redis answering 300 ms late for 20 s", fleet, run, moved, duplicates_allowed=False
    )
    assert moved[CACHE_ERRORS] > 0, "the cache never saw the late replies"
    assert moved[ASSIGNMENTS] == 0, "a slow cache cost a worker its partitions"
    await wait_cache_up(fleet)


async def test_redis_connections_reset_mid_pipeline(
    proxied: StartProxied,
    shared_dir: Path,
    toxiproxy: Toxiproxy,
    fault_ledger: FaultLedger,
) -> None:
    fleet = await proxied()
    before = Counters.read(fleet)
    rounds = 0

    async def resets() -> str:
        nonlocal rounds
        # A reset on the reply: Redis has run the pipeline (lookups, or the writes of a
        # batch's vectors) and the connection dies before the client reads the answers.
        # In rounds (0.5 s on, 1.5 s off) so that connections come back and die again.
        deadline = time.monotonic() + FAULT_S
        while time.monotonic() < deadline:
            async with toxiproxy.toxic("redis", "reset_peer", stream="downstream", timeout=0):
                await asyncio.sleep(0.5)
            rounds += 1
            await asyncio.sleep(1.5)
        return f"Redis replies reset (RST) in {rounds} rounds of 0.5 s over {FAULT_S:.0f} s"

    run = await run_paced(fleet, proxy_texts(shared_dir), resets)
    moved = Counters.read(fleet).since(before)
    await check_and_record(
        fault_ledger, "Redis connections reset mid-pipeline", fleet, run, moved, duplicates_allowed=False
    )
    assert moved[CACHE_ERRORS] > 0, "no cache operation met a reset"
    assert run.reconnections["redis"] > 0, "the workers never reconnected to Redis"
    assert moved[ASSIGNMENTS] == 0, "Redis resets cost a worker its partitions"
    await wait_cache_up(fleet)


async def wait_cache_up(fleet: Fleet, timeout_s: float = 20) -> None:
    """The cache is used again after the fault (it is retried every second)."""
    deadline = time.monotonic() + timeout_s
    while not all(w.metric("embedfleet_cache_up") == 1 for w in fleet.workers):
        assert time.monotonic() < deadline, "the cache never came back after the fault"
        await asyncio.sleep(0.5)


async def kafka_resets(toxiproxy: Toxiproxy, counts: list[int]) -> str:
    """Every broker reply reset (RST) in rounds of 0.3 s on, 2.7 s off, for FAULT_S: produce
    requests the broker has written but whose acknowledgement never arrives, fetches, heartbeats
    and (exactly-once) transaction calls alike."""
    deadline = time.monotonic() + FAULT_S
    while time.monotonic() < deadline:
        async with toxiproxy.toxic("kafka", "reset_peer", stream="downstream", timeout=0):
            await asyncio.sleep(0.3)
        counts.append(1)
        await asyncio.sleep(2.7)
    return f"broker replies reset (RST) in {len(counts)} rounds of 0.3 s over {FAULT_S:.0f} s"


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_kafka_connections_reset_mid_produce(
    guarantee: str,
    proxied: StartProxied,
    shared_dir: Path,
    toxiproxy: Toxiproxy,
    fault_ledger: FaultLedger,
) -> None:
    fleet = await proxied(EMBEDFLEET_GUARANTEE=guarantee)
    before = Counters.read(fleet)
    rounds: list[int] = []
    run = await run_paced(fleet, proxy_texts(shared_dir), lambda: kafka_resets(toxiproxy, rounds))
    moved = Counters.read(fleet).since(before)
    await check_and_record(
        fault_ledger,
        f"Kafka resets mid-produce ({guarantee})",
        fleet,
        run,
        moved,
        # At-least-once may answer twice after a lost commit; exactly-once never.
        duplicates_allowed=guarantee == "at-least-once",
    )
    # aiokafka retries a reset request by itself, so the workers' counters may not move:
    # the proof that the resets hit is the workers' connections, made again every round.
    assert run.reconnections["kafka"] >= len(rounds), "the resets never hit a broker connection"


# Each worker's results go out on its own producer connection: 50 results/s of ~4.9 KB (float
# JSON) over two workers are ~122 KB/s per connection, so a 50 KB/s link holds back about half of
# them (488 of 1000 answered during the fault in one run). At 100 KB/s, about 860 got through once
# results shrank to the float32 text (issue 21), too close to unhindered to prove the fault bit.
BANDWIDTH_KB_S = 50


async def test_broker_bandwidth_down_to_50_kb_s_for_20_s(
    proxied: StartProxied,
    shared_dir: Path,
    toxiproxy: Toxiproxy,
    fault_ledger: FaultLedger,
) -> None:
    async def narrow() -> str:
        # Both directions of every connection: fetches of requests, and produced results.
        async with (
            toxiproxy.toxic("kafka", "bandwidth", stream="downstream", rate=BANDWIDTH_KB_S),
            toxiproxy.toxic("kafka", "bandwidth", stream="upstream", rate=BANDWIDTH_KB_S),
        ):
            await asyncio.sleep(FAULT_S)
        return f"{BANDWIDTH_KB_S} KB/s each way on every broker connection for {FAULT_S:.0f} s"

    # 1000 requests are sent during the fault; unhindered, about as many are answered (1000-1200
    # in the other scenarios). The narrow link must have held results back (338-517 in runs that
    # it did). Toxiproxy has been seen to leave connections without a toxic (Shopify/toxiproxy
    # #148; once here: all 1000 answered during the fault): such a run proves nothing about the
    # fault, though it is still audited, so the scenario runs once more on a fresh fleet.
    for attempt in (1, 2):
        fleet = await proxied()
        before = Counters.read(fleet)
        run = await run_paced(fleet, proxy_texts(shared_dir), narrow)
        moved = Counters.read(fleet).since(before)
        await check_and_record(
            fault_ledger,
            f"broker bandwidth {BANDWIDTH_KB_S} KB/s for 20 s" + ("" if attempt == 1 else " (run again)"),
            fleet,
            run,
            moved,
            duplicates_allowed=False,
        )
        if run.answered_during < 0.8 * FAULT_S * RATE:
            break
        fleet.stop_all()  # idle from here; the fixture cleans it up
    assert run.answered_during < 0.8 * FAULT_S * RATE, "the bandwidth limit never slowed the results"
