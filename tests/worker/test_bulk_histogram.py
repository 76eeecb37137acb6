"""worker.metrics.BulkHistogram exposes exactly what prometheus_client's Histogram does for the
same observations (bar the `_created` sample, which the bulk one leaves out)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from worker.metrics import LATENCY_BUCKETS, BulkHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(
    st.lists(
        st.lists(
            st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 120, allow_nan=False)), max_size=50
        ),
        max_size=5,
    )
)
def test_bulk_observations_expose_what_one_by_one_observations_do(batches: list[list[float]]) -> None:
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=one_by_one)
    tested = BulkHistogram("x_seconds", "doc", LATENCY_BUCKETS, bulk)
    for batch in batches:
        for value in batch:
            reference.observe(value)
        tested.observe_many(batch)
    ours, theirs = exposition(bulk), exposition(one_by_one)
    # Sums may differ in the last digit (numpy sums pairwise).
    assert [line for line in ours if "_sum" not in line] == [line for line in theirs if "_sum" not in line]
    [our_sum] = [float(line.split()[-1]) for line in ours if "_sum " in line]
    [their_sum] = [float(line.split()[-1]) for line in theirs if "_sum " in line]
    assert abs(our_sum - their_sum) <= 1e-9 * max(1.0, their_sum)
