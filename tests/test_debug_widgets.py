"""The divergence figure and widget on a tiny-llama workspace (capture, passes, and an fp8 quant stage calibrated
on 8 x 64 random ids), on the CPU: the figure draws each comparison's layer rows on a log axis, and the widget,
driven from Python as its dropdown, text field and button would be, shows what ``diff`` finds for the pair and
prompt chosen."""

import pytest

from conftest import copy_workspace
from workbench.debug.diff import diff
from workbench.debug.plots import FLOOR, divergence_figure
from workbench.debug.widgets import DivergenceWidget, parse_prompt
from workbench.pipeline import QuantOptions, quant_stage

pytest.importorskip("plotly")
pytest.importorskip("ipywidgets")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def ws(_tiny_llama_workspaces, tmp_path_factory):
    ws = copy_workspace(_tiny_llama_workspaces / "optimized", tmp_path_factory.mktemp("debug") / "ws")
    quant_stage(ws, options=QuantOptions(fmt="fp8", samples=8, seq_len=64), device="cpu", progress=False)
    return ws


def test_the_figure_has_a_line_per_comparison_against_depth_on_a_log_axis(ws):
    clean = diff(ws.root, stage="passes", against="hf", device="cpu")
    quant = diff(ws.root, stage="quant", against="passes", device="cpu", tol=1e-2)
    fig = divergence_figure(clean, quant, labels=["passes vs hf", "quant vs passes"])
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "category"
    assert list(fig.layout.xaxis.categoryarray) == ["embed", "0", "1", "norm", "logits"]
    lines = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in lines] == ["passes vs hf", "quant vs passes"]
    assert list(lines[0].x) == ["embed", "0", "1", "norm", "logits"]
    assert list(lines[0].y) == [FLOOR] * 5  # float32 passes are exact: drawn at the floor, said so in the hover
    assert "0 (drawn at" in lines[0].hovertext[1]
    assert list(lines[1].y) == [max(e, FLOOR) for e in quant.layers.rel_err]
    tols = [t for t in fig.data if t.line.dash == "dash"]
    assert [t.y[0] for t in tols] == [1e-4, 1e-2]
    crosses = [t for t in fig.data if t.marker.symbol == "x"]  # the first divergence, only where there is one
    assert len(crosses) == 1 and list(crosses[0].x) == ["0"] and quant.first.layer == 0


def test_the_prompt_field_takes_token_ids_or_text():
    assert parse_prompt("  ") == {}
    assert parse_prompt("3, 14 15,92") == {"ids": [3, 14, 15, 92]}
    assert parse_prompt("The capital of France") == {"prompt": "The capital of France"}


def test_the_widget_diffs_the_pair_and_prompt_chosen(ws):
    w = DivergenceWidget(ws.root, device="cpu", tol=1e-2)
    assert w.pair.value == ("passes", "hf") and w.error is None
    assert w.status.value.startswith("no divergence: every layer of")
    first = w.output.outputs
    assert "text/html" in first[0]["data"] and PLOTLY in first[1]["data"]
    assert w.figure.data[0].name == "passes vs transformers"

    w.pair.value = ("quant", "passes")
    w.prompt.value = "3, 14, 15, 92, 65, 35"
    w.button.click()
    assert w.divergence.first is not None and w.divergence.first.layer == 0
    assert w.status.value.startswith("first divergence: layer 0, ")
    assert "-&gt; " in w.status.value  # the origin, escaped for the HTML line
    assert w.output.outputs != first and w.figure.data[0].name == "quant vs passes"
    assert len(w.figure.data[0].y) == 5 and min(w.figure.data[0].y[1:]) > 1e-2
    assert "rel_err" in w.output.outputs[0]["data"]["text/html"]  # the layers table
    assert PLOTLY in w.output.outputs[1]["data"]
    same = diff(ws.root, stage="quant", against="passes", device="cpu", tol=1e-2, ids=[3, 14, 15, 92, 65, 35])
    assert list(w.divergence.layers.rel_err) == list(same.layers.rel_err)


def test_text_for_a_model_without_tokenizer_shows_the_error_and_clears_the_output(ws):
    w = DivergenceWidget(ws.root, device="cpu")
    w.prompt.value = "The capital of France"
    w.button.click()
    assert w.divergence is None and w.figure is None and w.output.outputs == ()
    assert w.status.value.startswith("<span style='color:#c00'>error: this model has random weights")


def test_decode_steps_draw_a_line_per_step_and_the_picker_shows_each_steps_table(ws):
    """With decode steps the figure has one line per step (the prefill, then each decode step through the KV
    cache), the step picker lists them at the first diverging one, and picking a step shows its table."""
    w = DivergenceWidget(ws.root, device="cpu", tol=1e-2)
    assert w.step.disabled and w.step.options == (("prefill", 0),)
    w.pair.value = ("quant", "passes")
    w.prompt.value = "3, 14, 15, 92, 65, 35"
    w.steps.value = 2
    w.button.click()
    d = w.divergence
    assert len(d.decode) == 2 and len(d.tokens) == 2 and not w.step.disabled
    names = [t.name for t in w.figure.data if t.showlegend is not False]
    assert names == ["prefill", f"decode 1 (token {d.tokens[0]})", f"decode 2 (token {d.tokens[1]})"]
    assert [label for label, _ in w.step.options] == names and w.step.value == 0  # the prefill diverges first
    same = diff(ws.root, stage="quant", against="passes", device="cpu", tol=1e-2, ids=[3, 14, 15, 92, 65, 35],
                steps=2)
    assert same.tokens == d.tokens and list(same.decode[1].layers.rel_err) == list(d.decode[1].layers.rel_err)
    w.step.value = 2  # what picking "decode 2" does
    assert "(shown: decode 2" in w.status.value
    table = w.output.outputs[0]["data"]["text/html"]
    assert f"{d.decode[1].layers.rel_err.iloc[-1]:.2e}" in table
    assert PLOTLY in w.output.outputs[1]["data"]
