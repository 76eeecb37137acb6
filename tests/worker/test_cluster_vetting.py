"""ClusterView.vet_for_transactions: a reply topic whose configuration refuses records stamped a
moment ago is quarantined, even when the admin client cannot answer at first (right after start
it may know no broker yet: NodeNotReadyError)."""

from __future__ import annotations

from typing import Any

from aiokafka.errors import NodeNotReadyError

from worker.cluster import ClusterView


class FlakyAdmin:
    """Fails ``failures`` times, then describes each topic with the given configuration."""

    def __init__(self, failures: int, configs: dict[str, dict[str, str]]) -> None:
        self.failures = failures
        self.configs = configs
        self.calls = 0

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise NodeNotReadyError("node id None")

        class Response:
            def __init__(self, described: list[Any]) -> None:
                self.resources = described

        described = [(0, "", 2, r.name, list(self.configs[r.name].items())) for r in resources]
        return [Response(described)]


def view_with(admin: FlakyAdmin) -> ClusterView:
    view = ClusterView({"bootstrap_servers": "127.0.0.1:1"})  # never connects: the admin is a fake
    view._admin = admin
    return view


async def test_a_trap_topic_is_quarantined_after_the_admin_client_could_not_answer_at_first() -> None:
    admin = FlakyAdmin(
        2, {"embed.results.trap": {"message.timestamp.before.max.ms": "0"}, "embed.results.ok": {}}
    )
    view = view_with(admin)
    await view.vet_for_transactions(["embed.results.trap", "embed.results.ok"])
    assert admin.calls == 3
    assert view.quarantined("embed.results.trap") is not None
    assert view.quarantined("embed.results.ok") is None


async def test_a_cluster_that_never_answers_is_given_up_after_a_few_seconds() -> None:
    admin = FlakyAdmin(100, {})
    view = view_with(admin)
    await view.vet_for_transactions(["embed.results.x"])
    assert admin.calls == 5 and view.quarantined("embed.results.x") is None
