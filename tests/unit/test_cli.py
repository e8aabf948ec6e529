"""The segstream command: argument errors are one clear line and a non-zero exit."""

import json

import pytest
import torch

from server.cli import CliError, _parse_source_arg, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("demo", (None, "demo")),
        ("cam=rtsp://10.0.0.5/stream?a=b", ("cam", "rtsp://10.0.0.5/stream?a=b")),
        ("rtsp://host/x?user=a", (None, "rtsp://host/x?user=a")),
        ("/videos/a=b.mp4", (None, "/videos/a=b.mp4")),
        ("front=webcam:0", ("front", "webcam:0")),
    ],
)
def test_source_argument_forms(value, expected):
    assert _parse_source_arg(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "cam="])
def test_bad_source_arguments(value):
    with pytest.raises(CliError):
        _parse_source_arg(value)


def test_models_json_lists_every_model_with_classes_and_weights(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["selfie"]["classes"] == ["background", "person"]
    assert rows["selfie"]["weights"]["present"] is True
    assert len(rows["deeplabv3_resnet50"]["classes"]) == 21
    assert {"input_size", "binary", "description"} <= set(rows["selfie"])


def test_models_table(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "selfie" in out and "deeplabv3_resnet50" in out


def test_unknown_model_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(
        capsys, "segment", str(tmp_path / "x.mp4"), "--model", "nope", "-o", str(tmp_path / "o.mp4")
    )
    assert code == 2
    assert err.count("\n") == 1 and "nope" in err and "selfie" in err  # names the choices


def test_missing_input_file(capsys, tmp_path):
    code, _, err = run(capsys, "segment", str(tmp_path / "missing.mp4"), "--masks-dir", str(tmp_path / "m"))
    assert code == 2 and "missing.mp4" in err and err.count("\n") == 1


def test_segment_needs_an_output(capsys, tmp_path):
    code, _, err = run(capsys, "segment", str(tmp_path / "x.mp4"))
    assert code == 2 and "--output" in err


def test_serve_rejects_a_bad_source_before_starting(capsys):
    code, _, err = run(capsys, "serve", "--source", "gopher://example/x", "--port", "0")
    assert code == 2 and "gopher" in err and err.count("\n") == 1


def test_serve_rejects_an_unknown_model(capsys):
    code, _, err = run(capsys, "serve", "--model", "nope", "--port", "0")
    assert code == 2 and "nope" in err


def test_bad_config_file_names_the_key(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[engine]\nmax_batchh = 4\n")
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--port", "0")
    assert code == 2 and "max_batchh" in err


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (
            '[[streams]]\nid = "d"\nsource = "demo"\n'
            'temporal = { mode = "smooth", motion_low = 0.5, motion_high = 0.1 }\n',
            "stream 'd': temporal: motion_high must be above motion_low",
        ),
        (
            '[limits]\nmax_streams = 1\n[[streams]]\nid = "d"\nsource = "demo"\n'
            '[[streams]]\nid = "e"\nsource = "demo"\n',
            "2 streams configured, above limits.max_streams = 1",
        ),
        (
            'default_model = "null"\n[weights]\nnull = "/nonexistent/w.pth"\n',
            "weights file for 'null' not found",
        ),
        ('[[streams]]\nsource = "rtsp://cam.local/live?loop=1"\n', "loop applies to files only"),
    ],
)
def test_serve_checks_what_would_stop_its_start_up(capsys, tmp_path, toml, needle):
    """Settings the server would only trip over while starting are one line and exit 2."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--port", "0")
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "notanumber"])
    assert e.value.code == 2


def test_eval_switch_flags_parse_as_switches():
    from server.cli import build_parser

    def parsed(*flags):
        return build_parser().parse_args(["eval", "frames", "masks", *flags])

    assert parsed().compensate is False
    assert parsed("--compensate").compensate is True
    assert parsed("--compensate", "--no-compensate").compensate is False
    with pytest.raises(SystemExit):  # "--compensate false" used to read as True
        parsed("--compensate", "false")
    args = parsed("--agreement", "0.4", "--noise-floor", "0.03", "--keyframe-energy", "0.05")
    assert (args.agreement, args.noise_floor, args.keyframe_energy) == (0.4, 0.03, 0.05)


@pytest.fixture
def no_start(monkeypatch):
    """Start-up checks must refuse before the app exists: building it fails the test."""
    import server.app

    def refuse(*a, **k):
        pytest.fail("the server started despite a bad setting")

    monkeypatch.setattr(server.app, "create_app", refuse)


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)


@pytest.mark.parametrize(
    ("device", "needle"),
    [("bogus", "unknown device 'bogus': use auto, cpu, cuda or cuda:N"), ("cuda:0", "no CUDA support")],
)
def test_serve_refuses_a_device_it_cannot_use_before_starting(capsys, no_start, no_cuda, device, needle):
    code, _, err = run(capsys, "serve", "--device", device, "--port", "0")
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_serve_refuses_a_device_from_the_config_file(capsys, tmp_path, no_start):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[engine]\ndevice = "gpu0"\n')
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--port", "0")
    assert code == 2 and "unknown device 'gpu0'" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content", [b"\x80\x02garbage" + bytes(range(256)) * 40, b""])
def test_serve_reads_the_weights_file_before_starting(capsys, tmp_path, no_start, content):
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(content)
    code, _, err = run(capsys, "serve", "--weights", str(weights), "--port", "0")
    assert code == 2 and err.count("\n") == 1, err
    assert "garbage.pth" in err and "cannot read weights" in err and "weights_only" not in err


def test_segment_refuses_an_unknown_device_before_any_work(capsys, tmp_path):
    masks = tmp_path / "m"
    clip = str(tmp_path / "x.mp4")
    code, _, err = run(capsys, "segment", clip, "--device", "bogus", "--masks-dir", str(masks))
    assert code == 2 and "unknown device 'bogus'" in err and err.count("\n") == 1, err
    assert not masks.exists()


def test_eval_refuses_cuda_without_cuda_in_one_line(capsys, tmp_path, no_cuda):
    from tests.unit.test_evaluate import write_davis

    fdir, mdir, _, _ = write_davis(tmp_path, n=2)
    code, _, err = run(capsys, "eval", str(fdir), str(mdir), "--device", "cuda")
    assert code == 2 and err.count("\n") == 1, err
    assert "device 'cuda' requested but this torch build has no CUDA support" in err


def test_an_empty_token_is_refused_rather_than_running_open(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--token", "", "--port", "0")
    assert code == 2 and "token is empty" in err, err
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ntoken = " "\n')
    code, _, err = run(capsys, "serve", "--config", str(cfg), "--port", "0")
    assert code == 2 and "token is empty" in err, err


def test_serve_refuses_weights_made_for_another_network(capsys, tmp_path, no_start):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"not.this.model": torch.zeros(2)}, str(other))
    code, _, err = run(capsys, "serve", "--model", "selfie", "--weights", str(other), "--port", "0")
    assert code == 2 and "other.safetensors" in err and err.count("\n") == 1, err


class _App:
    def __init__(self, clean_shutdown: bool) -> None:
        self.state = type("State", (), {"clean_shutdown": clean_shutdown})()


def test_a_thread_left_after_shutdown_is_named_and_the_status_is_1(caplog):
    """An engine still busy (building or warming a model when SIGTERM came) outlives the bound:
    the exit status is 1 and the log names it, as for a stuck source."""
    import threading

    from server.cli import exit_status

    release = threading.Event()
    engine = threading.Thread(target=release.wait, name="engine", daemon=True)
    engine.start()
    try:
        with caplog.at_level("ERROR", logger="segstream.server"):
            assert exit_status(_App(clean_shutdown=False), started=True, bound=0.1) == 1
    finally:
        release.set()
        engine.join(2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "segstream.server"]
    assert any("still running" in m and "engine" in m for m in lines), lines


def test_exit_status_after_a_clean_shutdown_and_a_failed_start_up():
    from server.cli import exit_status

    assert exit_status(_App(clean_shutdown=True), started=True, bound=0.1) == 0
    assert exit_status(_App(clean_shutdown=True), started=False, bound=0.1) == 3


def test_serve_exits_3_when_start_up_fails_after_the_checks(monkeypatch, capsys):
    """What only start-up can see (the engine started, then a failure) ends with status 3."""
    from pipeline.manager import StreamManager

    real_start = StreamManager.start

    def start(self):
        real_start(self)
        raise RuntimeError("the device went away")

    monkeypatch.setattr(StreamManager, "start", start)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "null", "--no-demo", "--port", "0"])
    assert exc.value.code == 3


def test_serve_builds_a_network_checked_against_its_weights_file_once(monkeypatch, tmp_path):
    """The start-up check applies a configured weights file to its network; the server then
    serves that build instead of building (and reading the file) again."""
    import time
    from pathlib import Path

    from fastapi.testclient import TestClient

    import models.registry
    import pipeline.manager
    import server.cli

    weights = Path(models.registry.__file__).parent / "weights" / "selfie.safetensors"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'default_model = "selfie"\n[weights]\nselfie = "{weights}"\n[engine]\nthreads = 1\n')
    builds: list[str] = []
    real = models.registry.build_model

    def counting(name, *args, **kwargs):
        builds.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models.registry, "build_model", counting)
    monkeypatch.setattr(pipeline.manager, "build_model", counting)
    ready: list[bool] = []

    def serve_app(app, _cfg) -> int:
        with TestClient(app) as client:
            for _ in range(1200):  # a GPU warms up every batch size's kernels and graph: seconds
                if client.get("/readyz").json()["ready"]:
                    ready.append(True)
                    break
                time.sleep(0.05)
        return 0

    monkeypatch.setattr(server.cli, "serve_app", serve_app)
    assert main(["serve", "--config", str(cfg), "--port", "0", "--no-demo"]) == 0
    assert ready == [True]
    assert builds == ["selfie"]
