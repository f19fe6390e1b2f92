"""The divergence widget: pick two stages of a workspace and a prompt, press Diff, see where they part.

    w = DivergenceWidget("ws")                     # stage pair, prompt, Diff button; the first pair diffed
    w.pair.value = ("quant", "passes")             # what picking a pair in the dropdown does
    w.prompt.value = "3, 14, 15, 92"               # token ids (a model without tokenizer) or text
    w.run()                                        # what the button does: diff, then redraw table and figure
    w.divergence, w.figure                         # the last result (None after an error)

Each run calls ``diff.diff`` on the pair, shows the first-divergence line in the status line, and sets the
output area to the per-layer table and ``divergence_figure``. An empty prompt leaves the choice to ``diff``
(a fixed sentence, or seeded random ids for a model with no tokenizer). A run that fails (a stage the
workspace lacks, text for a model without tokenizer) shows ``error: ...`` instead and clears the output.

ipywidgets is imported only when the widget is built.
"""

from __future__ import annotations

import html
import re

from ..display import show_in, styled
from ..errors import WorkbenchError
from .diff import FORMATTERS, diff
from .plots import divergence_figure

#: The stage pairs offered: (subject stage, what it is compared with: "hf" or another stage).
PAIRS = (("passes", "hf"), ("quant", "passes"), ("quant", "hf"), ("capture", "hf"))

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

    def __init__(self, workspace, *, pairs=PAIRS, prompt: str = "", device: str = "auto",
                 tol: float | None = None) -> None:
        import ipywidgets as W

        self.workspace, self.device, self.tol = workspace, device, tol
        self.divergence = self.figure = None
        self.error: str | None = None
        self.pair = W.Dropdown(options=[(pair_label(p), tuple(p)) for p in pairs], value=tuple(pairs[0]),
                               description="compare")
        self.prompt = W.Text(value=prompt, description="prompt", placeholder="text, or token ids: 3, 14, 15",
                             layout=W.Layout(width="420px"))
        self.button = W.Button(description="Diff", button_style="primary")
        self.button.on_click(lambda _b: self.run())
        self.status = W.HTML()
        self.output = W.Output()
        self.widget = W.VBox([W.HTML(f"<b>First divergence</b> ({workspace})"),
                              W.HBox([self.pair, self.prompt, self.button]), self.status, self.output])
        self.run()

    def run(self) -> None:
        """Diff the pair chosen on the prompt in the field; show the line, the table and the figure."""
        stage, against = self.pair.value
        self.status.value = f"diffing {pair_label(self.pair.value)}..."
        try:
            self.divergence = diff(self.workspace, stage=stage, against=against, device=self.device, tol=self.tol,
                                   **parse_prompt(self.prompt.value))
        except WorkbenchError as e:
            self.divergence = self.figure = None
            self.error = str(e)
            self.status.value = f"<span style='color:#c00'>error: {html.escape(str(e))}</span>"
            self.output.outputs = ()
            return
        self.error = None
        d = self.divergence
        self.figure = divergence_figure(d, labels=[pair_label(self.pair.value)])
        self.status.value = html.escape(d.line())
        show_in(self.output, styled(d.layers, FORMATTERS), self.figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
