"""Timing for the CPU benchmark scripts: paths run in lockstep so machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run of each step, the steps taking turns one run at a time."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per step after `warmup` untimed rounds."""
    interleaved_times(steps, warmup)
    return {name: statistics.median(t) * 1e3 for name, t in interleaved_times(steps, repeats).items()}
