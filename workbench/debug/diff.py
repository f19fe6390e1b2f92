"""Where a graph first goes wrong: its values, layer by layer, against transformers or against another graph.

Both sides of a comparison are reduced to a ``Trace``: the values of one prompt's prefill at named *sites*,
sites that every side has whatever its ops look like:

    embed                      the token embeddings (the residual stream entering layer 0)
    layers.<i>                 decoder layer i's output: the residual stream leaving it
    <module path>              the output of a module inside a decoder layer (model.layers.1.self_attn,
                               model.layers.1.mlp.down_proj, ...), the path transformers names it by
    norm                       the final norm's output
    logits                     the logits

On the transformers model they are forward hooks' outputs (``trace_model``). On a graph (``trace_program``)
they are found through the nodes' module paths (``Node.module``, kept by capture and by every pass), with two
rules, written down here because fusion makes both non-obvious:

* The residual stream is a chain of residual adds starting at the embedding: from the stream's current
  value, the next one is the node of ``RESIDUAL_ADDS`` that reads it (``aten.add.Tensor`` with a second
  tensor of the same shape, or the sum a fused ``add_rms_norm`` returns as output 1). The other operand, the
  branch, comes from some layer (its producer's module path ``...layers.<i>...``); layer i's output is the
  last stream value whose branch came from layer i. So after ``fuse_add_rms_norm`` layer 0's output is the
  sum inside layer 1's ``input_layernorm`` node (``add_rms_norm_3[1]``), and the last layer's is the sum inside
  the final norm's node, a value no ``getitem`` names.
* A module's output is the last node (in graph order) of the module or its submodules that is not a stream
  value and holds a floating tensor (not FP8: a quantized activation is not comparable with the model's);
  tuples are skipped (their ``getitem`` nodes follow). ``self_attn``'s is its o_proj; a fused QKV slice is
  ``q_proj``'s; a module a pass fused away (``act_fn`` in ``silu_mul``) has no node, so no row.

``compare(subject, reference)`` lines the sites up and measures, per site, the relative error (‖a − b‖ / ‖b‖
in float64), the cosine and the largest absolute difference. ``Divergence.layers`` is the per-layer table;
``Divergence.first`` is the first layer row (embed, 0, 1, ..., norm, logits) whose relative error passes the
tolerance, and in it the first module (in the subject's graph order) that does, with the errors of the sites
its inputs come from: small inputs mean this op made the error, large ones that it inherited it.

The tolerance (``tolerance``) follows the precision of the two sides, the larger of theirs: 1e-4 in
float32 (the reference ops reorder sums, a few 1e-6), 2e-2 in bfloat16 or float16 (a few roundings per
layer), and 1e-1 for a quantized graph (a precision plan with an FP8 or INT8 group or KV cache: FP8 e4m3 alone
rounds each value by up to 6%). Give ``tol`` to look closer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..errors import WorkbenchError
from ..graph.ir import Graph, Ref
from ..graph.paged import cache_for, is_paged

#: Ops whose value (None) or output i is ``a + b`` of two same-shaped tensors: the residual adds. A plugin that
#: fuses the residual add into a new op adds it here, or its graphs' layer outputs are not found.
#: the final norm's module name, by family: Llama's model.norm, GPT-2's and Falcon's ln_f, GPT-NeoX's final_layer_norm
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")

RESIDUAL_ADDS: dict[str, int | None] = {
    "aten.add.Tensor": None,
    "workbench.add_rms_norm": 1,
    "workbench.add_rms_norm_fp8": 1,
    "workbench.norm_add_rms_norm": 1,
    "workbench.norm_add_rms_norm_fp8": 1,
    "workbench.add_layer_norm": 1,
    "workbench.add_layer_norm_fp8": 1,
    # a tensor-parallel graph's all-reduce fused with the add and norm (``graph.passes.collective``)
    "workbench.all_reduce_add_rms_norm": 1,
    "workbench.all_reduce_add_rms_norm_fp8": 1,
    "workbench.all_reduce_norm_add_rms_norm": 1,
    "workbench.all_reduce_norm_add_rms_norm_fp8": 1,
}

#: Relative error a site may have before it counts as diverged, by the compute dtype (see the module docstring).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
#: ... and for a quantized graph.
QUANTIZED_TOLERANCE = 1e-1

#: Ops that hand the residual stream on unchanged when their output has its shape and dtype (a capture's
#: ``to(float32)`` of a float32 stream, which the norm and the residual add then share).
PASS_THROUGH = ("aten.to.", "aten._to_copy.", "aten.clone.", "aten.contiguous.", "aten.alias.")

#: Ops that only select or lay out values (a site made by these alone is a view of its inputs).
VIEW_OPS = ("aten.slice.", "aten.view.", "aten.reshape.", "aten.transpose.", "aten.select.", "aten.unsqueeze.",
            "aten.squeeze.", "aten.permute.", "aten.expand.", "aten.contiguous.", "aten.t.", "aten._unsafe_view.",
            "aten.split", "aten.chunk.", "operator.getitem")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # model.layers.3, or transformer.h.3 (GPT-2, Falcon)
_ENDS = ("embed",), ("norm", "logits")


def layer_of(module: str) -> int | None:
    """The decoder layer a module path belongs to (``model.layers.3.mlp`` -> 3), or None."""
    m = _LAYER.search(module or "")
    return int(m.group(1)) if m else None


def _layer_path(module: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``."""
    m = _LAYER.search(module)
    return module[:m.end()].rstrip(".")


@dataclass
class Site:
    """One value of a trace: ``key`` (see the module docstring), where it came from (``node``: a graph node,
    ``name[i]`` for output i of a tuple node, or a transformers module path; ``op``: the node's op or the
    module's class), its rank in the side's own order, and the value."""

    key: str
    kind: str               # "embed" | "stream" | "module" | "norm" | "logits"
    layer: int | None
    node: str
    op: str
    order: int
    value: torch.Tensor = field(repr=False)


@dataclass
class Trace:
    """A prefill's values at every site of one side (``label``: what ran it)."""

    label: str
    sites: dict[str, Site]
    dtype: str
    quantized: bool = False
    #: site key -> keys of the nearest sites upstream of it (a graph's; empty for transformers)
    upstream: dict[str, list[str]] = field(default_factory=dict)
    #: site key -> the nodes that made its value from those sites' ("name (op)", in graph order, itself last)
    between: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return 1 + max((s.layer for s in self.sites.values() if s.kind == "stream"), default=-1)

    def rows(self, start: int, stop: int, length: int) -> "Trace":
        """This trace at token positions ``start``..``stop - 1`` of its run over ``length`` tokens: each value cut
        along its sequence axis (``[1, length, ...]`` or ``[length, ...]``); a site without one is left out."""
        sites = {}
        for key, site in self.sites.items():
            axis = _sequence_axis(site.value, length)
            if axis is not None:
                sites[key] = replace(site, value=site.value.narrow(axis, start, stop - start))
        return replace(self, sites=sites)

    def next_token(self) -> int:
        """The greedy token after the last position: the argmax of the last row of the logits."""
        logits = self.sites["logits"].value
        return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


def _sequence_axis(value: torch.Tensor, length: int) -> int | None:
    """The axis of ``value`` that runs over a sequence of ``length`` tokens: 1 of a batch of one, else 0."""
    if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == length:
        return 1
    return 0 if value.dim() >= 1 and value.shape[0] == length else None


# ---- transformers ----------------------------------------------------------------------------------------------
def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return name, mod
    raise WorkbenchError(f"{type(model).__name__} has no ModuleList named 'layers' or 'h'; diff knows decoder "
                         "models whose layers are model.layers.<i> (or transformer.h.<i>)")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


@torch.no_grad()
def trace_model(model: torch.nn.Module, ids: Sequence[int], *, label: str = "transformers") -> Trace:
    """Sites of a transformers causal LM's forward over ``ids`` (one sequence), by forward hooks."""
    prefix, layers = _decoder_layers(model)
    base = prefix.rpartition(".")[0]
    embed = model.get_input_embeddings()
    names = {mod: name for name, mod in model.named_modules()}
    # the final norm: Llama's model.norm, GPT-2's and Falcon's transformer.ln_f, GPT-NeoX's final_layer_norm
    norm_names = {f"{base}.{n}" if base else n for n in FINAL_NORMS}
    sites: dict[str, Site] = {}

    def hook(key, kind, layer, path):
        def fn(mod, args, out):
            t = _first_tensor(out)
            if t is not None:
                sites[key] = Site(key, kind, layer, path, type(mod).__name__, len(sites), t.detach())
        return fn

    handles = [embed.register_forward_hook(hook("embed", "embed", None, names[embed]))]
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            path = f"{prefix}.{i}" + (f".{name}" if name else "")
            if name:
                handles.append(mod.register_forward_hook(hook(path, "module", i, path)))
        # registered last on the layer: runs after its submodules' hooks, as its output comes after theirs
        handles.append(layer.register_forward_hook(hook(f"layers.{i}", "stream", i, f"{prefix}.{i}")))
    for name, mod in model.named_modules():
        if name in norm_names:
            handles.append(mod.register_forward_hook(hook("norm", "norm", None, name)))
    try:
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sites["logits"] = Site("logits", "logits", None, "lm_head", type(model).__name__, len(sites), out.logits.detach())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return Trace(label, sites, dtype)


# ---- graphs ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_inputs(program, ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The graph inputs of one sequence's prefill of ``ids``: a paged graph's on a fresh cache, any other graph's as
    a batch of one row."""
    graph, ids = program.graph, list(ids)
    if is_paged(graph):
        return _cached_step(program, _sequence_cache(program, len(ids)), ids)
    inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.arange(len(ids))[None]}
    if "logits_indices" in graph.inputs:
        inputs["logits_indices"] = torch.arange(len(ids))
    return inputs


def _sequence_cache(program, tokens: int):
    """A fresh paged KV cache of ``program``'s graph that holds one sequence of ``tokens`` tokens."""
    from ..graph.paged import PagedLayout

    return cache_for(program.graph, num_blocks=PagedLayout.from_graph(program.graph).blocks_for(tokens),
                     device=program.device)


def _cached_step(program, cache, new: list[int]) -> dict[str, torch.Tensor]:
    """The inputs of a step of sequence 0 that adds ``new`` tokens to ``cache`` (every new row's logits)."""
    inputs = cache.step_inputs([(0, new)])
    if "logits_indices" in program.graph.inputs:
        inputs["logits_indices"] = torch.arange(len(new), device=program.device)
    return inputs


def run_values(program, ids: Sequence[int]) -> dict[str, Any]:
    """Every value of ``program``'s graph over one sequence's prefill of ``ids`` (``run_inputs``)."""
    return program.run(keep_all=True, **run_inputs(program, ids))


def _value(values: dict[str, Any], name: str, index: int | None):
    v = values.get(name)
    if index is not None:
        v = v[index] if isinstance(v, (tuple, list)) and len(v) > index else None
    return v


def _comparable(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.element_size() > 1 and v.numel() > 0


def _label(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


def residual_stream(graph: Graph) -> list[tuple[str, int | None, int | None]]:
    """The residual stream's values in order: (node, output index or None, layer of the branch added), starting
    with the embedding (branch layer None). See the module docstring."""
    nodes = {n.name: n for n in graph.nodes}
    specs = graph.specs()
    readers: dict[str, list] = {}
    for n in graph.nodes:
        for r in set(n.refs()):
            readers.setdefault(r, []).append(n)
    start = next((n for n in graph.nodes if "embedding" in n.op and "input_ids" in set(n.refs())), None)
    if start is None:
        raise WorkbenchError("the graph has no embedding of input_ids to start its residual stream from")
    while True:  # the embedding module's own output: Gemma's lookup times sqrt(hidden) (its scaled embedding)
        after = [r for r in readers.get(start.name, []) if r.module == start.module and start.module
                 and _same(specs.get(r.name), specs.get(start.name))]
        if len(after) != 1 or len(readers.get(start.name, [])) != 1:
            break
        start = after[0]

    def alias(name: str, index: int | None) -> str | None:
        """The node that names output ``index`` of ``name`` (a getitem), or ``name`` itself."""
        if index is None:
            return name
        for r in readers.get(name, []):
            if r.op == "operator.getitem" and len(r.args) > 1 and r.args[1] == index:
                return r.name
        return None

    def branch_layer(name: str) -> int | None:
        todo, seen = [name], set()
        while todo:  # nearest producer with a layer (through views with no module of their own)
            cur = todo.pop(0)
            if cur in seen or cur not in nodes:
                continue
            seen.add(cur)
            layer = layer_of(nodes[cur].module)
            if layer is not None:
                return layer
            todo += list(nodes[cur].refs())
        return None

    stream = [(start.name, None, None)]
    while True:
        name, index, _ = stream[-1]
        current = alias(name, index)
        spec = specs.get(current) if current else None
        names = [current] if current else []
        for cur in names:  # the stream's value and its unchanged copies
            names += [r.name for r in readers.get(cur, []) if r.op.startswith(PASS_THROUGH) and r.args
                      and r.args[0] == Ref(cur) and _same(specs.get(r.name), spec) and r.name not in names]
        nxt = None
        for r in (r for cur in names for r in readers.get(cur, [])):
            if r.op not in RESIDUAL_ADDS:
                continue
            refs = [a.name for a in r.args[:2] if isinstance(a, Ref)]
            if len(refs) != 2 or not set(refs) & set(names):
                continue
            other = refs[1] if refs[0] in names else refs[0]
            if spec is not None and specs.get(other) is not None and list(specs[other].shape) != list(spec.shape):
                continue
            nxt = (r.name, RESIDUAL_ADDS[r.op], branch_layer(other))
            break
        if nxt is None:
            return stream
        stream.append(nxt)


def _same(a, b) -> bool:
    return a is not None and b is not None and list(a.shape) == list(b.shape) and a.dtype == b.dtype


def _upstream(nodes: dict[str, Any], site_of: dict[str, str], start: str) -> tuple[list[str], list[str]]:
    """Keys of the nearest sites upstream of node ``start`` (``nodes``: the graph's nodes by name), and the nodes
    between them and ``start`` (no site themselves; what made the site's value from theirs)."""
    found, inner, todo, seen = [], [], list(nodes[start].refs()) if start in nodes else [], set()
    while todo:
        cur = todo.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        if cur in site_of:
            if site_of[cur] not in found:
                found.append(site_of[cur])
        elif cur in nodes:
            inner.append(cur)
            todo += list(nodes[cur].refs())
    return found, inner


def is_quantized(graph: Graph) -> bool:
    """Whether a precision plan put any group or the KV cache of ``graph`` below the model's precision."""
    plan = graph.meta.get("precision") or {}
    formats = [g.get("format") for g in (plan.get("groups") or {}).values()] + [plan.get("kv_cache")]
    return any(f not in (None, "bf16") for f in formats)


def trace_program(program, ids: Sequence[int], *, label: str = "workbench") -> Trace:
    """Sites of a workbench program's prefill of ``ids`` (see the module docstring for how they are found)."""
    return trace_values(program, run_values(program, ids), label=label)


@torch.no_grad()
def trace_steps(program, ids: Sequence[int], steps: int, *, tokens: Sequence[int] | None = None,
                label: str = "workbench") -> tuple[list[Trace], list[int]]:
    """The traces of the prefill of ``ids`` (step 0) and of ``steps`` decode steps after it, and the tokens the
    decode steps were fed. Decode step k feeds one token at position ``len(ids) + k - 1``: through a paged graph's
    KV cache, filled by the steps before, as the runtime decodes (so a decode kernel's or the cache's error shows
    at its step); a graph without paged attention recomputes the whole sequence and its last row is kept. The
    tokens are ``tokens`` (another side's, so both see the same inputs), else each step's greedy token."""
    graph, ids = program.graph, list(ids)
    fed = [int(t) for t in tokens] if tokens is not None else []
    if tokens is not None and len(fed) < steps:
        raise WorkbenchError(f"{steps} decode steps need {steps} tokens to feed, got {len(fed)}")
    traces: list[Trace] = []
    if is_paged(graph):
        cache = _sequence_cache(program, len(ids) + steps)
        new = ids
        for k in range(steps + 1):
            values = program.run(keep_all=True, **_cached_step(program, cache, new))
            traces.append(trace_values(program, values, label=label))
            if k < steps:
                if len(fed) <= k:
                    fed.append(traces[-1].next_token())
                new = [fed[k]]
    else:
        for k in range(steps + 1):
            seq = ids + fed[:k]
            trace = trace_program(program, seq, label=label)
            traces.append(trace.rows(len(seq) - 1, len(seq), len(seq)) if k else trace)
            if k < steps and len(fed) <= k:
                fed.append(trace.next_token())
    return traces, fed[:steps]


def step_rows(trace: Trace, prompt: int, steps: int) -> list[Trace]:
    """A trace of one run over a prompt of ``prompt`` tokens and ``steps`` more, cut as ``trace_steps`` returns its
    steps: the prompt's rows, then each later position's row."""
    length = prompt + steps
    return [trace.rows(0, prompt, length)] + [trace.rows(prompt + k - 1, prompt + k, length)
                                              for k in range(1, steps + 1)]


def trace_values(program, values: dict[str, Any], *, label: str = "workbench") -> Trace:
    """Sites of a workbench program among ``values``, every value of one run of it (``program.run(keep_all=True,
    ...)``)."""
    graph = program.graph
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    stream = residual_stream(graph)
    stream_names = {_label(n, i) for n, i, _ in stream}
    getitems = {(n.args[0].name, n.args[1]): n.name for n in graph.nodes
                if n.op == "operator.getitem" and len(n.args) > 1 and isinstance(n.args[0], Ref)}
    stream_names |= {getitems[(n, i)] for n, i, _ in stream if (n, i) in getitems}
    sites: dict[str, Site] = {}
    node_of: dict[str, str] = {}  # key -> the node name upstream search starts from

    def add(key, kind, layer, name, index):
        v = _value(values, name, index)
        if not _comparable(v):
            return
        node = by_name[name]
        src, idx = name, index
        if node.op == "operator.getitem" and isinstance(node.args[0], Ref):  # named by the op that made it
            src, idx = node.args[0].name, node.args[1]
        sites[key] = Site(key, kind, layer, _label(src, idx), by_name[src].op, order[name], v)
        node_of[key] = getitems.get((name, index), name) if index is not None else name

    name, index, _ = stream[0]
    add("embed", "embed", None, name, index)
    last: dict[int, tuple[str, int | None]] = {}
    for name, index, layer in stream[1:]:
        if layer is not None:
            last[layer] = (name, index)
    for layer in sorted(last):
        add(f"layers.{layer}", "stream", layer, *last[layer])
    modules: dict[str, str] = {}  # module path -> its last eligible node
    for n in graph.nodes:
        layer = layer_of(n.module)
        if layer is None or n.name in stream_names or not _comparable(values.get(n.name)):
            continue
        top = _layer_path(n.module)
        parts = n.module.split(".")
        for k in range(len(top.split(".")) + 1, len(parts) + 1):
            modules[".".join(parts[:k])] = n.name
    for path, name in modules.items():
        add(path, "module", layer_of(path), name, None)
    norm = _final_norm(graph)
    if norm is not None:
        add("norm", "norm", None, norm, None)
    add("logits", "logits", None, graph.outputs[0], None)
    site_of = {}
    for key, site in sorted(sites.items(), key=lambda kv: len(kv[0])):  # the most specific key of a node wins
        site_of[node_of[key]] = key
    upstream, between = {}, {}
    for key in sites:
        upstream[key], inner = _upstream(by_name, site_of, node_of[key])
        ops = [(by_name[n].name, by_name[n].op) for n in sorted([*inner, node_of[key]], key=order.get)
               if by_name[n].op != "operator.getitem"]
        between[key] = [f"{n} ({op})" for n, op in ops]
    dtype = str(graph.meta.get("dtype", "float32"))
    return Trace(label, sites, dtype, is_quantized(graph), upstream, between)


def _final_norm(graph: Graph) -> str | None:
    """The final norm's output: from the logits back through nodes outside any layer to the first node whose
    module is a norm (``model.norm``)."""
    nodes = {n.name: n for n in graph.nodes}
    cur = graph.outputs[0]
    for _ in range(16):
        n = nodes.get(cur)
        if n is None:
            return None
        last = n.module.rsplit(".", 1)[-1]
        if layer_of(n.module) is None and last in FINAL_NORMS and n.op != "operator.getitem" \
                or (n.op == "operator.getitem" and last in FINAL_NORMS):
            return cur
        refs = [a.name for a in n.args if isinstance(a, Ref)]
        if not refs:
            return None
        cur = refs[0]
    return None


# ---- comparing -------------------------------------------------------------------------------------------------
def tolerance(*traces: Trace) -> float:
    """The relative error that counts as a divergence between ``traces`` (see the module docstring)."""
    tol = max(TOLERANCE.get(t.dtype, 2e-2) for t in traces)
    return max(tol, QUANTIZED_TOLERANCE) if any(t.quantized for t in traces) else tol


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float] | None:
    """(relative error ‖a − b‖ / ‖b‖, cosine, max |a − b|) in float64, or None where the shapes cannot be
    lined up (a flat batch [1, T, ...] and a row [T, ...] can)."""
    if a.shape != b.shape:
        if a.numel() != b.numel():
            return None
        a = a.reshape(b.shape)
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    diff = a - b
    rel = float(diff.norm() / b.norm().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-30))
    return rel, cos, float(diff.abs().max())


@dataclass
class First:
    """The first divergence: the layer row (``layer``: an int, "embed", "norm" or "logits"), the first site in it
    past the tolerance (``site``, its ``node`` and ``op`` on the subject's side), its error, and the errors of
    the sites its inputs come from (``inputs``: key -> relative error)."""

    layer: int | str
    site: str
    node: str
    op: str
    rel_err: float
    inputs: dict[str, float]
    tol: float
    #: the subject's nodes from the input sites to this one ("name (op)"): one of them made the error
    nodes: list[str] = field(default_factory=list)
    #: the step: 0 the prompt's prefill, k > 0 the k-th decode step after it (``diff(..., steps=N)``)
    step: int = 0

    @property
    def views_only(self) -> bool:
        """Whether the nodes that made this site from its inputs only slice or reshape (a fused QKV's v part):
        then the error was made upstream and lies mostly in this part of it."""
        return bool(self.nodes) and all(n.split(" (", 1)[1].startswith(VIEW_OPS) for n in self.nodes)

    @property
    def origin(self) -> str:
        """"this op" when every input is within the tolerance (the error starts here), "inherited" when one is
        not, "upstream" when this site is only a view of its inputs (``views_only``)."""
        if any(e > self.tol for e in self.inputs.values()):
            return "inherited"
        return "upstream" if self.views_only else "this op"

    def line(self) -> str:
        where = f"layer {self.layer}" if isinstance(self.layer, int) else self.layer
        if self.step:
            where = f"decode step {self.step}, {where}"
        ins = ", ".join(f"{k} {e:.1e}" for k, e in self.inputs.items()) or "none compared"
        line = (f"first divergence: {where}, {self.site} at node {self.node} ({self.op}): rel err "
                f"{self.rel_err:.2e} > {self.tol:.0e}; inputs: {ins} -> {self.origin}")
        if self.origin == "upstream":
            line += f" (a view of {', '.join(self.inputs) or 'its input'}: made there, concentrated in this part)"
        elif self.origin == "this op" and len(self.nodes) > 1:
            line += f" (made by one of: {', '.join(self.nodes)})"
        return line


#: How the tables print: errors in 3 digits, the cosine to 1e-6 (0.999 and 1.000 differ a lot here).
FORMATTERS = {"rel_err": "{:.2e}".format, "max_abs": "{:.2e}".format, "cosine": "{:.6f}".format}


@dataclass(eq=False)  # compared by identity: its table is a DataFrame (steps.index(first_step) must work)
class Divergence:
    """A comparison of two traces: ``table`` has one row per site both have (key, kind, layer, node, op, ref_node,
    rel_err, cosine, max_abs) in the subject's order; ``layers`` its layer rows; ``first`` the first divergence
    (None: every layer within ``tol``)."""

    subject: str
    reference: str
    tol: float
    table: Any  # pandas.DataFrame
    first: First | None
    #: the decode steps after the prompt (``diff(..., steps=N)``): step k's comparison is ``decode[k - 1]``
    decode: list["Divergence"] = field(default_factory=list)
    #: the token each decode step fed (the subject's greedy tokens, fed to both sides)
    tokens: list[int] = field(default_factory=list)

    @property
    def steps(self) -> list["Divergence"]:
        """The prefill's comparison (this one), then each decode step's."""
        return [self, *self.decode]

    @property
    def first_step(self) -> "Divergence | None":
        """The first step (prefill, then decode steps) that diverges; None when none does."""
        return next((d for d in self.steps if d.first is not None), None)

    def by_step(self):
        """The layer rows of every step: step (0 the prefill), layer, node, op, rel_err, cosine, max_abs."""
        import pandas as pd

        return pd.concat([d.layers.assign(step=k) for k, d in enumerate(self.steps)], ignore_index=True)[
            ["step", "layer", "node", "op", "rel_err", "cosine", "max_abs"]]

    def step_table(self):
        """The layers' relative error by step: one row per layer (embed, 0, 1, ..., norm, logits), one column per
        step ("prefill", "decode 1", ...)."""
        import pandas as pd

        columns = {"prefill" if k == 0 else f"decode {k}": d.layers.set_index(d.layers.layer.astype(str)).rel_err
                   for k, d in enumerate(self.steps)}
        table = pd.DataFrame(columns)
        table.index.name = "layer"
        return table.loc[[str(v) for v in self.layers.layer]].reset_index()

    @property
    def layers(self):
        """One row per layer (embed, 0, 1, ..., norm, logits): layer, node, op, rel_err, cosine, max_abs."""
        rows = self.table[self.table.kind != "module"]
        return rows[["layer", "node", "op", "rel_err", "cosine", "max_abs"]].reset_index(drop=True)

    @property
    def logits_rel_err(self) -> float:
        """The logits' relative error (NaN where the traces have no logits row)."""
        rows = self.table[self.table.kind == "logits"]
        return float(rows.rel_err.iloc[0]) if len(rows) else math.nan

    def nodes(self, layer: int):
        """The rows of one layer: its modules in the subject's order, then its output."""
        t = self.table
        return t[t.layer.apply(lambda v: v == layer and not isinstance(v, str))].reset_index(drop=True)

    def line(self) -> str:
        first = self.first_step
        if first is None:
            steps = f" in the prefill and {len(self.decode)} decode steps" if self.decode else ""
            return f"no divergence: every layer of {self.subject} is within {self.tol:.0e} of {self.reference}{steps}"
        if first is not self:
            return "the prefill is within tolerance; " + first.first.line()
        return self.first.line()

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 12):
            if self.decode:
                table = self.step_table().to_string(index=False, float_format="{:.2e}".format)
                table = f"relative error by step (decode tokens fed: {self.tokens})\n{table}"
            else:
                table = self.layers.to_string(index=False, formatters=FORMATTERS)
        return f"{self.subject} against {self.reference}\n{table}\n{self.line()}"


def compare_steps(subject: Sequence[Trace], reference: Sequence[Trace], *, tol: float | None = None,
                  tokens: Sequence[int] = ()) -> Divergence:
    """``compare`` of each step's traces (``trace_steps``: the prefill, then the decode steps): the prefill's
    Divergence, with the decode steps' in ``decode`` and the tokens fed in ``tokens``."""
    if len(subject) != len(reference) or not subject:
        raise WorkbenchError(f"the two sides ran {len(subject)} and {len(reference)} steps; compare the same steps")
    tol = tolerance(*subject, *reference) if tol is None else tol
    steps = [compare(a, b, tol=tol) for a, b in zip(subject, reference)]
    for k, d in enumerate(steps):
        if d.first is not None:
            d.first.step = k
    return replace(steps[0], decode=steps[1:], tokens=list(tokens))


def compare(subject: Trace, reference: Trace, *, tol: float | None = None) -> Divergence:
    """Line up the sites of ``subject`` and ``reference`` and find the first divergence (module docstring)."""
    import pandas as pd

    tol = tolerance(subject, reference) if tol is None else tol
    rows, err = [], {}
    for key, site in sorted(subject.sites.items(), key=lambda kv: kv[1].order):
        ref = reference.sites.get(key)
        e = errors(site.value, ref.value) if ref is not None else None
        if e is None:
            continue
        err[key] = e[0]
        layer = site.layer if site.kind in ("stream", "module") else site.kind
        rows.append({"key": key, "kind": site.kind, "layer": layer, "node": site.node, "op": site.op,
                     "ref_node": ref.node, "rel_err": e[0], "cosine": e[1], "max_abs": e[2]})
    # modules of a layer come before its output (the output of layer i can be computed inside layer i+1's node)
    rank = {"embed": -1, "norm": 1 << 30, "logits": (1 << 30) + 1}
    table = pd.DataFrame(rows, columns=["key", "kind", "layer", "node", "op", "ref_node", "rel_err", "cosine",
                                        "max_abs"])
    if len(table):
        table["_rank"] = [rank.get(r.layer, 0) if isinstance(r.layer, str) else r.layer for r in table.itertuples()]
        table["_out"] = (table.kind != "module").astype(int)
        table = table.sort_values(["_rank", "_out"], kind="stable").drop(columns=["_rank", "_out"])
        table = table.reset_index(drop=True)
    first = None
    for row in table[table.kind != "module"].itertuples():
        if not row.rel_err <= tol:  # NaN counts as diverged
            inside = table[(table.kind == "module") & table.layer.apply(lambda v: v == row.layer
                                                                       and not isinstance(v, str))]
            hit = next((r for r in inside.itertuples() if not r.rel_err <= tol), row)
            inputs = {k: err[k] for k in subject.upstream.get(hit.key, []) if k in err}
            if hit.kind == "stream" or not inputs:  # say at least what entered the layer
                entering = "embed" if row.layer in (0, "embed") or not isinstance(row.layer, int) \
                    else f"layers.{row.layer - 1}"
                if entering in err and entering != hit.key:
                    inputs = {entering: err[entering], **inputs}
            first = First(row.layer, hit.key, hit.node, hit.op, hit.rel_err, inputs, tol,
                          subject.between.get(hit.key, []))
            break
    return Divergence(subject.label, reference.label, tol, table, first)


# ---- what the command line compares ----------------------------------------------------------------------------
#: The reference ``diff`` compares with when none is named.
HF = "hf"
STAGES = ("capture", "passes", "quant", "tune")


#: The most decode steps ``diff`` runs after the prompt (each keeps every value of the graph).
MAX_STEPS = 64


def diff(target, *, stage: str = "latest", against: str = HF, ids: Sequence[int] | None = None,
         prompt: str | None = None, device: str | torch.device = "auto", tol: float | None = None,
         hf_dtype: str | None = None, steps: int = 0) -> Divergence:
    """Where ``target`` (a workspace, an engine directory or a model source; ``stage`` picks a workspace's graph)
    first goes wrong against ``against``: ``"hf"`` (the transformers model of its source, in the graph's dtype
    unless ``hf_dtype``), a stage of the same workspace (``"capture"``, ``"passes"``, ``"quant"``), or another
    engine directory or workspace. The prompt is ``ids``, else ``prompt`` through the model's tokenizer, else
    16 seeded random ids (a model with random weights has no tokenizer). Both sides run on ``device``.

    ``steps`` N > 0 also compares N decode steps after the prompt (``trace_steps``): the subject decodes one token
    a step through its paged KV cache, fed its own greedy tokens; a reference graph with paged attention decodes
    the same tokens through its own cache, transformers and graphs without one run the whole sequence once and
    each step is its row. The result's ``decode`` holds the steps' comparisons."""
    from ..device import resolve_device
    from ..runnable import open_runnable

    if hf_dtype is not None and against != HF:
        raise WorkbenchError(f"hf_dtype sets the transformers model's dtype; against={against!r} compares with a "
                             "graph, which runs in its own")
    if not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise WorkbenchError(f"steps is the number of decode steps after the prompt, 0 to {MAX_STEPS}; got {steps!r}")
    device = resolve_device(device)
    subject = open_runnable(target, device=device, stage=stage, paged=False, progress=False)
    ids = prompt_ids(subject, ids, prompt)
    label = f"{target} ({subject.stage})" if subject.kind == "workspace" else str(target)
    mine, tokens = trace_steps(subject.program, ids, steps, label=label)
    kind, ref, ref_label = _reference(subject, against, target, device, hf_dtype)
    if kind == "graph" and is_paged(ref.graph):
        theirs, _ = trace_steps(ref, ids, steps, tokens=tokens, label=ref_label)
    else:  # one run over the prompt and the tokens fed, cut into the steps' rows
        whole = list(ids) + tokens
        run = trace_model(ref, whole, label=ref_label) if kind == "hf" else trace_program(ref, whole, label=ref_label)
        theirs = step_rows(run, len(ids), steps) if steps else [run]
    return compare_steps(mine, theirs, tol=tol, tokens=tokens)


def _reference(subject, against: str, target, device, hf_dtype):
    """What ``diff`` compares ``subject`` with: ("hf", the transformers model, its label) or ("graph", a program,
    its label)."""
    from ..runnable import open_runnable

    if against == HF:
        if subject.source is None:
            raise WorkbenchError(f"{target} does not record the model it came from; compare it with another engine "
                                 "or stage (--against), or diff the workspace it was exported from")
        from ..graph.ir import dtype_from_name
        from ..models.intake import load_model

        dtype = hf_dtype or subject.program.graph.meta.get("dtype", "float32")
        model = load_model(subject.source, dtype=dtype_from_name(dtype), device=str(device)).model.eval()
        return "hf", model, f"transformers ({dtype})"
    if against in STAGES:
        if subject.kind != "workspace":
            raise WorkbenchError(f"--against {against} names a stage of a workspace, and {target} is not one; give "
                                 "the workspace, or --against hf or another engine directory")
        other = open_runnable(target, device=device, stage=against, paged=False, progress=False)
        return "graph", other.program, f"{target} ({against})"
    other = open_runnable(against, device=device, paged=False, progress=False)
    return "graph", other.program, str(against)


def prompt_ids(runnable, ids: Sequence[int] | None, prompt: str | None) -> list[int]:
    """The token ids ``diff`` runs: ``ids``, or ``prompt`` tokenized, or 16 seeded random ids."""
    if ids is not None and prompt is not None:
        raise WorkbenchError("give a prompt or token ids, not both")
    vocab = runnable.program.graph.meta.get("config", {}).get("vocab_size")
    if ids is not None:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if not ids or bad:
            raise WorkbenchError(f"token ids must be one or more integers in [0, {vocab}); got {bad or 'none'}")
        return ids
    if prompt is not None:
        if runnable.tokenizer is None:
            raise WorkbenchError("this model has random weights and no tokenizer; give token ids (--ids 1,2,3) "
                                 "instead of a prompt")
        ids = list(runnable.tokenizer(prompt).input_ids)
        if not ids:
            raise WorkbenchError(f"the prompt {prompt!r} tokenizes to no tokens")
        return ids
    if runnable.tokenizer is not None:
        return list(runnable.tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab or 2, (16,), generator=g).tolist()
