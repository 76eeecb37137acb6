"""The main job (`make run` ends with `embedfleet demo`): two workers, a sample of real texts,
every result back, a summary and the workers' metrics. Run here on a smaller sample."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.fleet import EMBEDFLEET, free_port

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_answers_every_text_and_prints_the_summary_and_metrics(
    kafka_bootstrap: str, redis_url: str, model_dir: Path
) -> None:
    env = {
        **os.environ,
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
    # One request through the gateway's /v1/embeddings, and a curl line to copy.
    assert re.search(r"input\[1\] -> \[[-+]\d\.\d{4}, .*\] \(384 floats\)", done.stdout), done.stdout[-3000:]
    assert re.search(r"curl -s http://127\.0\.0\.1:\d+/v1/embeddings .*\"input\"", done.stdout)
