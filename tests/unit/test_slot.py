import threading

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
