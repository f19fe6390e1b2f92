"""``GET /metrics``: the runtime's serving metrics in Prometheus text exposition format (version 0.0.4).

    prometheus_text(aengine.metrics, aengine.stats())     # counters, histograms, gauges

The numbers are the runtime's (``runtime.metrics.EngineMetrics``, written by the thread that delivers the
engine's outputs, and the gauges of ``AsyncLLMEngine.stats``); this module only names and formats them, under the record's lock.
"""

from __future__ import annotations

import math

from ..runtime.metrics import EngineMetrics, Histogram

MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def prometheus_text(metrics: EngineMetrics, gauges: dict[str, float]) -> str:
    """Every metric with its HELP and TYPE lines; ``gauges`` as ``AsyncLLMEngine.stats()`` returns them."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

    with metrics.lock:
        reasons = sorted(set(metrics.finished) | {"stop", "length", "abort"})
        metric("workbench_requests_total", "counter", "Requests finished, by finish reason (abort: cancelled "
               "by the client or by shutdown).",
               [f'workbench_requests_total{{finish_reason="{r}"}} {metrics.finished[r]}' for r in reasons])
        rejected = sorted(set(metrics.rejected) | {"queue_full", "closed"})
        metric("workbench_requests_rejected_total", "counter", "Requests refused at submission: the queue was "
               "full (429) or the engine was closed (503).",
               [f'workbench_requests_rejected_total{{reason="{r}"}} {metrics.rejected[r]}' for r in rejected])
        metric("workbench_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [f"workbench_prompt_tokens_total {metrics.prompt_tokens}"])
        metric("workbench_generation_tokens_total", "counter", "Tokens generated for finished requests.",
               [f"workbench_generation_tokens_total {metrics.generation_tokens}"])
        metric("workbench_preemptions_total", "counter", "Requests preempted (KV blocks freed, recomputed later).",
               [f"workbench_preemptions_total {int(gauges.get('preemptions', 0))}"])
        for key, name, help_ in (
                ("running", "workbench_requests_running", "Requests in the running batch."),
                ("waiting", "workbench_requests_waiting", "Requests waiting for admission (or preempted)."),
                ("pending", "workbench_requests_pending", "Requests submitted and not finished (bounded by "
                 "max_pending)."),
                ("kv_usage_percent", "workbench_kv_cache_usage_percent", "Share of KV-cache blocks held by "
                 "requests, in percent."),
                ("prefix_cache_hit_rate", "workbench_prefix_cache_hit_rate", "Share of admitted prompt tokens "
                 "found in the prefix cache (0 to 1).")):
            metric(name, "gauge", help_, [f"{name} {_number(gauges.get(key, 0))}"])
        for hist, name, help_ in (
                (metrics.ttft, "workbench_time_to_first_token_seconds", "Time from submission to the first token."),
                (metrics.itl, "workbench_inter_token_latency_seconds", "Time between consecutive tokens of a "
                 "request."),
                (metrics.e2e, "workbench_e2e_request_latency_seconds", "Time from submission to the end of a "
                 "request.")):
            metric(name, "histogram", help_, _histogram_lines(hist, name))
    return "\n".join(lines) + "\n"


def _histogram_lines(hist: Histogram, name: str) -> list[str]:
    """Cumulative ``_bucket`` lines (``le`` up to +Inf), then ``_sum`` and ``_count``."""
    out, total = [], 0
    for bound, n in zip((*hist.buckets, math.inf), hist.counts):
        total += n
        out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
    return out + [f"{name}_sum {_number(hist.sum)}", f"{name}_count {hist.count}"]


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


__all__ = ["MEDIA_TYPE", "prometheus_text"]
