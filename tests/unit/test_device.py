"""Device names: one resolver, one clear ValueError for a name or a GPU this machine lacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.device import check_device, resolve_device
from models.registry import build_model
from models.segmenter import Segmenter


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_names_resolve_without_a_gpu(no_cuda: None) -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    check_device("cpu")


def test_names_resolve_with_gpus(two_gpus: None) -> None:
    assert resolve_device("auto") == "cuda"
    assert [resolve_device(n) for n in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"'cuda:2' requested but only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    "name", ["bogus", "CPU", "cuda:", "cuda:x", "cudax", "gpu", "mps", "meta", "", " cpu"]
)
def test_unknown_names_are_one_line(name: str) -> None:
    with pytest.raises(ValueError) as e:
        check_device(name)
    msg = str(e.value)
    assert f"unknown device {name!r}" in msg and "auto, cpu, cuda or cuda:N" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_so(no_cuda: None, name: str) -> None:
    with pytest.raises(ValueError) as e:
        check_device(name)
    assert f"device '{name}' requested but this torch build has no CUDA support" in str(e.value)


def test_segmenter_refuses_before_touching_torch(no_cuda: None) -> None:
    module, spec = build_model("null")
    for name in ("bogus", "cuda"):
        with pytest.raises(ValueError, match=name):
            Segmenter(module, spec, device=name)
        with pytest.raises(ValueError, match=name):
            Segmenter.from_name("null", device=name)
    assert Segmenter(module, spec, device=torch.device("cpu")).device.type == "cpu"


def test_cuda_graphs_on_the_cpu_run_the_model_as_without() -> None:
    """``engine.cuda_graphs = true`` in a config shared with CPU machines changes nothing there."""
    module, spec = build_model("selfie")
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    plain = Segmenter(module, spec, device="cpu")([frame])
    seg = Segmenter(module, spec, device="cpu", cuda_graphs=True)
    (labels, probs), = seg([frame])
    assert seg.cuda_graphs is False and seg.cuda_graph_shapes == []
    np.testing.assert_array_equal(labels, plain[0][0])
    np.testing.assert_array_equal(probs, plain[0][1])
