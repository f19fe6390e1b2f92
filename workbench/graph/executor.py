"""Run a workbench graph with the registry's reference implementations.

``Program`` binds a graph to parameter tensors on one device and runs it over a
flat batch of tokens with explicit positions. Positions restarting at 0 inside a
row start a new sequence (see ``capture``), so several prompts can share one
row without padding.

This is the correctness oracle for every later stage and the CPU path. It frees
each intermediate after its last reader, so peak memory is what the model needs,
not the sum of every node's output.

``gpu_fallback_notes(graph, choices)`` says, without a GPU or weights, which nodes a GPU program
(``Program.for_gpu_steps``) would run on a fallback and why (one line per reason; for the build log).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch

from ..errors import WorkbenchError
from ..kernels.autotune import TunedChoices
from ..kernels.registry import REFERENCE, REGISTRY, OpRegistry
from .ir import Graph, Node, Ref, dtype_from_name
from .paged import is_paged

#: ``Program(tactics=DEFAULTS)``: each op's GPU default (``OpDef.default_impl``) where no choice names one
DEFAULTS = "defaults"


class Program:
    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], *,
                 device: str | torch.device = "cpu", registry: OpRegistry = REGISTRY,
                 tactics: str | Mapping[str, str] | None = None,
                 choices: Mapping[str, tuple[str, dict | None]] | TunedChoices | None = None,
                 graph_safe: bool = False, batch_invariant: bool = False) -> None:
        """``tactics`` picks implementations: None runs every op's reference; ``DEFAULTS`` ("defaults") runs
        each op's GPU default (the first of its ``gpu_defaults`` that is graph-safe and supports the node's
        shapes, else the reference); another name (``"triton"``) runs that tactic wherever an op has it; a
        mapping op name -> tactic name chooses per op. ``choices`` (from the autotuner) names a tactic and
        config per node, and wins over ``tactics``: one mapping for every step, or ``TunedChoices`` with one
        mapping per shape bucket, the bucket picked by each step's token count.

        ``graph_safe``: a node whose implementation so chosen may not be captured in a CUDA graph runs its
        op's GPU default instead (when that is graph-safe); ``notes`` says which and why, one line each, and
        ``unsafe_nodes(tokens)`` lists what is left unsafe (a step of those runs eagerly).

        ``batch_invariant``: every step, whatever its size, runs each node with one tactic and config, each
        batch-invariant (``kernels/invariant.py``: the tuned choices where they allow it, else each op's
        invariant default; what was lost is in ``notes``), so a request's results do not depend on the requests
        beside it. Where Triton cannot run (the CPU without ``TRITON_INTERPRET``) the references run, which the
        runtime's steps make row-invariant (``gemm.batch_invariant``)."""
        self.graph = graph
        self.device = torch.device(device)
        self.params = _check_params(graph, params, self.device)
        self._choices = choices  # as given (one mapping for every step, or TunedChoices): for_gpu_steps keeps them
        self.batch_invariant = bool(batch_invariant)
        self.graph_safe = graph_safe
        self.notes: list[str] = []
        if self.batch_invariant and _triton_runs(self.device):
            from ..kernels.autotune import tactic_ops
            from ..kernels.invariant import select

            tactic_ops()  # registers the Triton tactics
            selection = select(graph, meta_arguments(graph), choices, registry=registry)
            choices = selection.choices  # one mapping for every step
            self._note(selection.notes)
        elif self.batch_invariant:
            choices = None
            self._note(["batch-invariant: Triton does not run on the CPU: the references run, which the runtime's "
                        "steps keep row-invariant (fixed blocks of rows in every matmul)"])
        self.tuned = choices if isinstance(choices, TunedChoices) else None
        per_bucket = self.tuned.choices if self.tuned else [dict(choices or {})]
        if tactics is not None or graph_safe or any(t != REFERENCE for c in per_bucket for t, _ in c.values()):
            if not _triton_runs(self.device):
                raise WorkbenchError(f"Triton tactics run on a CUDA device, not {self.device.type}; run without "
                                     "tactics on the CPU (or set TRITON_INTERPRET=1 to test kernels there, slowly)")
            from ..kernels.autotune import tactic_ops

            tactic_ops()  # registers the Triton tactics
        self.tactics = tactics
        self._registry = registry
        self._meta = None  # node -> meta arguments for tactics' ``supports`` (``meta_arguments``, built on first use)
        self._names: list[dict[str, str]] = []  # per plan: node -> the implementation it runs
        self._configs: list[dict[str, dict | None]] = []  # per plan: node -> the config it runs with
        self._unsafe: list[list[str]] = []  # per plan: nodes whose implementation is not graph-safe
        self._plans = [self._plan(registry, c) for c in per_bucket]
        self._steps = self._plans[0]

    @property
    def choices_given(self) -> Mapping[str, tuple[str, dict | None]] | TunedChoices | None:
        """The choices this program was made with, as given (before the graph-safety rule and the batch-invariant
        selection): what a program derived from this one (``for_gpu_steps``, the runtime's rows-only copy) starts
        from."""
        return self._choices

    def with_choices(self, choices) -> "Program":
        """The same graph and weights, running the autotuner's choices (per node, or ``TunedChoices``)."""
        return Program(self.graph, self.params, device=self.device, choices=choices,
                       batch_invariant=self.batch_invariant)

    def with_batch_invariance(self, enabled: bool = True) -> "Program":
        """The same program (graph, weights, tactics, the choices it was given) with the batch-invariant mode on or
        off (see ``__init__``); itself when it is so already."""
        if bool(enabled) == self.batch_invariant:
            return self
        return Program(self.graph, self.params, device=self.device, registry=self._registry, tactics=self.tactics,
                       choices=self._choices, graph_safe=self.graph_safe, batch_invariant=enabled)

    def for_gpu_steps(self) -> "Program":
        """The program a GPU runtime runs: its tuned choices where they are graph-safe, each op's GPU default
        everywhere else (an untuned graph, a node the tuning left out, a choice a CUDA graph cannot capture)."""
        return Program(self.graph, self.params, device=self.device, registry=self._registry, tactics=DEFAULTS,
                       choices=self._choices, graph_safe=True, batch_invariant=self.batch_invariant)

    def unsafe_nodes(self, tokens: int | None = None) -> list[str]:
        """Nodes whose implementation may not be captured in a CUDA graph, in the plan a step of ``tokens``
        tokens runs (None: any plan)."""
        if tokens is None or self.tuned is None:
            return sorted({n for u in self._unsafe for n in u})
        return list(self._unsafe[self.tuned.bucket(tokens)])

    def implementations(self, tokens: int | None = None) -> dict[str, str]:
        """node -> the implementation it runs ("reference" or a tactic name) in the plan of a step of
        ``tokens`` tokens (the first plan when untuned or None)."""
        i = self.tuned.bucket(tokens) if self.tuned is not None and tokens is not None else 0
        return dict(self._names[i])

    def configs(self, tokens: int | None = None) -> dict[str, dict | None]:
        """node -> the config its implementation runs with (None: the launcher's own default, or the reference) in
        the plan of a step of ``tokens`` tokens (as ``implementations``)."""
        i = self.tuned.bucket(tokens) if self.tuned is not None and tokens is not None else 0
        return dict(self._configs[i])

    def _choose(self, opdef, node, choices: Mapping) -> tuple[str, dict | None] | None:
        """(implementation name, config) for ``node`` before the graph-safety rule; None: the op's GPU default
        (``tactics=DEFAULTS`` and no choice for the node)."""
        if node.name in choices:
            tactic, config = choices[node.name]
            if tactic != REFERENCE and tactic not in opdef.tactics:
                raise WorkbenchError(f"node {node.name!r} was tuned to tactic {tactic!r}, which op {opdef.name!r} "
                                     "does not have")
            return tactic, config
        if self.tactics is None:
            return REFERENCE, None
        if self.tactics == DEFAULTS:
            return None
        if isinstance(self.tactics, str):
            return (self.tactics if self.tactics in opdef.tactics else REFERENCE), None
        name = self.tactics.get(opdef.name)
        if name is None:
            return REFERENCE, None
        if name not in opdef.tactics:
            raise WorkbenchError(f"op {opdef.name!r} has no tactic {name!r}; it has: "
                                 f"{', '.join(opdef.tactics) or 'none'}")
        return name, None

    def _impl(self, registry: OpRegistry, node, choices: Mapping) -> tuple[str, Callable, dict | None]:
        opdef = registry.get(node.op)
        chosen = self._choose(opdef, node, choices)
        if chosen is None or (self.graph_safe and not opdef.is_graph_safe(chosen[0])):
            name, config, notes = gpu_choice(opdef, self._meta_args(node), chosen)
            self._note(notes)
        else:
            name, config = chosen
        fn = opdef.reference if name == REFERENCE else opdef.tactics[name]
        config = config if config and name != REFERENCE else None
        return name, (functools.partial(fn, config=config) if config else fn), config

    def _note(self, notes: list[str]) -> None:
        for line in notes:
            if line not in self.notes:  # one line per distinct reason, not per layer
                self.notes.append(line)

    def _meta_args(self, node) -> tuple[tuple, dict]:
        """The node's arguments as meta tensors of its static shapes (``meta_arguments``)."""
        if self._meta is None:
            self._meta = meta_arguments(self.graph)
        return self._meta(node)

    def _plan(self, registry: OpRegistry, choices: Mapping) -> list[tuple[str, Callable, list, dict, list[str]]]:
        last_use: dict[str, int] = {}
        for i, n in enumerate(self.graph.nodes):
            for r in n.refs():
                last_use[r] = i
        keep = set(self.graph.outputs) | set(self.graph.params)
        frees: list[list[str]] = [[] for _ in self.graph.nodes]
        for name, i in last_use.items():
            if name not in keep:
                frees[i].append(name)
        chosen = [self._impl(registry, n, choices) for n in self.graph.nodes]
        self._names.append({n.name: name for n, (name, _, _) in zip(self.graph.nodes, chosen)})
        self._configs.append({n.name: config for n, (_, _, config) in zip(self.graph.nodes, chosen)})
        self._unsafe.append([n.name for n, (name, _, _) in zip(self.graph.nodes, chosen)
                             if not registry.get(n.op).is_graph_safe(name)])
        return [(n.name, fn, _bind_device(n.args, self.device), _bind_device(n.kwargs, self.device), frees[i])
                for i, (n, (_, fn, _)) in enumerate(zip(self.graph.nodes, chosen))]

    @torch.no_grad()
    def run(self, *, keep_all: bool = False, _observe: tuple | None = None,
            **inputs: torch.Tensor) -> list[Any] | dict[str, Any]:
        """Run the graph on named inputs; returns the graph's outputs in order.

        With ``keep_all`` nothing is freed and every value is returned by name (for
        comparing two graphs node by node). ``_observe = (node names, fn)`` calls
        ``fn(name, op, args, kwargs)`` before those nodes run (the autotuner's recording)."""
        missing = set(self.graph.inputs) - set(inputs)
        if missing:
            raise WorkbenchError(f"graph inputs missing: {', '.join(sorted(missing))}")
        env: dict[str, Any] = dict(self.params)
        env.update({k: v.to(self.device) for k, v in inputs.items()})
        watched, observe = _observe or ((), None)
        plan = self._steps
        if self.tuned is not None and "input_ids" in inputs:
            plan = self._plans[self.tuned.bucket(inputs["input_ids"].numel())]
        from ..profiling.nvtx import op_ranges

        span = op_ranges()  # None (no per-node ranges) unless profiling asked for them; looked up once per run
        for (name, fn, args, kwargs, frees), node in zip(plan, self.graph.nodes):
            args, kwargs = _resolve(args, env), _resolve(kwargs, env)
            if name in watched:
                observe(name, node.op, tuple(args), kwargs)
            if span is None:
                env[name] = fn(*args, **kwargs)
            else:
                with span(f"{name} {node.op}"):
                    env[name] = fn(*args, **kwargs)
            if not keep_all:
                for f in frees:
                    del env[f]
        return env if keep_all else [env[o] for o in self.graph.outputs]

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for a flat batch: ``input_ids`` is [tokens] or [batch, tokens].

        Without ``position_ids`` each row is one sequence starting at position 0.
        """
        if is_paged(self.graph):
            raise WorkbenchError("this graph attends over a paged KV cache: run it with the attention metadata "
                                 "of workbench.graph.paged (e.g. workbench.evaluate.paged_greedy), not logits()")
        flat = input_ids.dim() == 1
        ids = input_ids.unsqueeze(0) if flat else input_ids
        if position_ids is None:
            pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        else:
            pos = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
        if pos.shape != ids.shape:
            raise WorkbenchError(f"position_ids shape {tuple(pos.shape)} does not match input_ids {tuple(ids.shape)}")
        self.graph.bind(batch=ids.shape[0], tokens=ids.shape[1])
        (out,) = self.run(input_ids=ids.long(), position_ids=pos.long().contiguous())
        return out[0] if flat else out

    __call__ = logits


def _triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: a CUDA device, or anywhere under ``TRITON_INTERPRET`` (tests)."""
    import os

    return device.type == "cuda" or bool(os.environ.get("TRITON_INTERPRET"))


def meta_arguments(graph: Graph) -> Callable[[Node], tuple[tuple, dict]]:
    """node -> its (args, kwargs) with every value ref replaced by a meta tensor of its static shape and dtype
    (symbolic dims at a small size: their range's minimum, or 16 where the range allows): what a tactic's
    ``supports`` and ``OpDef.default_impl`` read, without weights or a device. A value whose shape cannot be
    sized is None. The graph's specs are computed once, here."""
    specs = graph.specs()
    sizes = {d: max(r.get("min", 1), min(16, r.get("max", 16))) for d, r in graph.dims.items()}

    def meta(v):
        if isinstance(v, Ref):
            spec = specs.get(v.name)
            if spec is None:
                return None
            try:
                shape = spec.concrete_shape(sizes)
            except Exception:  # noqa: BLE001 - a dim this cannot size: the tactic sees no shape
                return None
            return torch.empty(shape, dtype=dtype_from_name(spec.dtype), device="meta")
        if isinstance(v, list):
            return [meta(x) for x in v]
        if isinstance(v, dict):
            return {k: meta(x) for k, x in v.items()}
        return v

    return lambda node: (tuple(meta(a) for a in node.args), {k: meta(v) for k, v in node.kwargs.items()})


def gpu_choice(opdef, meta_args: tuple[tuple, dict], chosen: tuple[str, dict | None] | None
               ) -> tuple[str, dict | None, list[str]]:
    """(implementation, config, notes) a GPU step runs for a node of ``opdef`` whose arguments are ``meta_args``
    (``meta_arguments``), given the implementation ``chosen`` for it (a tuned choice; None: none): ``chosen``
    where it is graph-safe, else the op's GPU default (``OpDef.default_impl``) where that is, else ``chosen``
    (or the default) as it is. ``notes``: one line per default passed over or choice replaced."""
    if chosen is not None and opdef.is_graph_safe(chosen[0]):
        return chosen[0], chosen[1], []
    name, notes = opdef.default_impl(*meta_args)
    if chosen is None:
        return name, None, notes
    if not opdef.is_graph_safe(name):  # nothing safer to run: the choice stands (its steps run eagerly)
        return chosen[0], chosen[1], notes
    return name, None, [*notes, f"{opdef.name}: {chosen[0]} is not CUDA-graph safe, running {name}"]


def gpu_fallback_notes(graph: Graph, choices: Mapping[str, tuple[str, dict | None]] | TunedChoices | None = None,
                       *, registry: OpRegistry = REGISTRY) -> list[str]:
    """The GPU kernel fallbacks of ``graph``, one line per distinct reason, found without a GPU or weights (for
    the build log): what ``Program.for_gpu_steps()`` records in ``notes`` (a default tactic passed over, with
    its one-line reason: not graph-safe, or its ``supports`` refuses the node's static shapes; a tuned choice
    that is not graph-safe, replaced), plus a line per op left with no graph-safe implementation (GPU steps
    that contain it run eagerly). ``choices``: the autotuner's, per node or ``TunedChoices``."""
    from ..kernels.autotune import tactic_ops

    tactic_ops()  # registers the Triton tactics (importing them needs no GPU)
    meta = meta_arguments(graph)
    per_bucket = choices.choices if isinstance(choices, TunedChoices) else [dict(choices or {})]
    notes: list[str] = []
    for bucket in per_bucket:
        for node in graph.nodes:
            opdef = registry.get(node.op)
            name, _, lines = gpu_choice(opdef, meta(node), bucket.get(node.name))
            if not opdef.is_graph_safe(name):
                lines.append(f"{opdef.name}: no CUDA-graph safe implementation; GPU steps with it run eagerly")
            notes += [line for line in lines if line not in notes]
    return notes


def resolve_params(graph: Graph, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values of every graph param from ``base`` (checkpoint tensors and constants by name, or a program's
    params, derived ones included), computing the derived ones that passes created and ``base`` lacks:

        cat        concatenation of inputs along ``dim`` (fused QKV / gate-up weights)
        transpose  input with ``dims`` swapped, stored contiguous (a weight transpose folded)
        tabulate   ``graph`` (an IR subgraph of position_ids) evaluated at positions 0..rows-1
        offset     input + ``value``, in fp32 (Gemma's norm weight 1 + w)
    """
    out = {}
    for name, p in graph.params.items():
        d = p.derived
        if name in base:
            out[name] = base[name]
            continue
        if not d:
            continue
        inputs = [base[src] for src, _aliases in d.get("inputs", [])]
        if d["op"] == "cat":
            out[name] = torch.cat(inputs, dim=d["dim"])
        elif d["op"] == "transpose":
            out[name] = inputs[0].transpose(*d["dims"]).contiguous()
        elif d["op"] == "offset":
            out[name] = inputs[0].float() + d["value"]
        elif d["op"] == "tabulate":
            sub = Graph.from_json(d["graph"])
            rows = d["rows"]
            positions = torch.arange(rows)[None]
            values = Program(sub, resolve_params(sub, base)).run(
                **{k: positions if k == "position_ids" else torch.zeros(1, rows, dtype=torch.long) for k in sub.inputs})
            out[name] = values[sub.outputs.index(d["output"])][0].contiguous()
        else:
            raise WorkbenchError(f"parameter {name!r} is derived by unknown op {d['op']!r}")
    return out


def _check_params(graph: Graph, params: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [n for n in graph.params if n not in params]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WorkbenchError(f"{len(missing)} graph parameters have no value: {shown}")
    out = {}
    for name, p in graph.params.items():
        t = params[name]
        if list(t.shape) != p.spec.shape:
            raise WorkbenchError(f"parameter {name!r} has shape {list(t.shape)}, the graph expects {p.spec.shape}")
        out[name] = t.to(device=device, dtype=dtype_from_name(p.spec.dtype))
    return out


def _bind_device(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.device):
        return device
    if isinstance(v, list):
        return [_bind_device(x, device) for x in v]
    if isinstance(v, dict):
        return {k: _bind_device(x, device) for k, x in v.items()}
    return v


def _resolve(v: Any, env: dict[str, Any]) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, list):
        return [_resolve(x, env) for x in v]
    if isinstance(v, dict):
        return {k: _resolve(x, env) for k, x in v.items()}
    return v
