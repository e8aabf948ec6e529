"""Protocol v1 round trips: what the hub packs, the client decodes back to the exact label map."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline.render import Format, render
from server.client import ProtocolError, decode, labels_from_rle, stream_url, unpack
from server.hub import pack_message
from server.ws import ParamError, parse_settings

CLASSES = ("background", "person", "car", "dog")


def label_map(h: int, w: int, seed: int) -> np.ndarray:
    """Blocks of several classes plus single-pixel noise, so runs start and end everywhere."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), dtype=np.uint8)
    labels[h // 4 : h // 2, w // 5 : w // 2] = 1
    labels[h // 2 :, w // 2 :] = 2
    noise = rng.random((h, w)) < 0.05
    labels[noise] = rng.integers(0, len(CLASSES), size=int(noise.sum()), dtype=np.uint8)
    return labels


def image_for(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return img


def round_trip(fmt: Format, labels: np.ndarray, quality: int = 90):
    h, w = labels.shape
    extra, payload = render(fmt, image_for(labels), labels, CLASSES, quality=quality)
    header = {"v": 1, "type": "result", "frame": 7, "width": w, "height": h, "format": fmt.value, **extra}
    header, payload = unpack(pack_message(header, payload))
    return header, decode(header, payload)


@pytest.mark.parametrize("fmt", [Format.LABELS, Format.RAW, Format.RLE, Format.LAYERS])
@pytest.mark.parametrize(("h", "w", "seed"), [(48, 64, 0), (37, 53, 1), (1, 1, 2), (120, 160, 3)])
def test_label_formats_decode_to_the_exact_map(fmt: Format, h: int, w: int, seed: int) -> None:
    labels = label_map(h, w, seed)
    header, result = round_trip(fmt, labels)
    assert header["frame"] == 7
    assert result.labels is not None
    assert result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, labels)


@pytest.mark.parametrize("fill", [0, 1, 3])
def test_uniform_maps_round_trip(fill: int) -> None:
    labels = np.full((9, 11), fill, dtype=np.uint8)
    for fmt in (Format.LABELS, Format.RAW, Format.RLE):
        _, result = round_trip(fmt, labels)
        np.testing.assert_array_equal(result.labels, labels)


def test_rle_is_one_object_per_present_class_and_pycocotools_decodes_it() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    labels = label_map(40, 30, 4)
    header, _ = round_trip(Format.RLE, labels)
    present = sorted(int(c) for c in np.unique(labels) if c)
    assert [o["class"] for o in header["rle"]] == present
    for obj in header["rle"]:
        assert obj["name"] == CLASSES[obj["class"]]
        decoded = mask_api.decode({"size": obj["size"], "counts": obj["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), labels == obj["class"])


def test_image_formats_decode_to_pictures_of_the_frame_size() -> None:
    labels = label_map(48, 64, 5)
    for fmt in (Format.OVERLAY, Format.JPEG, Format.LAYERS):
        _, result = round_trip(fmt, labels)
        assert result.image is not None and result.image.shape == (48, 64, 3)
    # overlay tints the labelled pixels; the plain jpeg does not
    _, overlay = round_trip(Format.OVERLAY, labels)
    _, plain = round_trip(Format.JPEG, labels)
    person = labels == 1
    tint = np.abs(overlay.image.astype(int) - plain.image.astype(int)).sum(axis=2)
    assert tint[person].mean() > 40 > tint[labels == 0].mean()


def test_header_is_length_prefixed_utf8_json() -> None:
    header = {"v": 1, "stream": "caméra", "classes": ["fond", "personne"]}
    msg = pack_message(header, b"\x00\x01")
    (n,) = struct.unpack(">I", msg[:4])
    assert json.loads(msg[4 : 4 + n].decode("utf-8")) == header
    assert msg[4 + n :] == b"\x00\x01"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x00\x00",
        struct.pack(">I", 100) + b"{}",
        struct.pack(">I", 2) + b"[]",
        struct.pack(">I", 3) + b"{x}",
    ],
)
def test_malformed_messages_raise_protocol_error(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack(message)


def test_raw_payload_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="raw payload"):
        decode({"format": "raw", "width": 4, "height": 4}, b"\x00" * 15)


def test_rle_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="RLE size"):
        labels_from_rle([{"class": 1, "size": [2, 2], "counts": [4]}], 3, 3)


def test_status_messages_decode_without_payload() -> None:
    header, payload = unpack(pack_message({"type": "status", "format": "status", "stale": True}))
    result = decode(header, payload)
    assert result.stale and result.labels is None and result.image is None


def test_settings_validation_names_the_bad_value() -> None:
    assert parse_settings({"format": "rle", "max_fps": "5", "quality": "60"}, partial=False) == {
        "fmt": Format.RLE,
        "max_fps": 5.0,
        "quality": 60,
    }
    for values, match in [
        ({"format": "gif"}, "unknown format 'gif'"),
        ({"max_fps": "fast"}, "max_fps must be a number"),
        ({"max_fps": "1000"}, r"max_fps must be in \(0, 240\]"),
        ({"quality": "0"}, "quality must be 1..100"),
        ({"colour": "red"}, "unknown parameter"),
    ]:
        with pytest.raises(ParamError, match=match):
            parse_settings(values, partial=False)


def test_stream_url_accepts_ids_and_urls() -> None:
    assert stream_url("cam1") == "ws://127.0.0.1:8000/ws/streams/cam1"
    assert stream_url("cam1", server="https://gpu.example:9000") == "wss://gpu.example:9000/ws/streams/cam1"
    assert stream_url("http://h:1/ws/streams/a?format=rle") == "ws://h:1/ws/streams/a?format=rle"
    assert stream_url("wss://h/ws/streams/a") == "wss://h/ws/streams/a"
    with pytest.raises(ValueError, match="not a stream id"):
        stream_url("a/b")
