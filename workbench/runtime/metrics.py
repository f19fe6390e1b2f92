"""The serving metrics record: counters and latency histograms the async engine's thread writes.

    metrics = EngineMetrics()
    with metrics.lock:
        metrics.finished["stop"] += 1
        metrics.ttft.observe(0.042)          # seconds

``AsyncLLMEngine`` records into one ``EngineMetrics`` (TTFT is measured from ``submit``); its gauges are
``AsyncLLMEngine.stats()``. Rendering them for Prometheus is the server's (``workbench.serve.metrics``): the
record is plain numbers, so the runtime needs nothing of HTTP. Readers take ``lock`` as the writers do.
"""

from __future__ import annotations

import threading
from collections import Counter

#: Histogram bucket upper bounds in seconds (vLLM's choices, for comparable dashboards).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)


class Histogram:
    """Counts per bucket (not cumulative; rendering accumulates), the sum and the count of observations."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1


class EngineMetrics:
    """What the server exports: written by the thread that delivers the engine's outputs (and ``submit`` for
    rejections), read by the server's renderer; one lock guards both."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: Counter[str] = Counter()   # finish reason -> requests
        self.rejected: Counter[str] = Counter()   # "queue_full" | "closed" -> requests refused by submit
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)


__all__ = ["E2E_BUCKETS", "EngineMetrics", "Histogram", "ITL_BUCKETS", "TTFT_BUCKETS"]
