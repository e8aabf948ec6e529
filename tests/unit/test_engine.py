"""The engine thread with fake segmenters: batching across streams, mixed models, failures."""

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.slot import DropPolicy, FrameSlot
from pipeline.types import DropCause, Frame, now


class ThresholdSegmenter:
    """Labels a pixel 1 when its red channel exceeds a threshold; records the batch sizes it saw."""

    def __init__(self, name: str, fail_on: set[int] | None = None, delay: float = 0.0) -> None:
        self.spec = SimpleNamespace(name=name, classes=("background", "thing"))
        self.batches: list[int] = []
        self.fail_on = fail_on or set()
        self.delay = delay
        self.calls = 0

    def preprocess(self, images):
        return list(images)

    def infer(self, x):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        self.batches.append(len(x))
        return [img[..., 0] > 127 for img in x]

    def postprocess(self, probs, sizes):
        return [(p.astype(np.uint8), p.astype(np.float32)) for p in probs]


class FailingPost(ThresholdSegmenter):
    """Fails to size the masks of its ``fail_post``-th batch."""

    def __init__(self, name: str, fail_post: int) -> None:
        super().__init__(name)
        self.fail_post = fail_post
        self.posts = 0

    def postprocess(self, probs, sizes):
        self.posts += 1
        if self.posts == self.fail_post:
            raise ValueError("bad size")
        return super().postprocess(probs, sizes)


def image(red: int) -> np.ndarray:
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, :3, 0] = red
    return img


class Collector:
    def __init__(self) -> None:
        self.results = []
        self.errors = []
        self.cond = threading.Condition()

    def on_result(self, r):
        with self.cond:
            self.results.append(r)
            self.cond.notify_all()

    def on_error(self, sid, msg):
        with self.cond:
            self.errors.append((sid, msg))
            self.cond.notify_all()

    def wait(self, pred, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self), timeout), "timed out"


def start_engine(segs, **cfg):
    col = Collector()
    eng = Engine(
        config=EngineConfig(**{"max_wait_ms": 20, **cfg}),
        segmenter_factory=lambda name: segs[name],
        on_result=col.on_result,
        on_error=col.on_error,
    )
    eng.start()
    return eng, col


def frame(sid, i, red=255, t=None):
    return Frame(
        stream_id=sid, index=i, pts=None, captured_at=t if t is not None else now(), image=image(red)
    )


def test_results_carry_labels_and_stage_timings():
    seg = ThresholdSegmenter("m")
    eng, col = start_engine({"m": seg})
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    slot.put(frame("a", 7))
    col.wait(lambda c: len(c.results) == 1)
    r = col.results[0]
    assert r.frame.index == 7 and r.model == "m" and r.classes == ("background", "thing")
    assert r.labels[:, :3].all() and not r.labels[:, 3:].any()
    assert set(r.latency_ms) >= {"decode", "queue", "preprocess", "infer", "postprocess"}
    assert eng.stop(2)


def test_frames_from_several_streams_share_one_batch():
    seg = ThresholdSegmenter("m")
    eng, col = start_engine({"m": seg}, max_wait_ms=200)
    slots = {}
    for sid in "abcd":
        slots[sid] = FrameSlot(on_put=eng.notify)
        eng.add_stream(sid, slots[sid], model="m")
    for sid in "abcd":
        slots[sid].put(frame(sid, 0))
    col.wait(lambda c: len(c.results) == 4)
    assert max(seg.batches) >= 2  # gathered across streams rather than one by one
    assert eng.stats.snapshot()["frames"] == 4
    assert eng.stop(2)


def test_mixed_models_are_batched_separately():
    a, b = ThresholdSegmenter("ma"), ThresholdSegmenter("mb")
    eng, col = start_engine({"ma": a, "mb": b})
    s1, s2 = FrameSlot(on_put=eng.notify), FrameSlot(on_put=eng.notify)
    eng.add_stream("x", s1, model="ma")
    eng.add_stream("y", s2, model="mb")
    s1.put(frame("x", 0))
    s2.put(frame("y", 0))
    col.wait(lambda c: len(c.results) == 2)
    assert {r.frame.stream_id: r.model for r in col.results} == {"x": "ma", "y": "mb"}
    assert a.batches == [1] and b.batches == [1]
    assert eng.stop(2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ThresholdSegmenter("m", fail_on={1}), "boom"),  # the network fails
        (lambda: FailingPost("m", fail_post=1), "bad size"),  # sizing the masks fails, after it
    ],
)
def test_a_failing_batch_is_reported_on_its_streams_and_the_engine_goes_on(make, message):
    seg = make()
    eng, col = start_engine({"m": seg}, max_wait_ms=0)
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    slot.put(frame("a", 0))
    col.wait(lambda c: len(c.errors) == 1)
    assert col.errors[0][0] == "a" and message in col.errors[0][1]
    assert slot.drops.snapshot() == {DropCause.ERROR.value: 1}
    slot.put(frame("a", 1))
    col.wait(lambda c: len(c.results) == 1)
    assert col.results[0].frame.index == 1
    assert eng.stats.errors == 1 and eng.alive
    assert eng.stop(2)


def test_a_model_that_fails_to_load_only_hurts_its_streams():
    good = ThresholdSegmenter("good")

    def factory(name):
        if name == "bad":
            raise ValueError("no such weights")
        return good

    col = Collector()
    eng = Engine(
        config=EngineConfig(max_wait_ms=0),
        segmenter_factory=factory,
        on_result=col.on_result,
        on_error=col.on_error,
    )
    eng.start()
    s_bad, s_good = FrameSlot(on_put=eng.notify), FrameSlot(on_put=eng.notify)
    eng.add_stream("bad", s_bad, model="bad")
    eng.add_stream("good", s_good, model="good")
    s_bad.put(frame("bad", 0))
    s_good.put(frame("good", 0))
    col.wait(lambda c: len(c.results) == 1 and len(c.errors) == 1)
    assert col.results[0].frame.stream_id == "good"
    assert col.errors[0][0] == "bad" and "no such weights" in col.errors[0][1]
    assert eng.stop(2)


def test_a_model_that_failed_to_build_is_not_rebuilt_for_every_batch(monkeypatch):
    import pipeline.engine as engine_mod

    calls = []

    def factory(name):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return ThresholdSegmenter(name)

    col = Collector()
    eng = Engine(config=EngineConfig(max_wait_ms=0), segmenter_factory=factory,
                 on_result=col.on_result, on_error=col.on_error)
    eng.start()
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    for i in range(3):
        slot.put(frame("a", i))
        col.wait(lambda c, n=i + 1: len(c.errors) == n)
    assert calls == ["m"], "one build attempt while the retry is not due"
    assert all("CUDA out of memory" in msg for _, msg in col.errors)
    assert "next try in" in col.errors[-1][1]
    monkeypatch.setattr(engine_mod, "MODEL_RETRY_S", 0.0)  # the retry is due: built, frames flow
    slot.put(frame("a", 3))
    col.wait(lambda c: len(c.results) == 1)
    assert calls == ["m", "m"] and col.results[0].frame.index == 3
    assert eng.stop(2)


def test_stale_frames_never_reach_the_model():
    seg = ThresholdSegmenter("m")
    eng, col = start_engine({"m": seg}, latency_budget_ms=100)
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    slot.put(frame("a", 0, t=now() - 10))
    slot.put(frame("a", 1))  # replaces the stale one in a latest-wins slot...
    col.wait(lambda c: len(c.results) == 1)
    slot2 = FrameSlot(capacity=4, on_put=eng.notify, policy="drop_oldest")
    eng.add_stream("b", slot2, model="m")
    slot2.put(frame("b", 0, t=now() - 10))  # ...here it is taken, judged stale and dropped
    slot2.put(frame("b", 1))
    col.wait(lambda c: len(c.results) == 2)
    assert [r.frame.index for r in col.results if r.frame.stream_id == "b"] == [1]
    assert slot2.drops.snapshot() == {DropCause.STALE.value: 1}
    assert eng.stop(2)


class GatedSegmenter(ThresholdSegmenter):
    """Holds its first batch inside the network until ``release`` is set."""

    def __init__(self, name: str, fail_on: set[int] | None = None) -> None:
        super().__init__(name, fail_on)
        self.entered, self.release = threading.Event(), threading.Event()

    def infer(self, x):
        if self.calls == 0:
            self.entered.set()
            assert self.release.wait(5)
        return super().infer(x)


def replace_mid_batch(seg: GatedSegmenter):
    """Stream "cam" removed and added again (new slot) while its frame 500 is in the network;
    the network is then let go. Returns the engine, its collector and the new stream's slot."""
    eng, col = start_engine({"m": seg})
    old = FrameSlot(on_put=eng.notify)
    eng.add_stream("cam", old, model="m")
    old.put(frame("cam", 500))
    assert seg.entered.wait(5)
    eng.remove_stream("cam")
    new = FrameSlot(on_put=eng.notify)
    eng.add_stream("cam", new, model="m")
    seg.release.set()
    return eng, col, new


def test_a_frame_in_the_network_when_its_stream_is_replaced_reaches_nobody():
    """DELETE then POST of the same id while the old source's frame is in the network: the old
    picture must not appear on the new stream."""
    eng, col, new = replace_mid_batch(GatedSegmenter("m"))
    new.put(frame("cam", 0))
    col.wait(lambda c: any(r.frame.index == 0 for r in c.results))
    assert [r.frame.index for r in col.results] == [0]
    assert eng.stop(2)


def test_a_failing_batch_of_a_replaced_stream_is_not_reported_on_its_successor():
    eng, col, _ = replace_mid_batch(GatedSegmenter("m", fail_on={1}))  # the held batch fails
    wait = time.monotonic() + 5
    while eng.stats.errors == 0 and time.monotonic() < wait:
        time.sleep(0.01)
    assert eng.stats.errors == 1 and "boom" in eng.stats.last_error  # it failed, and is counted...
    assert col.errors == []  # ...but not said to the stream now called "cam"
    assert eng.stop(2)


def test_stop_joins_the_thread():
    eng, _ = start_engine({"m": ThresholdSegmenter("m")})
    assert eng.alive
    assert eng.stop(2)
    assert not eng.alive
    assert "engine" not in [t.name for t in threading.enumerate()]


class TorchSegmenter:
    """A tiny torch segmenter: foreground where red > 0.5, at an 8x8 model resolution."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.spec = SimpleNamespace(name="t", classes=("background", "thing"), mean=(0, 0, 0), std=(1, 1, 1))
        self.inferred = 0

    def preprocess(self, images):
        t = self.torch.stack([self.torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])
        return self.torch.nn.functional.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)

    def infer(self, x):
        self.inferred += x.shape[0]
        fg = (x[:, :1] > 0.5).float()
        return self.torch.cat([1 - fg, fg], dim=1)

    def postprocess(self, probs, sizes):
        out = []
        for p, (h, w) in zip(probs, sizes, strict=True):
            up = self.torch.nn.functional.interpolate(p[None], size=(h, w), mode="nearest")[0]
            out.append((up.argmax(0).to(self.torch.uint8).numpy(), up[1].numpy()))
        return out


def test_keyframe_mode_skips_the_model_on_a_static_stream_and_resets_on_discontinuity():
    from pipeline.config import TemporalConfig

    seg = TorchSegmenter()
    eng, col = start_engine({"t": seg}, max_wait_ms=0)
    slot = FrameSlot(capacity=64, policy="drop_oldest", on_put=eng.notify)
    eng.add_stream("a", slot, model="t", temporal=TemporalConfig(mode="keyframe", keyframe_max_gap=5))
    for i in range(10):
        slot.put(frame("a", i))
        col.wait(lambda c, n=i + 1: len(c.results) == n)
    slot.put(
        Frame(stream_id="a", index=10, pts=None, captured_at=now(), image=image(255), discontinuity=True)
    )
    col.wait(lambda c: len(c.results) == 11)
    full = [r.full_pass for r in col.results]
    assert full[0] and full[10]  # first frame and the discontinuity always run the model
    assert sum(full[:10]) <= 3  # a static scene: the model ran at most every 5th frame
    assert seg.inferred == sum(full)
    carried = [r for r in col.results if not r.full_pass]
    assert all(r.labels[:, :3].all() and not r.labels[:, 3:].any() for r in carried)  # mask carried forward
    assert col.results[10].info["temporal"] == "discontinuity"
    assert eng.stop(2)


def test_changing_a_keyframe_stream_mid_batch_does_not_fail_the_batch():
    """A PATCH (or removal) while a batch runs resets the stream's refiner; the batch finishes
    with the refiner and state it was planned with, and no stream gets an error."""
    from pipeline.config import TemporalConfig

    class Gated(TorchSegmenter):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = threading.Event(), threading.Event()

        def infer(self, x):
            self.entered.set()
            self.release.wait(5)
            return super().infer(x)

    seg = Gated()
    seg.release.set()
    eng, col = start_engine({"t": seg}, max_wait_ms=300)
    slots = {sid: FrameSlot(on_put=eng.notify) for sid in "kg"}
    eng.add_stream("k", slots["k"], model="t", temporal=TemporalConfig(mode="keyframe", keyframe_max_gap=8))
    eng.add_stream("g", slots["g"], model="t")
    for sid in "kg":
        slots[sid].put(frame(sid, 0))
    col.wait(lambda c: len(c.results) == 2)
    seg.release.clear()
    seg.entered.clear()
    for sid in "kg":  # k's frame 1 is static: carried forward, in a batch where g runs the model
        slots[sid].put(frame(sid, 1))
    assert seg.entered.wait(5)
    eng.update_stream("k", temporal=TemporalConfig(mode="off"))  # resets k's refiner mid-batch
    seg.release.set()
    col.wait(lambda c: len(c.results) == 4)
    assert not col.errors
    k1 = next(r for r in col.results if r.frame.stream_id == "k" and r.frame.index == 1)
    assert not k1.full_pass and k1.labels[:, :3].all()  # carried forward with the plan's own state
    assert eng.stop(2)


def test_results_leave_in_frame_order_while_the_next_batch_runs():
    seg = ThresholdSegmenter("m", delay=0.002)
    eng, col = start_engine({"m": seg}, max_wait_ms=0)
    slot = FrameSlot(capacity=4, on_put=eng.notify, policy=DropPolicy.BLOCK)
    eng.add_stream("a", slot, model="m")
    for i in range(40):
        assert slot.put(frame("a", i), timeout=2.0)
    col.wait(lambda c: len(c.results) == 40)
    assert [r.frame.index for r in col.results] == list(range(40))
    assert eng.stop(2)


def test_finisher_keeps_order_holds_back_when_full_and_drains_on_close():
    from pipeline.engine import _Finisher

    done: list[int] = []
    gate = threading.Event()

    def work(job):
        gate.wait(5)
        done.append(job)

    fin = _Finisher(work, depth=2)
    fin.submit(1)
    fin.submit(2)
    blocked = threading.Thread(target=fin.submit, args=(3,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # two jobs waiting: the third submit blocks the engine
    gate.set()
    blocked.join(5)
    assert fin.close(5)
    assert done == [1, 2, 3]


@pytest.mark.parametrize(("device", "thread"), [("cpu", "engine-finish"), ("cuda", "engine")])
def test_cpu_engines_finish_batches_on_their_own_thread_and_device_engines_do_not(device, thread):
    seen: list[str] = []
    eng = Engine(
        config=EngineConfig(max_wait_ms=0, device=device),
        segmenter_factory=lambda name: ThresholdSegmenter(name),
        on_result=lambda r: seen.append(threading.current_thread().name),
    )
    eng.start()
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    slot.put(frame("a", 0))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.stop(2)
    # device tensors never leave the engine thread; on the CPU results are emitted beside it
    assert seen == [thread]


def test_capture_thread_preprocessing_counts_once_as_preprocess_not_as_queueing():
    eng, col = start_engine({"m": ThresholdSegmenter("m")}, max_wait_ms=0)
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    # decoded 60 ms ago, of which the capture thread spent 50 ms preparing the model input
    f = replace(frame("a", 0, t=now() - 0.060), prepare_ms=50.0)
    slot.put(f)
    col.wait(lambda c: len(c.results) == 1)
    lat = col.results[0].latency_ms
    assert lat["preprocess"] >= 50.0
    assert 0.0 <= lat["queue"] < 40.0  # ~10 ms in the slot, not 60
    assert eng.stop(2)


def test_wanted_models_are_built_before_their_first_frame():
    release = threading.Event()
    built = []

    def slow_factory(name):
        if name == "big":
            release.wait(5)  # building and warming up a large model
        if name == "broken":
            raise ValueError("no such weights")
        built.append(name)
        return ThresholdSegmenter(name)

    col = Collector()
    eng = Engine(  # on a CPU: a GPU engine builds models on its own thread, which owns the device
        config=EngineConfig(device="cpu", max_wait_ms=0),
        segmenter_factory=slow_factory,
        on_result=col.on_result,
        preload=["m"],
    )
    assert eng.wait_model("m", 0.01), "an engine that is not running has nothing to wait for"
    eng.start()
    assert eng.wait_model("m", 2) and eng.loaded_models == ("m",)
    eng.want("big")
    assert not eng.wait_model("big", 0.2) and "big" not in eng.loaded_models
    # while "big" is built (on a CPU, beside the engine thread), "m"'s streams are served
    slot = FrameSlot(on_put=eng.notify)
    eng.add_stream("a", slot, model="m")
    slot.put(frame("a", 0))
    col.wait(lambda c: len(c.results) == 1, timeout=2)
    assert not eng.wait_model("big", 0.01)
    release.set()
    assert eng.wait_model("big", 2) and eng.loaded_models == ("m", "big")
    eng.want("broken")  # a model that fails to build ends the wait too; its streams get the error
    assert eng.wait_model("broken", 2) and "broken" in (eng.stats.last_error or "")
    eng.want("m")
    assert built == ["m", "big"], "a model is built once"
    assert eng.stop(2)
    assert eng.wait_model("never", 0.01)
