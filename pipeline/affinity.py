"""Which CPUs the network's thread and the rest of the service run on (Linux, opt-in).

On a CPU the engine thread runs the network with ``engine.threads`` torch threads, and
every other thread (capture and FFmpeg's decoders, the finisher, encoders, the server) needs
CPU time too. Left to the scheduler, they all share every core: the network is preempted in
the middle of a pass, its caches are refilled by someone else's frames, and a pass takes
longer inside the service than alone. With ``engine.pin_threads`` the CPUs this process may
use are split: the first ``threads`` of them for the engine thread (torch's own worker
threads, started by it, inherit its set), the others for everything else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class AffinityError(ValueError):
    """The CPUs cannot be split as asked."""


class CpuSplit(NamedTuple):
    allowed: set[int]  # every CPU the process may use (given back at shutdown)
    engine: set[int]  # the engine thread's
    rest: set[int]  # every other thread's


def available_cpus() -> set[int] | None:
    """The CPUs this process may run on, or None where threads cannot be pinned (no such call
    on this platform, or a sandbox that refuses it)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        cpus = set(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus)  # allowed here? (setting what is already set changes nothing)
    except OSError:
        return None
    return cpus


def split_cpus(allowed: set[int], engine_threads: int) -> tuple[set[int], set[int]]:
    """(the engine's CPUs, everyone else's): the lowest ``engine_threads`` of ``allowed``
    for the engine, at least one left for the rest."""
    cpus = sorted(allowed)
    if engine_threads < 1 or len(cpus) < engine_threads + 1:
        raise AffinityError(
            f"engine.pin_threads needs one CPU per torch thread ({engine_threads}) and at least one "
            f"more for decoding and serving; this process may use {len(cpus)}: "
            "lower engine.threads or turn pin_threads off"
        )
    return set(cpus[:engine_threads]), set(cpus[engine_threads:])


def pin_process(cpus: set[int]) -> None:
    """Every thread of the process now, and those they start later, onto ``cpus`` (a thread
    that ended meanwhile is skipped)."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, ValueError):
            continue


def pin_this_thread(cpus: set[int]) -> None:
    """The calling thread (and the threads it starts from now on) onto ``cpus``."""
    os.sched_setaffinity(0, cpus)
