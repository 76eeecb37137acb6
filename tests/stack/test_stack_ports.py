"""`embedfleet stack up` on a port some other process holds: one line naming the setting to
change, exit status 1, no traceback (needs no running stack: the port check comes first)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.fleet import EMBEDFLEET

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("service", "flag", "setting"),
    [("kafka", "--kafka-port", "EMBEDFLEET_KAFKA_PORT"), ("redis", "--redis-port", "EMBEDFLEET_REDIS_PORT")],
)
def test_a_taken_port_is_a_one_line_error_naming_the_setting(
    service: str, flag: str, setting: str, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [EMBEDFLEET, "stack", "up", "--service", service, flag, str(port), "--state-dir", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is taken" in lines[0] and setting in lines[0], done.stderr
    assert "Traceback" not in done.stderr
