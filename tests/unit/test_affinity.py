"""engine.pin_threads: the network's thread on CPUs of its own, every other thread on the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.affinity import AffinityError, available_cpus, split_cpus
from pipeline.config import AppConfig, EngineConfig
from pipeline.manager import StreamManager

CPUS = available_cpus()
pinnable = pytest.mark.skipif(CPUS is None or len(CPUS) < 2, reason="needs 2 CPUs and sched_setaffinity")

# A service with the `null` model and the demo source, pinned; prints the CPUs each kind of
# thread may use while frames flow, and the main thread's after shutdown.
_PROGRAM = textwrap.dedent(
    """
    import json, os, threading
    from pipeline.config import AppConfig, EngineConfig, StreamConfig
    from pipeline.manager import StreamManager
    mgr = StreamManager(AppConfig(default_model="null",
                                  engine=EngineConfig(device="cpu", threads=1, pin_threads=True)))
    done = threading.Event()
    got = []
    mgr.result_listeners.append(lambda r: (got.append(r), len(got) >= 5 and done.set()))
    mgr.start()
    mgr.add(StreamConfig(id="cam", source="demo"))
    assert done.wait(30), "no results"
    by_name = {t.name: t.native_id for t in threading.enumerate()}
    cpus = lambda tid: sorted(os.sched_getaffinity(tid))
    seen = {"engine": cpus(by_name["engine"]), "source": cpus(by_name["source-cam"]),
            "main": cpus(0), "tasks": sorted({tuple(cpus(int(t))) for t in os.listdir("/proc/self/task")})}
    assert mgr.shutdown()
    seen["main_after"] = cpus(0)
    print(json.dumps(seen))
    """
)


@pinnable
def test_the_engine_thread_has_its_cpus_and_every_other_thread_the_rest() -> None:
    assert CPUS is not None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": root}, check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    everyone = sorted(CPUS)
    engine, rest = [everyone[0]], everyone[1:]
    assert seen["engine"] == engine
    assert seen["source"] == rest and seen["main"] == rest
    # every thread (FFmpeg's decoders, encoders, the finisher...) is on one side or the other
    assert all(list(t) in (engine, rest) for t in seen["tasks"]), seen["tasks"]
    assert seen["main_after"] == everyone  # shutdown gives the process all its CPUs back


def test_a_split_that_leaves_nothing_for_the_rest_is_refused() -> None:
    with pytest.raises(AffinityError, match="one CPU per torch thread"):
        split_cpus({0, 1}, 2)
    assert split_cpus({3, 5, 7}, 2) == ({3, 5}, {7})


@pinnable
def test_the_service_refuses_to_start_with_a_split_it_cannot_make() -> None:
    assert CPUS is not None
    engine = EngineConfig(device="cpu", threads=len(CPUS), pin_threads=True)
    cfg = AppConfig(default_model="null", engine=engine)
    with pytest.raises(AffinityError, match=f"this process may use {len(CPUS)}"):
        StreamManager(cfg)
    assert available_cpus() == CPUS  # nothing was pinned


def test_a_sandbox_that_refuses_pinning_is_said_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(pid: int, cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refused, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert available_cpus() is None
    cfg = AppConfig(default_model="null", engine=EngineConfig(device="cpu", threads=1, pin_threads=True))
    with pytest.raises(AffinityError, match="may not pin threads"):
        StreamManager(cfg)
