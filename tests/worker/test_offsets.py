"""Pure logic of the offset tracker: commits never pass an unacknowledged record."""

from __future__ import annotations

from worker.offsets import OffsetTracker


def test_commit_waits_for_the_lowest_pending_offset() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(10, 15):
        tracker.track("p0", offset)
    assert tracker.committable() == {"p0": 10}
    tracker.mark_committed({"p0": 10})
    tracker.done("p0", 12)
    tracker.done("p0", 13)
    assert tracker.committable() == {}  # 10 is still pending: nothing moves
    tracker.done("p0", 10)
    assert tracker.committable() == {"p0": 11}
    tracker.mark_committed({"p0": 11})
    tracker.done("p0", 11)
    tracker.done("p0", 14)
    assert tracker.committable() == {"p0": 15}
    assert tracker.in_flight == 0


def test_partitions_are_independent_and_forgettable() -> None:
    tracker: OffsetTracker[int] = OffsetTracker()
    tracker.track(0, 5)
    tracker.track(1, 7)
    tracker.done(1, 7)
    assert tracker.committable() == {0: 5, 1: 8}
    assert tracker.in_flight_of([0]) == 1
    tracker.forget([0])
    tracker.done(0, 5)  # late ack of a revoked partition: ignored
    assert tracker.in_flight == 0
    tracker.mark_committed({1: 8})
    assert tracker.committable() == {}
