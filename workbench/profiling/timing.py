"""Time a callable the way METHOD.md asks: warm-up, device events, many repeats, median.

On a GPU each repeat is bracketed by CUDA events (no host clock, no sync per
call beyond the events); on the CPU ``time.perf_counter`` is used, so the same
code measures both.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else float("nan")


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device: str | torch.device = "cpu") -> Timing:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), repeats)
