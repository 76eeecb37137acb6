"""The stack's process tracking (deploy/local/stack.py TrackedProcess), on real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.stack.test_cluster_id import load_stack_script


def test_a_started_process_is_not_taken_for_exited_until_it_has(tmp_path: Path) -> None:
    """Right after its exec a process's /proc/<pid>/cmdline can read empty, which failed `stack
    up` for Toxiproxy ('exited during start') while it was starting fine: only /proc/<pid> and
    its state may say a process has gone."""
    stack = load_stack_script()
    tracked = stack.TrackedProcess("sleeper", tmp_path / "sleeper.pid", "sleeper-marker")
    for _ in range(20):  # the race is narrow: start many
        pid = tracked.start(
            [sys.executable, "-c", "import time, sys; time.sleep(30)", "sleeper-marker"],
            tmp_path / "sleeper.log",
            {},
        )
        assert not tracked.exited_during_start(), "a running process taken for exited"
        subprocess.run(["kill", str(pid)], check=True)
        deadline = time.monotonic() + 10
        while not tracked.exited_during_start():
            assert time.monotonic() < deadline, "an exited process taken for running"
            time.sleep(0.05)
    (tmp_path / "sleeper.pid").unlink()
    assert tracked.exited_during_start()  # no PID file: nothing running
