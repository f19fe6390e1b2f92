"""Layer sensitivity, auto plans and their figures, on tiny-llama's optimized (paged) graph on the CPU.

tiny-llama has random weights, so quantizing costs it only hundredths of a percent of perplexity: the
budgets below are that small. Timings are planted: a TimingCache filled with the instance keys the
autotuner would record for the base and the uniformly quantized programs, with made-up milliseconds.
"""

import json
import math

import pandas as pd
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.graph.paged import cache_for
from workbench.kernels.autotune import LinearShape, TimingCache, instance_key
from workbench.quant import PrecisionPlan, linear_groups, quantize_graph, quantized_program
from workbench.quant import auto_plan as A
from workbench.quant import cost as C
from workbench.quant import pareto as P
from workbench.quant import probe
from workbench.quant import sensitivity as S

WINDOW, STRIDE = 64, 32
GROUPS = [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
#: planted ms per weight element (N·K) of each op: fp8 fastest, then int8 W8A8, then weight-only
MS_PER_ELEMENT = {"aten.linear.default": 1e-6, "workbench.fp8_linear": 0.4e-6, "workbench.int8_linear": 0.5e-6,
                  "workbench.w8_linear": 0.7e-6}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 512, (300,), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def report(program, stats, ids):
    return S.sensitivity(program, stats, ids, window=WINDOW, stride=STRIDE, progress=False)


def planted_cache(program, stats, tmp_path, *, tokens=(16,), skip=()) -> TimingCache:
    """The keys the autotuner records for the base program and every uniform plan (lm_head included),
    each with one timing of MS_PER_ELEMENT[op] · N · K · tokens; ops in ``skip`` are left out."""
    cache = TimingCache(tmp_path / "timings.json", {})
    programs = [program] + [quantized_program(program, PrecisionPlan.uniform(program.graph, f, lm_head=f), stats)
                            for f in ("fp8", "int8_sq", "int8_wo")]
    for prog in programs:
        linears = {n.name for n in prog.graph.nodes if n.op.endswith("linear") or n.op == "aten.linear.default"}
        for m in tokens:
            seen = []
            inputs = cache_for(prog.graph, num_blocks=-(-m // 16) + 1).step_inputs([(0, list(range(1, m + 1)))])
            prog.run(_observe=(linears, lambda n, op, a, k: seen.append((op, instance_key(op, a, k), a[1].shape))),
                     **inputs)
            for op, key, (n, k) in seen:
                if op not in skip:
                    cache.entries[key] = {"op": op, "timings": [
                        {"tactic": "reference", "config": None, "ms": MS_PER_ELEMENT[op] * n * k * m},
                        {"tactic": "broken", "config": {}, "ms": math.inf, "error": "planted"}]}
    return cache


def planted_ms(program, group, op, tokens=(16,)):
    shapes = [program.graph.params[w].spec.shape for w in linear_groups(program.graph)[group].weights]
    return sum(MS_PER_ELEMENT[op] * n * k * m for n, k in shapes for m in tokens)


# --- the report ---------------------------------------------------------------------------------------------

def test_one_row_per_group_and_format(report):
    frame = report.frame
    assert list(frame.columns) == S.COLUMNS
    assert len(frame) == 9 * 3 and report.formats == ["fp8", "int8_sq", "int8_wo"]
    assert list(frame["group"]) == [g for g in GROUPS for _ in range(3)]
    assert list(frame["format"]) == ["fp8", "int8_sq", "int8_wo"] * 9
    assert frame["kl"].map(math.isfinite).all() and (frame["kl"] >= 0).all() and (frame["kl"] > 0).any()
    assert frame["ppl"].map(math.isfinite).all()
    assert frame["ppl_delta_pct"].tolist() == pytest.approx([100 * (p / report.base_ppl - 1) for p in frame["ppl"]])
    assert list(frame["layer"]) == [0] * 12 + [1] * 12 + [None] * 3
    assert frame[["base_ms", "quant_ms", "saved_ms"]].isna().all().all()  # no timings given
    assert (report.window, report.stride, report.tokens) == (WINDOW, STRIDE, 300)
    table = report.table()
    assert list(table.index) == GROUPS and list(table.columns) == report.formats
    assert table.loc["layers.1.down", "int8_wo"] == report.delta("layers.1.down", "int8_wo")
    worst = report.worst("fp8")
    assert table["fp8"].max() == table.loc[worst, "fp8"]


def test_base_is_the_unquantized_program_on_perplexitys_windows(program, ids):
    from workbench.evaluate import perplexity
    from workbench.evaluate import logits_fn

    base = probe.reference_logits(program, ids, window=WINDOW, stride=STRIDE)
    ref = perplexity(logits_fn(program), ids, window=WINDOW, stride=STRIDE)
    assert base.ppl == ref.perplexity
    assert len(base.logprobs) == ref.windows and sum(lp.shape[0] for lp in base.logprobs) == ref.tokens_scored == 299
    # the unquantized program against itself: no change, no divergence
    same = probe.measure(program, base)
    assert same["ppl_delta_pct"] == 0 and same["kl"] == pytest.approx(0, abs=1e-9)


def test_a_row_is_that_group_alone_quantized(program, stats, ids, report):
    plan = PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.1.down", "int8_sq")
    _, _, done = quantize_graph(program.graph, dict(program.params), plan, stats)
    assert list(done["groups"]) == ["layers.1.down"]  # nothing else is rewritten
    got = probe.evaluate_plan(program, plan, stats, ids, window=WINDOW, stride=STRIDE)
    row = report.frame[(report.frame["group"] == "layers.1.down") & (report.frame["format"] == "int8_sq")].iloc[0]
    assert (got["ppl"], got["ppl_delta_pct"], got["kl"]) == (row["ppl"], row["ppl_delta_pct"], row["kl"])
    assert got["base_ppl"] == report.base_ppl
    # a cached base gives the same numbers; a base from other ids is refused
    base = probe.reference_logits(program, ids, window=WINDOW, stride=STRIDE)
    assert probe.evaluate_plan(program, plan, stats, ids, window=WINDOW, stride=STRIDE, base_logits=base) == got
    with pytest.raises(WorkbenchError, match="base_logits were computed on other ids"):
        probe.evaluate_plan(program, plan, stats, ids[:200], window=WINDOW, stride=STRIDE, base_logits=base)


def test_groups_and_options_and_base_plan(program, stats, ids, report):
    base_plan = PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.0.qkv", "int8_wo")
    part = S.sensitivity(program, stats, ids, formats=["int8_sq"], groups=["lm_head", "layers.0.o"],
                         base_plan=base_plan, window=WINDOW, stride=STRIDE, progress=False, alpha=0.8)
    assert list(part.frame["group"]) == ["layers.0.o", "lm_head"]  # graph order, whatever was asked
    assert part.base_ppl == report.base_ppl
    plan = base_plan.with_format("layers.0.o", "int8_sq", alpha=0.8)
    got = probe.evaluate_plan(program, plan, stats, ids, window=WINDOW, stride=STRIDE)
    assert part.frame.loc[0, "ppl"] == got["ppl"]
    # the base plan's own quantized group is in every row (rows compare with the unquantized program)
    alone = probe.evaluate_plan(program, PrecisionPlan.uniform(program.graph, "bf16").with_format(
        "layers.0.o", "int8_sq", alpha=0.8), stats, ids, window=WINDOW, stride=STRIDE)
    assert part.frame.loc[0, "ppl"] != alone["ppl"]


def test_planted_timings_give_saved_ms(program, stats, ids, tmp_path):
    cache = planted_cache(program, stats, tmp_path, tokens=(16, 32))
    cache.save()  # a cache as written to disk reads the same
    cache = TimingCache.view(cache.path)
    part = S.sensitivity(program, stats, ids, groups=["layers.0.gate_up", "lm_head"], window=WINDOW, stride=STRIDE,
                         timings=cache, progress=False)
    for row in part.frame.to_dict("records"):
        base = planted_ms(program, row["group"], "aten.linear.default", (16, 32))
        quant = planted_ms(program, row["group"], C.LINEAR_OPS[row["format"]], (16, 32))
        assert row["base_ms"] == pytest.approx(base) and row["quant_ms"] == pytest.approx(quant)
        assert row["saved_ms"] == pytest.approx(base - quant) and row["saved_ms"] > 0
    # an op the cache never timed leaves NaN, the rest stays
    partial = planted_cache(program, stats, tmp_path, skip=("workbench.w8_linear",))
    part = S.sensitivity(program, stats, ids, groups=["layers.0.o"], window=WINDOW, stride=STRIDE,
                         timings=partial, progress=False)
    saved = dict(zip(part.frame["format"], part.frame["saved_ms"]))
    assert math.isnan(saved["int8_wo"]) and saved["fp8"] == pytest.approx(0.6e-6 * 64 * 64 * 16)


def test_the_cache_answers_linear_times(program, stats, tmp_path):
    """TimingCache.linear_times: the best finite time per shape read from the planted keys (x [1, M, K])."""
    cache = planted_cache(program, stats, tmp_path, tokens=(16, 32))
    weights = {(128, 64), (64, 64), (256, 64), (64, 128), (512, 64)}  # qkv, o, gate_up, down, lm_head
    bf16 = cache.linear_times("aten.linear.default")
    assert set(bf16) == {LinearShape(m, n, k) for m in (16, 32) for n, k in weights}
    assert bf16[LinearShape(32, 256, 64)] == pytest.approx(1e-6 * 256 * 64 * 32)  # not the failed (inf) timing
    # fp8 takes a static activation scale by default, SmoothQuant int8 scales per token
    assert {s.input_scale for s in cache.linear_times("workbench.fp8_linear")} == {True}
    assert {s.input_scale for s in cache.linear_times("workbench.int8_linear")} == {False}
    assert cache.linear_times("workbench.rms_norm") == {}
    assert LinearShape.of_key(next(iter(cache.entries))) in bf16


def test_estimated_cost(program, stats, tmp_path):
    graph = program.graph
    per_layer = 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128
    total = 2 * per_layer + 512 * 64
    assert C.estimated_cost(graph, PrecisionPlan.uniform(graph, "bf16")) == {"ms": None, "low_precision_flops": 0.0}
    fp8 = PrecisionPlan.uniform(graph, "fp8")  # lm_head stays bf16
    assert C.estimated_cost(graph, fp8)["low_precision_flops"] == pytest.approx(2 * per_layer / total)
    cache = planted_cache(program, stats, tmp_path)
    cost = C.estimated_cost(graph, fp8, cache)
    assert cost["ms"] == pytest.approx(1e-6 * 512 * 64 * 16 + 0.4e-6 * 2 * per_layer * 16)
    assert C.estimated_cost(graph, fp8, TimingCache(tmp_path / "empty.json", {}))["ms"] is None


# --- auto plans ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.0, 0.01, 1.0])
def test_auto_plan_is_verified_within_budget(program, stats, ids, report, budget):
    plan, info = A.auto_plan(report, program, stats, ids, budget_pct=budget, window=WINDOW, stride=STRIDE,
                             progress=False)
    plan.validate(program.graph)
    assert info["ppl_delta_pct"] <= budget and info["within_budget"]
    assert 1 <= info["rounds"] == len(info["history"]) <= 8
    again = probe.evaluate_plan(program, plan, stats, ids, window=WINDOW, stride=STRIDE)
    assert again["ppl"] == info["ppl"] and again["kl"] == info["kl"]
    for g in plan.quantized():  # only formats whose own row fits the budget are chosen
        assert report.delta(g, plan.format_of(g)) <= budget
    if budget == 1.0:  # every single-group change is far below 1%: the fastest format everywhere, lm_head too
        assert plan.summary() == {"fp8": 9}


def fake_measure(program_q, base):
    """A stand-in for the probe: every quantized group costs 0.01 % of perplexity, lm_head 0.05 %."""
    groups = program_q.graph.meta["precision"]["groups"]
    delta = sum((0.05 if g == "lm_head" else 0.01) for g, spec in groups.items() if spec["format"] != "bf16")
    return {"ppl": base.ppl * (1 + delta / 100), "ppl_delta_pct": delta, "kl": delta}


def test_auto_plan_backs_off_when_verification_fails(program, stats, ids, report, monkeypatch):
    # a report that claims quantizing is free: the greedy pass takes fp8 everywhere (0.13 % verified);
    # each round drops the groups whose equal share (verified / chosen) covers the excess over 0.065 %,
    # smallest first (o, then qkv/down, in the order the greedy pass took them)
    frame = report.frame.copy()
    frame["ppl_delta_pct"] = 0.0
    free = S.SensitivityReport(frame, report.base_ppl, report.formats, report.model)
    monkeypatch.setattr(A, "measure", fake_measure)
    plan, info = A.auto_plan(free, program, stats, ids, budget_pct=0.065, window=WINDOW, stride=STRIDE,
                             progress=False)
    history = info["history"]
    assert [len(h["quantized"]) for h in history] == [9, 4, 3, 2]
    assert history[1]["backed_off"] == ["layers.0.o", "layers.1.o", "layers.0.qkv", "layers.0.down", "layers.1.qkv"]
    assert [h["backed_off"] for h in history[2:]] == [["layers.1.down"], ["layers.0.gate_up"]]
    assert plan.quantized() == ["layers.1.gate_up", "lm_head"] and plan.summary() == {"bf16": 7, "fp8": 2}
    assert info["ppl_delta_pct"] == pytest.approx(0.06) and info["rounds"] == 4 and info["within_budget"]
    # the last round allowed drops every chosen group
    plan, info = A.auto_plan(free, program, stats, ids, budget_pct=0.065, window=WINDOW, stride=STRIDE,
                             progress=False, max_rounds=2)
    assert plan.quantized() == [] and info["rounds"] == 2 and info["ppl_delta_pct"] == 0
    # groups the user edited count against the budget by their rows, and their cost cannot be backed off
    edited = PrecisionPlan.uniform(program.graph, "bf16").with_format("lm_head", "fp8", edited=True)
    frame.loc[frame["group"] == "lm_head", "ppl_delta_pct"] = 0.05
    plan, info = A.auto_plan(S.SensitivityReport(frame, report.base_ppl, report.formats), program, stats, ids,
                             budget_pct=0.03, base_plan=edited, window=WINDOW, stride=STRIDE, progress=False)
    assert plan.quantized() == ["lm_head"] and not info["within_budget"] and info["ppl_delta_pct"] == 0.05


def test_auto_plan_fills_the_budget_its_rows_overestimated(program, stats, ids, report, monkeypatch):
    """Rows claim 0.03 % per group, the plan costs 0.01 % per group: after the first verified round the rows
    are rescaled by 1/3 and more groups added; a fill that goes over returns the last plan within budget."""
    frame = report.frame.copy()
    frame["ppl_delta_pct"] = 0.03
    frame.loc[frame["group"] == "lm_head", "ppl_delta_pct"] = 0.15  # never fits
    pessimistic = S.SensitivityReport(frame, report.base_ppl, report.formats, report.model)
    monkeypatch.setattr(A, "measure", fake_measure)
    plan, info = A.auto_plan(pessimistic, program, stats, ids, budget_pct=0.065, window=WINDOW, stride=STRIDE,
                             progress=False)
    history = info["history"]
    assert [len(h["quantized"]) for h in history] == [2, 6] and len(history[1]["added"]) == 4
    assert info["ppl_delta_pct"] == pytest.approx(0.06) and info["within_budget"] and info["rounds"] == 2
    assert len(plan.quantized()) == 6 and "lm_head" not in plan.quantized()

    def cliff(program_q, base):  # cheap up to two groups, then far over the budget
        n = sum(spec["format"] != "bf16" for spec in program_q.graph.meta["precision"]["groups"].values())
        delta = 0.01 * n if n <= 2 else 1.0
        return {"ppl": base.ppl * (1 + delta / 100), "ppl_delta_pct": delta, "kl": delta}

    monkeypatch.setattr(A, "measure", cliff)
    plan, info = A.auto_plan(pessimistic, program, stats, ids, budget_pct=0.065, window=WINDOW, stride=STRIDE,
                             progress=False)
    assert [len(h["quantized"]) for h in info["history"]] == [2, 6] and info["history"][1]["ppl_delta_pct"] == 1.0
    assert len(plan.quantized()) == 2 and info["ppl_delta_pct"] == pytest.approx(0.02) and info["within_budget"]


def test_auto_plan_keeps_edited_groups(program, stats, ids, report):
    base = (PrecisionPlan.uniform(program.graph, "bf16").with_format("layers.0.qkv", "int8_wo", edited=True)
            .with_format("lm_head", "bf16", edited=True))
    plan, info = A.auto_plan(report, program, stats, ids, budget_pct=1.0, base_plan=base, window=WINDOW,
                             stride=STRIDE, progress=False)
    assert plan.edited == ["layers.0.qkv", "lm_head"]
    assert plan.format_of("layers.0.qkv") == "int8_wo" and plan.format_of("lm_head") == "bf16"
    assert all(plan.format_of(g) == "fp8" for g in GROUPS if g not in plan.edited)
    # with no budget at all, the edited groups still keep their formats
    tight, _ = A.auto_plan(report, program, stats, ids, budget_pct=0.0, base_plan=base, window=WINDOW,
                           stride=STRIDE, progress=False, max_rounds=2)
    assert tight.format_of("layers.0.qkv") == "int8_wo" and tight.edited == base.edited


def test_auto_plan_prefers_the_most_time_saved(program, stats, ids, report, tmp_path):
    # planted timings where weight-only int8 is the fastest: it wins wherever the group is timed
    cache = planted_cache(program, stats, tmp_path)
    for entry in cache.entries.values():
        if entry["op"] == "workbench.w8_linear":
            entry["timings"][0]["ms"] /= 100
    plan, info = A.auto_plan(report, program, stats, ids, budget_pct=1.0, timings=cache, window=WINDOW,
                             stride=STRIDE, progress=False)
    assert plan.summary() == {"int8_wo": 9}
    w8_ms = sum(planted_ms(program, g, "workbench.w8_linear") for g in GROUPS) / 100
    assert info["estimated_ms"] == pytest.approx(w8_ms)


# --- figures ------------------------------------------------------------------------------------------------

def test_sensitivity_figure(report):
    fig = S.sensitivity_figure(report, "kl", log_y=True)
    assert [t.name for t in fig.data] == ["fp8", "int8_sq", "int8_wo"]
    assert list(fig.data[1].x) == GROUPS
    assert list(fig.data[1].y) == report.table("kl")["int8_sq"].tolist()
    assert fig.layout.yaxis.type == "log"


def test_pareto_front_and_figure():
    points = [{"name": "a", "ppl_delta_pct": 5.0, "ms": 1.0}, {"name": "b", "ppl_delta_pct": 1.0, "ms": 2.0},
              {"name": "c", "ppl_delta_pct": 2.0, "ms": 3.0}, {"name": "d", "ppl_delta_pct": 0.0, "ms": 4.0}]
    fig = P.pareto_figure(points)
    assert [t.name for t in fig.data] == ["plans", "Pareto front"]
    assert list(fig.data[0].text) == ["a", "b", "c", "d"]
    assert list(fig.data[1].text) == ["a", "b", "d"] and list(fig.data[1].x) == [1.0, 2.0, 4.0]
    # without timings, more low-precision FLOPs is the faster side
    flops = [{"name": "x", "ppl_delta_pct": 0.0, "low_precision_flops": 0.0},
             {"name": "y", "ppl_delta_pct": 0.5, "low_precision_flops": 0.7},
             {"name": "z", "ppl_delta_pct": 0.6, "low_precision_flops": 0.6}]
    assert [p["name"] for p in P.pareto_front(flops)] == ["y", "x"]
    assert "FLOPs" in P.pareto_figure(flops).layout.xaxis.title.text


def test_pareto_points(program, stats, ids, report, tmp_path):
    cache = planted_cache(program, stats, tmp_path)
    points = P.pareto_points(report, program, stats, ids, budgets=(0.0, 1.0), timings=cache, window=WINDOW,
                             stride=STRIDE, progress=False)
    names = [p["name"] for p in points]
    assert names[:4] == ["base", "uniform fp8", "uniform int8_sq", "uniform int8_wo"]
    assert "auto +1%" in names and any("auto +0%" in n for n in names)
    base = points[0]
    assert base["ppl_delta_pct"] == 0 and base["low_precision_flops"] == 0
    assert base["ms"] == pytest.approx(sum(planted_ms(program, g, "aten.linear.default") for g in GROUPS))
    auto = points[names.index("auto +1%")]
    assert auto["ms"] < points[1]["ms"]  # fp8 everywhere, lm_head too, beats uniform fp8 (lm_head bf16)
    fig = P.pareto_figure(points)
    assert len(fig.data[0].x) == len(points) and "auto +1%" in fig.data[1].text


# --- persistence and errors ---------------------------------------------------------------------------------

def test_report_json_round_trip(report, tmp_path):
    path = tmp_path / "sensitivity.json"
    report.save(path)
    obj = json.loads(path.read_text())
    assert obj["rows"][0]["base_ms"] is None and obj["rows"][-1]["layer"] is None
    back = S.SensitivityReport.load(path)
    pd.testing.assert_frame_equal(back.frame, report.frame)
    assert (back.base_ppl, back.formats, back.model, back.window) == (report.base_ppl, report.formats,
                                                                     report.model, report.window)
    assert back.to_json() == report.to_json()


@pytest.mark.parametrize("call,match", [
    (lambda p, s, i: S.sensitivity(p, s, i, formats=("int4",), window=WINDOW, stride=STRIDE, progress=False),
     "format 'int4' is unknown"),
    (lambda p, s, i: S.sensitivity(p, s, i[:40], window=WINDOW, stride=STRIDE, progress=False),
     "40 tokens, fewer than one window of 64: pass at least 64 tokens or a smaller window"),
    (lambda p, s, i: S.sensitivity(p, s, i, groups=["layers.0.q"], window=WINDOW, stride=STRIDE, progress=False),
     "name the group 'layers.0.qkv'"),
    (lambda p, s, i: S.sensitivity(p, s, i, formats=("fp8",), window=WINDOW, stride=STRIDE, progress=False,
                                   alpha=0.5), "option 'alpha' is taken by none of the formats fp8"),
    (lambda p, s, i: probe.evaluate_plan(p, PrecisionPlan.uniform(p.graph, "fp8"), s, i[:10], window=WINDOW,
                                         stride=STRIDE), "fewer than one window"),
])
def test_bad_requests_say_what_and_how_to_fix(program, stats, ids, call, match):
    with pytest.raises(WorkbenchError, match=match):
        call(program, stats, ids)


def test_a_report_of_another_model_is_refused(program, stats, ids, report, tmp_path):
    frame = report.frame.copy()
    frame.loc[frame["group"] == "layers.1.o", "group"] = "layers.7.o"
    other = S.SensitivityReport(frame, report.base_ppl, report.formats)
    with pytest.raises(WorkbenchError, match="names 1 groups this model does not have .layers.7.o.*run sensitivity"):
        A.auto_plan(other, program, stats, ids, window=WINDOW, stride=STRIDE, progress=False)
    with pytest.raises(WorkbenchError, match="measured on another model"):
        P.pareto_points(S.SensitivityReport(report.frame, 1.0, report.formats, "0123456789abcdef"), program, stats,
                        ids, window=WINDOW, stride=STRIDE, progress=False)
    with pytest.raises(WorkbenchError, match="has no format 'int4'"):
        report.worst("int4")
    with pytest.raises(WorkbenchError, match="metric 'speed' is not a column"):
        report.table("speed")
    with pytest.raises(WorkbenchError, match="format 'int4' is unknown"):
        S.SensitivityReport.from_json({**report.to_json(), "formats": ["int4"]})
    (tmp_path / "bad.json").write_text("{rows: ")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        S.SensitivityReport.load(tmp_path / "bad.json")


def test_plan_sweep_fits_a_budget_with_every_kind_spread_over_depth(program, stats, ids):
    """On a CPU a sweep is planned to take a few minutes: a subset of layers, every kind of group in each, spread
    from the first layer to the last, with the estimate and the way to the full sweep printed before it starts."""
    timed = S.plan_sweep(program, stats, ids, window=WINDOW, stride=STRIDE)  # tiny-llama: all of it fits
    assert timed.full and timed.groups == GROUPS and timed.seconds_per_variant > 0
    assert timed.budget_s == S.CPU_SWEEP_BUDGET_S and str(timed).startswith("full sweep: 9 groups x 3 formats")
    from workbench.models import PRESETS, ModelSource
    from workbench.pipeline import optimize

    deep = optimize(ModelSource("random", "tiny-6", None, dict(PRESETS["tiny-llama"], num_hidden_layers=6), 0),
                    device="cpu").program
    names = list(linear_groups(deep.graph))
    # 2 s a variant x 3 formats, 60 s: lm_head and two layers' 4 groups fit (27 variants)
    quick = S.plan_sweep(deep, None, ids, budget_s=60, seconds_per_variant=2.0)
    assert quick.groups == [g for g in names if g.startswith(("layers.0.", "layers.5."))] + ["lm_head"]
    assert not quick.full and quick.variants == 27 and quick.estimate_s == 54
    assert "quick sweep: 9 of 25 groups" in str(quick) and "full=True" in str(quick) and "2 min" in str(quick)
    assert S.plan_sweep(deep, None, ids, budget_s=60, seconds_per_variant=2.0, full=True).groups == names
    wide = S.plan_sweep(deep, None, ids, budget_s=200, seconds_per_variant=2.0, formats=["fp8"])
    assert {g.split(".")[1] for g in wide.groups if g != "lm_head"} == {"0", "1", "2", "3", "4", "5"}
    assert S.plan_sweep(deep, None, ids, budget_s=0, seconds_per_variant=2.0).groups == \
        [g for g in names if g.startswith("layers.0.")] + ["lm_head"]  # at least one layer, whatever the budget
    report = S.sensitivity(deep, None, ids, groups=quick.groups, formats=["int8_wo"], window=WINDOW, stride=STRIDE,
                           progress=False)
    assert report.groups == quick.groups
