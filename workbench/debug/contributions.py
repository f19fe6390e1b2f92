"""Which linear groups make up a quantized graph's error: each group the precision plan quantizes, quantized alone.

    c = group_contributions("ws/")      # the quant stage's plan, group by group, against the passes stage
    c.table                             # one row per quantized group, largest contribution first (below)
    c.whole                             # the whole plan against the passes stage: a ``diff.Divergence``
    print(c)                            # ``workbench diff ws/ --stage quant --groups``
    contributions_figure(c)             # ``debug.plots``: contribution bars, sensitivity beside them

For a workspace whose quant stage ran: its precision plan (plan.json) and calibration statistics
(stats.safetensors) are applied to the passes stage's graph once as they are (the whole plan), then once per
group the plan quantizes with ONLY that group in its planned format and options, every other group (lm_head
and the KV cache too) in "bf16", the model's own precision. An FP8 KV cache is a row of its own ("kv_cache").
Each variant runs one prompt's prefill (``diff.trace_program``) and is compared with the unquantized passes
program (``diff.compare``).

Columns of ``table``:

    group, layer, kind, format   the group (layer None for lm_head and the KV cache) and its planned format
    rel_err                      the logits' relative error with this group alone quantized: its contribution
    share                        rel_err² / the whole plan's rel_err²: independent errors add in squares, so the
                                 shares sum to about 1 when the groups' errors do not cancel or compound
    max_rel_err                  the largest relative error over the layer rows (embed, 0, 1, ..., norm, logits)
    first                        the first layer row past the tolerance (``diff.tolerance``; None: none is)
    ppl_delta_pct                the group's sensitivity to this format: perplexity change in % when it alone is
                                 quantized, from the stage's sensitivity.json (an auto plan wrote it); NaN
                                 without one or where it has no such row

Both measure one group alone: ``rel_err`` on the prompt's prefill here, ``ppl_delta_pct`` on the evaluation text's
perplexity when the auto plan ran. A group high in both is the one to keep in bf16.

Time: one prefill per group plus quantizing the graph for it. On a busy 2-core CPU (load 4) a tiny-llama group
takes about 0.05 s; a SmolLM2-135M group about 3 s on the 13-token default prompt, so its 120 fp8 groups took 6
minutes (1.4 GB resident); ``groups=`` measures a subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar
from .diff import Divergence, compare, prompt_ids, trace_program

KV_CACHE = "kv_cache"
COLUMNS = ["group", "layer", "kind", "format", "rel_err", "share", "max_rel_err", "first", "ppl_delta_pct"]
FORMATTERS = {"rel_err": "{:.2e}".format, "max_rel_err": "{:.2e}".format, "share": "{:.0%}".format,
              "ppl_delta_pct": "{:+.2f}".format}


@dataclass
class Contributions:
    """Each quantized group's error alone (``table``, module docstring) beside the whole plan's (``whole``), on
    ``tokens`` prompt tokens; ``plan`` is the stage's ``PrecisionPlan``."""

    workspace: str
    plan: Any
    table: Any  # pandas.DataFrame, largest rel_err first
    whole: Divergence
    tokens: int

    @property
    def total_rel_err(self) -> float:
        """The whole plan's relative error on the logits."""
        return self.whole.logits_rel_err

    @property
    def caption(self) -> str:
        counts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.plan.summary().items(), key=lambda kv: -kv[1]))
        return (f"{self.workspace}: {len(self.table)} quantized groups, each alone, against the passes stage (plan: "
                f"{counts}, kv_cache {self.plan.kv_cache}), {self.tokens} tokens; the whole plan's logits rel err "
                f"{self.total_rel_err:.2e}")

    def line(self) -> str:
        if not len(self.table):
            return "no group measured"
        top = self.table.iloc[0]
        line = (f"largest contributor: {top.group} ({top.format}): logits rel err {top.rel_err:.2e} alone, "
                f"{top.share:.0%} of the whole plan's {self.total_rel_err:.2e} (in squares)")
        if top.ppl_delta_pct == top.ppl_delta_pct:
            line += f"; sensitivity {top.ppl_delta_pct:+.2f}% perplexity"
        return line

    def to_string(self, top: int | None = 10) -> str:
        """The caption, the ``top`` largest rows (None: all) and ``line()``."""
        import pandas as pd

        rows = self.table if top is None else self.table.head(top)
        shown = rows.assign(**{c: ["-" if v is None else v for v in rows[c]] for c in ("layer", "first")})
        with pd.option_context("display.width", 160, "display.max_columns", 12):
            text = shown.to_string(index=False, formatters=FORMATTERS, na_rep="-")
        more = len(self.table) - len(rows)
        return "\n".join([self.caption, text] + ([f"... {more} more groups"] if more > 0 else []) + [self.line()])

    def __str__(self) -> str:
        return self.to_string()


def group_contributions(ws, *, ids: Sequence[int] | None = None, prompt: str | None = None,
                        device: str | torch.device = "auto", groups: Sequence[str] | str | None = None,
                        tol: float | None = None, progress: bool = True) -> Contributions:
    """Each group that workspace ``ws``'s precision plan quantizes (or those of ``groups``; "kv_cache" for an
    FP8 KV cache), quantized alone, against the passes stage on one prompt (``ids``, else ``prompt``, else
    ``diff``'s default), beside the whole plan: see the module docstring. ``tol``: what ``first`` counts as
    diverged (default: ``diff.tolerance``, 1e-1 for a quantized graph)."""
    import pandas as pd

    from ..device import resolve_device
    from ..quant import CalibrationStats, PrecisionPlan, linear_groups, quantized_program
    from ..runnable import open_runnable
    from ..workspace import Workspace

    root = Path(ws.root if isinstance(ws, Workspace) else ws)
    workspace = Workspace(root, create=False)
    if workspace.record("quant") is None:
        raise WorkbenchError(f"{root} has no quant stage; run `workbench quantize {root}` first (group contributions "
                             "apply the precision plan and calibration statistics it writes)")
    device = resolve_device(device)
    passes = open_runnable(root, device=device, stage="passes", paged=False, progress=False)
    program, graph = passes.program, passes.program.graph
    ids = prompt_ids(passes, ids, prompt)
    plan = PrecisionPlan.loads(workspace.path("quant", "plan.json").read_text()).validate(graph)
    stats = CalibrationStats.load(workspace.path("quant", "stats.safetensors"))
    known = linear_groups(graph)
    chosen = _chosen(plan, groups, known)
    report = _sensitivity(workspace)

    reference = trace_program(program, ids, label=f"{root} (passes)")
    whole = compare(trace_program(quantized_program(program, plan, stats), ids, label=f"{root} (quant)"),
                    reference, tol=tol)
    base = PrecisionPlan.uniform(graph, "bf16")
    rows = []
    with progress_bar(len(chosen), "group contributions", "group", enabled=progress) as bar:
        for name in chosen:
            if name == KV_CACHE:
                solo, fmt, layer, kind = base.with_format(KV_CACHE, plan.kv_cache), plan.kv_cache, None, KV_CACHE
            else:
                spec = dict(plan.groups[name])
                fmt = spec.pop("format")
                solo, layer, kind = base.with_format(name, fmt, **spec), known[name].layer, known[name].kind
            d = compare(trace_program(quantized_program(program, solo, stats), ids, label=name), reference, tol=tol)
            rows.append({"group": name, "layer": layer, "kind": kind, "format": fmt, "rel_err": d.logits_rel_err,
                         "max_rel_err": float(d.layers.rel_err.max()),
                         "first": None if d.first is None else d.first.layer,
                         "ppl_delta_pct": report.delta(name, fmt) if report is not None else math.nan})
            bar.set_postfix_str(name)
            bar.update(1)
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "share"])
    total = whole.logits_rel_err
    table.insert(5, "share", table.rel_err ** 2 / total ** 2 if total > 0 else math.nan)
    for c in ("layer", "first"):  # ints stay ints beside None (lm_head, no divergence)
        table[c] = pd.Series([r[c] for r in rows], dtype=object)
    table = table.sort_values("rel_err", ascending=False, kind="stable").reset_index(drop=True)
    return Contributions(str(root), plan, table, whole, len(ids))


def _chosen(plan, groups, known) -> list[str]:
    """The groups to measure, in graph order (the KV cache last): the plan's quantized ones, or ``groups``."""
    quantized = plan.quantized() + ([KV_CACHE] if plan.kv_cache != "bf16" else [])
    if not quantized:
        raise WorkbenchError("the quant stage's plan keeps every group and the KV cache in bf16: no group contributes "
                             "an error; quantize some (`workbench quantize WS --format fp8`) first")
    if groups is None:
        return quantized
    groups = [groups] if isinstance(groups, str) else list(groups)
    if not groups:
        raise WorkbenchError("groups is empty; name some of the plan's quantized groups, or pass None for all")
    for g in groups:
        if g in quantized:
            continue
        if g in known or g == KV_CACHE:
            raise WorkbenchError(f"group {g!r} is kept in bf16 by the plan: it contributes no error; the plan "
                                 f"quantizes {_some(quantized)}")
        raise WorkbenchError(f"{g!r} is not a linear group of this model; the plan quantizes {_some(quantized)}")
    return [g for g in quantized if g in set(groups)]


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _sensitivity(workspace):
    """The quant stage's sensitivity report when this run of the stage wrote one (an older run's file is not
    this plan's), else None."""
    from ..quant.sensitivity import SensitivityReport

    if "sensitivity.json" not in (workspace.record("quant") or {}).get("artifacts", {}):
        return None
    return SensitivityReport.load(workspace.path("quant", "sensitivity.json"))
