"""The precision widget: a format per linear group, coloured by how much it costs in perplexity.

    w = precision_widget(program, stats, eval_ids, report=report, save_path="plan.json")
    w                       # a grid: one row per layer, one dropdown per group kind; lm_head; KV cache
    w.keep("layers.3.down") # what "Keep as shown" does: the shown format becomes an edit
    w.auto()                # what "Auto plan" does: auto_plan from the current plan, your edits kept
    w.evaluate()            # what "Evaluate" does: perplexity and KL of the current plan
    w.save()                # what "Save" does: the plan's JSON, written atomically
    w.plan                  # always the current PrecisionPlan

Colours follow the sensitivity report (``sensitivity.py``) for the format each dropdown shows: green
up to ``thresholds[0]`` % more perplexity when that group alone is quantized, amber up to
``thresholds[1]`` %, red beyond; grey where the report has no number (no report, or a format it did
not measure).

Edits are the user's: a dropdown changed by hand, or a group kept as shown ("Keep as shown": choosing the
value a dropdown already shows fires no change), marks its group in ``plan.edited``. The auto plan is
asked for with the current plan as its base (``auto_plan`` leaves edited groups alone), and whatever
it returns, edited groups get the user's format back, and the status says which ones it had changed.

``PrecisionWidget`` takes callables, so it needs no model to test: ``on_evaluate(plan) -> {"ppl",
"ppl_delta_pct", "kl"}`` and ``on_auto(plan) -> (plan, result)``; ``precision_widget`` wires them to
``probe.evaluate_plan`` and ``auto_plan.auto_plan``. ipywidgets is imported only when built.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from .plan import FORMATS, KV_FORMATS, PrecisionPlan, linear_groups

#: sensitivity level -> dropdown background
COLOURS = {"green": "#c8e6c9", "amber": "#ffe0a3", "red": "#f4b6b6", "grey": "#e4e4e4"}
#: the dropdowns' backgrounds: a <select> takes no colour through ipywidgets' styles, so a class per level
_CSS = "<style>" + "".join(f".wb-precision-{k} select {{background-color: {c} !important;}}"
                           for k, c in COLOURS.items()) + "</style>"
KV = "kv_cache"

Evaluate = Callable[[PrecisionPlan], dict]
Auto = Callable[[PrecisionPlan], tuple[PrecisionPlan, dict]]


def _spec(plan: PrecisionPlan, group: str) -> Any:
    return plan.kv_cache if group == KV else plan.groups.get(group)


def _numbers(result: dict) -> str:
    """'ppl 12.34 (+0.42% vs unquantized), KL 1.2e-03' from an evaluation's dict (missing keys left out)."""
    parts = []
    if result.get("ppl") is not None:
        delta = result.get("ppl_delta_pct")
        parts.append(f"ppl {result['ppl']:.4g}" + (f" ({delta:+.3g}% vs unquantized)" if delta is not None else ""))
    if result.get("kl") is not None:
        parts.append(f"KL {result['kl']:.3g}")
    return ", ".join(parts) or "no numbers returned"


class PrecisionWidget:
    def __init__(self, graph, plan: PrecisionPlan, *, report=None, on_evaluate: Evaluate | None = None,
                 on_auto: Auto | None = None, save_path: str | Path | None = None,
                 metric: str = "ppl_delta_pct", thresholds: tuple[float, float] = (0.5, 2.0)) -> None:
        import ipywidgets as W

        if not thresholds[0] <= thresholds[1]:
            raise WorkbenchError(f"thresholds are (green up to, amber up to) with the first <= the second, got "
                                 f"{thresholds}")
        self.graph = graph
        self.plan = copy.deepcopy(plan).validate(graph)
        self.report, self.on_evaluate, self.on_auto = report, on_evaluate, on_auto
        self.save_path = Path(save_path) if save_path else None
        self.metric, self.thresholds = metric, thresholds
        self.table = report.table(metric) if report is not None else None  # rows groups, columns formats
        self.result: dict | None = None  # the last evaluation or auto plan's numbers
        self.error: str | None = None
        self.colours: dict[str, str] = {}  # group -> key of COLOURS
        self._syncing = False  # set while the widget itself moves dropdowns: not a user's edit

        groups = linear_groups(graph)
        self.dropdowns = {name: W.Dropdown(options=FORMATS, value=self.plan.format_of(name),
                                           layout=W.Layout(width="110px")) for name in groups}
        # the plan's "bf16" for the cache means the model's own dtype (float32 for a CPU capture): say which
        own = str(graph.meta.get("dtype", "bfloat16"))
        kv_options = [(f"bf16 = {own}" if f == "bf16" and own != "bfloat16" else f, f) for f in KV_FORMATS]
        self.dropdowns[KV] = W.Dropdown(options=kv_options, value=self.plan.kv_cache,
                                        layout=W.Layout(width="150px"))
        for name, dd in self.dropdowns.items():
            dd.observe(partial(self._changed, name), names="value")
            self._paint(name)

        layers = sorted({g.layer for g in groups.values() if g.layer is not None})
        kinds = list(dict.fromkeys(g.kind for g in groups.values() if g.layer is not None))
        cells = [W.HTML("<b>layer</b>"), *(W.HTML(f"<b>{k}</b>") for k in kinds)]
        for layer in layers:
            cells.append(W.HTML(str(layer)))
            cells += [self.dropdowns.get(f"layers.{layer}.{k}") or W.HTML("") for k in kinds]
        grid = W.GridBox(cells, layout=W.Layout(grid_template_columns=f"60px repeat({len(kinds)}, 120px)",
                                                grid_gap="2px 4px"))
        others = [W.HBox([W.HTML(f"<b>{name}</b>", layout=W.Layout(width="120px")), self.dropdowns[name]])
                  for name, g in groups.items() if g.layer is None]
        kv = W.HBox([W.HTML("<b>KV cache</b>", layout=W.Layout(width="120px")), self.dropdowns[KV]])
        legend = " ".join(f"<span style='background:{COLOURS[k]};padding:0 6px'>{label}</span>" for k, label in (
            ("green", f"≤ {thresholds[0]:g}%"), ("amber", f"≤ {thresholds[1]:g}%"), ("red", f"> {thresholds[1]:g}%"),
            ("grey", "not measured")))
        self.auto_button = W.Button(description="Auto plan", button_style="primary", icon="magic")
        self.evaluate_button = W.Button(description="Evaluate", icon="check")
        self.save_button = W.Button(description="Save", icon="save")
        # choosing the format a dropdown already shows fires no change, so a person keeps a shown format here
        self.keep_group = W.Dropdown(options=list(self.dropdowns), description="keep", layout=W.Layout(width="260px"),
                                     style={"description_width": "40px"})
        self.keep_button = W.Button(description="Keep as shown", icon="thumb-tack",
                                    tooltip="mark the group's shown format as your edit: the auto plan keeps it")
        self.keep_button.on_click(lambda _b: self.keep())
        self.auto_button.on_click(lambda _b: self.auto())
        self.evaluate_button.on_click(lambda _b: self.evaluate())
        self.save_button.on_click(lambda _b: self.save())
        self.status = W.HTML()
        self.widget = W.VBox([W.HTML(_CSS), W.HTML(f"<b>Precision plan</b> (colour: {metric} when that group alone "
                                                   f"takes the format shown) {legend}"),
                              grid, *others, kv, W.HBox([self.keep_group, self.keep_button]),
                              W.HBox([self.auto_button, self.evaluate_button, self.save_button]),
                              self.status])

    # ---- colours ------------------------------------------------------------------------------------------
    def sensitivity(self, group: str, fmt: str) -> float | None:
        """The report's number for ``group`` in ``fmt``, or None where it has none."""
        if self.table is None or group not in self.table.index or fmt not in self.table.columns:
            return None
        value = self.table.at[group, fmt]
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(value) else value

    def level(self, group: str, fmt: str) -> str:
        """green / amber / red by ``thresholds``, grey without a number."""
        value = self.sensitivity(group, fmt)
        if value is None:
            return "grey"
        return "green" if value <= self.thresholds[0] else "amber" if value <= self.thresholds[1] else "red"

    def _paint(self, group: str) -> None:
        dd = self.dropdowns[group]
        fmt = dd.value
        level = self.level(group, fmt)
        old = self.colours.get(group)
        if old is not None:
            dd.remove_class(f"wb-precision-{old}")
        dd.add_class(f"wb-precision-{level}")
        self.colours[group] = level
        value = self.sensitivity(group, fmt)
        edited = " (edited: the auto plan keeps it)" if group in self.plan.edited else ""
        dd.tooltip = f"{group}: {fmt}" + (f", {self.metric} {value:+.3g}" if value is not None else "") + edited

    # ---- edits and plans ----------------------------------------------------------------------------------
    def _changed(self, group: str, change: dict) -> None:
        if self._syncing:
            return
        self.plan = self.plan.with_format(group, change["new"], edited=True)
        self._paint(group)
        self._say(f"{group} → {change['new']} (edited: the auto plan keeps it)")

    def edit(self, group: str, fmt: str) -> None:
        """A hand edit: ``group`` (a linear group, or "kv_cache") takes ``fmt`` and is marked edited, so the auto
        plan keeps it, also when its dropdown already showed ``fmt`` (choosing the shown value fires no change)."""
        if group not in self.dropdowns:
            self._fail(f"no group {group!r}; the groups are {', '.join(self.dropdowns)}")
            return
        dd = self.dropdowns[group]
        values = [o[1] if isinstance(o, tuple) else o for o in dd.options]
        if fmt not in values:
            self._fail(f"{group} takes {', '.join(values)}, not {fmt!r}")
            return
        if dd.value != fmt:
            dd.value = fmt  # the observer records the edit
            return
        self._changed(group, {"new": fmt})

    def keep(self, group: str | None = None) -> None:
        """What "Keep as shown" does: ``group`` (default: the one picked beside the button) keeps the format its
        dropdown shows, marked edited, so the auto plan leaves it alone."""
        group = group or self.keep_group.value
        if group not in self.dropdowns:
            self._fail(f"no group {group!r}; the groups are {', '.join(self.dropdowns)}")
            return
        self.edit(group, self.dropdowns[group].value)

    def set_plan(self, plan: PrecisionPlan) -> None:
        """Show ``plan`` (validated against the graph) as the current plan; no group is marked edited by this."""
        plan = copy.deepcopy(plan).validate(self.graph)
        self._syncing = True
        try:
            self.plan = plan
            for name, dd in self.dropdowns.items():
                dd.value = plan.format_of(name)
                self._paint(name)
        finally:
            self._syncing = False

    # ---- buttons ------------------------------------------------------------------------------------------
    def auto(self) -> None:
        """Ask ``on_auto`` for a plan from the current one; the user's edited groups keep their formats."""
        if self.on_auto is None:
            self._fail("Auto plan needs a sensitivity report and the model: build the widget with "
                       "precision_widget(program, stats, ids, report=sensitivity(program, stats, ids)), or pass "
                       "on_auto")
            return
        before = self.plan
        self._say("auto plan: running...")
        try:
            new, result = self.on_auto(copy.deepcopy(before))
            new = copy.deepcopy(new)
            restored = [g for g in before.edited if _spec(new, g) != _spec(before, g)]
            for g in before.edited:  # the user's formats win, whatever on_auto did
                if g == KV:
                    new.kv_cache = before.kv_cache
                else:
                    new.groups[g] = copy.deepcopy(before.groups[g])
            new.edited = list(dict.fromkeys([*before.edited, *new.edited]))
            self.set_plan(new)
        except WorkbenchError as e:
            self._fail(str(e))
            return
        self.result = dict(result or {})
        summary = ", ".join(f"{n} {f}" for f, n in self.plan.summary().items())
        note = ""
        if restored:
            note = (f"; kept your edits of {', '.join(restored)}, which the auto plan had changed (its numbers are "
                    "for its own plan: press Evaluate for this one)")
        self._say(f"auto plan: {summary}, KV cache {self.plan.kv_cache}; {_numbers(self.result)}{note}")

    def evaluate(self) -> None:
        """Show ``on_evaluate(plan)``'s perplexity and KL."""
        if self.on_evaluate is None:
            self._fail("Evaluate needs the model, calibration statistics and evaluation tokens: build the widget with "
                       "precision_widget(program, stats, ids), or pass on_evaluate")
            return
        self._say("evaluating...")
        try:
            result = self.on_evaluate(copy.deepcopy(self.plan))
        except WorkbenchError as e:
            self._fail(str(e))
            return
        self.result = dict(result)
        self._say(f"this plan: {_numbers(self.result)}")

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the plan's JSON to ``path`` (default ``save_path``) atomically; returns where."""
        from ..env import atomic_write

        path = Path(path) if path else self.save_path
        if path is None:
            self._fail("nowhere to save: build the widget with save_path=..., or call save(path)")
            return None
        try:
            self.plan.validate(self.graph)
        except WorkbenchError as e:
            self._fail(str(e))
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.plan.dumps().encode())
        self._say(f"saved to {path}")
        return path

    # ---- status -------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.error = None
        self.status.value = text

    def _fail(self, text: str) -> None:
        self.error = text
        self.status.value = f"<span style='color:#c00'>error: {text}</span>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def precision_widget(program, stats, ids, plan: PrecisionPlan | None = None, report=None,
                     save_path: str | Path | None = None, window: int = 256, stride: int = 128, *,
                     budget_pct: float = 1.0, timings=None) -> PrecisionWidget:
    """A ``PrecisionWidget`` for ``program`` whose buttons run ``probe.evaluate_plan`` and (with a
    ``report``) ``auto_plan.auto_plan`` within ``budget_pct`` % more perplexity, on ``ids``."""
    from .auto_plan import auto_plan
    from .probe import evaluate_plan, reference_logits

    plan = plan if plan is not None else PrecisionPlan.uniform(program.graph, "bf16")
    reference: list = []  # the unquantized program's log-probs on ids: computed at the first Evaluate, then kept

    def evaluate(p: PrecisionPlan) -> dict:
        if not reference:
            reference.append(reference_logits(program, ids, window=window, stride=stride))
        return evaluate_plan(program, p, stats, ids, window=window, stride=stride, base_logits=reference[0])

    def auto(p: PrecisionPlan):
        def rounds(done: int, total: int, _desc: str) -> None:  # each round verifies a whole plan: seconds each
            widget.status.value = f"auto plan: verifying plan {done + 1} (at most {total})..." if done < total \
                else "auto plan: done"

        return auto_plan(report, program, stats, ids, budget_pct=budget_pct, base_plan=p, timings=timings,
                         window=window, stride=stride, progress=rounds)

    widget = PrecisionWidget(program.graph, plan, report=report, on_evaluate=evaluate,
                             on_auto=auto if report is not None else None, save_path=save_path)
    return widget
