"""Pure logic of the offset tracker: commits never pass an unacknowledged record."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

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


def test_a_transaction_commits_up_to_the_lowest_record_pending_in_another_batch() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(6):
        tracker.track("p0", offset)
    assert tracker.commit_point("p0", [3, 4]) == 0  # 0-2 and 5 are in other batches
    tracker.done("p0", 3)
    tracker.done("p0", 4)
    assert tracker.commit_point("p0", [0, 1, 2]) == 5
    assert tracker.commit_point("p0", [0, 1, 2, 5]) == 6
    assert tracker.commit_point("gone", [1]) is None  # not tracked (revoked)


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


# --- generated interleavings (hypothesis) ------------------------------------------------------

PARTITIONS = (0, 1, 2)


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of what the worker does to the tracker: takes (a fetch's records in
    order), salvages (a record batch's culprits tracked before the good records around them, as
    worker.app does), acknowledgements in any order, revokes and commits. Invariant: an offset
    handed out for commit never passes a record that is tracked and not yet acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker[int] = OffsetTracker()
        self.pending: dict[int, set[int]] = {p: set() for p in PARTITIONS}
        self.next_offset: dict[int, int] = dict.fromkeys(PARTITIONS, 0)
        self.committed: dict[int, int] = {}

    @rule(partition=st.sampled_from(PARTITIONS), count=st.integers(1, 6))
    def take(self, partition: int, count: int) -> None:
        start = self.next_offset[partition]
        for offset in range(start, start + count):
            self.tracker.track(partition, offset, 100)
            self.pending[partition].add(offset)
        self.next_offset[partition] = start + count

    @rule(
        partition=st.sampled_from(PARTITIONS),
        culprits=st.lists(st.booleans(), min_size=1, max_size=8),
        gap=st.integers(0, 3),
    )
    def salvage(self, partition: int, culprits: list[bool], gap: int) -> None:
        start = self.next_offset[partition] + gap  # offsets may be missing (compaction, markers)
        offsets = list(range(start, start + len(culprits)))
        bad = [o for o, is_bad in zip(offsets, culprits, strict=True) if is_bad]
        good = [o for o, is_bad in zip(offsets, culprits, strict=True) if not is_bad]
        for offset in bad:  # the culprits first, each saying where the partition continues
            self.tracker.track(partition, offset, 100, next_offset=offsets[-1] + 1)
        for offset in good:
            self.tracker.track(partition, offset, 100)
        self.pending[partition].update(offsets)
        self.next_offset[partition] = offsets[-1] + 1

    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        candidates = sorted((p, o) for p, offsets in self.pending.items() for o in offsets)
        if not candidates:
            return
        partition, offset = data.draw(st.sampled_from(candidates))
        self.tracker.done(partition, offset)
        self.pending[partition].discard(offset)

    @rule(partition=st.sampled_from(PARTITIONS), data=st.data())
    def transaction(self, partition: int, data: st.DataObject) -> None:
        """Exactly-once: a batch's records of the partition commit with an offset in one
        transaction. It covers them and everything answered before, never a record still pending
        in another batch; when nothing else is pending it covers everything seen."""
        pending = sorted(self.pending[partition])
        if not pending:
            return
        batch = set(data.draw(st.lists(st.sampled_from(pending), min_size=1, unique=True)))
        point = self.tracker.commit_point(partition, batch)
        others = set(pending) - batch
        assert point == (min(others) if others else self.next_offset[partition]), (point, batch, others)
        for offset in batch:
            self.tracker.done(partition, offset)
        self.pending[partition] = others

    @rule(partition=st.sampled_from(PARTITIONS))
    def revoke(self, partition: int) -> None:
        self.tracker.forget([partition])
        self.pending[partition] = set()
        self.committed.pop(partition, None)

    @rule()
    def commit(self) -> None:
        offsets = self.tracker.committable()
        for partition, offset in offsets.items():
            assert offset > self.committed.get(partition, -1), "commits only move forward"
        self.tracker.mark_committed(offsets)
        self.committed.update(offsets)

    @invariant()
    def never_past_a_pending_record(self) -> None:
        for partition, offset in self.tracker.committable().items():
            if self.pending[partition]:
                assert offset <= min(self.pending[partition]), (partition, offset, self.pending)
            else:
                assert offset <= self.next_offset[partition]
        assert self.tracker.in_flight == sum(len(o) for o in self.pending.values())

    @invariant()
    def everything_answered_commits_everything_seen(self) -> None:
        for partition in PARTITIONS:
            if not self.pending[partition] and partition in self.committed:
                target = self.tracker.committable().get(partition, self.committed[partition])
                assert target == self.next_offset[partition]


TrackerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_tracker_interleavings = TrackerMachine.TestCase
