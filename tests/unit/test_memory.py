"""The allocator keeps frame-sized buffers: no fresh pages (page faults) per frame."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")

# 50 frames that each allocate, write and free three 720p float32 maps (a frame's resized
# probabilities and what is made from them); print whether the settings applied and the page
# faults the loop took.
_PROGRAM = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from pipeline.memory import keep_frame_buffers
    applied = keep_frame_buffers() if sys.argv[1] == "keep" else False
    def frame():
        maps = [np.ones((720, 1280), np.float32) for _ in range(3)]
        del maps
    for _ in range(3):
        frame()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        frame()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _run(mode: str, **env: str) -> tuple[bool, int]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, timeout=60,
        env={**clean, "PYTHONPATH": root, **env}, check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_frame_buffers_are_reused_without_page_faults():
    applied, kept = _run("keep")
    if not applied:
        pytest.skip("not glibc")
    _, plain = _run("plain")
    pages = 720 * 1280 * 4 // 4096
    assert plain >= 50 * pages // 2  # each new map faults its pages in again
    assert kept < pages  # at most the first map's pages


def test_allocator_settings_chosen_in_the_environment_are_left_alone():
    applied, faults = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
    assert faults >= 50 * (720 * 1280 * 4 // 4096) // 2
