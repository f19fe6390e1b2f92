"""Timing and profiling: device timing, NVTX ranges, profiler traces attributed to graph nodes.

Figures (plotly, imported inside each function) are in ``profiling.views`` and ``trace.timeline_figure``."""

from .nvtx import enabled, nvtx_ops, nvtx_range, op_ranges_as
from .timing import Timing, time_fn
from .trace import load_trace, save_trace, trace_program, trace_summary

__all__ = ["Timing", "time_fn", "nvtx_range", "nvtx_ops", "op_ranges_as", "enabled",
           "trace_program", "trace_summary", "save_trace", "load_trace"]
