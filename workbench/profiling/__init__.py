"""Timing and profiling helpers shared by benchmarks and (later) the autotuner."""

from .timing import Timing, time_fn

__all__ = ["Timing", "time_fn"]
