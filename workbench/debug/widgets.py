"""The divergence widget: pick two stages of a workspace and a prompt, press Diff, see where they part.

    w = DivergenceWidget("ws")                     # stage pair, prompt, decode steps, Diff button; diffed at once
    w.pair.value = ("quant", "passes")             # what picking a pair in the dropdown does
    w.prompt.value = "3, 14, 15, 92"               # token ids (a model without tokenizer) or text
    w.steps.value = 4                              # also 4 decode steps through the KV cache
    w.run()                                        # what the button does: diff, then redraw table and figure
    w.step.value = 2                               # show decode step 2's table and first divergence
    w.divergence, w.figure                         # the last result (None after an error)

Each run calls ``diff.diff`` on the pair, shows the first-divergence line in the status line, and sets the
output area to the per-layer table and the figure (``divergence_figure``; with decode steps ``steps_figure``,
one line per step, and the step picker lists them: the table is the picked step's). An empty prompt leaves the
choice to ``diff`` (a fixed sentence, or seeded random ids for a model with no tokenizer). A run that fails (a
stage the workspace lacks, text for a model without tokenizer) shows ``error: ...`` instead and clears the
output.

ipywidgets is imported only when the widget is built.
"""

from __future__ import annotations

import html
import re

from ..display import show_in, styled
from ..errors import WorkbenchError
from .diff import FORMATTERS, diff
from .plots import divergence_figure, step_labels, steps_figure

#: The stage pairs offered: (subject stage, what it is compared with: "hf" or another stage).
PAIRS = (("passes", "hf"), ("quant", "passes"), ("quant", "hf"), ("capture", "hf"))

#: The most decode steps the widget's field takes (each step keeps every value of the graph).
MAX_WIDGET_STEPS = 16

_IDS = re.compile(r"^\s*\d+(\s*[, ]\s*\d+)*\s*$")


def pair_label(pair: tuple[str, str]) -> str:
    stage, against = pair
    return f"{stage} vs {'transformers' if against == 'hf' else against}"


def parse_prompt(text: str) -> dict:
    """``diff``'s prompt arguments for the text field: {} when empty, ``ids`` for "3, 14, 15", else ``prompt``."""
    if not text.strip():
        return {}
    if _IDS.match(text):
        return {"ids": [int(t) for t in re.split(r"[,\s]+", text.strip())]}
    return {"prompt": text}


class DivergenceWidget:
    """Diffs a pair of ``workspace``'s stages (``pairs``, the first diffed at once) on the prompt in the field,
    on ``device``; ``tol`` as ``diff``'s (None: by the two sides' precision)."""

    def __init__(self, workspace, *, pairs=PAIRS, prompt: str = "", steps: int = 0, device: str = "auto",
                 tol: float | None = None) -> None:
        import ipywidgets as W

        self.workspace, self.device, self.tol = workspace, device, tol
        self.divergence = self.figure = None
        self.error: str | None = None
        self.pair = W.Dropdown(options=[(pair_label(p), tuple(p)) for p in pairs], value=tuple(pairs[0]),
                               description="compare")
        self.prompt = W.Text(value=prompt, description="prompt", placeholder="text, or token ids: 3, 14, 15",
                             layout=W.Layout(width="420px"))
        self.steps = W.BoundedIntText(value=steps, min=0, max=MAX_WIDGET_STEPS, description="decode steps",
                                      style={"description_width": "initial"}, layout=W.Layout(width="150px"))
        self.button = W.Button(description="Diff", button_style="primary")
        self.button.on_click(lambda _b: self.run())
        self.step = W.Dropdown(options=[("prefill", 0)], value=0, description="show step",
                               style={"description_width": "initial"})
        self._quiet = False  # while run() sets the step picker: it draws once, after
        self.step.observe(lambda _c: None if self._quiet else self._show(), names="value")
        self.status = W.HTML()
        self.output = W.Output()
        self.widget = W.VBox([W.HTML(f"<b>First divergence</b> ({workspace})"),
                              W.HBox([self.pair, self.prompt, self.steps, self.button]), self.step, self.status,
                              self.output])
        self.run()

    def run(self) -> None:
        """Diff the pair chosen on the prompt in the field; show the line, the table and the figure."""
        stage, against = self.pair.value
        self.status.value = f"diffing {pair_label(self.pair.value)}..."
        try:
            self.divergence = diff(self.workspace, stage=stage, against=against, device=self.device, tol=self.tol,
                                   steps=int(self.steps.value), **parse_prompt(self.prompt.value))
        except WorkbenchError as e:
            self.divergence = self.figure = None
            self.error = str(e)
            self.status.value = f"<span style='color:#c00'>error: {html.escape(str(e))}</span>"
            self.output.outputs = ()
            return
        self.error = None
        d = self.divergence
        self.figure = steps_figure(d) if d.decode else divergence_figure(d, labels=[pair_label(self.pair.value)])
        first = d.first_step
        options = list(zip(step_labels(d), range(len(d.steps))))
        self._quiet = True
        try:  # the picker at the step that diverges first, then one redraw
            self.step.options = options
            self.step.value = d.steps.index(first) if first is not None else 0
        finally:
            self._quiet = False
        self.step.disabled = len(options) == 1
        self._show()

    def _show(self) -> None:
        """The picked step's per-layer table and first divergence, under the figure of every step."""
        d = self.divergence
        if d is None or self.step.value is None or self.step.value >= len(d.steps):
            return
        shown = d.steps[self.step.value]
        line = d.line()
        if d.first_step is not None and shown is not d.first_step:  # what the table shows, beside the first
            line += f" (shown: {self.step.label}: {shown.line()})"
        self.status.value = html.escape(line)
        show_in(self.output, styled(shown.layers, FORMATTERS), self.figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
