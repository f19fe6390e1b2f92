"""The tuning widget: pick an optimization profile, tune (on a GPU), browse the timing views.

    w = TuningWidget(ws, saved="tests/data/h100_llama3_8b_tune.json")
    w                       # profile fields, a Tune button, a view dropdown, the figure
    w.tune()                # what the button does: tune_stage on a GPU, else load ``saved``
    w.show("roofline")      # what choosing a view does; the figure is kept in ``w.figure``

On a machine without a GPU there is nothing to time: the button loads the timing cache
``saved`` (measured on a GPU, opened read-only and never used for choices) so the views still
work, and says so. Everything shown is kept on the object (``profile``, ``cache``, ``table``,
``tuned``, ``figure``) for tests and notebook cells. ipywidgets is imported only when built.
"""

from __future__ import annotations

from pathlib import Path

from ..display import show_in
from ..errors import WorkbenchError
from ..workspace import Workspace

VIEWS = ("tactic comparison", "config x shape heatmap", "op share", "top slowest", "roofline")


class TuningWidget:
    def __init__(self, ws: Workspace, *, saved: str | Path | None = None, device: str | None = None,
                 timer=None) -> None:
        """``device`` defaults to CUDA when there is one; ``timer`` replaces the CUDA-event timer (tests)."""
        import ipywidgets as W
        import torch

        from ..kernels.profiles import OptimizationProfile

        self.ws, self.saved, self.timer = ws, Path(saved) if saved else None, timer
        self.device = device or ("cuda" if torch.cuda.is_available() else None)
        d = OptimizationProfile()
        # labels at a width that fits the longest ("max context"), buttons as wide as their text: at ipywidgets'
        # defaults JupyterLab cut them to "max cont…" and "Load saved tim…"
        label = {"style": {"description_width": "90px"}, "layout": W.Layout(width="260px")}
        self.fields = {
            "max_tokens": W.BoundedIntText(d.max_tokens, min=1, max=1 << 20, description="max tokens", **label),
            "max_seqs": W.BoundedIntText(d.max_seqs, min=1, max=1 << 16, description="max seqs", **label),
            "context": W.BoundedIntText(d.context, min=0, max=1 << 20, description="context", **label),
            "max_context": W.BoundedIntText(d.max_context, min=1, max=1 << 20, description="max context", **label),
        }
        self.buckets = W.Text(placeholder="1,4,16,... (default)", description="buckets", **label)
        self.tune_button = W.Button(description="Tune" if self.device else "Load saved timings",
                                    button_style="primary", icon="play", layout=W.Layout(width="auto"))
        self.tune_button.on_click(lambda _b: self.tune())
        self.view = W.Dropdown(options=VIEWS, value=VIEWS[0], description="view", **label)
        self.op = W.Dropdown(options=[], description="op", style={"description_width": "40px"},
                             layout=W.Layout(width="360px"))
        self.view.observe(lambda change: self.show(change["new"]), names="value")
        self.op.observe(lambda change: self.show(self.view.value), names="value")
        self.status = W.HTML()
        self.output = W.Output()
        self.widget = W.VBox([W.HTML("<b>Optimization profile</b> (steps the engine is tuned for)"),
                              W.HBox(list(self.fields.values())[:2]), W.HBox(list(self.fields.values())[2:]),
                              self.buckets, W.HBox([self.tune_button, self.status]),
                              W.HBox([self.view, self.op]), self.output])
        self.profile = self.cache = self.table = self.tuned = self.figure = None
        self.error: str | None = None

    def read_profile(self):
        from ..kernels.profiles import OptimizationProfile

        text = self.buckets.value.strip()
        try:
            edges = tuple(int(e) for e in text.split(",")) if text else ()
        except ValueError:
            raise WorkbenchError(f"buckets must be comma-separated token counts, got {text!r}") from None
        values = {k: f.value for k, f in self.fields.items()}
        return OptimizationProfile(**values, edges=edges)

    def tune(self) -> None:
        """Tune the workspace's optimized graph for the profile (GPU), or load the saved cache (no GPU)."""
        from ..kernels.autotune import TimingCache
        from ..pipeline import tune_stage

        self.status.value = "tuning..." if self.device else "loading..."
        try:
            self.profile = self.read_profile()
            if self.device:
                self.tuned = tune_stage(self.ws, self.profile, device=self.device, timer=self.timer)
                self.cache = TimingCache.view(self.ws.path("tune", "timings.json"))
                note = f"tuned {len(self.tuned.edges)} buckets; saved in {self.ws.root / 'tune'}"
            elif self.saved:
                self.cache = TimingCache.view(self.saved)
                note = (f"no GPU here: showing the timings measured on {self.cache.env.get('gpu', '?')} "
                        f"({self.saved.name}), read-only")
            else:
                raise WorkbenchError("no GPU here to tune on, and no saved timing cache to show; pass saved=PATH")
        except WorkbenchError as e:
            self.error = str(e)
            self.status.value = f"<span style='color:#c00'>error: {e}</span>"
            return
        self.error = None
        self.table = self.cache.table()
        self.op.options = sorted(self.table["op"].unique())
        self.status.value = note
        self.show(self.view.value)

    def show(self, view: str) -> None:
        """Draw ``view`` (one of ``VIEWS``) of the current timings into the output. The dropdown always names
        the view drawn: a view asked for in code is chosen there, and its change draws it."""
        from . import views as V

        if view not in VIEWS:
            raise WorkbenchError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
        if self.view.value != view:
            self.view.value = view  # the dropdown's observer calls show(view) again, which draws it
            return
        if self.table is None:
            return
        if view == "tactic comparison":
            fig = V.tactic_comparison_figure(self.table)
        elif view == "config x shape heatmap":
            fig = V.config_shape_heatmap(self.table, self.op.value or self.table["op"].iloc[0])
        elif view == "op share":
            fig = V.op_share_figure(self.table)
        elif view == "top slowest":
            fig = V.top_slowest_figure(self.table, n=20)
        elif view == "roofline":
            if not self.cache.ceilings:  # no figure, rather than the previous view's under this view's name
                self.status.value = "this timing cache has no measured ceilings (it was not tuned on a GPU)"
                self.figure, self.output.outputs = None, ()
                return
            fig = V.roofline_figure(V.roofline_rows(self.table), self.cache.ceilings)
        self.figure = fig
        show_in(self.output, fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
