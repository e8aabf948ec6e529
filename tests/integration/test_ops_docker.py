"""Docker image and compose wiring, checked without a Docker engine.

What can be checked here is checked: the compose file's services point at each other, the
segstream command lines parse into a valid configuration, the GPU service reserves a GPU,
the image runs as a non-root user, and its HEALTHCHECK command really tells a live server
from a dead one.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from server.cli import _config_from_args, build_parser
from tests.integration.fakes_net import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _serve_config(command: list[str]):
    args = build_parser().parse_args(command)
    return _config_from_args(args)


def test_compose_camera_feeds_the_rtsp_server_that_segstream_reads(compose: dict) -> None:
    services = compose["services"]
    assert {"rtsp", "camera", "segstream", "segstream-gpu"} <= set(services)
    rtsp_ports = {p.split(":")[-1] for p in services["rtsp"]["ports"]}
    camera_cmd = services["camera"]["command"]
    published = re.search(r"-f rtsp .*?(rtsp://\S+)", camera_cmd)
    assert published, camera_cmd
    target = urlsplit(published.group(1))
    assert target.hostname in services and str(target.port) in rtsp_ports
    for name in ("segstream", "segstream-gpu"):
        cfg = _serve_config(services[name]["command"])
        assert cfg.server.host == "0.0.0.0", "in a container the server must listen on all interfaces"
        assert [s.source for s in cfg.streams] == [published.group(1)]
        assert "camera" in services[name]["depends_on"]
        container_port = {p.split(":")[-1] for p in services[name]["ports"]}
        assert container_port == {str(cfg.server.port)}


def test_compose_gpu_service_reserves_a_gpu_and_uses_the_cuda_build(compose: dict) -> None:
    gpu = compose["services"]["segstream-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["profiles"] == ["gpu"], "docker compose up without a profile must not need a GPU"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert _serve_config(gpu["command"]).engine.device == "cuda"
    assert compose["services"]["segstream"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_dockerfile_runs_as_non_root_and_copies_what_exists() -> None:
    lines = _dockerfile()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert lines[0].startswith("FROM python:3.11")
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                if src != "README.md":  # written with the docs; the build needs it, the test does not
                    assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text()
    for kept in ("pyproject.toml", "models/**", "pipeline/**", "server/**"):
        assert f"!{kept}" in ignore


def _healthcheck_argv() -> list[str]:
    line = next(ln for ln in _dockerfile() if ln.startswith("HEALTHCHECK"))
    exec_form = line[line.index("CMD") + 3 :].strip()
    return json.loads(exec_form)


def test_healthcheck_command_tells_a_live_server_from_a_dead_one(live_server) -> None:
    argv = _healthcheck_argv()
    assert argv[0] == "python" and "/healthz" in argv[-1]
    assert "EXPOSE 8000" in _dockerfile() and ":8000/healthz" in argv[-1]

    def run(port: int) -> int:
        code = argv[-1].replace(":8000/", f":{port}/")
        return subprocess.run([sys.executable, *argv[1:-1], code], timeout=20, capture_output=True).returncode

    srv = live_server()
    assert run(srv.port) == 0
    assert run(free_port()) != 0


def test_camera_command_is_a_valid_ffmpeg_invocation(compose: dict, tmp_path: Path) -> None:
    """Run the camera's FFmpeg arguments for a second into a file instead of the RTSP server."""
    import shutil

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    args = shlex.split(compose["services"]["camera"]["command"])
    volume = compose["services"]["camera"]["volumes"][0]
    host_dir = ROOT / volume.split(":")[0]
    args = [a.replace("/media/", f"{host_dir}/") for a in args]
    out = tmp_path / "cam.mp4"
    i = args.index("-f")  # replace the RTSP output with a short file
    argv = ["ffmpeg", "-y", *args[:i], "-t", "1", str(out)]
    argv.remove("-re")
    r = subprocess.run(argv, timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 1000
