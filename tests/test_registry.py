"""The op registry as a plugin mechanism, and the cost models."""

import pytest
import torch

from conftest import rel_err
from workbench.errors import WorkbenchError
from workbench.graph.ir import Graph, Node, Param, Ref, TensorSpec
from workbench.graph.views import layer_table, node_table, op_histogram
from workbench.kernels import REGISTRY, Cost, OpCall, register_op
from workbench.kernels import cost as C
from workbench.models import load_model
from workbench.pipeline import capture_source, program_for

CALLS = {"n": 0}


def _scaled_cost(call: OpCall) -> Cost:
    return Cost(4 * call.out_numel(), call.in_bytes() + call.out_bytes())


@register_op("testplugin.scaled_silu", cost=_scaled_cost)
def scaled_silu(x: torch.Tensor, scale: float) -> torch.Tensor:
    """silu(x) * scale, counting its calls."""
    CALLS["n"] += 1
    return torch.nn.functional.silu(x) * scale


def test_plugin_op_runs_inside_a_captured_graph():
    lm = load_model("tiny-llama")
    captured = capture_source(lm.source)
    graph = Graph.loads(captured.graph.dumps())
    silus = [n for n in graph.nodes if n.op == "aten.silu.default"]
    assert len(silus) == 2
    for n in silus:  # rewrite: silu(x) -> scaled_silu(x, 2.0)
        n.op, n.args = "testplugin.scaled_silu", [n.args[0], 2.0]
    program = program_for(graph, captured.constants, lm.source)

    # the same change made to the transformers model
    class ScaledSiLU(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.silu(x) * 2.0

    for layer in lm.model.model.layers:
        layer.mlp.act_fn = ScaledSiLU()
    ids = torch.randint(0, 512, (2, 12))
    CALLS["n"] = 0
    out = program(ids)
    assert CALLS["n"] == 2
    with torch.no_grad():
        ref = lm.model(ids, use_cache=False).logits
    assert rel_err(out, ref) < 1e-5
    # the plugin's cost model is what the views use
    df = node_table(graph, batch=2, tokens=12)
    row = df[df["op"] == "testplugin.scaled_silu"].iloc[0]
    assert row["flops"] == 4 * 2 * 12 * 128


def test_unknown_op_fails_with_instructions():
    with pytest.raises(WorkbenchError, match="register_op"):
        REGISTRY.get("nolib.mystery_op")
    with pytest.raises(WorkbenchError, match="not an ATen op"):
        REGISTRY.get("aten.no_such_op.default")
    with pytest.raises(WorkbenchError, match="already registered"):
        register_op("testplugin.scaled_silu")(scaled_silu)


def _graph_of(op, args, out_shape, kwargs=None, params=None):
    params = params or {}
    return Graph({"x": TensorSpec(["batch", "tokens", 64], "float32")},
                 {k: Param(k, "parameter", v) for k, v in params.items()},
                 [Node("y", op, args, kwargs or {}, [TensorSpec(out_shape, "float32")])], ["y"],
                 {"batch": {"min": 1, "max": 8}, "tokens": {"min": 1, "max": 1024}})


def test_linear_cost_is_two_mnk_and_reads_weight_once():
    g = _graph_of("aten.linear.default", [Ref("x"), Ref("w")], ["batch", "tokens", 256],
                  params={"w": TensorSpec([256, 64], "float32")})
    row = node_table(g, batch=2, tokens=10).iloc[0]
    assert row["flops"] == 2 * 20 * 256 * 64
    assert row["bytes"] == 4 * (20 * 64 + 256 * 64 + 20 * 256)


def test_attention_and_view_costs():
    q = TensorSpec([1, 4, "tokens", 16], "float32")
    call = OpCall([q, TensorSpec([1, 4, "tokens", 16], "float32"), TensorSpec([1, 4, "tokens", 16], "float32")], {},
                  [q], {"tokens": 32})
    assert C.attention(call).flops == 4 * 4 * 32 * 32 * 16
    assert C.free(call) == Cost(0, 0)
    strided = OpCall([TensorSpec([4, 8], "float32", contiguous=False)], {}, [TensorSpec([32], "float32")], {})
    assert C.reshape(strided).bytes == 2 * 32 * 4  # a reshape of a strided tensor copies
    contiguous = OpCall([TensorSpec([4, 8], "float32")], {}, [TensorSpec([32], "float32")], {})
    assert C.reshape(contiguous).bytes == 0


def test_views_of_a_captured_graph():
    g = capture_source(load_model("tiny-qwen2", materialize=False).source).graph
    df = node_table(g, batch=1, tokens=16)
    assert len(df) == len(g.nodes)
    lin = df[df["op"] == "aten.linear.default"]
    # all linear FLOPs: 2 * tokens * (sum of weight sizes)
    weight_numel = sum(p.spec.numel({}) for n, p in g.params.items() if n.endswith("proj.weight") or n == "lm_head.weight")
    assert lin["flops"].sum() == 2 * 16 * weight_numel
    hist = op_histogram(g, tokens=16)
    assert hist.set_index("op").loc["aten.linear.default", "count"] == 15
    layers = layer_table(g, tokens=16).set_index("group")
    assert {"0", "1", "lm_head"} <= set(layers.index)
    assert layers.loc["0", "flops"] == layers.loc["1", "flops"]


def test_plots_show_the_tables():
    from workbench.graph.plots import layer_cost_figure, op_histogram_figure

    g = capture_source(load_model("tiny-llama", materialize=False).source).graph
    hist = op_histogram(g, tokens=16)
    fig = op_histogram_figure(hist, top=5)
    assert list(fig.data[0].y) == list(hist["count"].head(5))
    layers = layer_table(g, tokens=16)
    fig = layer_cost_figure(layers)
    assert list(fig.data[0].y) == list(layers["flops"] / 1e9)
    assert list(fig.data[1].x) == list(layers["group"])
