"""Profiling: NVTX ranges per node (a fake NVTX backend records them, so this runs on the CPU), a profiler
trace attributed to graph nodes, its summary and file round trip, and the views of a real H100 timing
cache (heatmap, slowest, roofline) checked against the numbers they are drawn from."""

import json
import math
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import prefill_then_decode
from workbench.kernels.autotune import TimingCache, instance_key
from workbench.profiling import enabled, load_trace, nvtx_ops, nvtx_range, op_ranges_as, save_trace, \
    trace_program, trace_summary
from workbench.profiling.trace import COLUMNS, timeline_figure
from workbench.profiling.views import config_shape_heatmap, roofline_figure, roofline_rows, top_slowest_figure

H100 = Path(__file__).parent / "data" / "h100_llama3_8b_tune.json"


def steps(program):
    return prefill_then_decode(program)


def compute_nodes(graph):
    """Nodes that run an ATen op (Python operators on tuples, ``operator.getitem``, run none)."""
    return [n for n in graph.nodes if not n.op.startswith("operator.")]


# --- NVTX ----------------------------------------------------------------------------------------

class FakeNvtx:
    """Records what would reach Nsight: ("push", name) and ("pop",)."""

    def __init__(self):
        self.calls = []

    def range_push(self, name):  # the torch.cuda.nvtx spelling
        self.calls.append(("push", name))

    def range_pop(self):
        self.calls.append(("pop",))

    def push_range(self, message):  # the nvtx package's spelling
        self.calls.append(("push", message))

    def pop_range(self):
        self.calls.append(("pop",))


def nested_ranges(calls):
    """The names pushed, checking every push is popped before the next (per-node ranges never nest)."""
    names, depth = [], 0
    for c in calls:
        if c[0] == "push":
            assert depth == 0, "a node range opened inside another"
            names.append(c[1])
        depth += 1 if c[0] == "push" else -1
    assert depth == 0
    return names


@pytest.fixture
def fake_cuda_nvtx(monkeypatch):
    """CUDA 'available', torch.cuda.nvtx faked, the nvtx package hidden (as on the GPU machine)."""
    fake = FakeNvtx()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "nvtx", fake)
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    monkeypatch.delenv("WORKBENCH_NVTX", raising=False)
    return fake


def test_nvtx_is_a_noop_without_cuda(program, monkeypatch):
    fake = FakeNvtx()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "nvtx", fake)
    monkeypatch.setitem(sys.modules, "nvtx", fake)

    @nvtx_range("decorated")
    def f():
        return 3

    with nvtx_range("block"):
        assert f() == 3
    with nvtx_ops():
        assert not enabled()  # no one to see the ranges: the executor keeps its fast path
        program.run(**steps(program)[1])
    monkeypatch.setenv("WORKBENCH_NVTX", "1")
    assert not enabled()
    program.run(**steps(program)[1])
    assert fake.calls == []


def test_nvtx_ranges_follow_the_nodes_in_order(program, fake_cuda_nvtx):
    prefill, decode = steps(program)
    assert not enabled()
    program.run(**decode)
    assert fake_cuda_nvtx.calls == []  # off unless asked for

    @nvtx_range("decode step")
    def step():
        return program.run(**decode)

    with nvtx_ops():
        assert enabled()
        step()
    calls = fake_cuda_nvtx.calls
    assert calls[0] == ("push", "decode step") and calls[-1] == ("pop",)
    names = nested_ranges(calls[1:-1])
    assert names == [f"{n.name} {n.op}" for n in program.graph.nodes]
    assert not enabled()  # the block's setting does not outlive it


def test_nvtx_env_var_and_the_nvtx_package(program, fake_cuda_nvtx, monkeypatch):
    package = FakeNvtx()
    monkeypatch.setitem(sys.modules, "nvtx", types.SimpleNamespace(push_range=package.push_range,
                                                                   pop_range=package.pop_range))
    monkeypatch.setenv("WORKBENCH_NVTX", "1")
    decode = steps(program)[1]
    program.run(**decode)
    # the nvtx package is preferred to torch.cuda.nvtx when importable
    assert fake_cuda_nvtx.calls == []
    assert nested_ranges(package.calls) == [f"{n.name} {n.op}" for n in program.graph.nodes]
    package.calls.clear()
    with op_ranges_as(None):  # a block can turn the process-wide setting off
        assert not enabled()
        program.run(**decode)
    assert package.calls == []


# --- trace -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced(program, tmp_path_factory):
    raw = tmp_path_factory.mktemp("trace") / "chrome.json"
    return trace_program(program, steps(program), warmup=1, chrome_trace=raw), raw


def test_trace_attributes_cpu_ops_to_nodes(program, traced):
    df, raw = traced
    graph = program.graph
    op_of = {n.name: n.op for n in graph.nodes}
    assert list(df.columns) == list(COLUMNS) and len(df) > len(graph.nodes)
    assert set(df["device"]) == {"cpu"} and set(df["step"]) == {0, 1}
    assert (df["dur_us"] > 0).all()
    assert df["name"].str.startswith("aten::").all()  # the ATen ops, not the workbench ranges
    assert all(op_of[n] == op for n, op in zip(df["node"], df["op"]))
    for step, rows in df.groupby("step"):
        # every compute node of the graph ran kernels in every step, first seen in graph order
        first = rows.groupby("node", sort=False)["start_us"].min().sort_values()
        assert list(first.index) == [n.name for n in compute_nodes(graph)]
    # steps are in order; within a node the rows are its top-level ops: back to back, never nested
    assert df[df["step"] == 0]["start_us"].max() < df[df["step"] == 1]["start_us"].min()
    for _, rows in df.groupby(["step", "node"]):
        ends = (rows["start_us"] + rows["dur_us"]).to_numpy()[:-1]
        assert (rows["start_us"].to_numpy()[1:] >= ends - 1e-3).all()
    assert df.attrs["device"] == "cpu" and df.attrs["steps"] == 2 and df.attrs["env"]["gpu"] == "cpu"
    assert "traceEvents" in json.loads(raw.read_text())  # the raw trace is kept for Perfetto
    assert not enabled()  # the trace's record_function ranges end with it


def test_trace_summary_totals(traced):
    df, _ = traced
    nodes = trace_summary(df, by="node")
    assert nodes["total_us"].sum() == pytest.approx(df["dur_us"].sum())
    assert nodes["kernels"].sum() == len(df)
    assert list(nodes["total_us"]) == sorted(nodes["total_us"], reverse=True)
    assert nodes["share"].sum() == pytest.approx(1.0)
    for r in nodes.head(5).itertuples():
        rows = df[df["node"] == r.node]
        assert r.total_us == pytest.approx(rows["dur_us"].sum()) and r.kernels == len(rows)
        assert r.op == rows["op"].iloc[0]
    ops = trace_summary(df, by="op").set_index("op")
    expected = df.groupby("op")["dur_us"].sum()
    assert ops["total_us"].to_dict() == pytest.approx(expected.to_dict())
    names = trace_summary(df, by="name")
    assert names["kernels"].sum() == len(df) and "aten::linear" in set(names["name"])


def test_trace_file_round_trip_is_exact(traced, tmp_path):
    df, _ = traced
    path = save_trace(df, tmp_path / "sub" / "trace.json")
    back = load_trace(path)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert back.attrs == df.attrs
    empty = df.iloc[:0].copy()
    pd.testing.assert_frame_equal(load_trace(save_trace(empty, tmp_path / "empty.json")), empty)


def test_timeline_and_slowest_of_a_trace(traced):
    df, _ = traced
    fig = timeline_figure(df)
    assert sum(len(t.x) for t in fig.data) == len(df)
    bars = pd.concat([pd.DataFrame({"base": t.base, "x": t.x, "y": t.y, "name": t.customdata[:, 0]})
                      for t in fig.data])
    assert sorted(bars["base"]) == sorted(df["start_us"]) and bars["x"].sum() == pytest.approx(df["dur_us"].sum())
    assert set(bars["y"]) == {f"cpu thread {s}" for s in df["stream"].unique()}
    by_op = timeline_figure(df, lanes="op")
    assert {y for t in by_op.data for y in t.y} == {t.name for t in by_op.data}  # one lane per op, coloured by op
    summary = trace_summary(df, by="node")
    top = top_slowest_figure(summary, n=7).data[0]
    assert list(top.x) == pytest.approx(list(summary["total_us"].head(7) / 1e3))
    assert list(top.y) == list(summary["node"].head(7))


# --- views of a timing cache -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def h100():
    return TimingCache.view(H100).table()


def test_heatmap_cells_are_the_cache_timings(h100):
    table = h100.copy()
    rope = table["op"] == "workbench.rope"
    # one failed candidate (inf) and one never timed for an instance: both gaps
    failed = table.index[rope][1]
    table.loc[failed, "ms"] = math.inf
    dropped = table.index[rope][-1]
    table = table.drop(index=dropped)
    fig = config_shape_heatmap(table, "rope")
    heat, chosen = fig.data
    t = table[table["op"] == "workbench.rope"]
    keys = list(dict.fromkeys(t["key"]))
    assert len(heat.x) == len(keys) == 8 and len(heat.y) == 6  # q and k at 4 buckets; reference + 5 configs
    cells = {(y, x): heat.z[i][j] for i, y in enumerate(heat.y) for j, x in enumerate(heat.x)}
    label = dict(zip(keys, heat.x))
    for r in t.itertuples():
        cand = r.tactic if r.config == "null" else f"{r.tactic} {r.config}"
        expected = None if math.isinf(r.ms) else r.ms
        assert cells.pop((cand, label[r.key])) == expected
    assert list(cells.values()) == [None]  # the dropped one
    assert sum(v is None for row in heat.z for v in row) == 2
    best = t[t["chosen"]]
    assert list(chosen.x) == [label[k] for k in best["key"]]
    rel = config_shape_heatmap(table, "workbench.rope", relative=True).data[0]
    for j in range(len(keys)):
        assert min(row[j] for row in rel.z if row[j] is not None) == 1.0


def test_top_slowest_of_a_timing_table(h100):
    fig = top_slowest_figure(h100, n=5)
    bar = fig.data[0]
    chosen = h100[h100["chosen"]]["ms"].sort_values(ascending=False)
    assert list(bar.x) == list(chosen.head(5)) and list(bar.x) == sorted(bar.x, reverse=True)
    assert bar.y[0].startswith("aten.linear.default 1x2048x4096")  # the lm_head of the 2048-token bucket
    assert len(top_slowest_figure(h100, n=50).data[0].x) == len(chosen) == 44


def test_roofline_rows_use_the_cost_models(h100):
    from workbench.graph.ir import TensorSpec
    from workbench.kernels.cost import OpCall
    from workbench.kernels.registry import REGISTRY

    m, n, k = 48, 96, 64
    linear = instance_key("aten.linear.default", (torch.empty(1, m, k, dtype=torch.bfloat16),
                                                  torch.empty(n, k, dtype=torch.bfloat16)), {})
    extra = pd.DataFrame([{"op": "aten.linear.default", "key": linear, "tactic": "reference", "config": "null",
                           "ms": 0.01, "chosen": True}])
    rows = roofline_rows(pd.concat([h100, extra], ignore_index=True))
    lin = rows[rows["key"] == linear].iloc[0]
    assert lin["flops"] == 2 * m * n * k and lin["bytes"] == 2 * (m * k + n * k + m * n)
    assert lin["tflops"] == pytest.approx(2 * m * n * k / 1e-5 / 1e12)
    # a fused op: the same numbers as its cost model called by hand (two outputs: normed, sum)
    key = next(k for k in h100["key"] if k.startswith('["workbench.add_rms_norm", [[[1, 4, 4096]'))
    spec = TensorSpec([1, 4, 4096], "bfloat16")
    by_hand = REGISTRY.get("workbench.add_rms_norm").cost(
        OpCall([spec, spec, TensorSpec([4096], "bfloat16"), 1e-5], {}, [spec, spec], {}))
    row = rows[rows["key"] == key].iloc[0]
    assert (row["flops"], row["bytes"]) == (by_hand.flops, by_hand.bytes) == (4 * 2 * 4 * 4096, 2 * 4096 * (4 * 4 + 1))
    # paged attention's reference reads its metadata (.tolist()): no meta run, so NaN with a note
    paged = rows[rows["op"] == "workbench.paged_attention"]
    assert len(paged) == 4 and paged["flops"].isna().all() and paged["note"].str.startswith("not costed").all()
    assert rows["flops"].notna().sum() == 41


def test_roofline_figure_draws_the_given_ceilings(h100):
    ceilings = {"copy_gbps": 2600.0, "matmul_tflops": 650.0}
    rows = roofline_rows(h100)
    fig = roofline_figure(rows, ceilings)
    *points, memory, roof = fig.data
    ridge = 650.0 * 1e3 / 2600.0
    assert list(roof.y) == [650.0, 650.0] and roof.x[0] == pytest.approx(ridge)
    assert memory.x[-1] == pytest.approx(ridge) and memory.y[-1] == pytest.approx(650.0)
    assert all(y / x == pytest.approx(2600.0 / 1e3) for x, y in zip(memory.x, memory.y))
    costed = rows[rows["flops"].notna()]
    assert sum(len(p.x) for p in points) == len(costed) == 40
    for p in points:
        for x, y, (name, ms, gbps, pct) in zip(p.x, p.y, p.customdata):
            r = costed[costed["name"] == name].iloc[0]
            assert x == pytest.approx(r["flops"] / r["bytes"]) and y == pytest.approx(r["flops"] / (ms * 1e-3) / 1e12)
            assert pct == pytest.approx(100 * y / min(650.0, x * 2.6))
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "log"
    assert "left out (4" in fig.layout.title.text and "paged_attention" in fig.layout.title.text


def test_gpu_kernels_are_attributed_through_their_launch():
    """A hand-written Chrome trace of a GPU run (the layout torch.profiler writes): kernels run on the device
    later than their launch; each is found through its runtime call's correlation id, or its op's External id."""
    from workbench.profiling.trace import NODE_PREFIX, STEP_PREFIX, chrome_trace_frame

    t0 = 1_712_345_678_901.123  # absolute µs, as the profiler writes them

    def span(cat, name, ts, dur, tid=100, **args):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1 if tid == 100 else 0, "tid": tid,
                "ts": t0 + ts, "dur": dur, "args": args}

    events = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 100, "args": {"name": "python"}},
        span("user_annotation", STEP_PREFIX + "0", 0, 100, **{"External id": 1}),
        span("cuda_runtime", "cudaMemcpyAsync", 2, 3, correlation=1003, **{"External id": 1}),
        span("user_annotation", NODE_PREFIX + "linear_0 aten.linear.default", 10, 30, **{"External id": 2}),
        span("cpu_op", "aten::linear", 11, 25, **{"External id": 3}),
        span("cpu_op", "aten::addmm", 12, 20, **{"External id": 4}),
        span("cuda_runtime", "cudaLaunchKernel", 13, 5, correlation=1001, **{"External id": 4}),
        span("user_annotation", NODE_PREFIX + "rope_0 workbench.rope", 50, 20, **{"External id": 5}),
        span("cuda_driver", "cuLaunchKernelEx", 52, 4, correlation=1002, **{"External id": 5}),  # a Triton launch
        span("user_annotation", STEP_PREFIX + "1", 200, 50, **{"External id": 6}),
        span("user_annotation", NODE_PREFIX + "rope_0 workbench.rope", 210, 20, **{"External id": 7}),
        span("cuda_driver", "cuLaunchKernelEx", 212, 4, correlation=1004, **{"External id": 7}),
        # device side: stream 7, plus an old-style "Kernel" known only by its op's External id
        span("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 5, 1.5, tid=7, correlation=1003, stream=7),
        span("kernel", "sm90_gemm", 20, 8.25, tid=7, correlation=1001, stream=7, **{"External id": 4}),
        span("gpu_user_annotation", NODE_PREFIX + "linear_0 aten.linear.default", 20, 8.25, tid=7),
        span("Kernel", "splitk_reduce", 30, 2, tid=13, stream=13, **{"External id": 3}),
        span("kernel", "_rope_kernel", 60, 3.5, tid=7, correlation=1002, stream=7),
        span("kernel", "_rope_kernel", 220, 3.25, tid=7, correlation=1004, stream=7),
        span("kernel", "nccl_other_thread", 300, 1, tid=9, correlation=9999, stream=9),  # launched outside the steps
    ]
    df = chrome_trace_frame({"traceEvents": events}, gpu=True)
    assert df[["step", "node", "op", "name", "device", "stream"]].values.tolist() == [
        [0, "", "", "Memcpy HtoD (Pageable -> Device)", "cuda", 7],
        [0, "linear_0", "aten.linear.default", "sm90_gemm", "cuda", 7],
        [0, "linear_0", "aten.linear.default", "splitk_reduce", "cuda", 13],
        [0, "rope_0", "workbench.rope", "_rope_kernel", "cuda", 7],
        [1, "rope_0", "workbench.rope", "_rope_kernel", "cuda", 7],
    ]
    assert df["start_us"].tolist() == pytest.approx([5, 20, 30, 60, 220], abs=1e-6)
    assert df["dur_us"].tolist() == [1.5, 8.25, 2.0, 3.5, 3.25]
    nodes = trace_summary(df).set_index("node")
    assert nodes.loc["rope_0", "kernels"] == 2 and nodes.loc["rope_0", "total_us"] == 6.75
    assert set(timeline_figure(df).data[0].y) <= {"cuda stream 7", "cuda stream 13"}
