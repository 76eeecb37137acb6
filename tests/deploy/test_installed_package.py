"""The package as `pip install .` (not editable) installs it, the way the Dockerfile does: it
carries the worker, the client and the wire contract, no local-dev tooling, and its commands
find the checkout's state and tooling from the working directory, not from where they are
installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A non-editable install of this checkout into its own directory (dependencies come from the
    test's environment); ``<dir>/bin/embedfleet`` is its command."""
    target = tmp_path_factory.mktemp("installed")
    # Built from a copy of what the package is made of, so the build leaves nothing in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("worker", "producer", "schemas"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "go"))
    pip_install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_install, "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    yield target


def embedfleet(
    installed: Path, *args: str, cwd: Path, home: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDFLEET_HOME", "EMBEDFLEET_MODEL")}
    env["PYTHONPATH"] = str(installed)
    env["HOME"] = str(installed / "home")
    if home is not None:
        env["EMBEDFLEET_HOME"] = home
    return subprocess.run(
        [sys.executable, "-c", "import sys; from worker.commands import main; sys.exit(main())", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_package_is_the_one_imported_and_holds_no_local_dev_tooling(installed: Path) -> None:
    where = embedfleet(installed, "--help", cwd=installed)
    assert where.returncode == 0 and "stack" in where.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import worker; print(worker.__file__)"],
        env={**os.environ, "PYTHONPATH": str(installed)},
        cwd=installed,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(installed))
    files = {p.relative_to(installed).as_posix() for p in installed.rglob("*.py")}
    assert "worker/app.py" in files and "producer/client.py" in files and "schemas/messages.py" in files
    assert not any(f.startswith("deploy/") or f.endswith(("/stack.py", "/demo.py")) for f in files), files


def test_inside_a_checkout_the_commands_use_its_state_like_the_makefile(installed: Path) -> None:
    config = embedfleet(installed, "worker", "--print-config", cwd=REPO / "worker")
    assert config.returncode == 0, config.stderr
    assert str(REPO / ".state" / "models" / "all-MiniLM-L6-v2") in config.stdout
    status = embedfleet(installed, "stack", "status", cwd=REPO)
    assert status.returncode in (0, 1), status.stderr  # 1: not running; either way it ran
    assert str(REPO / ".state" / "stack") in status.stdout + status.stderr
    demo = embedfleet(installed, "demo", "--help", cwd=REPO / "tests")
    assert demo.returncode == 0 and "--limit" in demo.stdout, demo.stderr


def test_outside_a_checkout_state_is_per_user_and_tooling_says_where_to_run(
    installed: Path, tmp_path: Path
) -> None:
    config = embedfleet(installed, "worker", "--print-config", cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    assert str(installed / "home" / ".cache" / "embedfleet" / "models") in config.stdout
    assert (
        str(tmp_path / "h" / "models")
        in embedfleet(installed, "worker", "--print-config", cwd=tmp_path, home=str(tmp_path / "h")).stdout
    )
    for command in (("stack", "status"), ("demo",)):
        outside = embedfleet(installed, *command, cwd=tmp_path)
        assert outside.returncode == 2
        lines = outside.stderr.strip().splitlines()
        assert len(lines) == 1 and "source checkout" in lines[0] and "Traceback" not in outside.stderr
