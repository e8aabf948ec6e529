"""``segstream watch`` and the client: a URL's own query is kept unless a flag replaces it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from server.cli import build_parser
from server.client import SegstreamClient, watch_client

BASE = "ws://127.0.0.1:8000/ws/streams/demo"


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def watched(*argv: str) -> dict[str, list[str]]:
    args = build_parser().parse_args(["watch", *argv])
    return query_of(watch_client(args)._full_url())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((BASE,), {"format": ["labels"]}),
        ((f"{BASE}?format=rle",), {"format": ["rle"]}),
        ((f"{BASE}?max_fps=2",), {"max_fps": ["2"], "format": ["labels"]}),
        (
            (f"{BASE}?format=raw&max_fps=2&quality=50",),
            {"format": ["raw"], "max_fps": ["2"], "quality": ["50"]},
        ),
        ((f"{BASE}?format=rle", "--format", "jpeg"), {"format": ["jpeg"]}),
        ((f"{BASE}?max_fps=2", "--max-fps", "5"), {"max_fps": ["5.0"], "format": ["labels"]}),
        (
            (f"{BASE}?quality=50&token=t0", "--quality", "90"),
            {"quality": ["90"], "token": ["t0"], "format": ["labels"]},
        ),
        (("demo", "--format", "rle", "--max-fps", "3"), {"format": ["rle"], "max_fps": ["3.0"]}),
    ],
)
def test_watch_keeps_the_url_query_unless_a_flag_is_given(argv, expected):
    # Each parameter appears once: the server would read the last of repeated ones.
    assert watched(*argv) == expected


def test_client_settings_replace_the_url_and_survive_reconnects():
    client = SegstreamClient(f"{BASE}?format=rle&max_fps=2", quality=70)
    assert query_of(client._full_url()) == {"format": ["rle"], "max_fps": ["2"], "quality": ["70"]}
    client.params.update({"format": "overlay"})  # what set() keeps for the next connection
    assert query_of(client._full_url()) == {"format": ["overlay"], "max_fps": ["2"], "quality": ["70"]}
    with pytest.raises(ValueError, match="unknown format"):
        SegstreamClient(BASE, format="gif")
