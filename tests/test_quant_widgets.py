"""The precision widget driven from Python (dropdowns set, buttons clicked, callables injected), and the
calibration plots, on tiny-llama's optimized graph on the CPU."""

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant import PrecisionPlan, calibrate, linear_groups
from workbench.quant.plots import amax_convergence_figure, histogram_figure

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def hist_stats(program):
    torch.manual_seed(1)
    return calibrate(program, torch.randint(1, 512, (3000,)), samples=6, seq_len=48, progress=False,
                     observer="percentile")


@pytest.fixture(scope="module")
def report(program):
    """A planted report: layers.0.qkv costs 0.1% in fp8 (green), 1% in int8_sq (amber), 5% in int8_wo (red);
    every other group 0.2% in every format."""
    from workbench.quant.sensitivity import SensitivityReport

    rows = []
    for name, g in linear_groups(program.graph).items():
        for fmt in ("fp8", "int8_sq", "int8_wo"):
            delta = {"fp8": 0.1, "int8_sq": 1.0, "int8_wo": 5.0}[fmt] if name == "layers.0.qkv" else 0.2
            rows.append({"group": name, "layer": g.layer, "kind": g.kind, "format": fmt, "ppl_delta_pct": delta,
                         "ppl": 100 * (1 + delta / 100), "kl": delta / 100})
    return SensitivityReport.from_json({"rows": rows, "base_ppl": 100.0, "formats": ["fp8", "int8_sq", "int8_wo"]})


def widget(program, **kw):
    from workbench.quant.widgets import PrecisionWidget

    return PrecisionWidget(program.graph, PrecisionPlan.uniform(program.graph, "bf16"), **kw)


def test_grid_has_a_dropdown_per_group_and_the_kv_cache(program):
    w = widget(program)
    assert set(w.dropdowns) == set(linear_groups(program.graph)) | {"kv_cache"}
    assert w.dropdowns["layers.1.down"].options == ("bf16", "fp8", "int8_sq", "int8_wo")
    # the plan's "bf16" cache is the model's own dtype: float32 for this CPU capture, and the label says so
    assert w.dropdowns["kv_cache"].options == (("bf16 = float32", "bf16"), ("fp8", "fp8"))
    assert w.dropdowns["kv_cache"].label == "bf16 = float32" and w.dropdowns["kv_cache"].value == "bf16"
    assert set(w.colours.values()) == {"grey"}  # no report: nothing measured


def test_a_user_edit_changes_the_plan_and_marks_it(program):
    w = widget(program)
    w.dropdowns["layers.0.down"].value = "int8_sq"
    w.dropdowns["kv_cache"].value = "fp8"
    assert w.plan.format_of("layers.0.down") == "int8_sq" and w.plan.kv_cache == "fp8"
    assert w.plan.edited == ["layers.0.down", "kv_cache"]
    assert w.plan.format_of("layers.0.o") == "bf16" and "edited" in w.status.value
    w.plan.validate(program.graph)


def test_auto_never_overwrites_edited_groups(program):
    asked = []

    def all_fp8(plan):  # ignores base_plan's edits on purpose: the widget must restore them
        asked.append(plan)
        new = PrecisionPlan.uniform(program.graph, "fp8", lm_head="fp8", kv_cache="fp8")
        return new, {"ppl": 101.5, "ppl_delta_pct": 0.75, "kl": 0.0042}

    w = widget(program, on_auto=all_fp8)
    w.dropdowns["layers.0.down"].value = "int8_wo"
    w.auto_button.click()
    assert w.error is None
    assert asked[0].edited == ["layers.0.down"] and asked[0].format_of("layers.0.down") == "int8_wo"
    assert w.plan.format_of("layers.0.down") == "int8_wo" and w.plan.edited == ["layers.0.down"]
    assert all(w.plan.format_of(g) == "fp8" for g in w.plan.groups if g != "layers.0.down")
    assert w.plan.kv_cache == "fp8" and w.dropdowns["layers.1.qkv"].value == "fp8"
    assert "kept your edits of layers.0.down" in w.status.value and "101.5" in w.status.value
    # the auto plan's formats came through set_plan: nothing else became an edit
    w.dropdowns["layers.1.o"].value = "bf16"
    assert w.plan.edited == ["layers.0.down", "layers.1.o"]


def test_an_edit_to_the_shown_format_is_recorded_and_kept_by_auto(program):
    """Pinning a group to the format its dropdown already shows (bf16 before any auto plan) fires no change event;
    ``edit`` records it anyway, and the auto plan keeps it (notebook 04's cell does this)."""
    def all_fp8(plan):
        return PrecisionPlan.uniform(program.graph, "fp8"), {"ppl": 1.0, "ppl_delta_pct": 0.1, "kl": 0.0}

    w = widget(program, on_auto=all_fp8)
    assert w.dropdowns["layers.1.down"].value == "bf16"
    w.edit("layers.1.down", "bf16")
    assert w.plan.edited == ["layers.1.down"] and "edited" in w.status.value
    w.auto()
    assert w.plan.format_of("layers.1.down") == "bf16" and w.plan.format_of("layers.0.down") == "fp8"
    w.edit("layers.0.qkv", "int8_wo")  # a changed value goes through the dropdown, recorded once
    assert w.plan.edited == ["layers.1.down", "layers.0.qkv"] and w.dropdowns["layers.0.qkv"].value == "int8_wo"
    w.edit("layers.9.o", "fp8")
    assert "no group 'layers.9.o'" in w.error
    w.edit("kv_cache", "int8_sq")
    assert "kv_cache takes" in w.error


def test_a_person_keeps_a_shown_format_with_the_keep_button(program):
    """A person cannot record an edit by choosing the value a dropdown already shows; "Keep as shown" does it: the
    group picked beside the button keeps its shown format through an auto plan that changes everything else."""
    def all_fp8(plan):
        return PrecisionPlan.uniform(program.graph, "fp8"), {"ppl": 1.0, "ppl_delta_pct": 0.1, "kl": 0.0}

    w = widget(program, on_auto=all_fp8)
    w.keep_group.value = "layers.1.down"
    w.keep_button.click()
    assert w.plan.edited == ["layers.1.down"] and "layers.1.down → bf16" in w.status.value
    w.auto_button.click()
    assert w.plan.format_of("layers.1.down") == "bf16" and w.plan.format_of("layers.1.o") == "fp8"
    w.keep_group.value = "kv_cache"
    w.keep_button.click()
    assert w.plan.edited == ["layers.1.down", "kv_cache"]


def test_auto_without_a_report_says_it_cannot(program):
    w = widget(program)
    w.auto_button.click()
    assert "needs a sensitivity report" in w.error and "error" in w.status.value
    w.evaluate_button.click()
    assert "Evaluate needs" in w.error


def test_evaluate_shows_the_numbers(program):
    seen = []

    def evaluate(plan):
        seen.append(plan.format_of("layers.1.gate_up"))
        return {"ppl": 123.456, "ppl_delta_pct": 0.42, "kl": 0.00123}

    w = widget(program, on_evaluate=evaluate)
    w.dropdowns["layers.1.gate_up"].value = "fp8"
    w.evaluate_button.click()
    assert seen == ["fp8"] and w.error is None
    assert "ppl 123.5" in w.status.value and "+0.42%" in w.status.value and "KL 0.00123" in w.status.value
    assert w.result["kl"] == 0.00123


def test_errors_of_a_callback_are_shown_in_place(program):
    def broken(plan):
        raise WorkbenchError("no calibration statistics for group 'lm_head'")

    w = widget(program, on_evaluate=broken, on_auto=broken)
    w.evaluate_button.click()
    assert "no calibration statistics" in w.error and "error" in w.status.value
    w.auto_button.click()
    assert "no calibration statistics" in w.error and w.plan.summary() == {"bf16": 9}


def test_save_writes_the_current_plan(program, tmp_path):
    path = tmp_path / "plans" / "plan.json"
    w = widget(program, save_path=path)
    w.dropdowns["layers.0.qkv"].value = "fp8"
    w.dropdowns["lm_head"].value = "int8_wo"
    w.save_button.click()
    assert w.error is None and str(path) in w.status.value
    saved = PrecisionPlan.loads(path.read_text()).validate(program.graph)
    assert saved == w.plan and saved.edited == ["layers.0.qkv", "lm_head"]
    assert not [p for p in path.parent.iterdir() if p.name != "plan.json"]  # no temporary left
    unsaved = widget(program)
    unsaved.save_button.click()
    assert "nowhere to save" in unsaved.error


def test_colours_follow_the_report(program, report):
    w = widget(program, report=report, thresholds=(0.5, 2.0))
    qkv = w.dropdowns["layers.0.qkv"]
    assert w.colours["layers.0.qkv"] == "grey"  # bf16: the report measured no bf16
    for fmt, colour in (("fp8", "green"), ("int8_sq", "amber"), ("int8_wo", "red")):
        qkv.value = fmt
        assert w.colours["layers.0.qkv"] == colour
        assert f"wb-precision-{colour}" in qkv._dom_classes and len(qkv._dom_classes) == 1
    w.dropdowns["layers.1.o"].value = "int8_wo"
    assert w.colours["layers.1.o"] == "green" and "+0.2" in w.dropdowns["layers.1.o"].tooltip
    assert w.colours["kv_cache"] == "grey"
    strict = widget(program, report=report, thresholds=(0.05, 0.1))
    strict.dropdowns["layers.1.o"].value = "fp8"
    assert strict.colours["layers.1.o"] == "red"


def test_precision_widget_runs_the_library(program, stats, report, tmp_path):
    """precision_widget's buttons run probe.evaluate_plan and auto_plan on the program itself."""
    from workbench.quant.probe import evaluate_plan
    from workbench.quant.widgets import precision_widget

    ids = torch.randint(1, 512, (160,), generator=torch.Generator().manual_seed(2))
    w = precision_widget(program, stats, ids, report=report, save_path=tmp_path / "plan.json", window=96, stride=64,
                         budget_pct=0.5)
    w.dropdowns["layers.0.qkv"].value = "int8_wo"  # red in the report, and an edit: auto must keep it
    w.evaluate_button.click()
    assert w.error is None and "ppl" in w.status.value and "KL" in w.status.value
    assert w.result == pytest.approx(evaluate_plan(program, w.plan, stats, ids, window=96, stride=64))
    said = []  # the status line while the auto plan runs: each verification round as it starts
    w.status.observe(lambda change: said.append(change["new"]), names="value")
    w.auto_button.click()
    assert w.error is None and w.plan.format_of("layers.0.qkv") == "int8_wo"
    assert said[:2] == ["auto plan: running...", "auto plan: verifying plan 1 (at most 8)..."]
    # by the planted report the edit alone spends 5%: no other group fits in a 0.5% budget
    assert w.plan.quantized() == ["layers.0.qkv"] and w.plan.edited == ["layers.0.qkv"]
    assert "auto plan: 1 int8_wo, 8 bf16" in w.status.value
    w.save_button.click()
    assert PrecisionPlan.loads((tmp_path / "plan.json").read_text()) == w.plan


# --- plots ------------------------------------------------------------------------------------------------

def test_amax_convergence_has_a_line_per_group(stats):
    fig = amax_convergence_figure(stats)
    assert [t.name for t in fig.data] == list(stats.activations)
    for t in fig.data:
        obs = stats.activations[t.name]
        assert len(t.x) == len(t.y) == obs.samples == 2  # 6 sequences, 4 per calibration step
        assert list(t.y) == pytest.approx(obs.history) and t.y[-1] == pytest.approx(float(obs.amax()))
    fig = amax_convergence_figure(stats, ["layers.1.down"], relative=True)
    assert len(fig.data) == 1 and fig.data[0].y[-1] == 1.0
    with pytest.raises(WorkbenchError, match="no calibration statistics for group 'layers.1.q'"):
        amax_convergence_figure(stats, ["layers.1.q"])


def test_histogram_has_the_threshold_lines(stats, hist_stats):
    g = "layers.0.gate_up"
    fig = histogram_figure(hist_stats, g)
    obs = hist_stats.activations[g]
    lines = {s.name: s.x0 for s in fig.layout.shapes}
    assert lines == pytest.approx({"fp8 threshold": float(obs.threshold("fp8")),
                                   "int8 threshold": float(obs.threshold("int8"))})
    assert sum(fig.data[0].y) == obs.counts().sum() == obs.rows * obs.channels
    assert "histogram of |x|" in fig.layout.title.text
    fig = histogram_figure(stats, g)  # "max": no histogram, the per-channel amax instead, said in the title
    assert "per-channel amax" in fig.layout.title.text and len(fig.data[0].x) == stats.channels[g].channels
    assert {s.name for s in fig.layout.shapes} == {"fp8 threshold", "int8 threshold"}
    with pytest.raises(WorkbenchError, match="no calibration statistics for group 'layers.0.mlp'"):
        histogram_figure(stats, "layers.0.mlp")
