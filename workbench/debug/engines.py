"""Engine against engine: two engines (or workspaces, or model sources) side by side, layer by layer: the
precision of each layer's linears, its latency and its output error on one prompt, with the speed-up and the
accuracy cost of each difference (TREx's engine comparison, with accuracy beside the time).

    c = compare_engines("fp8/", "bf16/")           # A = fp8/, B = bf16/
    c.table            # one row per depth (below); a_/b_ precision, us, rel_err; speedup, err_cost
    print(c)           # the table and a summary line (``workbench compare fp8/ bf16/``)
    engines_figure(c)  # ``debug.plots``: both sides' latency bars over their errors

Rows, in depth order, and which nodes each one times (by the node's module path):

    embed      the embedding (a module named ``*embed*``, ``wte`` or ``wpe``)
    0, 1, ...  decoder layer i (``...layers.<i>...``): its norms, attention, MLP and residual adds
    norm       what runs after the last layer before the lm_head: the final norm
    logits     the lm_head (the first linear after the last layer, or a module named lm_head) and what follows
    other      the rest, outside every layer: RoPE tables, sizes (timed, so totals add up; no error, no precision)

Precision (``a_precision``, ``b_precision``): the format of each linear of the row, from its node's op
(``workbench.fp8_linear`` fp8, ``workbench.int8_linear`` int8_sq, ``workbench.w8_linear`` int8_wo, any other
linear the graph's dtype), named by its module (``qkv_proj`` -> qkv): "fp8" when all agree, else
"qkv fp8, o fp8, gate_up fp8, down bf16"; "-" for a row without linears.

Error (``a_rel_err``, ``b_rel_err``): the row's site of ``diff`` (embed, ``layers.<i>``, norm, logits) against one
reference, ``reference``: the transformers model in float32 when both sides come from the same model source
(the truth both approximate), else side B itself (then B's error is 0 and A's is ``diff A --against B``).
``err_cost`` is A's error minus B's: what A's differences cost in accuracy by then (errors carry down the layers,
so the layer where the cost jumps is where a difference made it).

Latency (``a_us``, ``b_us``; ``speedup`` = B's time / A's: above 1, A is faster), ``latency_source`` says which:

* "tuning": both sides are engines tuned in the same environment (their manifests' ``tuned_for``, with the
  timing caches they ship). A row's time is the sum, over its tuned nodes, of the chosen tactic's timing in the
  engine's own cache, at the tuned step of the bucket the prompt's length falls in (its kernels' time, CUDA-graph
  replays): nodes without tactics (views, the embedding) were never timed and count 0. Needs no GPU: the
  timings are data ("measure on the GPU, analyse anywhere").
* "profile": anything else. The prompt's prefill runs ``repeats`` times under ``torch.profiler`` on ``device``
  (``profiling.trace.trace_program``: GPU kernels, or top-level ATen ops on the CPU); a row's time is the
  median over the runs of its nodes' summed durations.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import WorkbenchError
from ..graph.passes.tensor_parallel import LINEARS
from .diff import compare, layer_of, prompt_ids, run_inputs, trace_model, trace_program

#: linear op -> the precision plan's name of its format (other linears: the graph's dtype)
LINEAR_FORMATS = {"workbench.fp8_linear": "fp8", "workbench.int8_linear": "int8_sq", "workbench.w8_linear": "int8_wo"}
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_EMBED = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe)(?:\.|$)")  # not rotary_emb
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)$")
LATENCY_SOURCES = ("auto", "tuning", "profile")
REFERENCES = ("auto", "hf", "b")
COLUMNS = ["layer", "a_precision", "b_precision", "a_us", "b_us", "speedup", "a_rel_err", "b_rel_err", "err_cost"]
FORMATTERS = {"a_us": "{:.1f}".format, "b_us": "{:.1f}".format, "speedup": "{:.2f}x".format,
              "a_rel_err": "{:.2e}".format, "b_rel_err": "{:.2e}".format, "err_cost": "{:+.2e}".format}


def row_of_nodes(graph) -> dict[str, int | str]:
    """Node name -> its row (see the module docstring): a layer index, "embed", "norm", "logits" or "other"."""
    order = list(graph.nodes)
    in_layers = [i for i, n in enumerate(order) if layer_of(n.module) is not None]
    last = in_layers[-1] if in_layers else -1
    head = next((i for i, n in enumerate(order) if i > last and (n.op in LINEARS or _HEAD.search(n.module or ""))),
                len(order))
    rows: dict[str, int | str] = {}
    for i, n in enumerate(order):
        layer = layer_of(n.module)
        if layer is not None:
            rows[n.name] = layer
        elif _EMBED.search(n.module or ""):
            rows[n.name] = "embed"
        elif i >= head:
            rows[n.name] = "logits"
        elif i > last >= 0:
            rows[n.name] = "norm"
        else:
            rows[n.name] = "other"
    return rows


def precision(graph) -> dict[int | str, str]:
    """Row -> the formats of its linears (module docstring), for rows that have linears."""
    dtype = str(graph.meta.get("dtype", "float32"))
    rows = row_of_nodes(graph)
    groups: dict[int | str, dict[str, str]] = {}
    for n in graph.nodes:
        if n.op not in LINEARS:
            continue
        fmt = LINEAR_FORMATS.get(n.op, _SHORT_DTYPE.get(dtype, dtype))
        name = (n.module or n.name).rsplit(".", 1)[-1].removesuffix("_proj")
        groups.setdefault(rows[n.name], {})[name] = fmt
    return {row: (next(iter(set(g.values()))) if len(set(g.values())) == 1
                  else ", ".join(f"{k} {v}" for k, v in g.items())) for row, g in groups.items()}


# ---- latency ---------------------------------------------------------------------------------------------------
def profiled_us(program, inputs: dict[str, torch.Tensor], *, repeats: int = 5) -> dict[int | str, float]:
    """Row -> µs of one run of ``inputs``: the median over ``repeats`` profiled runs (module docstring)."""
    from ..profiling.trace import trace_program as profile

    df = profile(program, [inputs] * repeats, warmup=1)
    rows = row_of_nodes(program.graph)
    df = df[df.node.isin(rows.keys())]  # device work launched outside any node (input copies) is no layer's
    per_step = df.assign(row=df.node.map(rows).astype(str)).groupby(["row", "step"]).dur_us.sum()
    out: dict[int | str, float] = {}
    for row in dict.fromkeys(rows.values()):
        runs = [float(per_step.get((str(row), s), 0.0)) for s in range(repeats)]
        out[row] = statistics.median(runs)
    return out


def tuned_us(program, choices, timings, inputs: dict[str, torch.Tensor]) -> dict[int | str, float]:
    """Row -> µs of the tuned nodes of one run of ``inputs``, from ``timings`` (a ``TimingCache``): each node's
    chosen (tactic, config) of ``choices`` (node -> (tactic, config), one bucket's), summed over the node's
    instances; a node with no timing of its choice takes its instances' fastest timing."""
    from ..kernels.autotune import instance_key, tactic_ops

    ops = tactic_ops()
    tunable = {n.name for n in program.graph.nodes if n.op in ops}
    size = program.graph.meta.get("tensor_parallel", {}).get("size", 1)
    keys: dict[str, set[str]] = {}
    program.run(_observe=(tunable, lambda name, op, args, kwargs: keys.setdefault(name, set()).add(
        instance_key(op, args, kwargs, size))), **inputs)
    rows = row_of_nodes(program.graph)
    out = dict.fromkeys(dict.fromkeys(rows.values()), 0.0)
    for name, node_keys in keys.items():
        tactic, config = choices.get(name, (None, None))
        for key in node_keys:
            entry = timings.entries.get(key)
            if entry is None:
                raise WorkbenchError(f"node {name} ran an instance its engine's timing cache never timed; the timings "
                                     "are not this graph's: re-tune the engine")
            chosen = [t["ms"] for t in entry["timings"] if (t["tactic"], t["config"]) == (tactic, config)]
            out[rows[name]] += 1e3 * min(chosen or [t["ms"] for t in entry["timings"]])
    return out


def _tuning(runnable) -> tuple[Any, Any, dict] | None:
    """(TunedChoices, TimingCache, the environment it was measured in) of an engine tuned with its timings."""
    from ..engine.format import TIMINGS
    from ..kernels.autotune import TimingCache, TunedChoices

    engine = runnable.engine
    if engine is None or not engine.info.get("choices") or not engine.manifest.get("tuned_for"):
        return None
    if not (engine.path / TIMINGS).is_file():
        return None
    return TunedChoices.from_json(engine.info["choices"]), TimingCache.view(engine.path / TIMINGS), \
        engine.manifest["tuned_for"]


def _tuned_step(runnable, tokens: int) -> tuple[dict[str, torch.Tensor], int]:
    """The inputs of the tuned step of the bucket a prefill of ``tokens`` falls in, and that bucket's edge."""
    from ..kernels.autotune import step_inputs
    from ..kernels.profiles import OptimizationProfile

    profile = OptimizationProfile.from_json(runnable.engine.info["profiles"][0])
    edge = profile.edges[profile.bucket(tokens)]
    return step_inputs(runnable.program, profile.step(edge)), edge


# ---- the comparison --------------------------------------------------------------------------------------------
@dataclass
class EngineComparison:
    """Two sides layer by layer (module docstring): ``table`` (``COLUMNS``, one row per depth), the reference
    the errors are measured against, where the latencies come from, and each side's ``Divergence`` against the
    reference (``divergences``: A's, then B's unless B is the reference)."""

    a: str
    b: str
    reference: str
    latency_source: str     # "tuning" | "profile"
    latency_detail: str     # what was timed, in words
    table: Any              # pandas.DataFrame
    divergences: tuple

    @property
    def speedup(self) -> float:
        """B's total time over A's: above 1, A is faster."""
        a, b = self.table.a_us.sum(), self.table.b_us.sum()
        return float(b / a) if a > 0 else float("nan")

    @property
    def caption(self) -> str:
        return (f"A = {self.a}, B = {self.b}; errors against {self.reference}; latency from {self.latency_source}: "
                f"{self.latency_detail}")

    def line(self) -> str:
        t = self.table
        total = (f"total {t.a_us.sum():.1f} µs (A) vs {t.b_us.sum():.1f} µs (B): A is {self.speedup:.2f}x B's "
                 "speed")
        costs = t.err_cost.dropna()
        if costs.empty or not (costs.abs() > 0).any():
            return f"{total}; no accuracy cost: A's errors equal B's at every layer"
        worst = t.loc[costs.idxmax()]
        where = f"layer {worst.layer}" if isinstance(worst.layer, int) else worst.layer
        return (f"{total}; largest accuracy cost at {where}: rel err {worst.a_rel_err:.2e} vs {worst.b_rel_err:.2e} "
                f"({worst.err_cost:+.2e}; {worst.a_precision} vs {worst.b_precision})")

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 12, "display.max_colwidth", 48):
            table = self.table.to_string(index=False, formatters=FORMATTERS, na_rep="-")
        return f"{self.caption}\n{table}\n{self.line()}"


def _depth(row) -> tuple[int, int]:
    return {"other": (-2, 0), "embed": (-1, 0), "norm": (1, 0), "logits": (2, 0)}.get(row, (0, row)) \
        if isinstance(row, str) else (0, row)


def compare_engines(a, b, *, ids: Sequence[int] | None = None, prompt: str | None = None,
                    device: str | torch.device = "auto", reference: str = "auto", latency: str = "auto",
                    repeats: int = 5, stages: tuple[str, str] = ("latest", "latest")) -> EngineComparison:
    """``a`` against ``b`` (engine directories, workspaces or model sources) layer by layer on one prompt
    (``ids``, else ``prompt``, else ``diff``'s default): see the module docstring. ``reference``: "auto", "hf"
    (the transformers model in float32; both must come from one model source) or "b"; ``latency``: "auto"
    (the tuning caches when both are tuned in one environment, else a profile), "tuning" or "profile";
    ``repeats``: profiled runs per side; ``stages``: the graph of each side that is a workspace (two stages of one
    workspace: ``stages=("quant", "passes")``)."""
    import pandas as pd

    from ..device import resolve_device
    from ..runnable import open_runnable

    if reference not in REFERENCES:
        raise WorkbenchError(f"reference {reference!r}: use one of {', '.join(REFERENCES)}")
    if latency not in LATENCY_SOURCES:
        raise WorkbenchError(f"latency {latency!r}: use one of {', '.join(LATENCY_SOURCES)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise WorkbenchError(f"repeats must be a positive integer, not {repeats!r}")
    device = resolve_device(device)
    sides = [open_runnable(t, device=device, stage=stage, paged=False, progress=False)
             for t, stage in zip((a, b), stages)]
    labels = [str(t) if s.kind != "workspace" else f"{t} ({s.stage})" for t, s in zip((a, b), sides)]
    ids = prompt_ids(sides[0], ids, prompt)
    vocab = [s.program.graph.meta.get("config", {}).get("vocab_size") for s in sides]
    if vocab[0] != vocab[1]:
        raise WorkbenchError(f"{a} and {b} have different vocabularies ({vocab[0]} and {vocab[1]} tokens): they are "
                             "not the same model, and their layers cannot be lined up")

    # errors, against one reference
    same_source = sides[0].source is not None and sides[0].source == sides[1].source
    if reference == "hf" and not same_source:
        raise WorkbenchError(f"reference hf needs both sides to come from one model source, and {a} and {b} do not "
                             "(or do not record theirs); compare with reference b")
    traces = [trace_program(s.program, ids, label=label) for s, label in zip(sides, labels)]
    if traces[0].num_layers != traces[1].num_layers:
        raise WorkbenchError(f"{a} has {traces[0].num_layers} layers and {b} {traces[1].num_layers}: their layers "
                             "cannot be lined up")
    if reference == "b" or not same_source:
        divergences = (compare(traces[0], traces[1]),)
        ref_label = f"B ({labels[1]})"
    else:
        from ..models.intake import load_model

        model = load_model(sides[0].source, dtype=torch.float32, device=str(device)).model.eval()
        hf = trace_model(model, ids, label="transformers (float32)")
        divergences = tuple(compare(t, hf) for t in traces)
        ref_label = hf.label
    rel_err = []
    for d in divergences:
        rel_err.append({r.layer: r.rel_err for r in d.layers.itertuples()})
    if len(rel_err) == 1:  # B is the reference
        rel_err.append({k: 0.0 for k in rel_err[0]})

    # latency
    tunings = [_tuning(s) for s in sides]
    tuned = all(tunings) and tunings[0][2] == tunings[1][2]
    if latency == "tuning" and not tuned:
        why = [f"{t} is not a tuned engine with its timings" for t, tu in zip((a, b), tunings) if not tu]
        raise WorkbenchError("latency from the tuning caches needs two engines tuned in one environment: "
                             + ("; ".join(why) or f"{a} and {b} were tuned in different ones") + "; use profile")
    if tuned and latency != "profile":
        us, edges = [], []
        for s, (choices, timings, _) in zip(sides, tunings):
            inputs, edge = _tuned_step(s, len(ids))
            us.append(tuned_us(s.program, choices.for_tokens(edge), timings, inputs))
            edges.append(edge)
        source = "tuning"
        detail = (f"the engines' timing caches ({tunings[0][2].get('gpu', 'their GPU')}), tuned kernels of the "
                  f"{edges[0]}-token bucket's step")
    else:
        us = [profiled_us(s.program, run_inputs(s.program, ids), repeats=repeats) for s in sides]
        source = "profile"
        detail = f"median of {repeats} profiled prefills of {len(ids)} tokens on {device}"

    precisions = [precision(s.program.graph) for s in sides]
    rows = sorted(set(us[0]) | set(us[1]) | set(rel_err[0]), key=_depth)
    records = []
    for row in rows:
        a_us, b_us = us[0].get(row, 0.0), us[1].get(row, 0.0)
        a_err, b_err = rel_err[0].get(row, float("nan")), rel_err[1].get(row, float("nan"))
        records.append({"layer": row, "a_precision": precisions[0].get(row, "-"),
                        "b_precision": precisions[1].get(row, "-"), "a_us": a_us, "b_us": b_us,
                        "speedup": b_us / a_us if a_us > 0 else float("nan"),
                        "a_rel_err": a_err, "b_rel_err": b_err, "err_cost": a_err - b_err})
    table = pd.DataFrame(records, columns=COLUMNS)
    table.attrs = {"latency_source": source, "reference": ref_label}
    return EngineComparison(labels[0], labels[1], ref_label, source, detail, table, divergences)
