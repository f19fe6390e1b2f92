"""Trace a program under ``torch.profiler`` and attribute every kernel to the graph node that ran it.

    df = trace_program(program, steps)          # one row per kernel (GPU) or top-level ATen op (CPU)
    df = chrome_trace_frame(path, gpu=True)     # the same from a Chrome trace recorded by hand
    save_trace(df, "trace.json")                # on the GPU machine ...
    df = load_trace("trace.json")               # ... and analysed anywhere (pandas only)
    trace_summary(df, by="node")                # totals per node, per op type or per kernel name
    timeline_figure(df)                         # plotly Gantt: one lane per stream/thread or per op

How attribution works. Each step runs inside a ``record_function`` range "workbench.step: i", and
``Program.run`` wraps each node in "workbench.node: {node} {op}" (through ``nvtx.op_ranges_as``,
the same hook as the NVTX ranges). The profiler's Chrome trace (its public export) is parsed:

    host events   nest by time on their thread; an event's node is the nearest enclosing node range
    CPU program   rows are the host events directly under a node range (top-level ATen ops: their
                  nested ops are inside them, so durations never overlap and sum to the node's work)
    GPU program   rows are the device events (kernels, memcpy, memset); each is linked to the runtime
                  call that launched it (``correlation``) or, failing that, to its op (``External id``),
                  and takes that host event's node. Kernels launched outside any node (input copies)
                  have node "".

Columns (``COLUMNS``): step, node, op (the node's op), name (kernel or ATen op), device ("cpu" or
"cuda"), stream (CUDA stream of a device row, host thread id of a CPU row), start_us (from the
start of the first step, host clock), dur_us. ``df.attrs`` records where it was measured.

Files are JSON (no pyarrow here or on the GPU machine), written atomically; floats survive exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..env import atomic_write, environment_key
from ..errors import WorkbenchError
from .nvtx import op_ranges_as

STEP_PREFIX = "workbench.step: "
NODE_PREFIX = "workbench.node: "
FORMAT = "workbench-trace"
FORMAT_VERSION = 1
#: column -> dtype; every trace DataFrame (measured or loaded) is built through ``_frame`` with these
COLUMNS = {"step": "int64", "node": "str", "op": "str", "name": "str", "device": "str", "stream": "int64",
           "start_us": "float64", "dur_us": "float64"}
# device work (older kineto wrote "Kernel", "Memcpy"; categories are lower-cased on reading);
# "gpu_user_annotation" only labels a span of device time
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset")


@contextlib.contextmanager
def _native_stderr_quiet():
    """File descriptor 2 to /dev/null for the block: the profiler's C++ side prints "USDT: ... profiler_start" and
    "profiler_stop" lines there as it starts and stops, which a notebook shows as red error output. Only those
    two calls run under it, so nothing of the program's own output is lost."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to redirect (an embedded interpreter): leave it
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def trace_program(program, steps: Iterable[Mapping[str, torch.Tensor]], *, warmup: int = 1,
                  chrome_trace: str | Path | None = None):
    """Run each step (graph inputs, as for ``autotune``) once under the profiler; one row per kernel.

    Every step first runs ``warmup`` times unprofiled (Triton compiles, allocator warms up).
    ``chrome_trace`` keeps the profiler's raw trace too (open it in Perfetto)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    steps = list(steps)
    if not steps:
        raise WorkbenchError("trace_program needs at least one step (a dict of graph inputs)")
    on_gpu = program.device.type == "cuda"
    for _ in range(warmup):
        for step in steps:
            program.run(**step)
    if on_gpu:
        torch.cuda.synchronize(program.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    prof = profile(activities=activities)
    with _native_stderr_quiet():
        prof.start()
    try:
        with op_ranges_as(lambda label: record_function(NODE_PREFIX + label)):
            for i, step in enumerate(steps):
                with record_function(f"{STEP_PREFIX}{i}"):
                    program.run(**step)
        if on_gpu:
            torch.cuda.synchronize(program.device)
    finally:
        with _native_stderr_quiet():
            prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(chrome_trace) if chrome_trace is not None else Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        df = chrome_trace_frame(path, gpu=on_gpu)
    df.attrs = {"env": environment_key(), "device": str(program.device), "steps": len(steps), "warmup": warmup}
    return df


def chrome_trace_frame(trace: str | Path | Mapping, *, gpu: bool):
    """The trace DataFrame of a profiler Chrome trace (a path or the loaded JSON) whose steps and
    nodes carry this module's ranges: device rows with ``gpu``, else top-level host ops per node.

    ``trace_program`` calls this; it also reads a trace recorded by hand with
    ``torch.profiler.profile`` around ``record_function(STEP_PREFIX + "0")`` and
    ``nvtx.op_ranges_as(lambda label: record_function(NODE_PREFIX + label))``."""
    data = trace if isinstance(trace, Mapping) else json.loads(Path(trace).read_text())
    return _frame(_rows(data["traceEvents"], gpu), {})


def trace_summary(df, by: str = "node"):
    """Totals per ``by`` ("node", "op" or "name"), slowest first: kernels, total_us, share of the total.

    Per node the node's op is kept beside it. Totals add up to ``df["dur_us"].sum()``."""
    keys = {"node": ["node", "op"], "op": ["op"], "name": ["name"]}.get(by)
    if keys is None:
        raise WorkbenchError(f"trace_summary by {by!r}: use 'node', 'op' or 'name'")
    out = df.groupby(keys, sort=False, dropna=False).agg(kernels=("dur_us", "size"), total_us=("dur_us", "sum"))
    total = out["total_us"].sum()
    out["share"] = out["total_us"] / total if total else 0.0
    out = out.sort_values("total_us", ascending=False, kind="stable").reset_index()
    out.attrs = dict(df.attrs)
    return out


def save_trace(df, path: str | Path) -> Path:
    """Write a trace DataFrame (and its attrs) as JSON, atomically."""
    path = Path(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise WorkbenchError(f"not a trace DataFrame: missing columns {', '.join(missing)}")
    data = {"format": FORMAT, "version": FORMAT_VERSION, "attrs": df.attrs,
            "columns": {c: df[c].tolist() for c in COLUMNS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data).encode())
    return path


def load_trace(path: str | Path):
    """Read a trace written by ``save_trace``: the same rows, dtypes and attrs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"cannot read trace {path} ({e})") from None
    if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        raise WorkbenchError(f"{path} is not a workbench trace of version {FORMAT_VERSION} "
                             f"(format {data.get('format')!r}, version {data.get('version')!r})")
    cols = data["columns"]
    return _frame([dict(zip(cols, values)) for values in zip(*cols.values())], data.get("attrs", {}))


def timeline_figure(df, *, lanes: str = "stream"):
    """Gantt-like timeline: bars from start to end, one lane per stream/thread (``lanes="stream"``)
    or per op type (``lanes="op"``), coloured by op; hover shows kernel, node, op and duration."""
    import plotly.graph_objects as go

    if lanes not in ("stream", "op"):
        raise WorkbenchError(f"timeline lanes {lanes!r}: use 'stream' or 'op'")
    t = df.copy()
    t["op_label"] = t["op"].str.removeprefix("workbench.").str.removeprefix("aten.").replace("", "(no node)")
    if lanes == "stream":
        kind = t["device"].map({"cuda": "stream", "cpu": "thread"})
        t["lane"] = t["device"] + " " + kind + " " + t["stream"].astype(str)
    else:
        t["lane"] = t["op_label"]
    fig = go.Figure()
    for op, rows in t.groupby("op_label", sort=False):
        fig.add_trace(go.Bar(
            y=rows["lane"], x=rows["dur_us"], base=rows["start_us"], orientation="h", name=op,
            customdata=rows[["name", "node", "op", "step"]].to_numpy(),
            hovertemplate="%{customdata[0]}<br>node %{customdata[1]} (%{customdata[2]}), step %{customdata[3]}"
                          "<br>%{x:.2f} µs from %{base:.1f} µs<extra></extra>"))
    where = df.attrs.get("env", {}).get("gpu", df.attrs.get("device", ""))
    fig.update_layout(barmode="overlay", title=f"Timeline ({len(df)} kernels{', ' + where if where else ''})",
                      xaxis_title="µs from the first step", yaxis_title=lanes,
                      legend=dict(orientation="h", yanchor="top", y=-0.25, font_size=9))  # below: no scroll box
    return fig


# --- parsing the profiler's Chrome trace ---------------------------------------------------------

@dataclass(eq=False)
class _Event:
    cat: str
    name: str
    tid: Any
    start_ns: int
    end_ns: int
    args: dict
    parent: "_Event | None" = field(default=None, repr=False)

    def enclosing(self, prefix: str) -> "_Event | None":
        """The innermost workbench range named ``prefix...`` around this event (or this event itself)."""
        e = self
        while e is not None and not (e.cat == "user_annotation" and e.name.startswith(prefix)):
            e = e.parent
        return e


def _event(e: dict) -> _Event:
    # ts/dur are µs with ns decimals; integer ns make containment exact
    start = round(float(e["ts"]) * 1000)
    end = start + round(float(e.get("dur", 0)) * 1000)
    return _Event(e.get("cat", "").lower(), e.get("name", ""), e.get("tid"), start, end, e.get("args") or {})


def _nest(host: list[_Event]) -> None:
    """Set each host event's parent: the innermost event on its thread whose interval contains it."""
    by_thread: dict[Any, list[_Event]] = {}
    for e in host:
        by_thread.setdefault(e.tid, []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e.start_ns, -e.end_ns))
        stack: list[_Event] = []
        for e in events:
            while stack and not (stack[-1].start_ns <= e.start_ns and e.end_ns <= stack[-1].end_ns):
                stack.pop()
            e.parent = stack[-1] if stack else None
            stack.append(e)


def _rows(trace_events: list[dict], on_gpu: bool) -> list[dict]:
    spans = [_event(e) for e in trace_events if e.get("ph") == "X"]
    device = [e for e in spans if e.cat in _DEVICE_CATS]
    host = [e for e in spans if e.cat not in _DEVICE_CATS and not e.cat.startswith("gpu_")]
    _nest(host)
    step_ranges = [e for e in host if e.cat == "user_annotation" and e.name.startswith(STEP_PREFIX)]
    if not step_ranges:
        raise WorkbenchError("the profiler recorded no step ranges: was the program run under the profiler?")
    origin = min(e.start_ns for e in step_ranges)

    def labels(launcher: _Event | None) -> tuple[int, str, str] | None:
        if launcher is None:
            return None
        step = launcher.enclosing(STEP_PREFIX)
        if step is None:
            return None
        node = launcher.enclosing(NODE_PREFIX)
        name, op = node.name.removeprefix(NODE_PREFIX).split(" ", 1) if node is not None else ("", "")
        return int(step.name.removeprefix(STEP_PREFIX)), name, op

    rows = []
    if not on_gpu:
        for e in host:
            parent = e.parent
            if parent is None or not (parent.cat == "user_annotation" and parent.name.startswith(NODE_PREFIX)):
                continue
            step, node, op = labels(e)
            rows.append({"step": step, "node": node, "op": op, "name": e.name, "device": "cpu",
                         "stream": _lane(e.tid), "start_us": (e.start_ns - origin) / 1000,
                         "dur_us": (e.end_ns - e.start_ns) / 1000})
    else:
        by_correlation = {e.args["correlation"]: e for e in host if "correlation" in e.args}
        by_external = {e.args["External id"]: e for e in host
                       if "External id" in e.args and e.cat in ("cpu_op", "user_annotation")}
        for k in device:
            candidates = (by_correlation.get(k.args.get("correlation")), by_external.get(k.args.get("External id")))
            where = next((w for w in map(labels, candidates) if w is not None), None)
            if where is None:
                continue  # not launched inside a step (another thread's work, or a replayed CUDA graph)
            step, node, op = where
            rows.append({"step": step, "node": node, "op": op, "name": k.name, "device": "cuda",
                         "stream": _lane(k.args.get("stream", k.tid)), "start_us": (k.start_ns - origin) / 1000,
                         "dur_us": (k.end_ns - k.start_ns) / 1000})
    rows.sort(key=lambda r: (r["start_us"], r["stream"]))
    return rows


def _lane(v: Any) -> int:
    """A thread or stream id as an int (Chrome traces write ints; some writers use "stream 7")."""
    if isinstance(v, int):
        return v
    digits = "".join(ch for ch in str(v).split()[-1] if ch.isdigit()) if str(v).split() else ""
    return int(digits) if digits else -1


def _frame(rows: list[dict], attrs: dict):
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)
    df.attrs = dict(attrs)
    return df
