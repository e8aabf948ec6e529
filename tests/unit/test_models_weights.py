"""Every way a weights file can be wrong ends in one clear WeightsError / UnknownModelError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.registry import (
    UnknownModelError,
    WeightsError,
    build_model,
    get_spec,
    list_models,
    weights_status,
)
from models.weights import fetch_cached, hub_cache_path, read_state_dict, verify_sha256


def _selfie_state() -> dict[str, torch.Tensor]:
    module, _ = build_model("selfie")
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_unknown_model_lists_the_available_names() -> None:
    with pytest.raises(UnknownModelError) as e:
        build_model("selfy")
    msg = str(e.value)
    assert "selfy" in msg and all(s.name in msg for s in list_models())
    with pytest.raises(ValueError):  # UnknownModelError is a ValueError, so callers may catch either
        get_spec("nope")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        build_model("selfie", weights=tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_bare_and_wrapped_state_dicts_load(tmp_path: Path, suffix: str) -> None:
    state = _selfie_state()
    for i, obj in enumerate(
        [
            state,
            {"state_dict": state, "epoch": 3},
            {"model": state},
            {f"module.{k}": v for k, v in state.items()},
        ]
    ):
        path = tmp_path / f"w{i}{suffix}"
        torch.save(obj, path)
        module, _ = build_model("selfie", weights=path)
        assert torch.equal(module.state_dict()["segment.weight"], state["segment.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_corrupt_files(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good{suffix}"
    state = _selfie_state()
    if suffix == ".safetensors":
        save_file(state, str(good))
    else:
        torch.save(state, good)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x00not a weights file" * 50)
    for path in (truncated, garbage):
        with pytest.raises(WeightsError) as e:
            build_model("selfie", weights=path)
        msg = str(e.value)
        assert str(path) in msg and "cannot read" in msg and "\n" not in msg


class _NotATensor:
    pass


def test_a_file_the_tensors_only_loader_refuses_is_not_a_readable_checkpoint(tmp_path: Path) -> None:
    """torch's advice to load with weights_only=False (which runs the file's code) is not passed on."""
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + bytes(range(256)) * 40)
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": _selfie_state(), "extra": _NotATensor()}, objects)
    for path in (garbage, objects):
        with pytest.raises(WeightsError) as e:
            read_state_dict(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: cannot read weights: not a readable checkpoint"), msg
        assert "weights_only" not in msg and "\n" not in msg
    assert "_NotATensor" in msg  # what the loader refused is still named


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "w.onnx"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported weights format"):
        build_model("selfie", weights=path)


def test_wrong_keys_and_shapes_are_listed(tmp_path: Path) -> None:
    state = _selfie_state()
    state.pop("stem.0.weight")
    state["extra.weight"] = torch.zeros(3)
    state["segment.bias"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as e:
        build_model("selfie", weights=path)
    msg = str(e.value)
    assert "missing keys (1): stem.0.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "segment.bias (2,) vs model (1,)" in msg


def test_weights_of_another_model_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "selfie.safetensors"
    save_file(_selfie_state(), str(path))
    with pytest.raises(WeightsError, match="do not fit the model"):
        build_model("resnet18_fpn", weights=path)


def test_checkpoint_without_aux_head_loads_by_dropping_it(tmp_path: Path) -> None:
    spec = get_spec("lraspp_mobilenet_v3_large")  # the smallest torchvision model; no aux head
    state = spec.builder().state_dict()
    path = tmp_path / "lraspp.pth"
    torch.save(state, path)
    module, _ = build_model("lraspp_mobilenet_v3_large", weights=path)
    assert not module.training
    full = get_spec("deeplabv3_mobilenet_v3_large").builder().state_dict()
    path2 = tmp_path / "noaux.pth"
    torch.save({k: v for k, v in full.items() if not k.startswith("aux_classifier.")}, path2)
    module2, _ = build_model("deeplabv3_mobilenet_v3_large", weights=path2)
    assert module2.aux_classifier is None


def test_checksum_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"hello")
    verify_sha256(f, "2cf24dba")  # sha256("hello") prefix, as in torchvision's file names
    with pytest.raises(WeightsError, match="checksum mismatch"):
        verify_sha256(f, "deadbeef")

    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        url = get_spec("fcn_resnet50").weights.url
        # not cached + downloads disabled → clear error, no network
        with pytest.raises(WeightsError, match="downloading is disabled"):
            build_model("fcn_resnet50", allow_download=False)
        assert weights_status(get_spec("fcn_resnet50"))["present"] is False
        # a cached file with the wrong digest is refused and removed
        cached = hub_cache_path(url)
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"tampered")
        with pytest.raises(WeightsError, match="checksum mismatch"):
            fetch_cached(url, "1167a1af", allow_download=False)
        assert not cached.exists()
    finally:
        torch.hub.set_dir(old_hub)


def test_weights_status_sources() -> None:
    status = weights_status(get_spec("selfie"))
    assert status["source"] == "embedded" and status["present"] is True
    assert status["location"].endswith("models/weights/selfie.safetensors")
    assert weights_status(get_spec("resnet18_fpn"))["source"] == "none"
    assert weights_status(get_spec("selfie"), "/x/y.pth")["source"] == "file"
