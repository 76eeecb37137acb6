"""The main job (`make run` ends with `embedfleet demo`): two workers, a sample of real texts,
every result back, a summary and the workers' metrics. Run here on a smaller sample. And what
the demo shows of its workers' logs (their own warnings; libraries' stay in the log files)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from schemas.model_routing import DEFAULT_MODEL
from tests.fleet import EMBEDFLEET, free_port
from tests.helpers import load_script
from worker.config import WorkerConfig
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


# Several models: the demo's lanes, without the stack (the bundles are stand-ins: a manifest
# naming the model, the contract's fingerprint faked).
MPNET = "all-mpnet-base-v2"


def _home_with_bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *models: str) -> None:
    monkeypatch.setenv("EMBEDFLEET_HOME", str(tmp_path))
    for model in models:
        (tmp_path / "models" / model).mkdir(parents=True)
        (tmp_path / "models" / model / "manifest.json").write_text(json.dumps({"name": model}))
    monkeypatch.setattr(demo, "load_bundle", lambda path: SimpleNamespace(manifest=Path(path).name))
    monkeypatch.setattr(demo, "serving_fingerprint", lambda manifest, variant: f"fp-{manifest}-{variant}")


def _config(tmp_path: Path, **environ: str) -> WorkerConfig:
    return WorkerConfig.from_env({"EMBEDFLEET_MODEL": str(tmp_path / "models" / DEFAULT_MODEL), **environ})


def test_the_demo_runs_every_built_model_each_on_its_own_topic_and_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home_with_bundles(tmp_path, monkeypatch, DEFAULT_MODEL, MPNET)
    config = _config(tmp_path)
    others = demo.other_models(config, None)
    assert others == [MPNET]
    minilm, mpnet = demo.lanes_for(config, 2, others)
    assert (minilm.model, minilm.default, minilm.ports) == (DEFAULT_MODEL, True, (9401, 9402))
    assert (minilm.requests_topic, minilm.group_id) == ("embed.requests", "embedfleet")
    assert minilm.worker_ids == ["demo-1", "demo-2"]  # as before: demo-1.log, demo-2.log
    assert (mpnet.model, mpnet.default, mpnet.ports) == (MPNET, False, (9403,))
    assert mpnet.bundle == tmp_path / "models" / MPNET
    assert (mpnet.requests_topic, mpnet.group_id) == (f"embed.requests.{MPNET}", f"embedfleet.{MPNET}")
    assert mpnet.fingerprint == f"fp-{MPNET}-{config.variant}" != minilm.fingerprint
    assert mpnet.worker_ids == [f"demo-{MPNET}-1"]
    # The configured model's workers get the environment as before; another model's its bundle,
    # topic and group explicitly (they win over a configured topic or group).
    monkeypatch.setenv("EMBEDFLEET_REQUESTS_TOPIC", "jobs")
    env = demo.worker_env(mpnet, 9403, "1")
    assert env["EMBEDFLEET_MODEL"] == str(mpnet.bundle) and env["EMBEDFLEET_METRICS_PORT"] == "9403"
    assert (env["EMBEDFLEET_REQUESTS_TOPIC"], env["EMBEDFLEET_GROUP_ID"]) == (
        mpnet.requests_topic,
        mpnet.group_id,
    )
    assert WorkerConfig.from_env(env).model_name == MPNET
    default_env = demo.worker_env(minilm, 9401, "1")
    assert default_env["EMBEDFLEET_REQUESTS_TOPIC"] == "jobs" and "EMBEDFLEET_GROUP_ID" not in default_env
    changed = {key for key, value in default_env.items() if os.environ.get(key) != value}
    assert changed <= {
        "EMBEDFLEET_METRICS_PORT",
        "EMBEDFLEET_INTRA_OP_THREADS",
        "EMBEDFLEET_INFERENCE_THREADS",
        "EMBEDFLEET_LOG_LEVEL",
    }
    # A configured topic and group are the base of the other models' (as the gateway's).
    based = demo.lanes_for(
        _config(tmp_path, EMBEDFLEET_REQUESTS_TOPIC="jobs", EMBEDFLEET_GROUP_ID="g"), 1, [MPNET]
    )
    assert (based[1].requests_topic, based[1].group_id) == (f"jobs.{MPNET}", f"g.{MPNET}")


def test_the_demo_runs_only_the_configured_model_without_other_bundles_or_with_models_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home_with_bundles(tmp_path, monkeypatch, DEFAULT_MODEL)
    config = _config(tmp_path)
    assert demo.other_models(config, None) == []
    (lane,) = demo.lanes_for(config, 2, [])
    assert lane.default and lane.requests_topic == "embed.requests"
    with pytest.raises(SystemExit, match=f"make model MODEL={MPNET}"):
        demo.other_models(config, [MPNET])
    (tmp_path / "models" / MPNET).mkdir()
    (tmp_path / "models" / MPNET / "manifest.json").write_text("{}")
    assert demo.other_models(config, []) == []  # --models ''
    assert demo.other_models(config, [MPNET, DEFAULT_MODEL]) == [MPNET]


def test_the_summary_of_each_model_gives_its_width(capsys: pytest.CaptureFixture[str]) -> None:
    results = [demo.Received(0.010 * (i + 1), 0.5 + i, i == 0, True, [0.1] * 768) for i in range(3)]
    demo.print_summary(results, 4, demo.widths(results))
    out = capsys.readouterr().out
    assert re.search(r"results\s+3 of 4 \(0 errors\)", out)
    assert "cache hit rate 33.3%" in out and "width          768 floats per vector" in out
    assert re.search(r"throughput\s+1 results/s \(2\.5 s for all\)", out)
    demo.print_summary(results, 3)  # one model: the summary as before, no width line
    assert "width" not in capsys.readouterr().out
    assert demo.widths([demo.Received(0, 0, False, False, None), *results]) == [768]
