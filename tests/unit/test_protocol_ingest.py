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
