"""`stack.py --brokers 3`: each node's rendered server.properties (ports, voters, replication)."""

from pathlib import Path

from tests.stack.test_cluster_id import load_stack_script


def settings(stack: object, tmp_path: Path) -> object:
    return stack.StackSettings(  # type: ignore[attr-defined]
        state_dir=tmp_path, kafka_port=19092, controller_port=19093, redis_port=6379, sasl_port=19094,
        kafka_heap="256m", kafka_brokers=3,
    )  # fmt: skip


def properties(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    return {key: value for key, value in pairs}


def test_three_nodes_are_one_replicated_quorum(tmp_path: Path) -> None:
    stack = load_stack_script()
    cluster = stack.KafkaCluster(settings(stack, tmp_path), 3)
    assert cluster.bootstrap == "127.0.0.1:19092,127.0.0.1:19102,127.0.0.1:19112"
    credentials = stack.SaslCredentials("embedfleet", "pw-" + "x" * 20)
    rendered = []
    for member in cluster.members:
        member.home.mkdir(parents=True, exist_ok=True)
        member.render_config(credentials)
        rendered.append(properties(member.config))
    assert [r["node.id"] for r in rendered] == ["1", "2", "3"]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19103,3@127.0.0.1:19113"
    assert all(r["controller.quorum.voters"] == voters for r in rendered)
    assert "controller.quorum.bootstrap.servers" not in rendered[0]
    assert rendered[1]["listeners"].startswith("PLAINTEXT://127.0.0.1:19102,SASL_PLAINTEXT://127.0.0.1:19104")
    for r in rendered:
        assert r["default.replication.factor"] == r["offsets.topic.replication.factor"] == "3"
        assert r["min.insync.replicas"] == r["transaction.state.log.min.isr"] == "2"
    assert len({r["log.dirs"] for r in rendered}) == 3  # a log directory per node
    assert len({m.process.pid_file for m in cluster.members}) == 3


def test_the_single_node_stays_as_it_was(tmp_path: Path) -> None:
    stack = load_stack_script()
    node = stack.KafkaService(settings(stack, tmp_path))
    node.home.mkdir(parents=True, exist_ok=True)
    node.render_config(stack.SaslCredentials("embedfleet", "pw-" + "x" * 20))
    rendered = properties(node.config)
    assert rendered["node.id"] == "1" and rendered["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert rendered["default.replication.factor"] == "1" and rendered["min.insync.replicas"] == "1"
    assert node.data.name == "data" and node.process.pid_file.name == "kafka.pid"
