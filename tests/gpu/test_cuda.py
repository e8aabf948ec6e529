"""The GPU paths: CUDA results against the CPU's, half precisions, CUDA graphs, pinned staging,
torch.compile, and the engine on a GPU. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import build_model
from models.segmenter import Segmenter, prepare_input
from pipeline.config import AppConfig, EngineConfig, RoiConfig, StreamConfig, TemporalConfig
from pipeline.manager import StreamManager
from pipeline.types import SegmentationResult

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PHOTO = Path(__file__).resolve().parents[1] / "data" / "astronaut.png"


@pytest.fixture(scope="module")
def selfie():
    return build_model("selfie")


def _segmenter(model, **kw) -> Segmenter:
    module, spec = model
    return Segmenter(copy.deepcopy(module), spec, **kw)  # a segmenter moves its module in place


def _photos(n: int, seed: int) -> list[np.ndarray]:
    """A real photograph of a person, shifted and brightened differently for each image."""
    import cv2

    base = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.roll(base, int(rng.integers(-40, 40)), axis=1).astype(np.int16) + int(rng.integers(-30, 30))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _agree(a: list, b: list, *, labels: float, mean_prob: float) -> None:
    for (la, pa), (lb, pb) in zip(a, b, strict=True):
        assert la.shape == lb.shape
        assert np.mean(la == lb) >= labels, f"labels agree on {np.mean(la == lb):.4f}"
        assert np.abs(pa - pb).mean() <= mean_prob, f"mean |Δp| {np.abs(pa - pb).mean():.5f}"


def test_cuda_fp32_gives_the_cpu_result(selfie) -> None:
    images = _photos(3, 0)
    cpu = _segmenter(selfie, device="cpu", optimize=False)(images)
    gpu = _segmenter(selfie, device="cuda", precision="fp32", channels_last=True)(images)
    assert any(lab.any() for lab, _ in cpu)  # the photo's person is found, so labels are compared
    _agree(cpu, gpu, labels=0.995, mean_prob=2e-3)


# bf16 keeps 8 bits of mantissa to fp16's 11: its masks differ from fp32's at more edge pixels.
@pytest.mark.parametrize(("precision", "labels", "mean_prob"), [("fp16", 0.99, 1e-2), ("bf16", 0.97, 2e-2)])
def test_half_precisions_keep_the_masks(selfie, precision: str, labels: float, mean_prob: float) -> None:
    images = _photos(4, 1)
    ref = _segmenter(selfie, device="cuda", precision="fp32")(images)
    half = _segmenter(selfie, device="cuda", precision=precision, channels_last=True)(images)
    _agree(ref, half, labels=labels, mean_prob=mean_prob)


@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graphs_replay_the_eager_result_for_each_new_input(selfie, batch: int) -> None:
    eager = _segmenter(selfie, device="cuda", precision="fp16", channels_last=True)
    graphed = _segmenter(selfie, device="cuda", precision="fp16", channels_last=True, cuda_graphs=True)
    a = graphed.preprocess(_photos(batch, 2))
    b = graphed.preprocess(_photos(batch, 3))
    out_a = graphed.infer(a)
    out_b = graphed.infer(b)  # replays the same graph: out_a must not change with it
    assert graphed.cuda_graph_shapes == [tuple(a.shape)]
    torch.testing.assert_close(out_a, eager.infer(a), atol=2e-3, rtol=0)
    torch.testing.assert_close(out_b, eager.infer(b), atol=2e-3, rtol=0)
    assert (out_a - out_b).abs().max() > 0.05  # different inputs, different outputs: nothing stale


def test_warmup_captures_a_graph_per_batch_size_and_larger_batches_replay_in_parts(selfie) -> None:
    seg = _segmenter(selfie, device="cuda", cuda_graphs=True)
    seg.warmup(range(1, 5))
    th, tw = seg.spec.input_size
    warmed = [(n, 3, th, tw) for n in range(1, 5)]
    assert seg.cuda_graph_shapes == warmed
    images = _photos(6, 4)
    out = seg(images)  # batch 6 (ROI crops make such batches): replayed as 4 + 2, nothing captured
    assert seg.cuda_graph_shapes == warmed
    _agree(out, _segmenter(selfie, device="cuda")(images), labels=0.999, mean_prob=1e-3)


class _Syncing(torch.nn.Module):
    """A network that reads a value back to the host in its forward pass: allowed eagerly,
    forbidden while a CUDA graph is being captured."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y * (1.0 if float(y.mean()) > -1e9 else 0.0)


def test_a_model_that_cannot_be_captured_runs_eagerly_and_keeps_working(selfie) -> None:
    module, spec = selfie
    seg = Segmenter(_Syncing(copy.deepcopy(module)), spec, device="cuda", cuda_graphs=True)
    eager = _segmenter(selfie, device="cuda")
    for n in (1, 3):  # a second shape after the failed capture: still eager, still right
        images = _photos(n, 30 + n)
        _agree(seg(images), eager(images), labels=0.999, mean_prob=1e-3)
    assert seg.cuda_graphs is False and seg.cuda_graph_shapes == []
    torch.cuda.empty_cache()  # the allocator was left in a usable state
    again = _segmenter(selfie, device="cuda", cuda_graphs=True)  # and other models still capture
    again(_photos(2, 40))
    assert len(again.cuda_graph_shapes) == 1


def test_pinned_staging_never_overwrites_a_frame_in_flight(selfie) -> None:
    """Back-to-back batches reuse the caching host allocator's pinned buffers while earlier
    copies may still be running: each batch must still arrive as it was."""
    seg = _segmenter(selfie, device="cuda")
    batches = [_photos(4, 10 + i) for i in range(24)] + [[img] for img in _photos(8, 50)]
    torch.cuda._sleep(200_000_000)  # the GPU busy for a while: the copies below queue behind it
    fast = [seg.preprocess(b) for b in batches]  # no synchronisation between batches
    for b, got in zip(batches, fast, strict=True):
        torch.cuda.synchronize()
        want = seg.preprocess(b)
        torch.cuda.synchronize()
        assert torch.equal(got, want)
    prepared = [[prepare_input(seg.spec, img) for img in b] for b in batches[:8]]
    staged = [seg.from_prepared(p) for p in prepared]
    torch.cuda.synchronize()
    for p, got in zip(prepared, staged, strict=True):
        want = torch.from_numpy(np.stack(p)).permute(0, 3, 1, 2).cuda()
        assert torch.equal(got, want)


def test_compiled_model_with_cuda_graphs_gives_the_fp32_result(selfie) -> None:
    """Compiled fp16 code rounds differently from eager fp16 (fused kernels keep fp32 in between),
    so both are held to the fp32 result, as the half precisions are."""
    ref = _segmenter(selfie, device="cuda", precision="fp32")
    compiled = _segmenter(selfie, device="cuda", precision="fp16", channels_last=True, compile=True,
                          cuda_graphs=True)
    from torch._dynamo.utils import counters

    inputs = [compiled.preprocess(_photos(2, 20 + i)) for i in range(3)]
    outs = [compiled.infer(x) for x in inputs]  # later calls must not overwrite earlier outputs
    assert not counters["inductor"].get("cudagraph_skips")  # the graphs were really used
    for x, out in zip(inputs, outs, strict=True):
        fg, want = out[:, 1].cpu().numpy(), ref.infer(x)[:, 1].cpu().numpy()
        _agree([(fg > 0.5, fg)], [(want > 0.5, want)], labels=0.99, mean_prob=1e-2)


@pytest.mark.parametrize(
    "stream",
    [{}, {"temporal": TemporalConfig(mode="smooth")}, {"temporal": TemporalConfig(mode="keyframe")},
     {"roi": RoiConfig(enabled=True)}],
    ids=["plain", "smooth", "keyframe", "roi"],
)
def test_engine_on_cuda_with_graphs_segments_several_streams(monkeypatch, stream: dict) -> None:
    built: list[Segmenter] = []
    warmup = Segmenter.warmup
    monkeypatch.setattr(Segmenter, "warmup", lambda self, sizes: (built.append(self), warmup(self, sizes)))
    cfg = AppConfig(engine=EngineConfig(device="cuda", cuda_graphs=True, max_batch=4))
    manager = StreamManager(cfg, realtime=False)
    got: dict[str, list[SegmentationResult]] = {"a": [], "b": []}
    done = threading.Event()

    def on_result(r: SegmentationResult) -> None:
        got[r.frame.stream_id].append(r)
        if min(len(v) for v in got.values()) >= 20:
            done.set()

    manager.result_listeners.append(on_result)
    manager.start()
    try:
        for sid in got:
            manager.add(StreamConfig(id=sid, source="demo", **stream))
        assert done.wait(60), {k: len(v) for k, v in got.items()}
        [seg] = built
        assert seg.device.type == "cuda" and seg.precision == "fp16"
        th, tw = seg.spec.input_size
        # every batch size up to max_batch was captured at warm-up, before the first frame
        assert seg.cuda_graph_shapes[:4] == [(n, 3, th, tw) for n in range(1, 5)]
        assert all(h.describe()["error"] is None for h in manager.list())
        for results in got.values():
            for r in results[:20]:
                assert r.labels.shape == r.frame.image.shape[:2]
                assert r.labels.any()  # the demo's person
                assert r.latency_ms["infer"] > 0
    finally:
        assert manager.shutdown()
