"""Batcher fairness, max_wait and stale accounting with a fake clock."""

import numpy as np
import pytest

from pipeline.batcher import Batcher, Lane
from pipeline.slot import FrameSlot
from pipeline.types import DropCause, Frame


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.waits: list[float] = []
        self.on_wait = None  # called with the clock during a wait: lets a test "deliver" frames

    def __call__(self) -> float:
        return self.t

    def wait(self, timeout: float) -> None:
        self.waits.append(timeout)
        if self.on_wait is not None:
            self.on_wait(self)
        self.t += timeout


def put(lane: Lane, index: int, t: float) -> None:
    lane.slot.put(
        Frame(
            stream_id=lane.stream_id,
            index=index,
            pts=None,
            captured_at=t,
            image=np.zeros((1, 1, 3), np.uint8),
        )
    )


def make(clock, n=3, groups=None, **kw):
    b = Batcher(max_batch=kw.pop("max_batch", 8), max_wait_s=kw.pop("max_wait_s", 0.01), clock=clock, **kw)
    lanes = []
    for i in range(n):
        lane = Lane(stream_id=f"s{i}", slot=FrameSlot(), group=(groups or ["m"] * n)[i])
        b.add(lane)
        lanes.append(lane)
    return b, lanes


def test_empty_returns_none_without_waiting():
    clock = FakeClock()
    b, _ = make(clock)
    assert b.poll(clock.wait) is None
    assert clock.waits == []


def test_all_streams_ready_means_no_wait():
    clock = FakeClock()
    b, lanes = make(clock)
    for i, lane in enumerate(lanes):
        put(lane, i, clock.t)
    batch = b.poll(clock.wait)
    assert [f.stream_id for f in batch.frames] == ["s0", "s1", "s2"]
    assert clock.waits == []  # everyone already contributed: waiting could only add latency


def test_waits_at_most_max_wait_for_the_rest():
    clock = FakeClock()
    b, lanes = make(clock, max_wait_s=0.010)
    put(lanes[0], 0, clock.t)
    batch = b.poll(clock.wait)
    assert len(batch.frames) == 1
    assert sum(clock.waits) == pytest.approx(0.010)
    assert batch.gathered_at - batch.first_at == pytest.approx(0.010)


def test_frames_arriving_during_the_wait_join_the_batch():
    clock = FakeClock()
    b, lanes = make(clock, max_wait_s=0.050)
    put(lanes[1], 0, clock.t)

    def deliver(c):
        if len(c.waits) == 1:
            put(lanes[2], 0, c.t)
            put(lanes[0], 0, c.t)

    clock.on_wait = deliver
    batch = b.poll(clock.wait)
    assert sorted(f.stream_id for f in batch.frames) == ["s0", "s1", "s2"]
    assert len(clock.waits) == 1  # stopped waiting as soon as everyone was in


def test_round_robin_no_stream_starves_with_small_batches():
    clock = FakeClock()
    b, lanes = make(clock, n=4, max_batch=2, max_wait_s=0.0)
    served = []
    for round_ in range(8):
        for lane in lanes:
            put(lane, round_, clock.t)  # every stream always has a frame (latest wins)
        batch = b.poll(clock.wait)
        served += [f.stream_id for f in batch.frames]
    counts = {s: served.count(s) for s in ("s0", "s1", "s2", "s3")}
    assert counts == {"s0": 4, "s1": 4, "s2": 4, "s3": 4}


def test_groups_are_not_mixed_and_alternate():
    clock = FakeClock()
    b, lanes = make(clock, n=4, groups=["a", "b", "a", "b"], max_wait_s=0.0)
    groups_seen = []
    for r in range(4):
        for lane in lanes:
            put(lane, r, clock.t)
        batch = b.poll(clock.wait)
        assert len({lane.group for lane in batch.lanes}) == 1
        groups_seen.append(batch.group)
    assert groups_seen.count("a") == 2 and groups_seen.count("b") == 2


def test_stale_frames_are_dropped_and_counted():
    clock = FakeClock()
    b, lanes = make(clock, n=2, latency_budget_s=0.5)
    put(lanes[0], 0, clock.t - 2.0)  # two seconds old: over budget
    put(lanes[1], 0, clock.t - 0.1)
    batch = b.poll(clock.wait)
    assert [f.stream_id for f in batch.frames] == ["s1"]
    assert [f.stream_id for _, f in batch.stale] == ["s0"]
    assert lanes[0].slot.drops.snapshot() == {DropCause.STALE.value: 1}


def test_a_stale_frame_passes_its_discontinuity_mark_to_the_next_frame_taken():
    """The first frame after a reconnect dropped as stale: the stream's next frame that is
    processed carries the mark, so the engine still resets its temporal and ROI state."""
    clock = FakeClock()
    b, lanes = make(clock, n=1, latency_budget_s=0.5)
    restart = Frame(stream_id="s0", index=7, pts=None, captured_at=clock.t - 2.0,
                    image=np.zeros((1, 1, 3), np.uint8), discontinuity=True)
    lanes[0].slot.put(restart)
    batch = b.poll(clock.wait)
    assert batch.frames == [] and [f.index for _, f in batch.stale] == [7]
    put(lanes[0], 8, clock.t)
    put_next = b.poll(clock.wait)
    assert [(f.index, f.discontinuity) for f in put_next.frames] == [(8, True)]
    put(lanes[0], 9, clock.t)
    assert [(f.index, f.discontinuity) for f in b.poll(clock.wait).frames] == [(9, False)]  # once


def test_only_stale_frames_yield_an_empty_batch_reporting_them():
    clock = FakeClock()
    b, lanes = make(clock, n=1, latency_budget_s=0.5)
    put(lanes[0], 0, clock.t - 5)
    batch = b.poll(clock.wait)
    assert batch.frames == [] and len(batch.stale) == 1


def test_remove_and_duplicate_ids():
    clock = FakeClock()
    b, lanes = make(clock, n=2)
    with pytest.raises(ValueError, match="s0"):
        b.add(Lane("s0", FrameSlot(), "m"))
    b.remove("s0")
    put(lanes[0], 0, clock.t)
    assert b.poll(clock.wait) is None


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="got 0"):
        Batcher(max_batch=0, max_wait_s=0)
    with pytest.raises(ValueError, match="-1"):
        Batcher(max_batch=1, max_wait_s=-1)
