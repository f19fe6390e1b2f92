"""Run named graph passes in order, each checked and explained.

A pass is a function ``Rewriter -> list[Match]`` registered under a name; it edits
the graph in place and says what it matched. The manager runs each pass on a
copy of the graph, then

  * sweeps dead nodes and unused params,
  * costs the graph before and after (cost model, at ``tokens`` tokens),
  * runs both graphs on the same random tokens and compares the logits; a pass
    whose logits drift beyond the dtype's tolerance is rejected (the graph before
    it is kept) and its report names the first node whose value diverged,

and returns a ``PassReport`` per pass. ``summary_table`` turns them into one
DataFrame. Users add passes (plugins) with ``register_pass``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ...errors import WorkbenchError
from ..executor import Program, resolve_params
from ..ir import Graph
from ..paged import cache_for, is_paged
from ..rewrite import Rewriter
from ..views import node_table

#: Relative error of the logits a pass may introduce, by the graph's dtype.
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}
#: ... of a bf16/fp16 graph, checked in float32 (``promoted``), and of a float32 graph checked on a GPU: headroom
#: over float32's for GPU GEMMs whose blocking differs with the fused shape, through every layer (Llama-3-8B's
#: fused q/k/v and gate/up drifted 1.3e-5 over 32 float32 layers on an H200, BENCHMARKS.md 2026-12-07)
PROMOTED_TOLERANCE = 1e-4


def check_tolerance(dtype: str, device: str | torch.device) -> float:
    """The logits drift a pass may introduce in a graph of ``dtype`` checked on ``device``: float32's on the CPU,
    ``PROMOTED_TOLERANCE`` for a 16-bit graph (checked in float32) or any graph checked on a GPU."""
    if dtype in _LOW or torch.device(device).type != "cpu":
        return PROMOTED_TOLERANCE
    return TOLERANCE.get(dtype, 2e-2)


@dataclass
class Match:
    """One rewrite: the nodes it replaced and the nodes it created."""

    what: str
    layer: int | None
    replaced: list[str]
    created: list[str]


@dataclass
class GraphPass:
    name: str
    fn: Callable[[Rewriter], list[Match]]
    description: str
    #: applied by the runtime to the graph it runs, never part of a workspace's pipeline
    runtime_only: bool = False
    #: applied to a tensor-parallel graph after the sharding pass (``sharded_pipeline``), never part of a
    #: workspace's pipeline: it rewrites what sharding inserts (the collectives)
    sharded: bool = False


@dataclass
class PassReport:
    name: str
    description: str
    matches: list[Match]
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    max_rel_err: float | None
    accepted: bool
    first_diverging: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["matches"] = [m.__dict__ for m in self.matches]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "PassReport":
        return cls(**{**d, "matches": [Match(**m) for m in d["matches"]]})


#: The standard pipeline, in order. Norms are fused before the residual adds that feed them. The LayerNorm families'
#: passes (``layernorm.py``) sit by their RMSNorm / SwiGLU / RoPE counterparts and match nothing in Llama's graphs.
DEFAULT_PIPELINE = (
    "eliminate_noops",
    "fold_rope_tables",
    "eliminate_duplicates",
    "collapse_layout_chains",
    "linear_from_matmul",
    "fuse_rms_norm",
    "fuse_add_rms_norm",
    "fuse_norm_add_rms_norm",
    "fuse_layer_norm",
    "fuse_add_layer_norm",
    "fuse_silu_mul",
    "fuse_gelu",
    "fuse_softcap",
    "fuse_rope",
    "fuse_partial_rope",
    "fuse_attention",
    "fuse_parallel_linears",
    "insert_paged_attention",
    "fuse_rope_into_attention",
    "fuse_qk_norm_into_attention",
)

#: The fusions every decoder layer of a Llama-family model gets, once or more per layer: the pipeline's fusions but
#: ``fuse_qk_norm_into_attention`` (only Qwen3 and Gemma 3 have the norms), ``fuse_norm_add_rms_norm`` (only Gemma
#: normalizes the attention's and MLP's outputs), ``fuse_softcap`` (only Gemma 2 caps) and the LayerNorm families'
#: (``FAMILY_LAYER_FUSIONS``).
#: A layer one of them did not match in still runs, on the reference ops of the pattern it left (``unfused_layers``
#: names them).
LAYER_FUSIONS = ("fuse_rms_norm", "fuse_add_rms_norm", "fuse_silu_mul", "fuse_rope", "fuse_attention",
                 "fuse_parallel_linears", "insert_paged_attention", "fuse_rope_into_attention")

#: Architecture -> the fusions each of its decoder layers gets, for families whose layers differ from the Llama
#: family's (``LAYER_FUSIONS``): LayerNorm instead of RMSNorm, no RoPE (GPT-2), a parallel residual. An entry that
#: is a tuple of names is met by any one of them in a layer (NeoX's rotary: ``fuse_partial_rope`` over part of
#: each head, or over all of it ``fuse_rope_into_attention``). The module that registers a family's passes adds its
#: entry (``passes/layernorm.py``).
FAMILY_LAYER_FUSIONS: dict[str, tuple[str | tuple[str, ...], ...]] = {}

PASSES: dict[str, GraphPass] = {}
#: Where a registered pass joins the default pipeline: name -> ("before" | "after", the pass it is placed by).
PLACES: dict[str, tuple[str, str]] = {}


def register_pass(name: str, description: str = "", *, before: str | None = None, after: str | None = None,
                  replace: bool = False, runtime_only: bool = False, sharded: bool = False):
    """Decorator registering ``fn(Rewriter) -> list[Match]`` as pass ``name`` (the plugin mechanism).

    ``before`` / ``after`` name the pass it runs next to in the default pipeline (``default_pipeline()``):
    a pattern must be placed where the graph still has its shape (before ``fuse_attention`` for one on the
    attention's parts, say), and appending it at the end would let an earlier fusion change the pattern so
    that it silently matches nothing. A pass registered without a place runs only where it is named.
    ``runtime_only``: the runtime applies it to the graph it runs; a workspace's passes stage refuses it.
    ``sharded``: it runs on tensor-parallel graphs, after ``shard_tensor_parallel``, in registration order
    (``sharded_pipeline()``); a workspace's passes stage refuses it too."""
    if before is not None and after is not None:
        raise WorkbenchError(f"pass {name!r}: give before= or after=, not both")
    anchor = before or after
    if sharded and (anchor is not None or runtime_only):
        raise WorkbenchError(f"pass {name!r}: a sharded pass runs after the sharding pass, in registration order; "
                             "give it no before=, after= or runtime_only=")
    if anchor is not None and anchor not in PASSES:
        raise WorkbenchError(f"pass {name!r} is placed by {anchor!r}, which is not a registered pass; "
                             f"registered: {', '.join(PASSES)}")

    def wrap(fn):
        if name in PASSES and not replace:
            raise WorkbenchError(f"pass {name!r} is already registered; pass replace=True to override it")
        PASSES[name] = GraphPass(name, fn, description or (fn.__doc__ or "").strip().splitlines()[0], runtime_only,
                                 sharded)
        PLACES.pop(name, None)
        if anchor is not None:
            PLACES[name] = ("before" if before is not None else "after", anchor)
        return fn

    return wrap


def default_pipeline() -> list[str]:
    """The standard pipeline (``DEFAULT_PIPELINE``) with every pass registered with a place inserted there, in
    registration order (a pass placed by another placed pass follows it)."""
    names = list(DEFAULT_PIPELINE)
    pending = dict(PLACES)
    while pending:
        placed = [n for n, (_, anchor) in pending.items() if anchor in names]
        if not placed:  # anchors that were replaced away: say so rather than drop the passes
            raise WorkbenchError(f"pass(es) {', '.join(pending)} are placed by passes not in the pipeline")
        for n in placed:
            where, anchor = pending.pop(n)
            at = names.index(anchor)
            names.insert(at if where == "before" else at + 1, n)
    return names


def sharded_pipeline() -> list[str]:
    """The passes a tensor-parallel graph gets after the sharding pass (``register_pass(..., sharded=True)``),
    in registration order: ``graph.passes.tensor_parallel.shard_and_fuse`` runs them."""
    return [name for name, p in PASSES.items() if p.sharded]


def _check_registered(graph: Graph) -> None:
    from ...kernels.registry import REGISTRY

    for n in graph.nodes:
        REGISTRY.get(n.op)  # raises a WorkbenchError naming the op and how to register it


def _total_bytes(graph: Graph, tokens: int) -> int:
    return int(node_table(graph, batch=1, tokens=tokens)["bytes"].sum())


@dataclass
class CheckInputs:
    """The random tokens every pass is checked on: two rows, the second packing two sequences.

    40 tokens: long enough to cross KV blocks of 16 and small sliding windows."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor

    @classmethod
    def make(cls, vocab_size: int, tokens: int = 40, seed: int = 0) -> "CheckInputs":
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (2, tokens), generator=g)
        half = tokens // 2
        pos = torch.stack([torch.arange(tokens), torch.cat([torch.arange(half), torch.arange(tokens - half)])])
        return cls(ids, pos)


_LOW = {"bfloat16", "float16"}


def promoted(graph: Graph) -> Graph:
    """A copy of a bf16/fp16 graph computing in float32 (every 16-bit float spec, dtype argument and the KV cache's
    dtype): what the numeric checks run. A pass is exact algebra, so in float32 its drift is rounding of order 1e-6
    and a wrong rewrite stands out; in bf16 the reordered roundings of a rewritten GEMM grow through the layers (a
    16-layer model drifted 1.7e-2 from fuse_parallel_linears alone, so the 32-layer Llama-3-8B's fusion was
    rejected on the GPU) and would hide a bug of the same size."""
    g = copy.deepcopy(graph)

    def spec(t):
        return t if t is None or t.dtype not in _LOW else type(t)(t.shape, "float32", t.contiguous)

    def value(v):
        if isinstance(v, torch.dtype):
            return torch.float32 if v in (torch.bfloat16, torch.float16) else v
        if isinstance(v, list):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return v

    g.inputs = {k: spec(t) for k, t in g.inputs.items()}
    for p in g.params.values():
        p.spec = spec(p.spec)
        if p.derived and p.derived.get("op") == "tabulate":  # a folded table: its subgraph computes in float32 too
            p.derived = {**p.derived, "graph": promoted(Graph.from_json(p.derived["graph"])).to_json()}
    for n in g.nodes:
        n.outputs = [spec(t) for t in n.outputs]
        n.args, n.kwargs = value(n.args), value(n.kwargs)
    if g.meta.get("dtype") in _LOW:
        g.meta = {**g.meta, "dtype": "float32"}
    if g.meta.get("paged", {}).get("dtype") in _LOW:
        g.meta["paged"] = {**g.meta["paged"], "dtype": "float32"}
    return g


def _promoted_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in params.items()}


def _values(graph: Graph, params: Mapping[str, torch.Tensor], inputs: CheckInputs,
            device: torch.device) -> dict[str, torch.Tensor]:
    program = Program(graph, resolve_params(graph, params), device=device)
    # a graph whose lm_head reads selected rows (select_logits_rows) is checked with every row selected
    rows = {"logits_indices": torch.arange(inputs.input_ids.numel() if is_paged(graph) else inputs.input_ids.shape[1])
            } if "logits_indices" in graph.inputs else {}
    if not is_paged(graph):
        values = program.run(input_ids=inputs.input_ids, position_ids=inputs.position_ids, keep_all=True, **rows)
    else:
        # A paged graph sees the same tokens as one flat batch of three sequences (the second
        # row packs two); its logits are put back in the rows' shape to compare.
        ids = inputs.input_ids
        half = ids.shape[1] // 2
        seqs = [ids[0].tolist(), ids[1, :half].tolist(), ids[1, half:].tolist()]
        values = program.run(keep_all=True, **cache_for(graph, device=device).step_inputs(list(enumerate(seqs))),
                             **rows)
        out = graph.outputs[0]
        values[out] = values[out].reshape(*ids.shape, -1)
    # the nodes' values only: derived weights (a fused gate/up, in float32 for a 16-bit graph) are freed now
    return {k: v for k, v in values.items() if k not in graph.params}


def _align(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor | None:
    """``after`` laid out like ``before``: the same shape, or a flat batch ([1, .., B*T, ..]) of B rows."""
    if after.shape == before.shape:
        return after
    if after.dim() != before.dim() or after.shape[0] != 1 or after.numel() != before.numel():
        return None
    rows = before.shape[0]
    for d in range(1, after.dim()):
        if after.shape[d] == rows * before.shape[d] and \
                all(after.shape[i] == before.shape[i] for i in range(1, after.dim()) if i != d):
            return after[0].unflatten(d - 1, (rows, before.shape[d])).movedim(d - 1, 0)
    return None


def _first_diverging(candidate: Graph, matches: list[Match], after: dict, reference: dict, tol: float) -> str:
    """The first node of ``candidate`` whose value differs from its counterpart before the pass
    (the same name, or for a node the pass created, the last node it replaced)."""
    counterpart = {m.created[0]: m.replaced[-1] for m in matches if m.created and m.replaced}
    for n in candidate.nodes:
        ref = reference.get(counterpart.get(n.name, n.name))
        val = after.get(n.name)
        if not (isinstance(ref, torch.Tensor) and isinstance(val, torch.Tensor)) or not ref.is_floating_point():
            continue
        aligned = _align(val, ref)
        if aligned is not None and _rel(aligned, ref) > tol:
            return n.name
    return candidate.outputs[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_passes(graph: Graph, params: Mapping[str, torch.Tensor], names: list[str] | None = None, *,
               tokens: int = 512, check: bool = True, device: str | torch.device = "cpu",
               on_pass: Callable[[int, int, str], None] | None = None) -> tuple[Graph, list[PassReport]]:
    """Apply passes ``names`` (default: ``default_pipeline()``) in order; returns the graph and reports.

    ``params`` holds the captured graph's tensors by name (weights, buffers and
    constants); derived parameters of fused graphs are computed from them. The
    numeric checks run on ``device``. ``on_pass(i, total, name)`` is called as pass ``i`` (from 0) starts, and
    ``on_pass(total, total, "")`` once all are done (a widget's progress bar).
    """
    device = torch.device(device)
    names = default_pipeline() if names is None else list(names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise WorkbenchError(f"unknown pass(es) {', '.join(unknown)}; registered: {', '.join(PASSES)}")
    _check_registered(graph)
    # checks run in float32 (``promoted``): a 16-bit graph's own roundings would drown a pass's error
    low = graph.meta.get("dtype", "float32") in _LOW
    tol = check_tolerance(graph.meta.get("dtype", "float32"), device)
    check_as = promoted if low else (lambda g: g)
    inputs = CheckInputs.make(graph.meta.get("config", {}).get("vocab_size", 2))
    if check:  # once, not per check: fused weights are then derived on the device too
        params = _promoted_params(params) if low else params
        if device.type != "cpu":
            params = {k: v.to(device) for k, v in params.items()}
    current = graph
    reference = _values(check_as(current), params, inputs, device) if check else None
    reports = []
    for i, name in enumerate(names):
        if on_pass is not None:
            on_pass(i, len(names), name)
        gp = PASSES[name]
        start = time.perf_counter()
        candidate = copy.deepcopy(current)
        rw = Rewriter(candidate)
        matches = gp.fn(rw)
        rw.sweep()
        candidate.validate()
        _check_registered(candidate)
        report = PassReport(name, gp.description, matches, len(current.nodes), len(candidate.nodes),
                            _total_bytes(current, tokens), _total_bytes(candidate, tokens), None, True)
        if check and matches:
            after = _values(check_as(candidate), params, inputs, device)
            out = candidate.outputs[0]
            report.max_rel_err = _rel(after[out], reference[current.outputs[0]])
            if not report.max_rel_err <= tol:
                report.accepted = False
                report.first_diverging = _first_diverging(candidate, matches, after, reference, tol)
                report.notes.append(f"rejected: logits drift {report.max_rel_err:.2e} > tolerance {tol:.0e}")
            else:
                reference = after
        if report.accepted:
            current = candidate
        else:
            report.nodes_after, report.bytes_after = report.nodes_before, report.bytes_before
        report.seconds = round(time.perf_counter() - start, 3)
        reports.append(report)
    current.meta = {**current.meta, "passes": [r.name for r in reports if r.accepted]}
    if on_pass is not None:
        on_pass(len(names), len(names), "")
    return current, reports


def unfused_layers(reports: list[PassReport], num_layers: int, architecture: str | None = None
                   ) -> dict[str, list[int]]:
    """Pass name -> the decoder layers (of ``num_layers``) it did not match in, for each of the architecture's layer
    fusions (``FAMILY_LAYER_FUSIONS``, else ``LAYER_FUSIONS``) that ran, in that list's order; a rejected pass
    matched in none. Passes that matched in every layer are left out; alternatives are named "a or b" (those of
    them that ran) and miss a layer only where none of them matched."""
    matched: dict[str, set] = {}
    for r in reports:
        matched[r.name] = {m.layer for m in r.matches} if r.accepted else set()
    missing = {}
    for entry in FAMILY_LAYER_FUSIONS.get(architecture, LAYER_FUSIONS):
        names = [n for n in ((entry,) if isinstance(entry, str) else entry) if n in matched]
        if not names:  # none of them ran
            continue
        left = [i for i in range(num_layers) if not any(i in matched[n] for n in names)]
        if left:
            missing[" or ".join(names)] = left
    return missing


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def unfused_lines(reports: list[PassReport], num_layers: int, architecture: str | None = None) -> list[str]:
    """One line per layer fusion that left layers unfused, e.g. ``fuse_silu_mul matched 0 of 2 layers: layers 0-1
    stay unfused (reference ops)``; empty when every layer got every fusion."""
    lines = []
    for name, left in unfused_layers(reports, num_layers, architecture).items():
        which = f"layer {left[0]} stays" if len(left) == 1 else f"layers {_ranges(left)} stay"
        lines.append(f"{name} matched {num_layers - len(left)} of {num_layers} layers: {which} unfused "
                     "(reference ops)")
    return lines


def summary_table(reports: list[PassReport]):
    """One row per pass: matches, layers, nodes before/after, bytes saved (at the costed size), error."""
    import pandas as pd

    rows = [{"pass": r.name, "matches": len(r.matches),
             "layers": len({m.layer for m in r.matches if m.layer is not None}),
             "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
             "bytes_saved": r.bytes_saved, "max_rel_err": r.max_rel_err, "accepted": r.accepted,
             "first_diverging": r.first_diverging, "seconds": r.seconds} for r in reports]
    df = pd.DataFrame(rows)
    if reports:
        df.attrs["bytes_before_first"] = reports[0].bytes_before
    return df
