"""The browser-camera upstream: picture framing and the push feed's latest-wins hand-over."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

from pipeline.render import encode_jpeg
from pipeline.sources.base import SourceError
from pipeline.sources.push import PushFeed, PushSource, push_spec
from server.ingest import parse_ingest_params, split_picture
from server.ws import ParamError


def picture(value: int = 0) -> np.ndarray:
    return np.full((8, 12, 3), value, dtype=np.uint8)


def test_framed_picture_carries_the_browser_capture_time() -> None:
    jpeg = encode_jpeg(picture(), 80)
    header = json.dumps({"t": 1700000000.25}).encode()
    pts, data = split_picture(struct.pack(">I", len(header)) + header + jpeg)
    assert pts == 1700000000.25 and data == jpeg


def test_bare_jpeg_is_accepted_without_a_time() -> None:
    jpeg = encode_jpeg(picture(), 80)
    assert split_picture(jpeg) == (None, jpeg)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"\x00", "too short"),
        (struct.pack(">I", 10**6) + b"{}", "bad header length"),
        (struct.pack(">I", 3) + b"{x}\xff\xd8", "not UTF-8 JSON"),
        (struct.pack(">I", 2) + b"{}PNG", "not a JPEG"),
    ],
)
def test_bad_pictures_are_rejected(message: bytes, match: str) -> None:
    with pytest.raises(ParamError, match=match):
        split_picture(message)


def test_ingest_params() -> None:
    p = parse_ingest_params({"id": "cam", "model": "null", "max_fps": "12"})
    assert p == {"id": "cam", "model": "null", "max_fps": 12.0}
    assert parse_ingest_params({})["id"].startswith("cam-")
    with pytest.raises(ParamError, match="max_fps"):
        parse_ingest_params({"max_fps": "0"})
    with pytest.raises(ParamError, match="unknown parameter"):
        parse_ingest_params({"format": "rle"})


def test_feed_is_latest_wins_and_reports_taken() -> None:
    feed = PushFeed()
    s1 = feed.push(picture(1), pts=1.0)
    s2 = feed.push(picture(2), pts=2.0)
    assert feed.replaced == 1
    assert feed.wait_taken(s1, 0.0)  # replaced by a newer picture: the pusher need not wait for it
    assert not feed.wait_taken(s2, 0.01)
    frame = feed.take(0.1)
    assert frame is not None and frame.pts == 2.0 and int(frame.image[0, 0, 0]) == 2
    assert feed.wait_taken(s2, 0.0)
    assert feed.take(0.01) is None


def test_source_reports_the_pushed_size_and_ends_when_the_feed_closes() -> None:
    feed = PushFeed(open_timeout_s=5.0)
    source = push_spec("cam", feed).create()
    assert isinstance(source, PushSource)
    threading.Timer(0.05, lambda: feed.push(picture(3))).start()
    info = source.open()
    assert (info.width, info.height) == (12, 8)
    frames = source.frames()
    first = next(f for f in frames if f is not None)
    assert int(first.image[0, 0, 0]) == 3
    feed.close()
    assert all(f is None for f in frames)  # the generator ends
    with pytest.raises(SourceError):
        feed.push(picture())


def test_open_times_out_without_a_picture() -> None:
    source = push_spec("cam", PushFeed(open_timeout_s=0.05)).create()
    with pytest.raises(SourceError, match="no picture pushed"):
        source.open()


def test_feed_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        PushFeed().push(np.zeros((4, 4), dtype=np.uint8))


def framed_with_header(header: bytes, jpeg: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header + jpeg


@pytest.mark.parametrize(
    "header",
    [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b'{"t": 1e999}', b'{"t": ' + b"9" * 400 + b"}"],
)
def test_a_capture_time_that_is_not_a_finite_number_is_a_bad_picture(header: bytes) -> None:
    with pytest.raises(ParamError):
        split_picture(framed_with_header(header, encode_jpeg(picture(), 80)))


def test_a_deeply_nested_picture_header_is_a_bad_picture_not_a_crash() -> None:
    header = b"[" * 2000 + b"]" * 2000  # within the 4096-byte header limit
    # Python 3.11's json gives up on this depth ("nested too deeply"); 3.12's parses it, and the
    # list is then refused as not an object. Either way: one clear error about the header.
    with pytest.raises(ParamError, match=r"header .*(nested too deeply|must be a JSON object)"):
        split_picture(framed_with_header(header, encode_jpeg(picture(), 80)))


def test_a_header_without_a_capture_time_gives_none() -> None:
    jpeg = encode_jpeg(picture(), 80)
    for header in (b"{}", b'{"t": null}', b'{"other": 1}'):
        assert split_picture(framed_with_header(header, jpeg)) == (None, jpeg)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (b'{"t": true}', "t must be a finite number"),
        (b'{"t": "soon"}', "t must be a finite number"),
        (b'{"t": [1]}', "t must be a finite number"),
        (b"[1]", "header must be a JSON object"),
        (b'"t"', "header must be a JSON object"),
    ],
)
def test_a_capture_time_of_another_type_is_a_bad_picture(header: bytes, needle: str) -> None:
    """A client sending its capture time as text (or a header that is not an object) has a
    bug it should hear about, not frames silently without a time."""
    with pytest.raises(ParamError, match=needle):
        split_picture(framed_with_header(header, encode_jpeg(picture(), 80)))


def with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with the frame header (SOF0) claiming another size."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def test_an_oversized_picture_is_refused_from_its_header_without_decoding(monkeypatch) -> None:
    import server.ingest as ingest

    decoded: list[int] = []
    monkeypatch.setattr(ingest, "decode_jpeg", lambda data: decoded.append(len(data)))
    huge = with_size(encode_jpeg(picture(), 80), 12000, 12000)
    with pytest.raises(ingest.PictureTooLarge, match="12000x12000"):
        ingest.decode_picture(huge, max_pixels=3840 * 2160)
    assert decoded == []


def test_a_picture_within_the_limit_is_decoded() -> None:
    from server.ingest import PictureTooLarge, decode_picture

    image = decode_picture(encode_jpeg(picture(7), 90), max_pixels=12 * 8)
    assert image.shape == (8, 12, 3)
    with pytest.raises(PictureTooLarge, match="12x8"):
        decode_picture(encode_jpeg(picture(7), 90), max_pixels=12 * 8 - 1)
    with pytest.raises(ParamError):
        decode_picture(b"\xff\xd8 not a jpeg", max_pixels=100)


@pytest.mark.parametrize("sid", ["../x", "a/b", "..", ".", "x" * 65, "caméra", "a b"])
def test_an_unusable_stream_id_is_named_with_the_rule(sid: str) -> None:
    with pytest.raises(ParamError, match="invalid stream id") as e:
        parse_ingest_params({"id": sid})
    assert "A-Z a-z 0-9 _ . -" in str(e.value) or "URL" in str(e.value)


@pytest.mark.parametrize("raw", ["nan", "inf", "1e999", "-inf"])
def test_ingest_max_fps_must_be_finite(raw: str) -> None:
    with pytest.raises(ParamError, match="max_fps"):
        parse_ingest_params({"max_fps": raw})
