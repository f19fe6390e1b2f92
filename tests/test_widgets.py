"""Widgets driven from Python: tick boxes, click buttons, check the artifacts and numbers they produce."""

from pathlib import Path

import pytest

from workbench.errors import WorkbenchError
from workbench.graph.passes import DEFAULT_PIPELINE, PASSES
from workbench.graph.plots import pass_layer_figure, pass_waterfall_figure

pytest.importorskip("ipywidgets")


@pytest.fixture
def ws(captured_ws):
    return captured_ws


def test_pass_widget_runs_the_ticked_passes(ws):
    from workbench.graph.widgets import PassPipelineWidget

    w = PassPipelineWidget(ws)
    assert [n for n, cb in w.checkboxes.items() if cb.value] == list(DEFAULT_PIPELINE)
    w.checkboxes["fuse_rope"].value = False
    shown = []  # what the status line said while the passes ran: each pass by name, in order
    w.status.observe(lambda change: shown.append(change["new"]), names="value")
    w.run_button.click()
    assert w.error is None
    ran = [n for n in DEFAULT_PIPELINE if n != "fuse_rope"]
    assert [s for s in shown if s.startswith("pass ")] == [f"pass {i + 1} of {len(ran)}: {n}..."
                                                           for i, n in enumerate(ran)]
    assert w.progress.value == w.progress.max == len(ran) and w.progress.layout.visibility == "hidden"
    assert not w.run_button.disabled
    assert list(w.table["pass"]) == [n for n in DEFAULT_PIPELINE if n != "fuse_rope"]
    assert ws.status("passes") == "ok"
    saved = [r["name"] for r in ws.read_json("passes", "report.json")]
    assert "fuse_rope" not in saved
    assert not any(n.op == "workbench.rope" for n in w.graph.nodes)
    assert any(n.op == "workbench.paged_attention" for n in w.graph.nodes)
    # tick it again and re-run: the stage is rewritten with it
    w.checkboxes["fuse_rope"].value = True
    w.run_button.click()
    attention = [n for n in w.graph.nodes if n.op == "workbench.paged_attention"]
    assert len(attention) == 2 and all("cos" in n.kwargs for n in attention)  # fused ropes, moved into attention
    assert "fuse_rope" in [r["name"] for r in ws.read_json("passes", "report.json")]
    assert "nodes" in w.status.value and set(w.figures) == {"waterfall", "layer"}
    shown = w.output.outputs[0]["data"]["text/html"]  # the table as shown: short numbers, no "None"
    assert "<table" in shown and ">None<" not in shown and "0.000000" not in shown


def test_pass_widget_reports_errors_in_place(ws):
    from workbench.graph.widgets import PassPipelineWidget

    w = PassPipelineWidget(ws)
    w.run_button.click()
    (ws.root / "passes" / "graph.json").write_text("{}")  # a hand edit
    w.run_button.click()
    assert "changed by hand" in w.error and "error" in w.status.value


def test_a_graph_the_runtime_cannot_run_is_saved_with_a_warning(ws):
    """Unticking fuse_attention leaves insert_paged_attention matching nothing: the widget and the stage say so
    when they save, and the runtime refuses the graph in one line naming the pass, not a KeyError."""
    from workbench.errors import WorkbenchError
    from workbench.graph.widgets import PassPipelineWidget
    from workbench.pipeline import passes_stage
    from workbench.runtime.engine import LLM

    w = PassPipelineWidget(ws)
    assert w.warnings == []
    w.checkboxes["fuse_attention"].value = False
    w.run_button.click()
    assert w.error is None and ws.status("passes") == "ok"
    [warning] = w.warnings
    assert "insert_paged_attention matched nothing" in warning and "needs fuse_attention" in warning
    assert "warning: " in w.status.value and "\n" not in warning
    with pytest.warns(UserWarning, match="insert_paged_attention.*fuse_attention"):
        passes_stage(ws, [n for n in DEFAULT_PIPELINE if n != "fuse_attention"], force=True)
    with pytest.raises(WorkbenchError, match="no paged attention.*fuse_attention and insert_paged_attention") as e:
        LLM(ws.root, device="cpu")
    assert "\n" not in str(e.value)
    w.checkboxes["fuse_attention"].value = True
    w.run_button.click()
    assert w.warnings == [] and "warning" not in w.status.value


def test_pass_figures_show_the_reports(ws):
    from workbench.graph.passes import summary_table
    from workbench.pipeline import load_graph, passes_stage

    graph, reports = passes_stage(ws)
    before, _ = load_graph(ws, "capture")
    table = summary_table(reports)
    fig = pass_waterfall_figure(table)
    nodes = fig.data[0]
    assert nodes.y[0] == len(before.nodes) and sum(nodes.y[:-1]) == len(graph.nodes)
    assert list(nodes.x[1:-1]) == list(DEFAULT_PIPELINE)
    fig = pass_layer_figure(before, graph, reports, layer=1)
    shown = {t.name.split(": ")[1]: len(t.x) for t in fig.data if t.name.startswith("optimized")}
    # the attention node was last rewritten by the pass that moved RoPE into it; no rope node is left
    assert shown["fuse_rope_into_attention"] == 1 and "fuse_rope" not in shown and shown["fuse_silu_mul"] == 1
    assert sum(len(t.x) for t in fig.data if t.name.startswith("captured")) == sum(n.layer == 1 for n in before.nodes)
    assert set(shown) <= set(PASSES) | {"unchanged"}


H100_CACHE = Path(__file__).parent / "data" / "h100_llama3_8b_tune.json"


def test_tuning_widget_without_a_gpu_shows_saved_timings(ws):
    from workbench.profiling.widgets import TuningWidget

    w = TuningWidget(ws, saved=H100_CACHE, device=None)
    assert w.tune_button.description == "Load saved timings"
    w.tune_button.click()
    assert w.error is None and "NVIDIA H100" in w.status.value
    assert len(w.table) == sum(len(e["timings"]) for e in w.cache.entries.values())
    assert len(w.figure.data) > 0 and "candidate" in w.figure.layout.title.text  # the first view, drawn
    w.op.value = "workbench.rms_norm"
    w.view.value = "config x shape heatmap"
    timed = w.table[(w.table["op"] == "workbench.rms_norm") & (w.table["ms"] != float("inf"))]
    cells = [z for row in w.figure.data[0].z for z in row if z is not None]
    assert sorted(cells) == pytest.approx(sorted(timed["ms"]))  # the heatmap shows exactly that op's timings
    w.view.value = "op share"
    assert w.figure.data[0].type == "treemap"


def test_tuning_widget_dropdown_names_the_figure_shown(ws):
    """``show`` from code (what 03's cells call) chooses the view in the dropdown too, so after Run All the
    dropdown names the figure under it; choosing in the dropdown draws that view."""
    from workbench.profiling.widgets import VIEWS, TuningWidget

    titles = {"tactic comparison": "Every candidate", "config x shape heatmap": "every config at every shape",
              "op share": "Share of tuned time", "top slowest": "Top ", "roofline": "Roofline"}
    assert set(titles) == set(VIEWS)
    w = TuningWidget(ws, saved=H100_CACHE, device=None)
    w.tune()
    for view in ("roofline", "tactic comparison", "op share", "top slowest", "config x shape heatmap", "roofline"):
        w.show(view)
        assert w.view.value == view and titles[view] in w.figure.layout.title.text
        assert len(w.output.outputs) == 1  # drawn once, not once more by the dropdown's observer
    w.view.value = "tactic comparison"
    assert titles["tactic comparison"] in w.figure.layout.title.text
    with pytest.raises(WorkbenchError, match="unknown view"):
        w.show("flame graph")
    assert w.view.value == "tactic comparison"


def test_tuning_widget_tunes_the_profile_it_shows(optimized_ws):
    """On a device (here the CPU under the Triton interpreter, timings planted) the button writes the
    tune stage for exactly the profile in the fields; a bad bucket list is an error in place."""
    from workbench.profiling.widgets import TuningWidget

    ws = optimized_ws
    ran = []  # the candidates run so far (kept alive: a re-measured candidate is the same call object)

    def timer(call, op, tactic, config):
        # every candidate runs once; the near-ties' re-measurements (all Triton configs tie at 0.5) need not
        # run it again, which would only triple the interpreter's time
        if not any(c is call for c in ran):
            ran.append(call)
            call()
        return 1.0 if tactic == "reference" else 0.5

    w = TuningWidget(ws, device="cpu", timer=timer)
    w.buckets.value = "2,x"
    w.tune_button.click()
    assert "comma-separated" in w.error and ws.record("tune") is None
    for name, value in {"max_tokens": 24, "max_seqs": 2, "context": 5, "max_context": 16}.items():
        w.fields[name].value = value
    w.buckets.value = "2,24"
    w.tune_button.click()
    assert w.error is None
    assert ws.read_json("tune", "choices.json")["edges"] == [2, 24] == w.tuned.edges
    assert ws.record("tune")["params"]["profile"]["context"] == 5
    assert set(w.table["tactic"]) == {"reference", "triton"} and w.table["chosen"].sum() == len(w.cache.entries)
    w.view.value = "roofline"  # no ceilings: the CPU measured none; said in place
    assert "no measured ceilings" in w.status.value


@pytest.mark.parametrize("renderer", ["", "plotly_mimetype+notebook", "png"])
def test_a_figure_in_an_output_area_is_its_plotly_json_whatever_the_default_renderer(renderer, monkeypatch):
    """Outside a kernel plotly's default renderer is empty (its figure's own bundle is then empty too), and a
    kernel's may be anything a library set: the widgets' output areas get the plotly JSON all the same."""
    import ipywidgets
    import plotly.graph_objects as go
    import plotly.io as pio

    from workbench.display import show_in

    monkeypatch.setattr(pio.renderers, "default", renderer)
    out = ipywidgets.Output()
    show_in(out, go.Figure(go.Scatter(x=[1, 2], y=[3, 5], name="line")))
    (shown,) = out.outputs
    assert list(shown["data"]) == ["application/vnd.plotly.v1+json"]
    assert shown["data"]["application/vnd.plotly.v1+json"]["data"][0]["name"] == "line"


def test_figures_are_shown_in_the_widgets_output_area(ws, monkeypatch):
    """The widgets put a plotly figure into their output area as its plotly JSON. ``Output.append_display_data``
    asks IPython's formatter, which lets a figure display itself below the running cell (from a button's callback:
    nowhere the page shows) and leaves the area an empty bundle: tests/test_browser.py saw 02, 03 and 05 so."""
    import plotly.io as pio

    from workbench.graph.widgets import PassPipelineWidget

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")  # a Jupyter kernel's default
    w = PassPipelineWidget(ws)
    w.run()
    shown = [sorted(o["data"]) for o in w.output.outputs]
    assert "text/html" in shown[0] and shown[1:] == [["application/vnd.plotly.v1+json"]] * 2
