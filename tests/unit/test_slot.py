import threading
from dataclasses import replace

import numpy as np
import pytest

from pipeline.slot import DropCounter, DropPolicy, FrameSlot
from pipeline.types import DropCause, Frame


def frame(i: int, sid: str = "a") -> Frame:
    return Frame(
        stream_id=sid, index=i, pts=i / 30, captured_at=float(i), image=np.zeros((2, 2, 3), np.uint8)
    )


def test_latest_keeps_newest_and_counts_overruns():
    slot = FrameSlot(capacity=1, policy=DropPolicy.LATEST)
    for i in range(5):
        assert slot.put(frame(i))
    assert slot.take().index == 4
    assert slot.take() is None
    assert slot.drops.snapshot() == {DropCause.SOURCE_OVERRUN.value: 4}


def test_drop_oldest_is_a_short_fifo():
    slot = FrameSlot(capacity=3, policy=DropPolicy.DROP_OLDEST)
    for i in range(5):
        slot.put(frame(i))
    assert [slot.take().index for _ in range(3)] == [2, 3, 4]
    assert slot.drops.total() == 2


def test_block_waits_for_room_and_drops_nothing():
    slot = FrameSlot(capacity=1, policy=DropPolicy.BLOCK)
    assert slot.put(frame(0))
    assert not slot.put(frame(1), timeout=0.05)  # full: times out instead of dropping
    got = []

    def consumer():
        for _ in range(10):
            while (f := slot.take()) is None:
                threading.Event().wait(0.001)
            got.append(f.index)

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(1, 10):
        assert slot.put(frame(i), timeout=5)
    t.join(5)
    assert got == list(range(10))
    assert slot.drops.total() == 0


def test_close_releases_a_blocked_producer():
    slot = FrameSlot(capacity=1, policy=DropPolicy.BLOCK)
    slot.put(frame(0))
    result = []
    t = threading.Thread(target=lambda: result.append(slot.put(frame(1), timeout=10)))
    t.start()
    slot.close()
    t.join(2)
    assert not t.is_alive() and result == [False]
    assert not slot.put(frame(2))


def test_on_put_is_called_and_counter_is_shared():
    calls = []
    drops = DropCounter()
    slot = FrameSlot(drops=drops, on_put=lambda: calls.append(1))
    slot.put(frame(0))
    slot.put(frame(1))
    assert len(calls) == 2 and drops.total() == 1


def test_bad_capacity_is_rejected_with_value():
    with pytest.raises(ValueError, match="got 0"):
        FrameSlot(capacity=0)


def marked(i: int) -> Frame:
    return replace(frame(i), discontinuity=True)


@pytest.mark.parametrize("policy", [DropPolicy.LATEST, DropPolicy.DROP_OLDEST])
def test_a_dropped_discontinuity_passes_to_the_frame_that_replaces_it(policy):
    slot = FrameSlot(capacity=1, policy=policy)
    slot.put(marked(0))  # the first frame after a loop restart, never taken
    slot.put(frame(1))
    slot.put(frame(2))
    got = slot.take()
    assert got.index == 2 and got.discontinuity
    assert slot.drops.snapshot() == {DropCause.SOURCE_OVERRUN.value: 2}
    slot.put(frame(3))
    assert not slot.take().discontinuity  # the mark is passed on once, not forever


def test_drop_oldest_moves_the_mark_to_the_next_frame_in_line():
    slot = FrameSlot(capacity=2, policy=DropPolicy.DROP_OLDEST)
    for f in (marked(0), frame(1), frame(2)):
        slot.put(f)
    first, second = slot.take(), slot.take()
    assert (first.index, first.discontinuity) == (1, True)
    assert (second.index, second.discontinuity) == (2, False)
    assert slot.drops.snapshot() == {DropCause.SOURCE_OVERRUN.value: 1}


def test_drop_oldest_mark_survives_several_drops_in_a_row():
    slot = FrameSlot(capacity=2, policy=DropPolicy.DROP_OLDEST)
    for f in (marked(0), frame(1), frame(2), frame(3), frame(4)):
        slot.put(f)
    got = [(f.index, f.discontinuity) for f in (slot.take(), slot.take())]
    assert got == [(3, True), (4, False)]
    assert slot.drops.total() == 3


def test_a_kept_mark_stays_on_its_frame():
    slot = FrameSlot(capacity=2, policy=DropPolicy.DROP_OLDEST)
    for f in (frame(0), marked(1), frame(2)):
        slot.put(f)
    got = [(f.index, f.discontinuity) for f in (slot.take(), slot.take())]
    assert got == [(1, True), (2, False)]


def test_a_block_put_that_times_out_passes_its_mark_to_the_next_frame():
    slot = FrameSlot(capacity=1, policy=DropPolicy.BLOCK)
    slot.put(frame(0))
    assert not slot.put(marked(1), timeout=0.01)  # never queued
    assert slot.take().index == 0
    assert slot.put(frame(2), timeout=1)
    got = slot.take()
    assert (got.index, got.discontinuity) == (2, True)
    assert slot.drops.total() == 0
    slot.put(frame(3))
    assert not slot.take().discontinuity
