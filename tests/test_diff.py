"""``workbench diff``: where a graph first diverges from transformers or from another stage, found at the layer
and node where a planted bug is, with the layers before it clean (tiny-llama, CPU, float32)."""

import copy

import pytest
import torch

from conftest import copy_workspace
from workbench.cli import main
from workbench.debug.contributions import group_contributions
from workbench.debug.diff import (compare, compare_steps, diff, residual_stream, run_inputs, step_rows, trace_model,
                                  trace_program, trace_steps, tolerance)
from workbench.debug.engines import compare_engines, precision, tuned_us
from workbench.graph.executor import Program
from workbench.kernels.autotune import TimingCache, autotune
from workbench.kernels.fused import paged_attention
from workbench.kernels.registry import register_op
from workbench.models.intake import load_model, resolve_source
from workbench.quant import PrecisionPlan, quantized_program

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = list(range(3, 19))


@pytest.fixture(scope="module")
def hf_model():
    return load_model(resolve_source("tiny-llama"), dtype=torch.float32).model.eval()


@pytest.fixture(scope="module")
def hf_trace(hf_model):
    return trace_model(hf_model, IDS)


def planted(program, edit) -> Program:
    """``program`` with ``edit(graph)`` applied to a copy of its graph, on the same weights."""
    graph = copy.deepcopy(program.graph)
    edit(graph)
    return Program(graph, program.params)


def test_the_residual_stream_is_found_in_captured_and_fused_graphs(program, checked_optimize):
    captured = checked_optimize("tiny-llama").captured.graph
    for graph in (captured, program.graph):  # aten.add.Tensor after a to(float32); add_rms_norm's output 1
        stream = residual_stream(graph)
        assert [layer for _, _, layer in stream] == [None, 0, 0, 1, 1]
    assert [(n, i) for n, i, _ in residual_stream(program.graph)][-1] == ("add_rms_norm_9", 1)  # inside model.norm


def test_a_correct_graph_does_not_diverge(program, hf_trace):
    d = compare(trace_program(program, IDS), hf_trace)
    assert d.first is None and d.tol == 1e-4 and "no divergence" in d.line()
    layers = d.layers
    assert list(layers.layer) == ["embed", 0, 1, "norm", "logits"]
    assert (layers.rel_err < 1e-5).all() and (layers.cosine > 0.99999).all()
    assert list(layers.columns) == ["layer", "node", "op", "rel_err", "cosine", "max_abs"]
    # every module of a layer is lined up through its path: fused QKV slices are q/k/v_proj
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= set(d.nodes(1).key)


#: the RMSNorm families (test_families checks the LayerNorm ones: GPT-2, GPT-NeoX, Falcon)
FAMILIES = ["tiny-mistral", "tiny-qwen2", "tiny-llama31", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_lines_up_with_transformers_and_does_not_diverge(checked_optimize, name):
    """Each family's optimized graph against its transformers model: every row found (the embedding module's own
    output: Gemma's scaled one) and none past float32's tolerance."""
    program = checked_optimize(name).program
    hf = trace_model(load_model(resolve_source(name), dtype=torch.float32).model.eval(), IDS)
    d = compare(trace_program(program, IDS), hf)
    layers = program.graph.meta["config"]["num_hidden_layers"]
    assert list(d.layers.layer) == ["embed", *range(layers), "norm", "logits"], name
    assert d.first is None and (d.layers.rel_err < 1e-5).all(), d.line()


def test_a_wrong_epsilon_in_layer_1_is_found_at_its_norm(program, hf_trace):
    def edit(graph):  # layer 1's input_layernorm: the add_rms_norm that also makes layer 0's output
        node = next(n for n in graph.nodes if n.module == "model.layers.1.input_layernorm" and "rms_norm" in n.op)
        node.args[3] = 10.0

    d = compare(trace_program(planted(program, edit), IDS), hf_trace)
    layers = d.layers.set_index("layer")
    assert layers.loc[0, "rel_err"] < 1e-6 and layers.loc[1, "rel_err"] > 1e-2
    f = d.first
    assert (f.layer, f.site, f.op, f.origin) == (1, "model.layers.1.input_layernorm", "workbench.add_rms_norm",
                                                 "this op")
    assert f.node == "add_rms_norm_3[0]" and f.inputs and max(f.inputs.values()) < 1e-6
    assert "layer 1" in d.line() and "add_rms_norm_3" in d.line()


def test_a_wrong_op_in_one_layer_is_found_in_that_layer(program, hf_trace):
    @register_op("test.wrong_silu_mul", replace=True)
    def wrong_silu_mul(gate, up):
        return torch.nn.functional.silu(gate) * up * 1.5

    def edit(graph):
        node = next(n for n in graph.nodes if n.op == "workbench.silu_mul" and n.layer == 1)
        node.op = "test.wrong_silu_mul"

    d = compare(trace_program(planted(program, edit), IDS), hf_trace)
    f = d.first
    assert f.layer == 1 and f.site.startswith("model.layers.1.mlp") and f.origin == "this op"
    # silu_mul is no module's last node: the site after it is named, and it among the nodes that made it
    assert any("test.wrong_silu_mul" in n for n in f.nodes)
    assert d.layers.set_index("layer").loc[0, "rel_err"] < 1e-6


def test_decode_steps_through_the_cache_match_transformers(program, hf_model):
    """Three decode steps after the prompt, one token each through the paged KV cache, against transformers' one
    run over the prompt and the same tokens, row by row: every step within float32's tolerance."""
    traces, tokens = trace_steps(program, IDS, 3)
    assert len(traces) == 4 and len(tokens) == 3 and tokens[0] == traces[0].next_token()
    assert traces[1].sites["logits"].value.reshape(-1, 512).shape[0] == 1  # a decode step's one row
    d = compare_steps(traces, step_rows(trace_model(hf_model, IDS + tokens), len(IDS), 3), tokens=tokens)
    assert d.first_step is None and len(d.steps) == 4 and d.tokens == tokens
    steps = d.by_step()
    assert list(steps.step.unique()) == [0, 1, 2, 3] and (steps.rel_err < 1e-5).all()
    assert list(d.step_table().columns) == ["layer", "prefill", "decode 1", "decode 2", "decode 3"]
    assert "in the prefill and 3 decode steps" in d.line()


def test_a_decode_only_bug_is_found_at_its_step_and_layer(program, hf_model):
    """Layer 1's attention off by one in decode steps only (the newest key left out when each sequence has one
    new token): the prefill is clean, and the first divergence is decode step 1, layer 1's attention, made there."""
    @register_op("test.paged_attention_off_by_one", replace=True, effects=True)
    def off_by_one(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, *args, **kwargs):
        decode = int(query_start_loc[-1]) == seq_lens.numel()
        return paged_attention(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens - 1 if decode else seq_lens,
                               query_start_loc, *args, **kwargs)

    def edit(graph):
        node = next(n for n in graph.nodes if n.op == "workbench.paged_attention" and n.layer == 1)
        node.op = "test.paged_attention_off_by_one"

    traces, tokens = trace_steps(planted(program, edit), IDS, 2)
    d = compare_steps(traces, step_rows(trace_model(hf_model, IDS + tokens), len(IDS), 2), tokens=tokens)
    assert d.first is None  # the prompt's prefill is right
    f = d.first_step.first
    assert (f.step, f.layer, f.origin) == (1, 1, "this op") and f.site.startswith("model.layers.1.self_attn")
    assert d.steps.index(d.first_step) == 1  # by identity (the widget's step picker starts there)
    assert any("test.paged_attention_off_by_one" in n for n in f.nodes)
    assert d.decode[0].layers.set_index("layer").loc[0, "rel_err"] < 1e-5
    assert "the prefill is within tolerance; first divergence: decode step 1, layer 1" in d.line()


def test_decode_steps_of_a_captured_graph_and_stage_against_stage(optimized_ws, capsys):
    """A graph without paged attention (the capture stage) decodes by recomputing the sequence; the passes stage
    against it decodes through its cache, fed the same tokens; the command prints the table by step."""
    ws = str(optimized_ws.root)
    d = diff(ws, stage="passes", against="capture", device="cpu", ids=IDS, steps=2)
    assert d.first_step is None and len(d.decode) == 2
    captured = diff(ws, stage="capture", device="cpu", ids=IDS, steps=2)
    assert captured.tokens == d.tokens and captured.first_step is None
    assert main(["diff", ws, "--device", "cpu", "--ids", ",".join(map(str, IDS)), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "relative error by step (decode tokens fed: " in out and "decode 2" in out
    assert "in the prefill and 2 decode steps" in out.splitlines()[-1]
    assert main(["diff", ws, "--device", "cpu", "--steps", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("workbench: error: steps is the number of decode steps after the "
                                               "prompt, 0 to 64; got -1")
    assert main(["diff", ws, "--device", "cpu", "--ids", "3,4,5", "--steps", "1", "--hf-dtype", "float32"]) == 0
    assert "against transformers (float32)" in capsys.readouterr().out
    assert main(["diff", ws, "--device", "cpu", "--against", "capture", "--hf-dtype", "float32"]) == 2
    assert "--hf-dtype sets the transformers model's dtype" in capsys.readouterr().err


def test_fp8_in_one_group_shows_at_its_layer_not_before(program, stats):
    plan = PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.1.gate_up", "fp8")
    q = quantized_program(program, plan, stats)
    d = compare(trace_program(q, IDS, label="quant"), trace_program(program, IDS, label="passes"))
    assert d.tol == tolerance(trace_program(q, IDS)) == 1e-1  # a quantized graph's
    layers = d.layers.set_index("layer")
    assert layers.loc["embed", "rel_err"] == 0 and layers.loc[0, "rel_err"] == 0
    assert layers.loc[1, "rel_err"] > 1e-4
    f = compare(trace_program(q, IDS), trace_program(program, IDS), tol=1e-4).first
    assert f.layer == 1 and f.site.startswith("model.layers.1.mlp") and "fp8" in " ".join(f.nodes)


def test_diff_command(capsys):
    assert main(["diff", "tiny-llama", "--device", "cpu", "--ids", ",".join(map(str, IDS))]) == 0
    out = capsys.readouterr().out
    assert "against transformers (float32)" in out and "no divergence" in out.splitlines()[-1]
    assert main(["diff", "tiny-llama", "--device", "cpu", "--ids", "1,x"]) == 2
    assert main(["diff", "tiny-llama", "--device", "cpu", "--against", "capture"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["workbench: error: --ids takes comma-separated token ids, e.g. 1,2,3; got '1,x'",
                   "workbench: error: --against capture names a stage of a workspace, and tiny-llama is not one; "
                   "give the workspace, or --against hf or another engine directory"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``workbench build tiny-llama`` in bf16 and in fp8, on the CPU (untuned): precision -> engine directory."""
    out = tmp_path_factory.mktemp("engines")
    for fmt in ("bf16", "fp8"):
        assert main(["build", "tiny-llama", "--precision", fmt, "--out", str(out / fmt),
                     "--device", "cpu"]) == 0
    return {p: str(out / p) for p in ("bf16", "fp8")}


def test_engine_against_engine(engines, capsys):
    """Two engine directories, layer-aligned: an FP8 engine against the bf16 engine of the same model shows the
    quantization's error from layer 0 on (the embedding equal), within the quantized tolerance; an engine against
    itself is exact."""
    capsys.readouterr()
    ids = ",".join(map(str, IDS))
    assert main(["diff", engines["fp8"], "--against", engines["bf16"], "--device", "cpu", "--ids", ids]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[3]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("embed", "0", "1", "logits")}
    assert rows["embed"] == 0 and 1e-3 < rows["0"] < 1e-1 and 0 < rows["logits"] < 1e-1, out
    assert "no divergence" in out.splitlines()[-1]
    assert main(["diff", engines["bf16"], "--against", engines["bf16"], "--device", "cpu", "--ids", ids]) == 0
    out = capsys.readouterr().out
    assert all(float(line.split()[3]) == 0 for line in out.splitlines()
               if line.split() and line.split()[0] in ("embed", "0", "1", "norm", "logits")), out


def test_compare_engines_side_by_side(engines):
    """fp8 against bf16, layer by layer: the layers' linears fp8 against bf16 (the lm_head stays bf16), each side's
    error against transformers float32 with fp8 costing accuracy in both layers, and latencies profiled here."""
    c = compare_engines(engines["fp8"], engines["bf16"], device="cpu", ids=IDS, repeats=2)
    t = c.table.set_index("layer")
    assert list(t.index) == ["other", "embed", 0, 1, "norm", "logits"]
    assert list(t.a_precision) == ["-", "-", "fp8", "fp8", "-", "bf16"]
    assert list(t.b_precision) == ["-", "-", "bf16", "bf16", "-", "bf16"]
    assert c.reference == "transformers (float32)" and len(c.divergences) == 2
    assert t.loc["embed", "err_cost"] == 0  # the embedding is not quantized
    for layer in (0, 1):
        assert 1e-3 < t.loc[layer, "b_rel_err"] < 2e-2 < t.loc[layer, "a_rel_err"] < 1e-1
        assert t.loc[layer, "err_cost"] == t.loc[layer, "a_rel_err"] - t.loc[layer, "b_rel_err"]
        assert t.loc[layer, "a_us"] > 0 and t.loc[layer, "b_us"] > 0
        assert t.loc[layer, "speedup"] == pytest.approx(t.loc[layer, "b_us"] / t.loc[layer, "a_us"])
    assert c.latency_source == c.table.attrs["latency_source"] == "profile" and "2 profiled prefills" in c.caption
    assert c.speedup == pytest.approx(t.b_us.sum() / t.a_us.sum())
    line = c.line()
    assert line.startswith("total ") and "largest accuracy cost at layer" in line and "fp8 vs bf16" in line


def test_an_engine_against_itself_costs_nothing(engines):
    c = compare_engines(engines["bf16"], engines["bf16"], device="cpu", ids=IDS, repeats=1)
    t = c.table.dropna(subset=["err_cost"])
    assert len(t) == 5 and (t.err_cost == 0).all() and (t.a_rel_err > 0).all()  # bf16 against float32
    assert (c.table.a_precision == c.table.b_precision).all()
    assert "no accuracy cost" in c.line()


def test_precision_names_each_linear_group_when_they_differ(program, stats):
    plan = PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.1.gate_up", "fp8")
    rows = precision(quantized_program(program, plan, stats).graph)
    assert rows == {0: "fp32", 1: "qkv fp32, o fp32, gate_up fp8, down fp32", "logits": "fp32"}


def test_tuned_latency_is_each_nodes_chosen_timing(program, tmp_path):
    """Per-layer latency from a timing cache: every tuned node's chosen candidate's timing, summed by layer (planted
    timings: a reference 1 µs, any other tactic 2 µs; paged attention's graph-safe Triton kernel is chosen)."""
    inputs = run_inputs(program, IDS)
    cache = TimingCache(tmp_path / "timings.json", {})  # autotune saves it as it goes
    choices = autotune(program, [inputs], cache, progress=False,
                       timer=lambda call, op, tactic, config: 0.001 if tactic == "reference" else 0.002)
    us = tuned_us(program, choices, cache, run_inputs(program, IDS))
    # a layer: 2 norms, qkv, attention (2), o, gate_up, silu_mul, down
    assert us == {"other": 0.0, "embed": 0.0, 0: 9.0, 1: 9.0, "norm": 1.0, "logits": 1.0}


def test_compare_command(engines, capsys):
    ids = ",".join(map(str, IDS))
    assert main(["compare", engines["fp8"], engines["bf16"], "--device", "cpu", "--ids", ids, "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"A = {engines['fp8']}, B = {engines['bf16']}; errors against transformers (float32)")
    assert out[1].split() == ["layer", "a_precision", "b_precision", "a_us", "b_us", "speedup", "a_rel_err",
                              "b_rel_err", "err_cost"]
    assert [line.split()[:3] for line in out[4:6]] == [["0", "fp8", "bf16"], ["1", "fp8", "bf16"]]
    assert out[-1].startswith("total ") and "largest accuracy cost at layer" in out[-1]
    assert main(["compare", engines["fp8"], engines["bf16"], "--device", "cpu", "--ids", "1,x"]) == 2
    assert main(["compare", engines["fp8"], engines["bf16"], "--device", "cpu", "--latency", "tuning"]) == 2
    assert main(["compare", engines["fp8"], "tiny-gpt2", "--device", "cpu", "--reference", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["workbench: error: --ids takes comma-separated token ids, e.g. 1,2,3; got '1,x'",
                   f"workbench: error: latency from the tuning caches needs two engines tuned in one environment: "
                   f"{engines['fp8']} is not a tuned engine with its timings; {engines['bf16']} is not a tuned engine "
                   "with its timings; use profile",
                   f"workbench: error: reference hf needs both sides to come from one model source, and "
                   f"{engines['fp8']} and tiny-gpt2 do not (or do not record theirs); compare with reference b"]



@pytest.fixture(scope="module")
def two_group_ws(_tiny_llama_workspaces, tmp_path_factory):
    """A tiny-llama workspace whose quant stage ran an auto plan (fp8, a budget nothing exceeds) over a plan that
    pins every group in bf16 (edited) but layers.0.o and layers.1.down, with an FP8 KV cache: so it quantizes
    exactly those two groups and the KV cache, and writes sensitivity.json (64 probe tokens, 4 calibration samples)."""
    from workbench.pipeline import QuantOptions, load_program, quant_stage

    ws = copy_workspace(_tiny_llama_workspaces / "optimized", tmp_path_factory.mktemp("contributions") / "ws")
    graph = load_program(ws, stage="passes", device="cpu").graph
    plan = PrecisionPlan.uniform(graph, "bf16", kv_cache="fp8")
    plan.edited = [g for g in plan.groups if g not in TWO_GROUPS]
    options = QuantOptions(fmt="fp8", samples=4, seq_len=32, auto_budget=1e6, probe_tokens=64)
    plan, _, _ = quant_stage(ws, plan, options, device="cpu", progress=False)
    assert plan.quantized() == list(TWO_GROUPS) and plan.kv_cache == "fp8"
    return ws


TWO_GROUPS = ("layers.0.o", "layers.1.down")


def test_each_quantized_group_alone_beside_the_whole_plan(two_group_ws):
    """Exactly the plan's quantized groups (and its FP8 KV cache) get a row, each with an error of its own below the
    whole plan's, their sensitivity from the stage's sensitivity.json; with a float32 tolerance each group's first
    divergence is its own layer (layer 0 is exact while only layer 1's down_proj is fp8)."""
    from workbench.quant.sensitivity import SensitivityReport

    c = group_contributions(two_group_ws.root, ids=IDS, device="cpu", tol=1e-4, progress=False)
    t = c.table.set_index("group")
    assert sorted(t.index) == ["kv_cache", *TWO_GROUPS] and list(c.table.rel_err) == sorted(c.table.rel_err)[::-1]
    assert list(t.columns) == ["layer", "kind", "format", "rel_err", "share", "max_rel_err", "first", "ppl_delta_pct"]
    assert list(t.format) == ["fp8"] * 3 and t.loc["layers.1.down", "layer"] == 1 and t.loc["kv_cache", "layer"] is None
    assert ((t.rel_err > 1e-4) & (t.rel_err < c.total_rel_err)).all(), c
    assert t.share.tolist() == pytest.approx((t.rel_err ** 2 / c.total_rel_err ** 2).tolist())
    assert t.loc["layers.0.o", "first"] == 0 and t.loc["layers.1.down", "first"] == 1
    report = SensitivityReport.load(two_group_ws.path("quant", "sensitivity.json"))
    for g in TWO_GROUPS:
        assert t.loc[g, "ppl_delta_pct"] == report.delta(g, "fp8") and t.loc[g, "ppl_delta_pct"] != 0
    assert t.loc["kv_cache", "ppl_delta_pct"] != t.loc["kv_cache", "ppl_delta_pct"]  # NaN: not a sensitivity row
    top = c.table.iloc[0]
    assert c.line().startswith(f"largest contributor: {top.group} (fp8): logits rel err {top.rel_err:.2e} alone")
    only = group_contributions(two_group_ws.root, ids=IDS, device="cpu", groups="layers.1.down", progress=False)
    assert list(only.table.group) == ["layers.1.down"]
    assert only.table.rel_err[0] == t.loc["layers.1.down", "rel_err"] and only.total_rel_err == c.total_rel_err


def test_contributions_figure(two_group_ws):
    """Bars of each group's error alone, largest first, the whole plan's dashed across, sensitivity on the right axis
    (the KV cache, which the sensitivity sweep does not measure, has none)."""
    pytest.importorskip("plotly")
    from workbench.debug.plots import contributions_figure

    c = group_contributions(two_group_ws.root, ids=IDS, device="cpu", progress=False)
    bars, whole, sens = contributions_figure(c).data
    assert list(bars.x) == list(c.table.group) == list(sens.x) and list(bars.y) == list(c.table.rel_err)
    assert list(whole.y) == [c.total_rel_err] * 2 and whole.line.dash == "dash" and sens.yaxis == "y2"
    assert [v == v for v in sens.y] == [g != "kv_cache" for g in c.table.group]


def test_diff_groups_command(two_group_ws, optimized_ws, capsys):
    ws, ids = str(two_group_ws.root), ",".join(map(str, IDS))
    capsys.readouterr()
    assert main(["diff", ws, "--stage", "quant", "--groups", "--device", "cpu", "--ids", ids, "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{ws}: 3 quantized groups, each alone, against the passes stage (plan: 7 bf16, 2 fp8, "
                             "kv_cache fp8), 16 tokens; the whole plan's logits rel err ")
    assert out[1].split() == ["group", "layer", "kind", "format", "rel_err", "share", "max_rel_err", "first",
                              "ppl_delta_pct"]
    assert len(out) == 6 and out[4] == "... 1 more groups" and out[5].startswith("largest contributor: ")
    bad = [["--groups"], ["--stage", "quant", "--groups", "--against", "hf"], ["--stage", "quant", "--groups",
           "layers.9.o"], ["--stage", "quant", "--groups", "lm_head"], ["--top", "3"]]
    for argv in bad:
        assert main(["diff", ws, "--device", "cpu", *argv]) == 2
    assert main(["diff", str(optimized_ws.root), "--stage", "quant", "--groups", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    quantized = "the plan quantizes layers.0.o, layers.1.down, kv_cache"
    assert err == ["workbench: error: --groups quantizes each group of the quant stage's plan alone and compares it "
                   "with the passes stage: give --stage quant (and --against passes, or no --against)"] * 2 + [
                   f"workbench: error: 'layers.9.o' is not a linear group of this model; {quantized}",
                   f"workbench: error: group 'lm_head' is kept in bf16 by the plan: it contributes no error; {quantized}",
                   "workbench: error: --top sets how many rows of --groups print; give --groups with it",
                   f"workbench: error: {optimized_ws.root} has no quant stage; run `workbench quantize "
                   f"{optimized_ws.root}` first (group contributions apply the precision plan and calibration "
                   "statistics it writes)"]


def test_compare_command_takes_a_stage_per_side(two_group_ws, engines, capsys):
    """One workspace's quant stage against its passes stage, side by side: the two pinned groups' layers show their
    formats per group; a stage of an engine directory (which holds one graph) is refused in one line."""
    ws, ids = str(two_group_ws.root), ",".join(map(str, IDS))
    capsys.readouterr()
    assert main(["compare", ws, ws, "--stage-a", "quant", "--stage-b", "passes", "--device", "cpu", "--ids", ids,
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ("0", "1")}
    assert "qkv fp32, o fp8, gate_up fp32, down fp32" in rows["0"] and "qkv fp32, o fp32, gate_up fp32, down fp8" in \
        rows["1"], out
    fp8 = engines["fp8"]
    assert main(["compare", fp8, ws, "--stage-a", "quant", "--device", "cpu", "--ids", ids]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is an engine directory, which holds one graph" in err, err
