"""Applying a precision plan: the graph's linears rewritten into quantized ops, with quantized weights.

    graph_q, tensors = quantize_graph(graph, params, plan, stats)
    program_q = quantized_program(program, plan, stats)          # the same, bound and ready to run

Per group (see ``plan``):

    fp8      aten.linear -> workbench.fp8_linear(x, W_q fp8, W scale, x scale | None, bias)
    int8_wo  aten.linear -> workbench.w8_linear(x, W_q int8, W scale, bias)
    int8_sq  x' = x / s and W' = W · s (SmoothQuant), then workbench.int8_linear(x', W'_q, ...):
             1/s is folded into the weight of the RMSNorm that produces x when only this group reads
             that norm's output (the q/k/v and gate/up inputs), into a LayerNorm's weight and bias alike;
             elsewhere (o, down, and a norm two groups read: Falcon-7B's) an explicit multiply by 1/s is
             inserted before the GEMM
    kv fp8   every paged attention node gets its layer's scales as keyword arguments (k_scale=, v_scale=)
             and the KV cache inputs become float8_e4m3fn

**FP8 producers.** Where an fp8 group has static activation scales and its x is written by an RMSNorm,
a residual add + RMSNorm, SwiGLU's silu_mul or GeGLU's gelu_mul read by nobody else, that op is replaced by its FP8
variant (``workbench.rms_norm_fp8``, ``add_rms_norm_fp8``, ``silu_mul_fp8``, ``gelu_mul_fp8``, see ``kernels/fused.py``;
Gemma's ``norm_add_rms_norm`` and the LayerNorm families' ``layer_norm``, ``add_layer_norm`` and ``gelu`` likewise,
``kernels/fused_ln.py``),
which writes x already quantized with the group's scale: the linears then read fp8 x and run the GEMM
alone, as TensorRT-LLM's FP8 graphs do. The result is bit-identical to the unfused graph (the same
rounding, then the same quantization); ``fuse_producers=False`` leaves them unfused. The report says,
per group, which op quantizes x (``x_quantized_by``).

Weight scales are amax / qmax per output channel (or per tensor); activation scales come from
the calibration statistics (static), or are computed per token at run time (dynamic). The new
tensors are parameters of kind ``quantized`` (their values come from the quant stage's
safetensors file, not from the checkpoint); weights nobody reads any more leave the graph.
The quantized ops' references are the CPU path; their GPU tactics are in ``kernels/gemm.py``.
"""

from __future__ import annotations

import torch

from ..errors import WorkbenchError
from ..graph.ir import Graph, Node, Param, Ref, TensorSpec, dtype_from_name, dtype_name
from ..graph.paged import PagedLayout, is_paged
from ..graph.rewrite import Rewriter
from ..kernels.gemm import fp8_scale, int8_scale, quantize_fp8, quantize_int8
from .calibrate import CalibrationStats
from .plan import PrecisionPlan, linear_groups

SMOOTH_MIN = 1e-5  # floor of SmoothQuant's factors and of the maxima they are made from
_NORMS = ("workbench.rms_norm", "workbench.add_rms_norm")


def _needs_stats(plan: PrecisionPlan) -> bool:
    return plan.kv_cache == "fp8" or any(
        plan.format_of(g) == "int8_sq" or (plan.format_of(g) == "fp8" and plan.options(g)["activations"] == "static")
        for g in plan.groups)


def smoothing_factors(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) over the group's weights (one input)."""
    w_amax = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    a = x_amax.float().to(w_amax.device).clamp(min=SMOOTH_MIN)
    return (a.pow(alpha) / w_amax.clamp(min=SMOOTH_MIN).pow(1 - alpha)).clamp(min=SMOOTH_MIN)


class _Builder:
    def __init__(self, graph: Graph, params: dict[str, torch.Tensor]) -> None:
        self.rw = Rewriter(graph)
        self.params = params
        self.new: dict[str, torch.Tensor] = {}

    def param(self, name: str, value: torch.Tensor) -> Ref:
        value = value.detach().contiguous()
        self.rw.graph.params[name] = Param(name, "quantized", TensorSpec(list(value.shape), dtype_name(value.dtype)))
        self.new[name] = value
        return Ref(name)

    def value(self, ref) -> torch.Tensor:
        return self.new[ref.name] if ref.name in self.new else self.params[ref.name]

    def replace(self, old: Node, op: str, args: list) -> Node:
        node = Node(self.rw.fresh(old.name + "_q"), op, args, {}, list(old.outputs), old.module, old.layer)
        self.rw.insert_before(old, node)
        self.rw.replace_uses(old.name, Ref(node.name))
        return node


def _weight_q(w: torch.Tensor, fmt: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale_fn, quant_fn = (fp8_scale, quantize_fp8) if fmt == "fp8" else (int8_scale, quantize_int8)
    w = w.detach().float()
    if per_channel:
        s = scale_fn(w, dim=1)
        return quant_fn(w, s), s.reshape(-1)
    s = scale_fn(w)
    return quant_fn(w, s), s.reshape(1)


#: norm op -> (the argument index of its weight, of its bias or None); the fused-add variants return (normed, sum)
_NORM_AFFINE = {"workbench.rms_norm": (1, None), "workbench.add_rms_norm": (2, None),
                "workbench.norm_add_rms_norm": (3, None),  # Gemma's: the next norm's weight scales the normed output
                "workbench.layer_norm": (1, 2), "workbench.add_layer_norm": (2, 3)}


def _fold_target(b: _Builder, group, x: Ref) -> list[Ref] | None:
    """The norm's weight (and a LayerNorm's bias) to divide by s, if x is a norm's normed output read only by this
    group's nodes: norm(x)·w/s + b/s = (norm(x)·w + b)/s."""
    rw = b.rw
    node = rw.producer(x)
    if node is None:
        return None
    norm = node
    if node.op == "operator.getitem":  # add_rms_norm returns (normed, residual); index 0 is normed
        src = rw.producer(node.args[0])
        if src is None or src.op not in _ADD_NORMS or node.args[1] != 0:
            return None
        norm = src
    elif node.op not in ("workbench.rms_norm", "workbench.layer_norm"):
        return None
    w_at, b_at = _NORM_AFFINE[norm.op]
    targets = [norm.args[i] for i in (w_at, b_at) if i is not None and norm.args[i] is not None]
    if not all(isinstance(t, Ref) and t.name in rw.graph.params for t in targets) or not targets \
            or targets[0] != norm.args[w_at]:
        return None
    readers = {u.name for u in rw.users.get(x.name, [])}
    if not readers <= set(group.nodes) or x.name in rw.graph.outputs:
        return None
    if any({u.name for u in rw.users.get(t.name, [])} != {norm.name} for t in targets):
        return None
    return targets


def _smooth_input(b: _Builder, group, first: Node, s: torch.Tensor) -> tuple[Ref, bool]:
    """x / s: folded into the producing norm's weight (and bias) when possible, else an inserted multiply."""
    x = first.args[0]
    targets = _fold_target(b, group, x)
    if targets is not None:
        norm = next(u for u in b.rw.users[targets[0].name])
        for target in targets:
            w = b.value(target)
            new = b.param(f"{target.name}.smooth", (w.float() / s.to(w.device)).to(w.dtype))
            norm.args = [new if (isinstance(a, Ref) and a.name == target.name) else a for a in norm.args]
        b.rw.refresh()
        return x, True
    spec = b.rw.spec(x)
    dtype = b.value(first.args[1]).dtype if spec is None else dtype_from_name(spec.dtype)
    inv = b.param(f"{group.name}.smooth_inv", (1.0 / s).to(dtype))
    mul = Node(b.rw.fresh(f"{group.name.replace('.', '_')}_smooth"), "aten.mul.Tensor", [x, inv], {},
               [spec], first.module, first.layer)
    b.rw.insert_before(first, mul)
    return Ref(mul.name), False


_FP8_PRODUCERS = {"workbench.rms_norm": ("workbench.rms_norm_fp8", 3),
                  "workbench.add_rms_norm": ("workbench.add_rms_norm_fp8", 4),
                  "workbench.silu_mul": ("workbench.silu_mul_fp8", 2),
                  "workbench.gelu_mul": ("workbench.gelu_mul_fp8", 2),
                  "workbench.norm_add_rms_norm": ("workbench.norm_add_rms_norm_fp8", 5),
                  "workbench.layer_norm": ("workbench.layer_norm_fp8", 4),
                  "workbench.add_layer_norm": ("workbench.add_layer_norm_fp8", 5),
                  "workbench.gelu": ("workbench.gelu_fp8", 2)}
_ADD_NORMS = ("workbench.add_rms_norm", "workbench.norm_add_rms_norm", "workbench.add_layer_norm")


def _fp8_spec(spec: TensorSpec | None) -> TensorSpec | None:
    return None if spec is None else TensorSpec(list(spec.shape), "float8_e4m3fn", spec.contiguous)


def _fuse_fp8_producer(b: _Builder, linears: list[Node], scale: Ref) -> str | None:
    """Make the op that writes the linears' x write it in fp8 with ``scale`` (see the module docstring);
    the op replaced, or None where x has another reader or another producer."""
    rw = b.rw
    rw.sweep()  # the replaced linears still read x until they are swept
    x = linears[0].args[0]
    if not isinstance(x, Ref) or any(n.args[0] != x for n in linears) or x.name in rw.graph.outputs:
        return None
    if {u.name for u in rw.users.get(x.name, [])} != {n.name for n in linears}:
        return None
    node = rw.producer(x)
    if node is None:
        return None
    getitem = None
    if node.op == "operator.getitem":  # add_rms_norm's (add_layer_norm's) normed output (index 0)
        src = rw.producer(node.args[0])
        if src is None or src.op not in _ADD_NORMS or node.args[1] != 0:
            return None
        getitem, node = node, src
    if node.op not in _FP8_PRODUCERS or node.kwargs:
        return None
    op, arity = _FP8_PRODUCERS[node.op]
    if len(node.args) != arity or (node.op in _ADD_NORMS) != (getitem is not None):
        return None
    outputs = [_fp8_spec(node.outputs[0]), *node.outputs[1:]]
    fused = Node(rw.fresh(node.name + "_fp8"), op, [*node.args, scale], {}, outputs, node.module, node.layer)
    x_spec = rw.spec(x)
    if x_spec is None:
        return None
    rw.insert_before(node, fused)
    rw.replace_uses(node.name, Ref(fused.name))
    for n in linears:  # fp8 x: the output dtype is no longer x's, so it is named
        n.args = [*n.args[:5], *[None] * (5 - len(n.args)), dtype_from_name(x_spec.dtype)]
    if getitem is not None:
        getitem.outputs = [_fp8_spec(getitem.out)]
    return node.op


def quantize_graph(graph: Graph, params: dict[str, torch.Tensor], plan: PrecisionPlan,
                   stats: CalibrationStats | None = None, *,
                   fuse_producers: bool = True) -> tuple[Graph, dict[str, torch.Tensor], dict]:
    """The graph with ``plan`` applied, the new (quantized) tensors by name, and a report of what was done."""
    plan.validate(graph)
    if _needs_stats(plan):
        if stats is None:
            raise WorkbenchError("this plan uses static activation scales, SmoothQuant or an FP8 KV cache, which "
                                 "need calibration statistics: run calibrate() first and pass them")
        stats.check_model(graph)
    g = Graph.loads(graph.dumps())
    b = _Builder(g, params)
    groups = linear_groups(g)
    report = {"groups": {}, "kv_cache": plan.kv_cache}
    for name, group in groups.items():
        fmt = plan.format_of(name)
        if fmt == "bf16":
            continue
        opts = plan.options(name)
        per_channel = opts.get("weights", "channel") == "channel"
        nodes = [b.rw.by_name[n] for n in group.nodes]
        weights = [b.value(n.args[1]) for n in nodes]
        x_in, folded, x_scale = None, None, None
        if fmt == "int8_sq":
            s = smoothing_factors(stats.channel_amax(name), weights, opts["alpha"])
            x_in, folded = _smooth_input(b, group, nodes[0], s)
            weights = [w.float() * s.to(w.device)[None, :] for w in weights]
            if opts["activations"] == "static":
                smoothed = (stats.channel_amax(name).float().to(s.device) / s).amax()
                x_scale = (smoothed / 127.0).clamp(min=1e-12).reshape(1)
        elif fmt == "fp8" and opts["activations"] == "static":
            x_scale = stats.input_scale(name, "fp8")
        linears = []
        for node, w in zip(nodes, weights):
            x = x_in if x_in is not None else node.args[0]
            bias = node.args[2] if len(node.args) > 2 else None
            base = node.args[1].name
            wq, ws = _weight_q(w, "fp8" if fmt == "fp8" else "int8", per_channel)
            w_ref, s_ref = b.param(f"{base}.{fmt}", wq), b.param(f"{base}.{fmt}_scale", ws)
            if fmt == "int8_wo":
                b.replace(node, "workbench.w8_linear", [x, w_ref, s_ref, bias])
                continue
            in_ref = b.param(f"{base}.{fmt}_input_scale", x_scale) if x_scale is not None else None
            op = "workbench.fp8_linear" if fmt == "fp8" else "workbench.int8_linear"
            linears.append(b.replace(node, op, [x, w_ref, s_ref, in_ref, bias]))
        report["groups"][name] = {"format": fmt, **opts, **({"smoothing": "folded into norm" if folded else
                                                            "explicit multiply"} if fmt == "int8_sq" else {})}
        if fmt == "fp8" and x_scale is not None:
            producer = _fuse_fp8_producer(b, linears, linears[0].args[3]) if fuse_producers else None
            report["groups"][name]["x_quantized_by"] = producer or "the linear"
    if plan.kv_cache == "fp8":
        _fp8_kv_cache(g, stats, report)
    b.rw.sweep()
    g.meta["precision"] = plan.to_json()
    return g, {k: v for k, v in b.new.items() if k in g.params}, report


def _fp8_kv_cache(g: Graph, stats: CalibrationStats, report: dict) -> None:
    if not is_paged(g):
        raise WorkbenchError("an FP8 KV cache needs a paged graph: run the passes first")
    layout = PagedLayout.from_graph(g)
    layers = layout.cache_inputs
    scales = {}
    for n in g.nodes:
        if n.op != "workbench.paged_attention":
            continue
        layer = layers[n.args[3].name]  # the node's kv_cache input
        k_scale, v_scale = stats.kv_scales(layer)
        n.kwargs = {**n.kwargs, "k_scale": k_scale, "v_scale": v_scale}
        scales[layer] = (k_scale, v_scale)
    for name in layers:
        spec = g.inputs[name]
        g.inputs[name] = TensorSpec(list(spec.shape), "float8_e4m3fn", spec.contiguous)
    layout.planned(dtype="float8_e4m3fn").store(g)
    report["kv_scales"] = scales


def quantized_program(program, plan: PrecisionPlan, stats: CalibrationStats | None = None, *,
                      fuse_producers: bool = True):
    """``program`` with ``plan`` applied (same device, the unquantized weights it still reads shared)."""
    from ..graph.executor import Program

    graph, new, _ = quantize_graph(program.graph, dict(program.params), plan, stats, fuse_producers=fuse_producers)
    params = {k: v for k, v in program.params.items() if k in graph.params}
    params.update(new)
    return Program(graph, params, device=program.device)
