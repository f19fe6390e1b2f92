"""Time a callable the way METHOD.md asks: warm-up, device events, many repeats, median.

On a GPU each repeat is bracketed by CUDA events (no host clock, no sync per
call beyond the events); on the CPU ``time.perf_counter`` is used, so the same
code measures both.

``graph_calls=n`` (GPU) captures n calls into a CUDA graph and times its replays, per
call: the kernels' own time, without the host's launch overhead, which otherwise
dominates microsecond kernels and makes their timings noise. It is what a runtime that
replays CUDA graphs sees. A callable that cannot be captured (one that syncs with the
host) is timed call by call instead; ``Timing.method`` says which was used.
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
    method: str = "events"

    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else float("nan")


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device: str | torch.device = "cpu",
            graph_calls: int = 0) -> Timing:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and graph_calls:
        timing = _time_graph(fn, repeats, device, graph_calls)
        if timing is not None:
            return timing
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


def _time_graph(fn: Callable[[], object], repeats: int, device: torch.device, calls: int) -> Timing | None:
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:  # not capturable (a host sync inside): the caller times it call by call
        torch.cuda.synchronize(device)
        return None
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return Timing(statistics.median(times), min(times), max(times), repeats, "cuda_graph")
