"""The batch-invariant mode: every step, whatever its size, runs each op with one tactic and one config.

    sel = select(graph, meta_arguments(graph), tuned)   # node -> (tactic, config), and what it cost
    sel.choices, sel.notes
    why_variant("aten.linear.default", "triton", GEMV_CONFIGS["16bit"][0])   # "the M = 1 GEMV ..."

A request's logits depend on the other requests of its step only where some kernel computes a row differently
with the number of rows it is called with. On the GPU each Triton tile gives a row the same result for every M at
one config held (BENCHMARKS.md, 2026-12-07, fourth entry: ``bench/batch_invariance.py``); what is not invariant:
cuBLAS (the bf16 linears' untuned default, and ``torch._scaled_mm`` / ``_int_mm``: it picks its kernel by shape),
the M = 1 GEMV against the tile that takes over at M = 2, split-K, and configs that change between token
buckets, as the tuned ones do (``TunedChoices``: one mapping per bucket). The mode (``Program(...,
batch_invariant=True)``; ``LLM(..., batch_invariant=True)``, ``workbench serve --batch-invariant``, ``workbench
build --batch-invariant``, which records it in the engine's manifest) gives every node whose op has tactics one
invariant candidate for every step:

  * where the choices (tuned, per bucket) agree across buckets on an invariant candidate: that one;
  * else the largest bucket's choice where it is invariant (it was tuned on the step that costs the most);
  * else, and where nothing was tuned, the op's invariant default (``default_choice``): the first tactic, GPU
    defaults first, that declares one and supports the node's shapes;
  * no invariant tactic at all (a shape no tactic takes): the reference, with a note that it is not invariant.

What each node lost is said in ``notes``, one line per op and lost choice. ``workbench build --batch-invariant``
tunes in the mode instead (``autotune_profile(..., batch_invariant=True)``): every invariant candidate is timed at
every bucket and each node gets the one with the least mean slowdown against each bucket's fastest invariant one
(``choose_across_buckets``); ``cost_lines`` says, per op, how much slower that is than the per-bucket choices.

Whether a candidate is invariant is data on the tactic, like its ``configs`` and ``graph_safe``:

    fn.invariant(config) -> str | None         why this config is not batch-invariant; None: it is
    fn.invariant_default                       the config the mode runs where nothing was tuned
    fn.invariant_configs(configs, args, kwargs)   (optional) the invariant configs the tuner times in the mode,
                                               besides those ``fn.prune`` keeps (e.g. tiles taller than M)

A tactic without ``invariant`` is not invariant (a plugin's, until it says so). An op's reference runs torch's own
kernels, which choose their reduction and kernel by shape on a GPU: never a candidate of the mode where the op has
a tactic. Ops without tactics (views, casts, elementwise ATen ops) run as they are; those that reduce or multiply
(their cost model says so) are named in ``notes``. On the CPU the references run under ``gemm.batch_invariant()``,
which makes them row-invariant; the mode's Triton tactics run there only under ``TRITON_INTERPRET=1`` (tests).
Tensor parallelism is refused in the mode: the all-reduce's algorithm is picked by message size.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..errors import WorkbenchError
from . import cost as C
from .registry import REFERENCE, REGISTRY, OpDef, OpRegistry

Choice = tuple[str, "dict | None"]

#: ops without tactics whose torch kernels reduce or multiply (their cost model): named in the notes
_REDUCING = (C.matmul, C.addmm, C.reduction, C.attention)


def why_variant(op: str, tactic: str, config: dict | None, *, registry: OpRegistry = REGISTRY) -> str | None:
    """Why candidate (``tactic``, ``config``) of ``op`` may compute a row differently with the rows beside it (one
    line), or None when it is batch-invariant with that config held for every step."""
    opdef = registry.get(op)
    if tactic == REFERENCE:
        return ("its reference runs torch's kernels, which pick their kernel and reduction split by shape"
                if opdef.tactics else None)
    fn = opdef.tactics.get(tactic)
    if fn is None:
        return f"op {op} has no tactic {tactic!r}"
    check = getattr(fn, "invariant", None)
    if check is None:
        return f"tactic {tactic} does not declare itself batch-invariant (no fn.invariant)"
    return check(config)


def invariant_candidates(opdef: OpDef, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[str, dict, Callable]]:
    """The invariant (tactic, config, fn) candidates the tuner times for a node in the mode beyond its usual
    ones: each tactic's ``invariant_configs`` (those it declares invariant)."""
    out = []
    for name, fn in opdef.tactics.items():
        extra = getattr(fn, "invariant_configs", None)
        if extra is None or getattr(fn, "invariant", None) is None:
            continue
        out += [(name, cfg, fn) for cfg in extra(getattr(fn, "configs", None) or [], args, dict(kwargs))
                if fn.invariant(cfg) is None]
    return out


def default_choice(opdef: OpDef, meta_args: tuple[tuple, dict] | None) -> tuple[Choice | None, str | None]:
    """(the invariant candidate the mode runs for a node of ``opdef`` where nothing was tuned, or None; why none).
    The first tactic, in the order of ``gpu_defaults`` then the rest, that is graph-safe, declares an invariant
    default config and supports the node's shapes (``meta_args``: ``graph.executor.meta_arguments``)."""
    order = [t for t in opdef.gpu_defaults if t in opdef.tactics] + \
            [t for t in opdef.tactics if t not in opdef.gpu_defaults]
    reasons = []
    for name in order:
        fn = opdef.tactics[name]
        config = getattr(fn, "invariant_default", None)
        reason = why_variant(opdef.name, name, config) if config is not None else "no invariant default config"
        if reason is None and not opdef.is_graph_safe(name):
            reason = "not CUDA-graph safe"
        if reason is None and meta_args is not None:
            reason = opdef.unsupported(name, *meta_args)
        if reason is None:
            return (name, dict(config)), None
        reasons.append(f"{name}: {reason}")
    return None, "; ".join(reasons) or "the op has no tactic"


@dataclass
class Selection:
    """The mode's choice for every node whose op has tactics (``choices``: node -> (tactic, config), the same for
    every step), and one line per op and lost choice (``notes``)."""
    choices: dict[str, Choice] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def select(graph, meta: Callable | None, tuned=None, *, registry: OpRegistry = REGISTRY) -> Selection:
    """The mode's choices for ``graph`` (see the module docstring) from ``tuned``: ``TunedChoices`` (per bucket),
    one mapping node -> (tactic, config), or None. ``meta``: node -> its meta arguments
    (``graph.executor.meta_arguments``), for the defaults' ``supports``; None: not checked."""
    edges, per_bucket = _buckets(tuned)
    sel = Selection()
    lost: dict[tuple[str, str, str, str], list] = defaultdict(list)  # (op, lost, why, runs) -> [(node, edge)]
    fallbacks: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in graph.nodes:
        opdef = registry.get(node.op)
        if not opdef.tactics:
            if node.op.startswith("aten.") and opdef.cost in _REDUCING:
                fallbacks[(node.op, "runs torch's kernel on a GPU, which may sum a row differently with the "
                                    "step's size")].append(node.name)
            continue
        given = [c.get(node.name) for c in per_bucket]
        chosen = _pick(opdef, given)
        if chosen is None:
            chosen, why = default_choice(opdef, meta(node) if meta is not None else None)
            if chosen is None:
                fallbacks[(node.op, f"has no batch-invariant tactic here ({why}): runs its reference, which is "
                                    "not batch-invariant on a GPU")].append(node.name)
                continue
        sel.choices[node.name] = chosen
        for edge, c in zip(edges, given):
            if c is not None and _key(c) != _key(chosen):
                why = why_variant(node.op, c[0], c[1], registry=registry) or "not the one config for every bucket"
                lost[(node.op, describe(c), why, describe(chosen))].append((node.name, edge))
    for (op, was, why, runs), where in lost.items():
        nodes = sorted({n for n, _ in where})
        at = sorted({e for _, e in where if e is not None})
        buckets = f" at {_tokens(at)}" if at else ""
        sel.notes.append(f"batch-invariant: {op} lost its tuned {was}{buckets} on {len(nodes)} node(s) ({why}); "
                         f"runs {runs}")
    for (op, what), nodes in fallbacks.items():
        sel.notes.append(f"batch-invariant: {op} ({len(nodes)} node(s), e.g. {nodes[0]}) {what}")
    return sel


def choice_lines(graph, choices: Mapping[str, Choice], *, prefix: str = "batch-invariant") -> list[str]:
    """One line per op of ``graph``: what its nodes run at every step (``describe`` of each distinct choice)."""
    ops: dict[str, Counter] = defaultdict(Counter)
    for node in graph.nodes:
        if node.name in choices:
            ops[node.op][describe(choices[node.name])] += 1
    return [f"{prefix}: {op} runs " + ", ".join(f"{what} ({n} node{'s' if n > 1 else ''})" for what, n in runs.items())
            + " at every step" for op, runs in ops.items()]


def _buckets(tuned) -> tuple[list, list[Mapping]]:
    """(bucket edges, one mapping per bucket) of ``tuned``: TunedChoices, one mapping (edge None) or None."""
    if tuned is None:
        return [None], [{}]
    if hasattr(tuned, "edges") and hasattr(tuned, "choices"):
        return list(tuned.edges), list(tuned.choices)
    if isinstance(tuned, Mapping):
        return [None], [tuned]
    raise WorkbenchError(f"batch-invariant selection: choices must be TunedChoices or a mapping node -> (tactic, "
                         f"config), not {type(tuned).__name__}")


def _pick(opdef: OpDef, given: list[Choice | None]) -> Choice | None:
    """The choice to keep among a node's per-bucket choices: the one they agree on, else the largest bucket's,
    where it is invariant and graph-safe; None: the default."""
    present = [c for c in given if c is not None]
    if not present:
        return None
    candidates = [present[0]] if len({_key(c) for c in present}) == 1 else [given[-1]] if given[-1] else []
    for tactic, config in candidates:
        if tactic in opdef.tactics and opdef.is_graph_safe(tactic) and \
                why_variant(opdef.name, tactic, config) is None:
            return tactic, (dict(config) if config is not None else None)
    return None


def _key(choice: Choice) -> str:
    return json.dumps([choice[0], choice[1]], sort_keys=True)


def _tokens(edges: list[int]) -> str:
    return ", ".join(str(e) for e in edges) + (" token" if edges == [1] else " tokens")


_SHORT = {"num_warps": "w", "num_stages": "s", "GROUP_M": "G", "SPLIT_K": "split-K ", "SPLITS": "splits ",
          "NEW_FROM_CACHE": "own keys from cache "}


def describe(choice: Choice) -> str:
    """A choice in a few words: its tactic and its config's values (``BLOCK_`` dropped, warps ``w``, stages ``s``;
    a GEMV named)."""
    tactic, config = choice
    if not config:
        return tactic if config is None else f"{tactic} {{}}"
    if config.get("GEMV"):
        return f"{tactic} GEMV N{config['BLOCK_N']} K{config['BLOCK_K']} w{config['num_warps']}"
    parts = []
    for k, v in config.items():
        if (k == "SPLIT_K" or k == "SPLITS") and v == 1:
            continue
        if isinstance(v, dict):
            v = "{" + describe(("", v)).strip() + "}"
        parts.append(f"{_SHORT.get(k, k.removeprefix('BLOCK_'))}{v}")
    return f"{tactic} {' '.join(parts)}"


# ---- tuning in the mode ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostRow:
    """One node at one bucket: the mode's choice against the per-bucket (free) choice, in ms of the timing cache."""
    node: str
    op: str
    edge: int
    tactic: str
    config: dict | None
    ms: float
    free_tactic: str
    free_config: dict | None
    free_ms: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def choose_across_buckets(graph, node_keys: list[Mapping[str, set[str]]], timings: Mapping[str, dict],
                          free: list[Mapping[str, Choice]], edges: Iterable[int], *,
                          registry: OpRegistry = REGISTRY) -> tuple[dict[str, Choice], list[CostRow]]:
    """The mode's tuned choices: for each node, among the invariant, graph-safe candidates timed (finite) at every
    bucket, the one whose mean of ``ms / fastest invariant ms`` over the buckets is least; and a ``CostRow`` per
    node and bucket against that bucket's free choice (``free``: the autotuner's per-bucket choices).
    ``node_keys[b]``: node -> the timing-cache keys of its instances at bucket b; ``timings``: key -> cache entry.
    A node with no such candidate gets none (its default runs)."""
    edges = list(edges)
    chosen, rows = {}, []
    for node in graph.nodes:
        opdef = registry.get(node.op)
        if not opdef.tactics or any(node.name not in k for k in node_keys):
            continue
        per_bucket = [_totals(timings, k[node.name]) for k in node_keys]
        common = set.intersection(*(set(t) for t in per_bucket))
        ok = [c for c in common if opdef.is_graph_safe(json.loads(c)[0])
              and why_variant(node.op, *json.loads(c), registry=registry) is None
              and all(math.isfinite(t[c]) for t in per_bucket)]
        if not ok:
            continue
        best = [min(t[c] for c in ok) for t in per_bucket]
        pick = min(sorted(ok), key=lambda c: sum(t[c] / max(b, 1e-12) for t, b in zip(per_bucket, best)))
        tactic, config = json.loads(pick)
        chosen[node.name] = (tactic, config)
        for edge, totals, f in zip(edges, per_bucket, free):
            ft, fc = f.get(node.name, (tactic, config))
            rows.append(CostRow(node.name, node.op, edge, tactic, config, totals[pick], ft, fc,
                                totals.get(_key((ft, fc)), math.nan)))
    return chosen, rows


def _totals(timings: Mapping[str, dict], keys: set[str]) -> dict[str, float]:
    """candidate (``_key``) -> its ms summed over ``keys`` (a node seen at several shapes in one bucket), for the
    candidates timed at all of them."""
    out: dict[str, list[float]] = defaultdict(list)
    for key in keys:
        for t in timings[key]["timings"]:
            out[_key((t["tactic"], t["config"]))].append(float(t["ms"]))
    return {c: sum(ms) for c, ms in out.items() if len(ms) == len(keys)}


def cost_lines(rows: Iterable[CostRow | Mapping]) -> list[str]:
    """One line per op: what the mode's one choice per node costs at each bucket against the per-bucket choices
    (the op's nodes' summed ms, chosen / free), and the choice it lost there most often."""
    by_op: dict[str, list] = defaultdict(list)
    for r in rows:
        r = r if isinstance(r, CostRow) else CostRow(**r)
        by_op[r.op].append(r)
    lines = []
    for op, rs in by_op.items():
        nodes = {r.node for r in rs}
        runs = Counter(describe((r.tactic, r.config)) for r in rs if r.edge == rs[0].edge)
        parts = []
        for edge in sorted({r.edge for r in rs}):
            at = [r for r in rs if r.edge == edge]
            free_ms = sum(r.free_ms for r in at)
            ratio = sum(r.ms for r in at) / free_ms if free_ms > 0 and math.isfinite(free_ms) else math.nan
            was = Counter(describe((r.free_tactic, r.free_config)) for r in at
                          if _key((r.free_tactic, r.free_config)) != _key((r.tactic, r.config)))
            parts.append(f"{ratio:.2f}x at {edge}" + (f" (lost {was.most_common(1)[0][0]})" if was else ""))
        lines.append(f"batch-invariant cost: {op} ({len(nodes)} node(s), running {', '.join(runs)}): "
                     f"{'; '.join(parts)} [time against the per-bucket choices, by bucket edge in tokens]")
    return lines
