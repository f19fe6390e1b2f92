"""Precision plans, calibration and applying a plan, on tiny-llama's optimized (paged) graph on the CPU.

Calibration runs random token ids (never zeros); every format is checked against what it must compute:
the quantized program's logits against the unquantized ones (small KL), and the rewritten nodes, weights
and scales against the quantization helpers applied by hand.
"""

import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.evaluate import logits_fn
from workbench.graph.paged import PagedLayout
from workbench.kernels import fused
from workbench.kernels import gemm as G
from workbench.quant import CalibrationStats, PrecisionPlan, calibrate, linear_groups, quantize_graph, quantized_program
from workbench.quant.apply import smoothing_factors


@pytest.fixture(scope="module")
def probe(program):
    ids = torch.randint(1, 512, (1, 33))
    return ids, logits_fn(program)(ids)


def kl(ref, out):
    return torch.nn.functional.kl_div(out[0].log_softmax(-1), ref[0].log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


# --- groups and plans -------------------------------------------------------------------------------------

def test_linear_groups_follow_the_modules(program):
    groups = linear_groups(program.graph)
    assert list(groups) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
    assert groups["layers.1.qkv"].weights == ("model.layers.1.self_attn.qkv_proj.weight",)
    assert groups["layers.0.down"].layer == 0 and groups["lm_head"].layer is None


def test_plan_json_round_trip_and_defaults(program):
    plan = PrecisionPlan.uniform(program.graph, "fp8", kv_cache="fp8", weights="tensor")
    assert plan.format_of("lm_head") == "bf16" and plan.format_of("kv_cache") == "fp8"
    assert plan.options("layers.0.o") == {"weights": "tensor", "activations": "static"}
    again = PrecisionPlan.loads(plan.dumps())
    assert again.to_json() == plan.to_json()
    edited = plan.with_format("layers.0.down", "int8_sq", edited=True, alpha=0.7)
    assert edited.edited == ["layers.0.down"] and plan.edited == []
    assert edited.options("layers.0.down")["alpha"] == 0.7
    assert edited.summary() == {"fp8": 7, "int8_sq": 1, "bf16": 1}


@pytest.mark.parametrize("edit,match", [
    (lambda p: p["groups"].update({"layers.0.q": {"format": "fp8"}}), "fused siblings .* name the group 'layers.0.qkv'"),
    (lambda p: p["groups"].update({"model.embed_tokens": {"format": "fp8"}}), "embeddings stay in high precision"),
    (lambda p: p["groups"].update({"layers.9.o": {"format": "fp8"}}), "not a linear group of this model"),
    (lambda p: p["groups"].pop("lm_head"), "lm_head is never implied"),
    (lambda p: p["groups"].pop("layers.1.o"), "leaves out 1 linear groups"),
    (lambda p: p["groups"].update({"layers.0.o": {"format": "int4"}}), "format 'int4' is unknown"),
    (lambda p: p["groups"].update({"layers.0.o": {"format": "int8_sq", "alpha": 1.5}}), r"alpha must be a number in \[0, 1\]"),
    (lambda p: p["groups"].update({"layers.0.o": {"format": "int8_wo", "activations": "static"}}), "takes no option 'activations'"),
    (lambda p: p["groups"].update({"layers.0.o": {"format": "fp8", "weights": "row"}}), "weights must be one of channel, tensor"),
    (lambda p: p.update({"kv_cache": "int4"}), "kv_cache format 'int4' is unknown"),
    (lambda p: p.update({"model": "0123456789abcdef"}), "made for another model"),
    (lambda p: p.update({"version": 7}), "version 7 is not supported"),
])
def test_invalid_plans_say_what_and_how_to_fix(program, edit, match):
    obj = PrecisionPlan.uniform(program.graph, "fp8").to_json()
    edit(obj)
    with pytest.raises(WorkbenchError, match=match):
        PrecisionPlan.from_json(obj).validate(program.graph)


def test_plan_files_that_are_not_plans():
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        PrecisionPlan.loads("{groups: ")
    with pytest.raises(WorkbenchError, match="unknown keys extra"):
        PrecisionPlan.from_json({"groups": {}, "extra": 1})


# --- calibration --------------------------------------------------------------------------------------------

def test_calibration_sees_every_group_input_and_layer(program, stats):
    groups = linear_groups(program.graph)
    assert set(stats.activations) == set(groups) and set(stats.kv) == {0, 1}
    # the statistics are those of the tensors the linears read: re-observe one group's input by hand
    seen = []
    ids = torch.randint(1, 512, (2, 48))
    from workbench.graph.paged import cache_for

    cache = cache_for(program.graph, num_blocks=6)
    inputs = cache.step_inputs([(0, ids[0].tolist()), (1, ids[1].tolist())])
    program.run(_observe=({groups["layers.1.down"].nodes[0]}, lambda n, op, a, k: seen.append(a[0])), **inputs)
    x = seen[0].reshape(-1, seen[0].shape[-1])
    one = calibrate(program, ids.reshape(-1), samples=2, seq_len=48, batch=2, progress=False)
    assert torch.equal(one.activations["layers.1.down"].amax(), x.abs().amax())
    assert torch.equal(one.channel_amax("layers.1.down"), x.abs().amax(dim=0))
    assert stats.activations["layers.0.qkv"].samples == 2 and stats.samples == 6  # 6 samples in batches of 4
    w = program.params["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(stats.weights["layers.0.down"], w.abs().amax(dim=1))
    k_scale, v_scale = stats.kv_scales(0)
    assert k_scale > 0 and v_scale > 0
    # RoPE runs inside the attention (fuse_rope_into_attention): the K statistics are the rotated keys'
    attn = next(n for n in program.graph.nodes if n.op == "workbench.paged_attention" and n.layer == 1)
    assert "cos" in attn.kwargs
    seen_kv = []
    program.run(_observe=({attn.name}, lambda n, op, a, k: seen_kv.append((a, k))), **cache_for(
        program.graph, num_blocks=6).step_inputs([(0, ids[0].tolist()), (1, ids[1].tolist())]))
    (a, kw), = seen_kv
    rotated = fused.rope(a[1], kw["cos"], kw["sin"])
    assert not torch.equal(rotated.abs().amax(), a[1].abs().amax())
    assert torch.equal(one.kv[1]["k"].amax(), rotated.abs().amax())
    assert torch.equal(one.kv[1]["v"].amax(), a[2].abs().amax())


def test_statistics_round_trip_and_refuse_another_model(program, stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path, program.graph)
    for g in stats.activations:
        assert torch.equal(back.input_scale(g, "fp8"), stats.input_scale(g, "fp8"))
        assert torch.equal(back.channel_amax(g), stats.channel_amax(g))
    assert back.kv_scales(1) == stats.kv_scales(1)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["model"] = "feedfacefeedface"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WorkbenchError, match="come from another model"):
        CalibrationStats.load(path, program.graph)
    with pytest.raises(WorkbenchError, match="no calibration statistics at"):
        CalibrationStats.load(tmp_path / "none.safetensors")


def test_calibration_refuses_a_set_too_small_and_bad_observers(program):
    with pytest.raises(WorkbenchError, match=r"has 100 tokens, too few for 4 samples x 48 tokens .*at most 2 samples"):
        calibrate(program, torch.randint(1, 512, (100,)), samples=4, seq_len=48, progress=False)
    with pytest.raises(WorkbenchError, match="unknown"):
        calibrate(program, torch.randint(1, 512, (500,)), samples=2, seq_len=48, observer="minmax", progress=False)


def test_histogram_observers_calibrate_too(program):
    s = calibrate(program, torch.randint(1, 512, (600,)), samples=4, seq_len=48, observer="percentile",
                  percentile=99.9, progress=False)
    obs = s.activations["layers.0.gate_up"]
    assert 0 < float(obs.threshold("fp8")) <= float(obs.amax())


# --- applying a plan ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,opts,op,limit", [
    ("fp8", {}, "workbench.fp8_linear", 1e-3),
    ("fp8", {"activations": "dynamic", "weights": "tensor"}, "workbench.fp8_linear", 1e-3),
    ("int8_wo", {}, "workbench.w8_linear", 1e-4),
    ("int8_sq", {"alpha": 0.5}, "workbench.int8_linear", 1e-3),
    ("int8_sq", {"alpha": 0.8, "activations": "static"}, "workbench.int8_linear", 1e-3),
])
def test_each_format_rewrites_every_group_and_stays_close(program, stats, probe, fmt, opts, op, limit):
    plan = PrecisionPlan.uniform(program.graph, fmt, **opts)
    q = quantized_program(program, plan, stats)
    ops = [n.op for n in q.graph.nodes]
    assert ops.count(op) == 8 and ops.count("aten.linear.default") == 1  # lm_head stays
    ids, ref = probe
    out = logits_fn(q)(ids)
    assert torch.isfinite(out).all() and 0 < kl(ref, out) < limit
    assert q.graph.meta["precision"] == plan.to_json()
    assert "model.layers.0.mlp.down_proj.weight" not in q.graph.params  # the unquantized weight left the graph


def test_fp8_weights_and_static_scales_are_the_helpers(program, stats):
    plan = PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.1.o", "fp8")
    graph, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
    node = next(n for n in graph.nodes if n.op == "workbench.fp8_linear")
    w = program.params["model.layers.1.self_attn.o_proj.weight"]
    scale = G.fp8_scale(w, dim=1)
    assert torch.equal(tensors[node.args[1].name].view(torch.uint8), G.quantize_fp8(w, scale).view(torch.uint8))
    assert torch.equal(tensors[node.args[2].name], scale.reshape(-1))
    assert torch.equal(tensors[node.args[3].name], stats.input_scale("layers.1.o", "fp8"))
    assert graph.params[node.args[1].name].kind == "quantized" and report["groups"]["layers.1.o"]["format"] == "fp8"


def test_smoothquant_folds_into_norms_where_it_can(program, stats, probe):
    """x/s folded into the RMSNorm weight for qkv and gate_up (only they read their norm); o and down get an
    explicit multiply. Smoothing alone (before rounding) leaves the function unchanged."""
    plan = PrecisionPlan.uniform(program.graph, "int8_sq", alpha=0.5)
    graph, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
    how = {g: r["smoothing"] for g, r in report["groups"].items()}
    assert how["layers.0.qkv"] == how["layers.1.gate_up"] == "folded into norm"
    assert how["layers.0.o"] == how["layers.1.down"] == "explicit multiply"
    assert sum(n.op == "aten.mul.Tensor" for n in graph.nodes) == 4
    norm_w = program.params["model.layers.0.input_layernorm.weight"]
    s = smoothing_factors(stats.channel_amax("layers.0.qkv"),
                          [program.params["model.layers.0.self_attn.qkv_proj.weight"]], 0.5)
    assert torch.allclose(tensors["model.layers.0.input_layernorm.weight.smooth"], norm_w / s)
    # smoothing is exact in real arithmetic: (x/s) @ (W s)^T == x @ W^T
    x = torch.randn(5, norm_w.numel())
    w = program.params["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), atol=1e-5)


def test_fp8_producers_write_x_quantized_and_change_nothing(program, stats, probe):
    """Static FP8: the norm / add+norm / silu_mul writing each group's x writes it in fp8 with the group's
    scale, and the linears read it as it is: bit-identical logits to quantizing x inside the linear."""
    plan = PrecisionPlan.uniform(program.graph, "fp8", lm_head="fp8")
    graph, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
    by = {g: r["x_quantized_by"] for g, r in report["groups"].items()}
    assert by["layers.0.qkv"] == "workbench.rms_norm" and by["layers.1.qkv"] == "workbench.add_rms_norm"
    assert by["layers.0.gate_up"] == by["lm_head"] == "workbench.add_rms_norm"
    assert by["layers.1.down"] == "workbench.silu_mul" and by["layers.0.o"] == "the linear"  # attention writes o's x
    ops = [n.op for n in graph.nodes]
    assert ops.count("workbench.rms_norm_fp8") == 1 and ops.count("workbench.add_rms_norm_fp8") == 4
    assert ops.count("workbench.silu_mul_fp8") == 2 and "workbench.silu_mul" not in ops
    specs = graph.specs()
    linears = [n for n in graph.nodes if n.op == "workbench.fp8_linear"]
    fed = [n for n in linears if specs[n.args[0].name].dtype == "float8_e4m3fn"]
    assert len(fed) == 7 and all(n.args[5] == torch.float32 for n in fed)  # the output keeps the model's dtype
    for n in fed:  # the producer quantizes with the same scale the linear dequantizes with
        producer = next(m for m in graph.nodes if m.name == n.args[0].name)
        if producer.op == "operator.getitem":
            producer = next(m for m in graph.nodes if m.name == producer.args[0].name)
        assert torch.equal(tensors[producer.args[-1].name], tensors[n.args[3].name])
    ids, _ = probe
    fused = logits_fn(quantized_program(program, plan, stats))(ids)
    unfused = logits_fn(quantized_program(program, plan, stats, fuse_producers=False))(ids)
    assert torch.equal(fused, unfused)
    from workbench.graph.ir import Graph

    assert Graph.loads(graph.dumps()).dumps() == graph.dumps()


def test_fp8_producers_only_where_the_linears_alone_read_x(program, stats):
    """Dynamic per-token scales are computed by the linear; an x that something else reads stays unquantized."""
    dynamic = PrecisionPlan.uniform(program.graph, "fp8", activations="dynamic")
    _, _, report = quantize_graph(program.graph, dict(program.params), dynamic, stats)
    assert "x_quantized_by" not in report["groups"]["layers.0.qkv"]
    graph = type(program.graph).loads(program.graph.dumps())
    norm = next(n for n in graph.nodes if n.op == "workbench.rms_norm")
    graph.outputs.append(norm.name)  # the first norm's output now also leaves the graph
    plan = PrecisionPlan.uniform(graph, "fp8")
    g2, _, report = quantize_graph(graph, dict(program.params), plan, stats)
    assert report["groups"]["layers.0.qkv"]["x_quantized_by"] == "the linear"
    assert report["groups"]["layers.0.gate_up"]["x_quantized_by"] == "workbench.add_rms_norm"
    assert "workbench.rms_norm_fp8" not in {n.op for n in g2.nodes}


def test_fp8_kv_cache_uses_calibrated_scales(program, stats, probe):
    plan = PrecisionPlan.uniform(program.graph, "bf16", kv_cache="fp8")
    q = quantized_program(program, plan, stats)
    layout = PagedLayout.from_graph(q.graph)
    assert layout.dtype == "float8_e4m3fn" and PagedLayout.from_graph(program.graph).scales is None
    attn = [n for n in q.graph.nodes if n.op == "workbench.paged_attention"]
    # the scales go by name, read back through the layout
    assert all(len(n.args) == 10 for n in attn)
    assert [(n.kwargs["k_scale"], n.kwargs["v_scale"]) for n in attn] == [stats.kv_scales(0), stats.kv_scales(1)]
    assert layout.scales == (stats.kv_scales(0), stats.kv_scales(1)) and layout.scale_of(1) == stats.kv_scales(1)
    ids, ref = probe
    assert 0 < kl(ref, logits_fn(q)(ids)) < 1e-3


def test_plans_that_need_statistics_say_so(program):
    with pytest.raises(WorkbenchError, match="need calibration statistics"):
        quantize_graph(program.graph, dict(program.params), PrecisionPlan.uniform(program.graph, "fp8"))
    graph, _, _ = quantize_graph(program.graph, dict(program.params), PrecisionPlan.uniform(program.graph, "int8_wo"))
    assert any(n.op == "workbench.w8_linear" for n in graph.nodes)


# --- the workspace stage --------------------------------------------------------------------------------------

def test_quant_stage_writes_artifacts_reuses_statistics_and_reloads(optimized_ws):
    from workbench.pipeline import QuantOptions, load_program, quant_stage

    ws = optimized_ws
    plan, stats, report = quant_stage(ws, options=QuantOptions(fmt="fp8", kv_cache="fp8", samples=4, seq_len=32),
                                      progress=False)
    for name in ("stats.safetensors", "stats.json", "plan.json", "graph.json", "weights.safetensors", "report.json"):
        assert (ws.stage_dir("quant") / name).is_file()
    assert report["kv_cache"] == "fp8" and len(report["groups"]) == 8
    reloaded = load_program(ws, stage="quant")
    direct = quantized_program(load_program(ws, stage="passes"), plan, stats)
    ids = torch.randint(1, 512, (1, 21))
    assert torch.equal(logits_fn(reloaded)(ids), logits_fn(direct)(ids))
    # a user's edit to the plan is never overwritten silently; applying the edited plan is explicit
    edited = plan.with_format("layers.0.down", "int8_wo", edited=True)
    (ws.stage_dir("quant") / "plan.json").write_text(edited.dumps())
    with pytest.raises(WorkbenchError, match="changed by hand"):
        quant_stage(ws, options=QuantOptions(samples=4, seq_len=32), progress=False)
    plan2, stats2, _ = quant_stage(ws, ws.stage_dir("quant") / "plan.json", QuantOptions(samples=4, seq_len=32),
                                   progress=False, force=True)
    assert plan2.format_of("layers.0.down") == "int8_wo" and plan2.edited == ["layers.0.down"]
    assert torch.equal(stats2.input_scale("layers.0.o", "fp8"), stats.input_scale("layers.0.o", "fp8"))  # reused
    assert any(n.op == "workbench.w8_linear" for n in load_program(ws, stage="quant").graph.nodes)


def test_quantize_command(tmp_path, capsys):
    from workbench.cli import main

    ws = str(tmp_path / "ws")
    assert main(["capture", "tiny-llama", ws]) == 0
    assert main(["optimize", ws]) == 0
    assert main(["quantize", ws, "--format", "int8_sq", "--alpha", "0.6", "--samples", "4", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "plan: 8 groups int8_sq, 1 group bf16; KV cache bf16" in out
    plan = PrecisionPlan.loads((tmp_path / "ws" / "quant" / "plan.json").read_text())
    assert plan.options("layers.1.o")["alpha"] == 0.6
    assert main(["quantize", ws, "--format", "fp8", "--alpha", "2", "--samples", "4", "--seq-len", "32",
                 "--force"]) == 2
    assert "takes no option 'alpha'" in capsys.readouterr().err


def test_calibration_counts_below_one_are_refused_in_one_line_before_anything_runs():
    from workbench.engine.build import BuildOptions
    from workbench.pipeline import QuantOptions

    for bad in (0, -5, 2.5):
        with pytest.raises(WorkbenchError, match="samples must be a whole number >= 1"):
            QuantOptions(samples=bad)
        with pytest.raises(WorkbenchError, match="seq_len must be a whole number >= 1"):
            BuildOptions(precision="fp8", seq_len=bad)
    with pytest.raises(WorkbenchError, match="probe_tokens must be"):
        QuantOptions(probe_tokens=0)
    assert QuantOptions(samples=None, seq_len=8).seq_len == 8


def test_quantize_command_chooses_an_auto_plan_within_its_budget(optimized_ws, capsys, monkeypatch):
    """The whole sweep where it fits the CPU's few minutes (tiny-llama), a subset sized to them where it does not
    (the unmeasured groups stay bf16, the full sweep's estimate printed first), every group with --full-sweep."""
    from workbench.cli import main
    from workbench.quant import sensitivity as S
    from workbench.quant.sensitivity import SensitivityReport

    ws = optimized_ws.root  # captured and optimized (the commands' own run: test_quantize_command)
    common = ["--samples", "4", "--seq-len", "32", "--probe-tokens", "300"]
    assert main(["quantize", str(ws), "--format", "bf16", "--auto", "1", *common]) == 2
    assert "give a quantized --format" in capsys.readouterr().err
    assert main(["quantize", str(ws), "--format", "fp8", "--auto", "0.5", *common]) == 0
    out = capsys.readouterr().out
    report = json.loads((ws / "quant" / "report.json").read_text())
    auto = report["auto_plan"]
    assert auto["within_budget"] and auto["ppl_delta_pct"] <= 0.5 and auto["probe_tokens"] == 300
    assert "auto plan within +0.5%" in out
    sens = SensitivityReport.load(ws / "quant" / "sensitivity.json")
    assert len(sens.groups) == 9 and sens.formats == ["fp8"]
    plan = PrecisionPlan.loads((ws / "quant" / "plan.json").read_text())
    assert set(auto["bf16_groups"]) == {g for g in plan.groups if plan.format_of(g) == "bf16"}
    assert {plan.format_of(g) for g in plan.groups} <= {"fp8", "bf16"}
    assert sum(plan.format_of(g) == "fp8" for g in plan.groups) == sum(r["format"] == "fp8" for r in
                                                                         report["groups"].values())
    assert "auto plan: full sweep: 9 groups x 1 formats" in out and auto["sweep"]["groups"] == 9

    monkeypatch.setattr(S, "CPU_SWEEP_BUDGET_S", 1e-3)  # a model whose full sweep would outlast the CPU's budget
    assert main(["quantize", str(ws), "--format", "fp8", "--auto", "0.5", *common, "--force"]) == 0
    out = capsys.readouterr().out
    assert "auto plan: quick sweep: 5 of 9 groups" in out  # one layer of 2, and lm_head and "--full-sweep" in out
    measured = set(SensitivityReport.load(ws / "quant" / "sensitivity.json").groups)
    plan = PrecisionPlan.loads((ws / "quant" / "plan.json").read_text())
    assert len(measured) == 5 and "lm_head" in measured
    assert all(plan.format_of(g) == "bf16" for g in plan.groups if g not in measured)
    assert main(["quantize", str(ws), "--format", "fp8", "--auto", "0.5", *common, "--full-sweep"]) == 0
    assert "auto plan: full sweep: 9 groups" in capsys.readouterr().out
    assert len(SensitivityReport.load(ws / "quant" / "sensitivity.json").groups) == 9


def test_tune_stage_tunes_the_quantized_graph(optimized_ws):
    """After `workbench quantize`, tuning takes the quantized graph (its fp8 linears and fp8 producers get
    tactics), and the tuned program decodes like the quantized one; re-quantizing makes the tune stale."""
    from test_autotune import TINY_PROFILE, PlantedTimer
    from workbench.kernels.profiles import OptimizationProfile
    from workbench.pipeline import QuantOptions, load_program, quant_stage, tune_stage
    from workbench.evaluate import paged_greedy

    ws = optimized_ws
    quant_stage(ws, options=QuantOptions(fmt="fp8", samples=4, seq_len=32), progress=False)
    tuned = tune_stage(ws, OptimizationProfile(**TINY_PROFILE), device="cpu", timer=PlantedTimer(), progress=False)
    assert ws.record("tune")["params"]["graph"] == "quant"
    fast, plain = load_program(ws, stage="tune"), load_program(ws, stage="quant")
    ops = {fast.graph.node(n).op for n in tuned.choices[-1]}
    assert {"workbench.fp8_linear", "workbench.rms_norm_fp8", "workbench.add_rms_norm_fp8",
            "workbench.silu_mul_fp8"} <= ops
    prompt = torch.tensor([5, 9, 11, 2, 30])
    assert paged_greedy(fast, prompt, 3) == paged_greedy(plain, prompt, 3)  # the prefill bucket, then decode's
    quant_stage(ws, options=QuantOptions(fmt="int8_wo", samples=4, seq_len=32), progress=False)
    assert ws.status("tune") == "stale"
