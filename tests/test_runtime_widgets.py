"""The runtime's figures and the capacity widget, on tiny-llama's optimized graph on the CPU: the timeline
figure's traces are the engine's timeline (a real run whose tiny KV pool forces preemptions), the capacity
figure's lines are the concurrency table, and the widget, driven from Python, always holds the plan
``plan_capacity`` computes for its fields."""

import pandas as pd
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.graph.paged import PagedLayout
from workbench.runtime.capacity import concurrency_table, plan_capacity
from workbench.runtime.engine import LLMEngine
from workbench.runtime.plots import capacity_figure, request_table, timeline_figure
from workbench.runtime.sampling import SamplingParams
from workbench.runtime.scheduler import SchedulerConfig

pytest.importorskip("plotly")

MIB = 2**20
BUDGET = 24  # max_num_batched_tokens of the run


@pytest.fixture(scope="module")
def run(tiny_program):
    """Ten requests of 20-50 tokens arriving one per step into 10 blocks of 16 tokens (a request peaks at 4):
    chunked prefill beside decodes, and preemptions. Returns (timeline, outputs)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (int(torch.randint(20, 51, (1,), generator=g)),), generator=g).tolist()
               for _ in range(10)]
    engine = LLMEngine(tiny_program, num_blocks=10,
                       config=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=6))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
        engine.step()
    while engine.has_unfinished:
        engine.step()
    return engine.timeline(), [engine.output(f"r{i}") for i in range(10)]


def traces(fig):
    return {t.name: t for t in fig.data}


def test_timeline_figure_traces_are_the_timeline(run):
    steps, _ = run
    assert steps["preempted"].sum() > 0  # the run is meant to preempt
    assert ((steps["prefill_tokens"] > 0) & (steps["decode_tokens"] > 0)).any()
    fig = timeline_figure(steps, max_num_batched_tokens=BUDGET)
    t = traces(fig)
    assert list(t) == ["prefill tokens", "decode tokens", "graph padding", "KV cache used (%)", "preemption",
                       "running requests", "waiting requests"]
    assert set(t["graph padding"].y) == {0} and f"{len(steps)} steps eager" in fig.layout.title.text  # CPU: eager
    x = steps["step"].tolist()
    for name, column in (("prefill tokens", "prefill_tokens"), ("decode tokens", "decode_tokens"),
                         ("running requests", "running"), ("waiting requests", "waiting")):
        assert list(t[name].x) == x and list(t[name].y) == steps[column].tolist(), name
    assert fig.layout.barmode == "stack"
    assert list(t["KV cache used (%)"].y) == pytest.approx((steps["kv_usage"] * 100).tolist())

    hit = steps[steps["preempted"] > 0]
    marks = t["preemption"]
    assert list(marks.x) == hit["step"].tolist()
    assert list(marks.y) == pytest.approx((hit["kv_usage"] * 100).tolist())  # on the KV line
    for text, n in zip(marks.text, hit["preempted"]):
        assert f": {n} request" in text and "preempted" in text

    # tokens on the first axis; KV % on the second row's left axis, requests on its right axis
    assert {t[n].yaxis for n in ("prefill tokens", "decode tokens")} == {"y"}
    assert t["KV cache used (%)"].yaxis == t["preemption"].yaxis == "y2"
    assert t["running requests"].yaxis == t["waiting requests"].yaxis == "y3"
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"  # one step axis
    assert [s.y0 for s in fig.layout.shapes] == [BUDGET]  # the token budget line
    assert f"{steps['preempted'].sum()} preemptions" in fig.layout.title.text


def test_timeline_figure_shows_each_graphs_padding(tiny_program):
    """Steps replayed in CUDA graphs (emulated on the CPU): the grey bar is the graph's tokens beyond the step's."""
    engine = LLMEngine(tiny_program, num_blocks=32, config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4),
                       emulate_graphs=True, graph_token_sizes=(16, 32))
    for i in range(3):
        engine.add_request(str(i), list(range(3 + 5 * i, 14 + 6 * i)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    steps = engine.timeline()
    fig = timeline_figure(steps)
    pad = traces(fig)["graph padding"]
    tokens = steps["prefill_tokens"] + steps["decode_tokens"]
    assert list(pad.y) == (steps["graph_tokens"] - tokens).tolist() and max(pad.y) > 0
    assert list(pad.customdata) == steps["graph_tokens"].tolist() and "0 steps eager" in fig.layout.title.text


def test_timeline_figure_without_preemptions_has_an_empty_marker_trace(run):
    steps, _ = run
    calm = steps.assign(preempted=0)
    t = traces(timeline_figure(calm))
    assert list(t["preemption"].x) == [] and "0 preemptions" in timeline_figure(calm).layout.title.text


def test_an_empty_timeline_says_to_run_steps_first(tiny_program):
    fresh = LLMEngine(tiny_program, num_blocks=4).timeline()
    for df in (fresh, pd.DataFrame()):
        with pytest.raises(WorkbenchError, match="run some steps first"):
            timeline_figure(df)
    with pytest.raises(WorkbenchError, match="kv_usage"):
        timeline_figure(pd.DataFrame({"step": [0], "prefill_tokens": [3], "decode_tokens": [0], "running": [1],
                                      "waiting": [0], "preempted": [0]}))


def test_request_table_counts_each_request(run):
    steps, outs = run
    table = request_table(outs)
    assert table["request"].tolist() == [f"r{i}" for i in range(10)]
    assert table["output_tokens"].tolist() == [8] * 10
    assert table["prompt_tokens"].tolist() == [len(o.prompt_token_ids) for o in outs]
    assert table["preemptions"].sum() == steps["preempted"].sum()
    assert table["cached_tokens"].tolist() == [o.metrics["num_cached_tokens"] for o in outs]
    assert (table["ttft_ms"] > 0).all() and (table["e2e_ms"] >= table["ttft_ms"]).all()
    assert set(table["finish_reason"]) == {"length"}


@pytest.fixture(scope="module")
def layout(tiny_program):
    return PagedLayout.from_graph(tiny_program.graph)


def test_capacity_figure_has_a_line_per_request_shape(layout):
    lengths = [(100, 20), (400, 100)]
    table = concurrency_table(layout, memory_bytes=16 * MIB, fractions=[0.5, 0.7, 0.9], lengths=lengths,
                              weights_bytes=MIB)
    fig = capacity_figure(table, fraction=0.7)
    assert [t.name for t in fig.data] == ["100+20 tokens", "400+100 tokens"]
    for trace, (p, o) in zip(fig.data, lengths):
        rows = table[(table.prompt_len == p) & (table.output_len == o)]
        assert list(trace.x) == [0.5, 0.7, 0.9]
        assert list(trace.y) == rows["max_concurrency"].tolist()
        assert [c[0] for c in trace.customdata] == rows["num_blocks"].tolist()
    # 0.7 × 16 MiB − 1 MiB = 10695475 B over 8192-B blocks (2 layers × 2 heads × 16 dims × K,V × fp32, 16 tokens)
    assert fig.data[0].y[1] == (10695475 // 8192) // 8  # 120 tokens take 8 blocks
    assert [s.x0 for s in fig.layout.shapes] == [0.7]
    with pytest.raises(WorkbenchError, match="empty"):
        capacity_figure(table.iloc[:0])


# ---- the widget ----------------------------------------------------------------------------------------------
@pytest.fixture
def widget(tiny_program):
    pytest.importorskip("ipywidgets")
    from workbench.runtime.widgets import CapacityWidget

    return CapacityWidget(tiny_program.graph, memory_bytes=64 * MIB, weights_bytes=MIB)


def expected(dtype="float32", block_size=16, fraction=0.9, prompt_len=512, output_len=128, weights=MIB):
    """The plan from the model's numbers (2 layers, 2 KV heads, head dim 16), not from the graph."""
    layout = PagedLayout(layers=range(2), kv_heads=2, head_dim=16, dtype=dtype, block_size=block_size)
    return plan_capacity(layout, memory_bytes=64 * MIB, fraction=fraction, prompt_len=prompt_len,
                         output_len=output_len, weights_bytes=weights)


def test_widget_offers_the_graphs_block_size_and_dtype_and_fp8(widget):
    assert widget.block_size.options == (8, 16, 32) and widget.block_size.value == 16
    assert widget.kv_dtype.options == ("float32", "float8_e4m3fn") and widget.kv_dtype.value == "float32"
    # floor(0.9 × 64 MiB) − 1 MiB = 59349401 B → 7244 blocks of 8192 B; 640 tokens take 40 blocks → 181 at once
    assert (widget.plan.num_blocks, widget.plan.max_concurrency) == (7244, 181)
    assert widget.plan == expected()
    assert widget.plan.summary() in widget.status.value


def test_every_field_replans(widget):
    widget.fraction.value = 0.5
    assert widget.plan == expected(fraction=0.5)
    widget.block_size.value = 32
    assert widget.plan == expected(fraction=0.5, block_size=32)
    assert widget.plan.layout.block_size == 32 and widget.layout.block_size == 32
    widget.kv_dtype.value = "float8_e4m3fn"
    fp8 = expected(fraction=0.5, block_size=32, dtype="float8_e4m3fn")
    # fp8 takes a quarter of fp32's bytes: 32505856 B hold 1984 fp32 blocks of 32 tokens, 7936 fp8 ones
    assert widget.plan == fp8 and (expected(fraction=0.5, block_size=32).num_blocks, fp8.num_blocks) == (1984, 7936)
    widget.prompt_len.value = 1000
    widget.output_len.value = 24
    want = expected(fraction=0.5, block_size=32, dtype="float8_e4m3fn", prompt_len=1000, output_len=24)
    assert widget.plan == want
    assert (widget.plan.num_blocks, widget.plan.blocks_per_request, widget.plan.max_concurrency) == \
        (want.num_blocks, 32, want.num_blocks // 32)
    assert widget.error is None and widget.plan.summary() in widget.status.value


def test_figure_follows_the_fields(widget):
    widget.prompt_len.value = 200
    widget.fraction.value = 0.6
    (line,) = widget.figure.data
    assert line.name == "200+128 tokens"
    assert list(line.x) == pytest.approx([0.05 * i for i in range(1, 21)])  # every slider fraction leaves memory
    assert line.y[11] == widget.plan.max_concurrency  # 0.6 is the 12th fraction
    assert [s.x0 for s in widget.figure.layout.shapes] == [0.6]


def test_fields_that_leave_no_memory_show_the_error_and_recover(tiny_program):
    pytest.importorskip("ipywidgets")
    from workbench.runtime.widgets import CapacityWidget

    w = CapacityWidget(tiny_program.graph, memory_bytes=64 * MIB, weights_bytes=40 * MIB)
    assert w.plan == expected(weights=40 * MIB)
    # the figure only has the fractions whose share of 64 MiB exceeds the 40 MiB of weights
    assert list(w.figure.data[0].x) == pytest.approx([0.65 + 0.05 * i for i in range(8)])
    w.fraction.value = 0.5  # 32 MiB < 40 MiB of weights
    assert w.plan is None and w.figure is None and "no memory left" in w.error and "error" in w.status.value
    w.fraction.value = 0.7
    assert w.error is None and w.plan == expected(fraction=0.7, weights=40 * MIB)
    w.prompt_len.value = 0
    w.output_len.value = 0
    assert w.plan is None and "is 0" in w.error


def test_a_graph_without_paged_attention_is_refused():
    pytest.importorskip("ipywidgets")
    from workbench.graph.ir import Graph
    from workbench.runtime.widgets import CapacityWidget

    with pytest.raises(WorkbenchError, match="paged attention"):
        CapacityWidget(Graph(inputs={}, params={}, nodes=[], outputs=[], dims={}), memory_bytes=MIB)
