"""Rolling rates: steady while events come, falling as soon as they stop."""

import pytest

from pipeline.stats import RollingWindow, events_per_second


def test_a_steady_rate_reads_the_same_between_events() -> None:
    times = [i / 25 for i in range(50)]
    for wait in (0.0, 0.02, 0.05, 0.079):  # up to two intervals after the last event
        assert events_per_second(times, times[-1] + wait) == pytest.approx(25.0)


def test_the_rate_falls_once_events_stop() -> None:
    times = [i / 25 for i in range(50)]  # 2 s at 25/s
    after = [events_per_second(times, times[-1] + wait) for wait in (0.5, 1.0, 2.0)]
    # 49 intervals over the 1.96 s span plus the wait beyond two intervals
    assert after == pytest.approx([49 / 2.38, 49 / 2.88, 49 / 3.88])


def test_a_slow_source_reads_its_rate_between_its_events() -> None:
    times = [0.0, 1.0, 2.0]  # one per second
    assert events_per_second(times, 2.9) == pytest.approx(1.0)
    assert events_per_second(times, 5.0) < 0.7


def test_too_few_events_read_zero() -> None:
    assert events_per_second([], 1.0) == 0.0
    assert events_per_second([1.0], 1.0) == 0.0
    assert events_per_second([1.0, 1.0], 1.0) == 0.0


def test_a_rolling_window_falls_when_its_events_stop_and_forgets_them() -> None:
    w = RollingWindow(window_s=5.0)
    for i in range(100):
        w.add(t=i / 25)
    last = 99 / 25
    assert w.rate(now=last) == pytest.approx(25.0)
    assert w.rate(now=last + 1.0) < 22  # it held 25 until the events aged out
    assert w.rate(now=last + 6.0) == 0.0
