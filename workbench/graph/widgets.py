"""Notebook widgets for the graph stages. ipywidgets is imported only when a widget is built.

``PassPipelineWidget(ws)`` shows one checkbox per registered pass (the standard
pipeline first, ticked; plugin passes after it) and a Run button. Running writes
the workspace's ``passes`` stage and shows the report table, the waterfall and a
before/after view of one decoder layer; a graph the runtime cannot run (no paged
attention) is saved with a warning in the status line. Everything it shows is also kept on the
object (``graph``, ``reports``, ``table``, ``figures``), so tests and notebook
cells can use the results directly.
"""

from __future__ import annotations

import html
import warnings

from ..display import show_in, styled
from ..errors import WorkbenchError
from ..workspace import Workspace


class PassPipelineWidget:
    def __init__(self, ws: Workspace, *, layer: int = 0) -> None:
        import ipywidgets as W

        from .passes import PASSES, default_pipeline

        self.ws = ws
        self.layer = layer
        pipeline = default_pipeline()
        names = [*pipeline, *(n for n, p in PASSES.items()
                              if n not in pipeline and not p.runtime_only and not p.sharded)]
        self.checkboxes = {n: W.Checkbox(value=n in pipeline, description=n, indent=False,
                                         tooltip=PASSES[n].description) for n in names}
        self.run_button = W.Button(description="Run passes", button_style="primary", icon="play")
        self.run_button.on_click(lambda _button: self.run())
        self.status = W.HTML()
        # a run checks every pass numerically (about a minute for SmolLM2 on a laptop CPU): the bar shows which
        # pass is running; hidden between runs
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                      layout=W.Layout(width="240px", visibility="hidden"))
        self.output = W.Output()
        self.widget = W.VBox([W.HTML("<b>Graph passes</b> (in order; untick to skip)"),
                              W.VBox(list(self.checkboxes.values())),
                              W.HBox([self.run_button, self.progress, self.status]), self.output])
        self.graph = self.reports = self.table = None
        self.figures: dict[str, object] = {}
        self.error: str | None = None
        self.warnings: list[str] = []  # the last run's, one line each (a graph the runtime cannot run)

    def selected(self) -> list[str]:
        return [n for n, cb in self.checkboxes.items() if cb.value]

    def run(self) -> None:
        """Run the ticked passes into the workspace and show what they did."""
        from ..pipeline import load_graph, passes_stage
        from .passes import summary_table
        from .plots import pass_layer_figure, pass_waterfall_figure

        self.output.outputs = ()
        self.status.value = "reading the weights for the passes' checks..."
        self.progress.value, self.progress.max = 0, max(1, len(self.selected()))
        self.progress.layout.visibility = "visible"
        self.run_button.disabled = True

        def on_pass(i: int, total: int, name: str) -> None:
            self.progress.value, self.progress.max = i, max(1, total)
            self.status.value = f"pass {i + 1} of {total}: {html.escape(name)}..." if name else "drawing..."

        try:
            with warnings.catch_warnings(record=True) as caught:  # shown in the status line, not below the widget
                warnings.simplefilter("always")
                self.graph, self.reports = passes_stage(self.ws, self.selected(), on_pass=on_pass)
        except WorkbenchError as e:
            self.error = str(e)
            self.status.value = f"<span style='color:#c00'>error: {e}</span>"
            return
        finally:
            self.progress.layout.visibility = "hidden"
            self.run_button.disabled = False
        self.error = None
        self.warnings = [str(w.message) for w in caught]
        self.table = summary_table(self.reports)
        before, _ = load_graph(self.ws, "capture")
        self.figures = {"waterfall": pass_waterfall_figure(self.table),
                        "layer": pass_layer_figure(before, self.graph, self.reports, self.layer)}
        self.status.value = (f"{len(before.nodes)} → {len(self.graph.nodes)} nodes; "
                             f"saved in {self.ws.root / 'passes'}"
                             + "".join(f"<br><span style='color:#b60'>warning: {html.escape(w)}</span>"
                                       for w in self.warnings))
        show_in(self.output, _readable(self.table), *self.figures.values())

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _readable(table):
    """The pass table as the widget shows it: errors to two significant digits, seconds to 0.01, bytes with
    separators, no "None" for passes that did not diverge."""
    return styled(table, {"max_rel_err": lambda v: "" if v is None or v != v else f"{v:.1e}", "seconds": "{:.2f}",
                          "bytes_saved": "{:,}", "first_diverging": lambda v: v or ""})
