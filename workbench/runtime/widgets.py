"""The capacity widget: how many KV blocks, and how many requests at once, for a memory budget.

    w = CapacityWidget(program.graph, memory_bytes=80 * 2**30, weights_bytes=16 * 10**9)
    w                           # memory fraction, block size, KV dtype, prompt and output length; the plan
    w.fraction.value = 0.8      # what moving the slider does: the plan and the figure follow
    w.plan                      # always the plan of the fields as they are (None while they cannot be planned)
    w.plan.summary()            # "KV cache: ... blocks of 16 tokens (...); 1000+1000-token requests: ... at once"

Every change recomputes ``capacity.plan_capacity`` for the graph's paged layout with the block size and
KV dtype chosen (a block size or an fp8 cache the graph does not have yet is planned as
``PagedLayout.planned`` does), and redraws ``capacity_figure``: the request shape's max
concurrency at every fraction of the slider, the fraction in use marked. Fields that leave nothing to
plan (no memory left for the cache, a request of 0 tokens) set ``plan`` to None and ``error`` to the
reason, which the widget shows.

ipywidgets is imported only when the widget is built.
"""

from __future__ import annotations

import math

from ..display import show_in
from ..errors import WorkbenchError
from ..graph.paged import PagedLayout
from .capacity import concurrency_table, plan_capacity

#: block sizes offered (the graph's own is added when it is not one of them)
BLOCK_SIZES = (8, 16, 32)
#: the cache dtype offered beside the graph's
FP8 = "float8_e4m3fn"
#: the slider's fractions, also the figure's x values
FRACTION_MIN, FRACTION_MAX, FRACTION_STEP = 0.05, 1.0, 0.05


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.3g} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.3g} MiB"


class CapacityWidget:
    """Fields for a paged ``graph``'s KV-cache plan within ``memory_bytes`` (total memory less
    ``weights_bytes`` and ``activation_bytes``, or free memory with both 0); the other arguments are the
    fields' first values."""

    def __init__(self, graph, *, memory_bytes: int, weights_bytes: int = 0, activation_bytes: int = 0,
                 fraction: float = 0.9, prompt_len: int = 512, output_len: int = 128) -> None:
        import ipywidgets as W

        self.base = base = PagedLayout.from_graph(graph)  # refuses a graph without paged attention
        self.graph = graph
        self.memory_bytes, self.weights_bytes, self.activation_bytes = memory_bytes, weights_bytes, activation_bytes
        self.plan = self.table = self.figure = None
        self.error: str | None = None

        style = {"description_width": "110px"}
        self.fraction = W.FloatSlider(value=fraction, min=FRACTION_MIN, max=FRACTION_MAX, step=FRACTION_STEP,
                                      description="memory fraction", readout_format=".2f",
                                      continuous_update=False, style=style)
        sizes = sorted({*BLOCK_SIZES, base.block_size})
        self.block_size = W.Dropdown(options=sizes, value=base.block_size, description="block size", style=style)
        self.kv_dtype = W.Dropdown(options=list(dict.fromkeys([base.dtype, FP8])), value=base.dtype,
                                   description="KV dtype", style=style)
        self.prompt_len = W.BoundedIntText(value=prompt_len, min=0, max=10**8, description="prompt tokens",
                                           style=style)
        self.output_len = W.BoundedIntText(value=output_len, min=0, max=10**8, description="output tokens",
                                           style=style)
        for field in (self.fraction, self.block_size, self.kv_dtype, self.prompt_len, self.output_len):
            field.observe(lambda _change: self.update(), names="value")
        self.status = W.HTML()
        self.output = W.Output()
        memory = ", ".join(f"{_size(n)} of {what}" for n, what in ((memory_bytes, "memory"), (weights_bytes, "weights"),
                                                                   (activation_bytes, "activations")) if n)
        self.widget = W.VBox([W.HTML(f"<b>KV-cache capacity</b> ({base.num_layers} layers × {base.kv_heads} KV heads × "
                                     f"{base.head_dim} head dim; {memory})"),
                              W.HBox([W.VBox([self.fraction, self.block_size, self.kv_dtype]),
                                      W.VBox([self.prompt_len, self.output_len])]),
                              self.status, self.output])
        self.update()

    @property
    def layout(self) -> PagedLayout:
        """The layout planned: the graph's, with the block size and KV dtype chosen."""
        return self.base.planned(dtype=self.kv_dtype.value, block_size=self.block_size.value)

    def update(self) -> None:
        """Recompute the plan and the figure from the fields (what every change does)."""
        from .plots import capacity_figure

        layout = self.layout
        budget = dict(memory_bytes=self.memory_bytes, weights_bytes=self.weights_bytes,
                     activation_bytes=self.activation_bytes)
        shape = dict(prompt_len=self.prompt_len.value, output_len=self.output_len.value)
        try:
            self.plan = plan_capacity(layout, fraction=self.fraction.value, **budget, **shape)
        except WorkbenchError as e:
            self.plan = self.table = self.figure = None
            self.error = str(e)
            self.status.value = f"<span style='color:#c00'>error: {e}</span>"
            self.output.outputs = ()
            return
        self.error = None
        self.status.value = (f"{self.plan.summary()}<br>{layout.bytes_per_token} B per token, "
                             f"{layout.bytes_per_block} B per block; each request needs "
                             f"{self.plan.blocks_per_request} blocks at its peak")
        # the slider's fractions that leave memory for the cache (concurrency_table raises on the others)
        steps = round((FRACTION_MAX - FRACTION_MIN) / FRACTION_STEP)
        fractions = [f for f in (round(FRACTION_MIN + i * FRACTION_STEP, 10) for i in range(steps + 1))
                     if math.floor(self.memory_bytes * f) > self.weights_bytes + self.activation_bytes]
        self.table = concurrency_table(layout, fractions=fractions, lengths=[(shape["prompt_len"],
                                                                              shape["output_len"])], **budget)
        self.figure = capacity_figure(self.table, fraction=self.fraction.value)
        show_in(self.output, self.figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
