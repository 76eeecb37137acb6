"""The container image, built (`make image`: podman/buildah from the project's Dockerfile on a
debootstrap'ed bookworm base) and run with `buildah run` (chroot isolation, the host's network)
against the local stack: a worker and a gateway from the image answer real requests.

`make test` builds the image first and names it in EMBEDFLEET_IMAGE; without it (a plain
`pytest`) these tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer import Client
from tests.fleet import Fleet, free_port
from worker.engine import quality

IMAGE = os.environ.get("EMBEDFLEET_IMAGE", "")
pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(
        not IMAGE, reason="no image: `make image` builds it (make test does, and sets EMBEDFLEET_IMAGE)"
    ),
]
RUN = ["buildah", "run", "--isolation", "chroot", "--network", "host"]


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    name = subprocess.run(
        ["buildah", "from", IMAGE], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)


def inside(container: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return subprocess.run(
        [*RUN, *flags, container, "--", *argv], capture_output=True, text=True, timeout=120, check=False
    )


def start(container: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    flags = [f"--env={k}={v}" for k, v in env.items()]
    with log.open("wb") as out:
        return subprocess.Popen([*RUN, *flags, container, "--", *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_http(
    port: int, path: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 90
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK the image declares (``["CMD", ...]``)."""
    inspect = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE], capture_output=True, text=True, check=True
    )
    test: list[str] = json.loads(inspect.stdout)["Docker"]["config"]["Healthcheck"]["Test"]
    return test


def post_embeddings(port: int, texts: list[str]) -> dict[str, Any]:
    body = json.dumps({"model": "all-MiniLM-L6-v2", "input": texts}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer: dict[str, Any] = json.loads(reply.read())
    return answer


def test_the_image_runs_as_its_non_root_user_with_the_bundle_baked_in(container: str) -> None:
    assert inside(container, "id", "-u").stdout.strip() == "10001"
    model = inside(container, "sh", "-c", 'cat "$EMBEDFLEET_MODEL/manifest.json"')
    assert model.returncode == 0, model.stderr
    assert json.loads(model.stdout)["name"] == "all-MiniLM-L6-v2"
    # Installed, not a checkout: the package comes from the venv.
    where = inside(container, "python", "-c", "import worker; print(worker.__file__)")
    assert where.stdout.startswith("/opt/venv/"), where.stdout + where.stderr


async def test_a_worker_and_a_gateway_from_the_image_answer(
    container: str, kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path, shared_dir: Path
) -> None:
    fleet = Fleet(kafka_bootstrap, redis_url, model_dir, tmp_path)
    await fleet.create_topics()
    metrics_port, gateway_port = free_port(), free_port()
    env = {
        key: value
        for key, value in fleet.env().items()
        if key.startswith("EMBEDFLEET_") and key not in {"EMBEDFLEET_MODEL", "EMBEDFLEET_HOME"}
    }
    env |= {"EMBEDFLEET_METRICS_PORT": str(metrics_port), "EMBEDFLEET_METRICS_HOST": "127.0.0.1"}
    worker_log, gateway_log = tmp_path / "worker.log", tmp_path / "gateway.log"
    worker = start(container, ["embedfleet", "worker"], env, worker_log)
    gateway_env = env | {"EMBEDFLEET_GATEWAY_PORT": str(gateway_port)}
    gateway = start(container, ["embedfleet", "gateway"], gateway_env, gateway_log)
    try:
        started = time.monotonic()
        await asyncio.to_thread(wait_http, metrics_port, "/readyz", worker, worker_log)
        ready_s = time.monotonic() - started
        # The image's HEALTHCHECK command, as the image declares it, run inside it.
        check = await asyncio.to_thread(healthcheck_command)
        assert check[0] == "CMD"
        health = await asyncio.to_thread(
            inside, container, *check[1:], env={"EMBEDFLEET_METRICS_PORT": str(metrics_port)}
        )
        assert health.returncode == 0, health.stderr

        reference = quality.read_reference(shared_dir / "reference" / "all-MiniLM-L6-v2")
        texts, expected = reference.texts[:200], reference.vectors[:200]
        client = Client(fleet.client_config())
        async with client:
            vectors = np.asarray(await client.embed(texts, timeout=120))
        cosines = (vectors * expected).sum(axis=1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
        )
        assert cosines.min() >= 0.99, cosines.min()
        assert client.stats.computed == 200
        assert "model build" not in worker_log.read_text(errors="replace")  # baked in, not built at start
        assert ready_s < 60, ready_s

        await asyncio.to_thread(wait_http, gateway_port, "/readyz", gateway, gateway_log)
        answer = await asyncio.to_thread(post_embeddings, gateway_port, texts[:3])
        got = np.asarray([item["embedding"] for item in answer["data"]], dtype=np.float32)
        assert np.array_equal(got, vectors[:3])  # from the cache the image's worker filled
    finally:
        stop(gateway)
        stop(worker)
        await fleet.cleanup()
