"""The config file: one pydantic tree, unknown keys rejected, errors that name the bad key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.config import (
    AppConfig,
    ConfigError,
    EngineConfig,
    LimitsConfig,
    ReconnectConfig,
    RoiConfig,
    ServerConfig,
    SourceOptions,
    StreamConfig,
    TemporalConfig,
    build_config,
    load_config_file,
)
from server.cli import _config_from_args, build_parser

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "segstream.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "segstream.toml"
    p.write_text(text, encoding="utf-8")
    return p


def load(tmp_path: Path, text: str) -> AppConfig:
    return build_config(load_config_file(write(tmp_path, text)))


def test_example_file_is_valid_and_documents_the_defaults() -> None:
    cfg = build_config(load_config_file(EXAMPLE))
    defaults = AppConfig()
    # The example spells out the defaults; if a default changes, the documented file must follow.
    assert cfg.engine == defaults.engine
    assert cfg.limits == defaults.limits
    assert cfg.reconnect == defaults.reconnect
    assert cfg.server.model_dump(exclude={"host"}) == defaults.server.model_dump(exclude={"host"})
    assert [s.id for s in cfg.streams] == ["door", "lobby"]
    assert cfg.streams[0].temporal.mode == "smooth"
    temporal = cfg.streams[0].temporal.model_dump(exclude={"mode"})
    assert temporal == TemporalConfig().model_dump(exclude={"mode"})
    assert cfg.streams[0].options.model_dump() == SourceOptions().model_dump()
    assert cfg.streams[1].roi == RoiConfig()
    assert cfg.streams[1].options.loop is True


def test_example_file_passes_the_start_up_checks_as_shipped() -> None:
    """`segstream serve --config examples/segstream.toml` starts on a fresh clone: no stream
    in it names a file that only exists on someone's machine."""
    from server.cli import _check_startup

    _check_startup(_config_from_args(serve_args("--config", str(EXAMPLE))))


def test_example_file_names_every_key() -> None:
    """Every setting appears in the example (commented out where its default is no value)."""
    import re

    text = EXAMPLE.read_text(encoding="utf-8")
    named = set(re.findall(r"^\s*#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    tables = {"server", "engine", "limits", "reconnect", "streams", "weights", "temporal", "roi", "options"}
    for model in (AppConfig, ServerConfig, EngineConfig, LimitsConfig, ReconnectConfig, StreamConfig,
                  SourceOptions, TemporalConfig, RoiConfig):
        missing = {f for f in model.model_fields if f not in named} - tables
        assert not missing, f"{model.__name__}: {sorted(missing)} not in {EXAMPLE.name}"


def test_streams_models_and_limits_from_a_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        default_model = "null"
        [limits]
        max_streams = 2
        max_clients_per_stream = 3
        [[streams]]
        id = "a"
        source = "demo"
        model = "selfie"
        """,
    )
    assert cfg.default_model == "null"
    assert (cfg.limits.max_streams, cfg.limits.max_clients_per_stream) == (2, 3)
    assert cfg.streams[0].model == "selfie"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[limits]\nmax_streamz = 3\n", "limits.max_streamz"),
        ("[limits]\nmax_streams = 0\n", "limits.max_streams"),
        ("[limits]\nmax_streams = 'many'\n", "limits.max_streams"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level"),
        ("[server]\nlog_rate_limit_s = -1\n", "server.log_rate_limit_s"),
        ("[[streams]]\nid = 'a'\nsourc = 'demo'\n", "streams.0.sourc"),
        (
            "[[streams]]\nid = 'a'\nsource = 'demo'\n[streams.options]\nloops = true\n",
            "streams.0.options.loops",
        ),
        ("[[streams]]\nid = 'bad id'\nsource = 'demo'\n", "streams.0.id"),
        ("[engine]\nmax_batch = 1000\n", "engine.max_batch"),
        ("colour = 'blue'\n", "colour"),
        ("[reconnect]\nauth_max_backoff_s = 30\n", "reconnect"),  # below auth_backoff_s (60)
        ("[reconnect]\ninitial_backoff_s = 20\n", "reconnect"),  # above max_backoff_s (10)
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert f"{names}:" in str(e.value)


def test_duplicate_stream_ids_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate stream ids: a"):
        load(tmp_path, "[[streams]]\nid='a'\nsource='demo'\n[[streams]]\nid='a'\nsource='demo'\n")


def test_syntax_errors_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "[limits\nmax_streams = 1\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.toml")


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes("# caf\u00e9\n[limits]\nmax_streams = 1\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config_file(p)
    assert str(e.value) == f"{p}: not valid UTF-8 (byte 0xe9 at offset 5)"


def test_cli_reports_a_non_utf8_config_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    p = tmp_path / "binary.toml"
    p.write_bytes(b"\xff\xfe[limits]\n")
    assert main(["serve", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("segstream serve: error:") and str(p) in err and "not valid UTF-8" in err


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_cli_flags_override_the_file_and_sources_add_to_it(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        default_model = "selfie"
        [server]
        port = 9000
        [limits]
        max_streams = 4
        [[streams]]
        id = "file1"
        source = "demo"
        """,
    )
    cfg = _config_from_args(
        serve_args("--config", str(p), "--port", "9100", "--model", "null", "--source", "b=demo")
    )
    assert cfg.server.port == 9100
    assert cfg.default_model == "null"
    assert cfg.limits.max_streams == 4
    assert [s.id for s in cfg.streams] == ["file1", "b"]


def test_cli_reports_a_bad_config_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    p = write(tmp_path, "[limits]\nmax_clients = 3\n")
    assert main(["serve", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "limits.max_clients" in err and err.startswith("segstream serve: error:")


@pytest.mark.parametrize(
    ("file", "flags", "graphs"),
    [("", [], True), ("[engine]\ncuda_graphs = false\n", [], False),
     ("[engine]\ncuda_graphs = false\n", ["--cuda-graphs"], True), ("", ["--no-cuda-graphs"], False)],
)
def test_cuda_graphs_are_on_unless_the_file_or_a_flag_turns_them_off(
    tmp_path: Path, file: str, flags: list[str], graphs: bool
) -> None:
    p = write(tmp_path, file)
    assert _config_from_args(serve_args("--config", str(p), *flags)).engine.cuda_graphs is graphs


@pytest.mark.parametrize(("file", "flags", "pinned"), [("", [], False), ("", ["--pin-threads"], True),
                                                      ("[engine]\npin_threads = true\n", [], True)])
def test_engine_threads_are_pinned_when_the_file_or_a_flag_asks(
    tmp_path: Path, file: str, flags: list[str], pinned: bool
) -> None:
    p = write(tmp_path, file)
    assert _config_from_args(serve_args("--config", str(p), *flags)).engine.pin_threads is pinned


def test_a_backoff_cap_below_its_start_names_both_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "[reconnect]\nauth_backoff_s = 120\nauth_max_backoff_s = 30\n")
    assert "auth_max_backoff_s (30) must be at least auth_backoff_s (120)" in str(e.value)
