"""Cluster time: the offset to Redis's clock, measured so that a starved process does not
skew every timestamp it writes (common/clock.py)."""

from __future__ import annotations

import math

import pytest

from common import clock


@pytest.fixture(autouse=True)
def fresh_offset(monkeypatch):
    monkeypatch.setattr(clock, "_offset", 0.0)
    monkeypatch.setattr(clock, "_offset_rtt", math.inf)


def sample(local_before: float, rtt: float, redis_time: float) -> tuple[float, tuple[int, int], float]:
    seconds = int(redis_time)
    return local_before, (seconds, round((redis_time - seconds) * 1e6)), local_before + rtt


def test_the_quickest_round_trip_of_a_measurement_is_used():
    # Redis's clock is 30 s ahead; the slow sample's reply came back 2 s late.
    offset = clock._settle([sample(1000.0, 2.0, 1030.0), sample(1010.0, 0.002, 1040.001),
                            sample(1020.0, 0.5, 1050.25)])
    assert offset == pytest.approx(30.0, abs=0.01)


def test_a_slow_measurement_does_not_replace_a_quick_one_at_once():
    clock._settle([sample(1000.0, 0.002, 1030.001)])
    # A starved process: the reply waited 2.8 s to be read, which would put the clock 1.4 s off.
    assert clock._settle([sample(1010.0, 2.8, 1040.0)]) == pytest.approx(30.0, abs=0.01)
    assert clock._offset == pytest.approx(30.0, abs=0.01)


def test_a_clock_that_moved_is_followed_even_when_every_round_trip_is_slow():
    clock._settle([sample(1000.0, 0.15, 1030.075)])  # a far Redis: 150 ms round trips
    # This host's clock stepped back 10 s.
    offsets = [clock._settle([sample(1010.0 + i, 0.2, 1050.1 + i)]) for i in range(5)]
    assert offsets[0] == pytest.approx(30.0, abs=0.01)
    assert offsets[-1] == pytest.approx(40.0, abs=0.01)
