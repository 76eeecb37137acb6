"""The KRaft cluster id the stack formats with: Kafka's storage tool parses `-t ID` with
argparse4j, so an id that starts with '-' is read as an option and `stack up` fails (this broke
one CI run: 1 random id in 64 starts with '-')."""

import uuid
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import load_script

STACK_SCRIPT = Path(__file__).resolve().parents[2] / "deploy/local/stack.py"


def load_stack_script() -> ModuleType:
    return load_script(STACK_SCRIPT, "embedfleet_stack_script")


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = load_stack_script()
    # The first draw encodes to an id starting with '-' (0xfb... -> '-w...'); a second must follow.
    draws = iter([uuid.UUID(bytes=b"\xfb" + b"\x00" * 15), uuid.UUID(int=1)])
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(draws))
    cluster_id = stack.new_cluster_id()
    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22


def test_cluster_ids_are_random_kafka_format() -> None:
    stack = load_stack_script()
    ids = {stack.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
