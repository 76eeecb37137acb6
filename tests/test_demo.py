"""The main job (`make run` ends with `embedfleet demo`): two workers, a sample of real texts,
every result back, a summary and the workers' metrics. Run here on a smaller sample. And what
the demo shows of its workers' logs (their own warnings; libraries' stay in the log files)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
from pathlib import Path

from tests.fleet import EMBEDFLEET, free_port
from tests.helpers import load_script
from worker.logs import JsonFormatter

REPO = Path(__file__).resolve().parents[1]
demo = load_script(REPO / "deploy" / "local" / "demo.py", "embedfleet_demo_script")


def test_the_demo_answers_every_text_and_prints_the_summary_and_metrics(
    kafka_bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "EMBEDFLEET_HOME": str(tmp_path),  # where the demo writes its workers' logs
        "EMBEDFLEET_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "EMBEDFLEET_REDIS_URL": redis_url,
        "EMBEDFLEET_MODEL": str(model_dir),
    }
    done = subprocess.run(
        [EMBEDFLEET, "demo", "--limit", "300", "--timeout", "240", "--gateway-port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"results\s+300 of 300 \(0 errors\)", done.stdout), done.stdout[-3000:]
    assert "sample results:" in done.stdout and "cache hit rate" in done.stdout
    assert done.stdout.count("embedfleet_requests_total{") >= 2  # both workers' metrics
    assert "gateway and workers stopped" in done.stdout
    # Off a terminal the progress is plain lines, not one line of carriage returns; library
    # warnings (aiokafka's) go to the log files, not to the output.
    assert "\r" not in done.stdout and "results 300/300\n" in done.stdout
    assert "aiokafka" not in done.stdout + done.stderr
    assert {p.name for p in (tmp_path / "logs").glob("demo-*.log")} >= {"demo-1.log", "demo-2.log"}
    # One request through the gateway's /v1/embeddings, and a curl line to copy.
    assert re.search(r"input\[1\] -> \[[-+]\d\.\d{4}, .*\] \(384 floats\)", done.stdout), done.stdout[-3000:]
    assert re.search(r"curl -s http://127\.0\.0\.1:\d+/v1/embeddings .*\"input\"", done.stdout)


def _formatted(logger: str, level: int, message: str, formatter: logging.Formatter) -> str:
    record = logging.LogRecord(logger, level, __file__, 1, message, None, None)
    return formatter.format(record) + "\n"


# The formats of worker.logs.setup_logging, as the workers and the gateway write them.
TEXT = logging.Formatter("%(asctime)s %(levelname)s [demo-1] %(name)s: %(message)s")
JSON = JsonFormatter("demo-1")


def test_the_demo_shows_the_projects_warnings_and_keeps_library_chatter_in_the_log() -> None:
    for formatter in (TEXT, JSON):
        coordinator = _formatted(
            "aiokafka.consumer.group_coordinator", logging.WARNING, "Heartbeat failed: rebalancing", formatter
        )
        assert not demo.shown(coordinator, True)
        assert not demo.shown(_formatted("uvicorn.error", logging.ERROR, "x", formatter), True)
        assert demo.shown(_formatted("worker.app", logging.WARNING, "Redis is away", formatter), False)
        assert demo.shown(_formatted("producer.gateway.service", logging.ERROR, "x", formatter), False)
        assert not demo.shown(_formatted("worker.app", logging.INFO, "batch done", formatter), True)
    # A traceback's lines go with their record; before any record (a failed start), all is shown.
    assert demo.shown("Traceback (most recent call last):\n", True)
    assert not demo.shown('  File "x.py", line 1\n', False)
    assert demo.shown("error: no model bundle at /x\n", True)


def test_the_log_relay_keeps_everything_in_the_file_and_shows_the_rest(tmp_path: Path) -> None:
    lines = [
        "error: printed before logging started\n",
        _formatted("aiokafka.consumer.group_coordinator", logging.WARNING, "Heartbeat failed", TEXT),
        "  a continuation of the library's record\n",
        _formatted("worker.delivery", logging.WARNING, "a reply topic is missing", TEXT),
        "Traceback (most recent call last):\n",
        _formatted("aiokafka.conn", logging.ERROR, "connection reset", TEXT),
    ]
    source = io.BytesIO("".join(lines).encode())
    terminal = io.StringIO()
    log_file = tmp_path / "demo-1.log"
    relay = demo.LogRelay(source, log_file, terminal)
    relay.join()
    assert log_file.read_text() == "".join(lines)
    assert terminal.getvalue() == lines[0] + lines[3] + lines[4]
