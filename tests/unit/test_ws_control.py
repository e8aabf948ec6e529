"""Control messages on /ws/streams/{id}: every malformed one is a ParamError, never a crash."""

from __future__ import annotations

import pytest

from pipeline.render import Format
from server.ws import MAX_CONTROL_BYTES, ParamError, parse_control, parse_settings

BAD = [
    ('{"quality": 1e999}', "quality"),
    ('{"quality": -1e999}', "quality"),
    ('{"quality": Infinity}', "Infinity"),
    ('{"quality": NaN}', "NaN"),
    ('{"max_fps": NaN}', "NaN"),
    ('{"max_fps": 1e999}', "max_fps"),
    ('{"max_fps": -Infinity}', "Infinity"),
    ('{"quality": ' + "9" * 5000 + "}", ""),
    ('{"max_fps": ' + "9" * 400 + "}", "max_fps"),
    ("[" * 30000 + "]" * 30000, "nested"),
    ('{"a":' * 10000 + "1" + "}" * 10000, "nested"),
    ('{"quality": true}', "quality"),
    ('{"max_fps": false}', "max_fps"),
    ('{"quality": 50.5}', "quality"),
    ('{"quality": [80]}', "quality"),
    ('{"max_fps": {"x": 1}}', "max_fps"),
    ('{"format": null}', "format"),
    ("[]", "JSON object"),
    ("7", "JSON object"),
    ("", ""),
    ("{", ""),
    ('{"quality": 80', ""),
]


@pytest.mark.parametrize(("text", "match"), BAD)
def test_malformed_control_messages_raise_param_error(text: str, match: str) -> None:
    assert len(text.encode()) <= MAX_CONTROL_BYTES
    with pytest.raises(ParamError) as e:
        parse_control(text)
    assert match in str(e.value)


def test_valid_control_messages() -> None:
    assert parse_control('{"format": "rle", "max_fps": 5, "quality": 60.0}') == {
        "fmt": Format.RLE,
        "max_fps": 5.0,
        "quality": 60,
    }
    assert parse_control('{"type": "settings", "max_fps": 0}') == {"max_fps": None}
    assert parse_control('{"max_fps": null}') == {"max_fps": None}


@pytest.mark.parametrize(
    "values",
    [{"max_fps": "nan"}, {"max_fps": "inf"}, {"max_fps": "1e999"}, {"quality": "inf"}, {"quality": "1e999"}],
)
def test_query_parameters_must_be_finite(values: dict[str, str]) -> None:
    with pytest.raises(ParamError):
        parse_settings(values, partial=False)


def test_error_messages_do_not_echo_huge_values() -> None:
    with pytest.raises(ParamError) as e:
        parse_control('{"format": "' + "x" * 50000 + '"}')
    assert len(str(e.value)) < 400
    with pytest.raises(ParamError) as e:
        parse_control("{" + ", ".join(f'"k{i}": 1' for i in range(5000)) + "}")
    assert len(str(e.value)) < 400
