"""Pure logic of the micro-batcher: window, padded-token budget, size cap, order, flush."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import FakeClock
from worker.batcher import MicroBatcher


def test_closes_on_size_cap() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(window_s=10, token_budget=10_000, max_size=3, clock=FakeClock())
    for i in range(7):
        batcher.add(i, tokens=5)
    assert batcher.poll().items == [0, 1, 2]  # type: ignore[union-attr]
    assert batcher.poll().items == [3, 4, 5]  # type: ignore[union-attr]
    assert batcher.poll() is None  # the seventh waits for its window
    assert batcher.pending == 1


def test_closes_on_padded_token_budget() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(window_s=10, token_budget=100, max_size=100, clock=FakeClock())
    batcher.add("short-1", tokens=10)
    batcher.add("short-2", tokens=10)
    # 3 x 40 = 120 padded tokens would exceed 100: the long one starts the next batch.
    batcher.add("long", tokens=40)
    first = batcher.poll()
    assert first is not None and first.items == ["short-1", "short-2"]
    assert first.padded_tokens == 20
    batcher.add("x", tokens=10)  # 2 x 40 = 80 fits
    batcher.add("y", tokens=10)  # 3 x 40 = 120 does not
    second = batcher.poll()
    assert second is not None and second.items == ["long", "x"]
    assert second.padded_tokens == 80


def test_oversized_job_runs_alone() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(window_s=10, token_budget=100, max_size=100, clock=FakeClock())
    batcher.add("a", tokens=10)
    batcher.add("huge", tokens=500)
    assert [b.items for b in batcher.flush()] == [["a"], ["huge"]]


def test_window_starts_with_first_job() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[int] = MicroBatcher(window_s=0.005, token_budget=1000, max_size=100, clock=clock)
    batcher.add(1, tokens=3)
    clock.now += 0.004
    batcher.add(2, tokens=3)
    assert batcher.poll() is None
    clock.now += 0.001
    batch = batcher.poll()
    assert batch is not None and batch.items == [1, 2]


async def test_next_batch_waits_for_the_window() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(window_s=0.05, token_budget=1000, max_size=100)
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(batcher.next_batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # nothing added yet
    started = loop.time()
    batcher.add(1, tokens=3)
    batcher.add(2, tokens=3)
    batch = await asyncio.wait_for(waiter, timeout=2)
    assert batch.items == [1, 2]
    assert loop.time() - started >= 0.045


async def test_next_batch_returns_at_once_when_full() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(window_s=30, token_budget=1000, max_size=2)
    waiter = asyncio.ensure_future(batcher.next_batch())
    await asyncio.sleep(0)
    batcher.add(1, tokens=1)
    batcher.add(2, tokens=1)
    batch = await asyncio.wait_for(waiter, timeout=1)
    assert batch.items == [1, 2]


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(window_s=0.005, token_budget=0, max_size=1)


def test_discard_removes_revoked_jobs_from_unstarted_batches() -> None:
    batcher: MicroBatcher[tuple[int, int]] = MicroBatcher(
        window_s=10, token_budget=1000, max_size=2, clock=FakeClock()
    )
    for partition, offset in [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3)]:
        batcher.add((partition, offset), tokens=3)
    removed = batcher.discard(lambda item: item[0] == 1)
    assert sorted(removed) == [(1, 1), (1, 2)]
    assert [b.items for b in batcher.flush()] == [[(0, 1)], [(0, 2)], [(0, 3)]]


def test_the_open_batch_keeps_growing_until_someone_asks() -> None:
    """The window is checked when the pipeline asks: a busy pipeline gets one larger batch."""
    clock = FakeClock()
    batcher: MicroBatcher[int] = MicroBatcher(window_s=0.005, token_budget=1000, max_size=100, clock=clock)
    for i in range(10):
        batcher.add(i, tokens=5)
        clock.now += 0.004  # the window has long passed, but nobody polled
    batch = batcher.poll()
    assert batch is not None and batch.items == list(range(10))


async def test_an_idle_model_takes_the_open_batch_at_once() -> None:
    """Nothing to wait behind: a lone job (a cache hit at low load) never waits out the window."""
    batcher: MicroBatcher[int] = MicroBatcher(
        window_s=30, token_budget=1000, max_size=100, model_idle=lambda: True
    )
    waiter = asyncio.ensure_future(batcher.next_batch())
    await asyncio.sleep(0)
    batcher.add(1, tokens=3)
    batch = await asyncio.wait_for(waiter, timeout=1)
    assert batch.items == [1]


async def test_a_busy_model_lets_the_batch_grow_until_it_is_idle() -> None:
    busy = True
    batcher: MicroBatcher[int] = MicroBatcher(
        window_s=30, token_budget=1000, max_size=100, model_idle=lambda: not busy
    )
    waiter = asyncio.ensure_future(batcher.next_batch())
    batcher.add(1, tokens=3)
    await asyncio.sleep(0.05)
    assert not waiter.done()  # the model is busy: the batch waits for company
    batcher.add(2, tokens=3)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    busy = False
    batcher.wake()  # the model finished a batch
    batch = await asyncio.wait_for(waiter, timeout=1)
    assert batch.items == [1, 2]
