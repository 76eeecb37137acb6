"""The roles' definitions without a stack: the broker's authorizer settings (single node and each
node of a 3-node cluster), each role's ACL table, the Redis rules, and the credentials file."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from tests.security.conftest import roles_module
from tests.stack.test_cluster_id import load_stack_script

AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


def settings(stack: Any, tmp_path: Path, brokers: int) -> Any:
    return stack.StackSettings(
        state_dir=tmp_path, kafka_port=19092, controller_port=19093, redis_port=16379, sasl_port=19094,
        kafka_heap="256m", kafka_brokers=brokers,
    )  # fmt: skip


def properties(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {key: value for key, value in pairs}


def test_every_node_runs_the_authorizer_with_the_stack_super_users(tmp_path: Path) -> None:
    stack = load_stack_script()
    credentials = stack.SaslCredentials("embedfleet", "pw-" + "x" * 20)
    nodes = [stack.KafkaService(settings(stack, tmp_path / "one", 1))]
    nodes += stack.KafkaCluster(settings(stack, tmp_path / "three", 3), 3).members
    for node in nodes:
        node.home.mkdir(parents=True, exist_ok=True)
        node.render_config(credentials)
        rendered = properties(node.config)
        assert rendered["authorizer.class.name"] == AUTHORIZER
        # ANONYMOUS: the PLAINTEXT/CONTROLLER listeners (tools, tests, inter-broker, controllers).
        assert rendered["super.users"].split(";") == ["User:ANONYMOUS", "User:embedfleet"]
        assert rendered["inter.broker.listener.name"] == "PLAINTEXT"


def acl_set(acls: list[Any]) -> set[tuple[str, str, str, str]]:
    roles = roles_module()
    return {
        (
            roles.OPERATION_NAMES[a.operation],
            str(a.resource),
            "allow" if a.permission == roles.ALLOW else "deny",
            a.principal,
        )
        for a in acls
    }


def test_fleet_acls_are_the_least_each_role_needs() -> None:
    roles = roles_module()
    names = roles.FleetNames.for_fleet("embed.requests.t", "embed.results.t", "embed.requests.dlq.t", "g-t")
    worker = acl_set(roles.worker_acls("w", names))
    assert worker == {
        ("READ", "topic:embed.requests.t", "allow", "User:w"),
        ("DESCRIBE", "topic:embed.requests.t", "allow", "User:w"),
        ("READ", "group:g-t", "allow", "User:w"),
        ("DESCRIBE", "group:g-t", "allow", "User:w"),
        ("WRITE", "topic:embed.results.t*", "allow", "User:w"),
        ("DESCRIBE", "topic:embed.results.t*", "allow", "User:w"),
        ("DESCRIBE_CONFIGS", "topic:embed.results.t*", "allow", "User:w"),
        ("WRITE", "topic:embed.requests.dlq.t", "allow", "User:w"),
        ("DESCRIBE", "topic:embed.requests.dlq.t", "allow", "User:w"),
        ("DESCRIBE_CONFIGS", "topic:embed.requests.dlq.t", "allow", "User:w"),
        ("WRITE", "txn-id:embedfleet-g-t-*", "allow", "User:w"),
        ("DESCRIBE", "txn-id:embedfleet-g-t-*", "allow", "User:w"),
    }
    client = acl_set(roles.client_acls("c", names))
    assert client == {
        ("WRITE", "topic:embed.requests.t", "allow", "User:c"),
        ("DESCRIBE", "topic:embed.requests.t", "allow", "User:c"),
        ("CREATE", "topic:embed.results.t.c-*", "allow", "User:c"),
        ("READ", "topic:embed.results.t.c-*", "allow", "User:c"),
        ("DESCRIBE", "topic:embed.results.t.c-*", "allow", "User:c"),
        ("DELETE", "topic:embed.results.t.c-*", "allow", "User:c"),
    }
    keda = acl_set(roles.keda_acls("k", names))
    assert {op for op, *_ in keda} == {"DESCRIBE"}


def test_stack_acls_keep_clients_off_the_dlq_and_apart() -> None:
    roles = roles_module()
    names = roles.FleetNames()
    client = acl_set(roles.client_acls("embedfleet-client", names))
    assert ("WRITE", "topic:embed.requests.dlq*", "deny", "User:embedfleet-client") in client
    assert not any(resource.startswith("topic:embed.results*") for _, resource, _, _ in client)
    gateway = acl_set(roles.gateway_acls("embedfleet-gateway", names))
    assert ("WRITE", "topic:embed.results.gw-*", "allow", "User:embedfleet-gateway") in gateway
    roles.check_prefixes(names, ["embedfleet-client", "embedfleet-test-client-a"])
    try:
        roles.check_prefixes(names, ["app", "app-2"])
    except roles.RoleError as exc:
        assert "covers" in str(exc)
    else:
        raise AssertionError("overlapping reply prefixes were accepted")


def test_redis_rules() -> None:
    roles = roles_module()
    reader = roles.redis_reader_rules("embedfleet")
    assert "%R~embedfleet:*" in reader and "-@all" in reader
    assert not {"+hset", "+del", "+eval", "+evalsha", "+expire", "+ft.create"} & set(reader)
    worker = roles.redis_worker_rules("a*b")
    assert "~a\\*b:*" in worker and "+hset" in worker and "+ft.create" in worker
    # FT.CREATE's index name is a key: only this prefix's index names of the served models.
    assert "~a\\*b-all-MiniLM-L6-v2-*" in worker and not any(r == "~a\\*b-*" for r in worker)
    assert not any(rule.startswith(("+@", "+config", "+flush", "allkeys", "~*")) for rule in worker + reader)


def test_credentials_are_generated_once_into_a_private_file(tmp_path: Path) -> None:
    stack = load_stack_script()
    node = stack.KafkaService(settings(stack, tmp_path, 1))
    setup = stack.RolesSetup(node.settings, node, ["embedfleet-test-client-a"])
    first = setup.load()
    assert stat.S_IMODE(setup.file.stat().st_mode) == 0o600
    users = first["kafka"]["users"]
    assert {u: e["role"] for u, e in users.items()} == {
        "embedfleet-worker": "worker",
        "embedfleet-gateway": "gateway",
        "embedfleet-keda": "keda",
        "embedfleet-client": "client",
        "embedfleet-test-client-a": "client",
    }
    assert set(first["redis"]["users"]) == {"embedfleet-worker", "embedfleet-reader"}
    passwords = [e["password"] for e in users.values()]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 24 for p in passwords)
    for password in passwords:
        stack.SaslCredentials.check_password(password)
    again = stack.RolesSetup(node.settings, node, []).load()
    assert again == first == json.loads(setup.file.read_text())
