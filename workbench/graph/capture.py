"""Capture a Hugging Face causal LM into the workbench IR through ``torch.export``.

What is captured is the forward pass without a KV cache, ``(input_ids,
position_ids) -> logits``, with batch and token count symbolic. Positions are
explicit: transformers starts a new sequence wherever ``position_ids`` restart
(packed-sequence masking), so one row of the batch can hold several requests'
tokens back to back — the flat batch the runtime feeds.

Workarounds for torch.export, each checked on transformers 5.17-5.23:
  * export runs under ``torch.no_grad()``: otherwise the rotary embedding's
    ``@torch.no_grad`` becomes a ``wrap_with_set_grad_enabled`` higher-order op
    with a nested submodule instead of plain ATen ops;
  * the example batch is 2 and the example length 8, because export specialises
    dims whose example size is 0 or 1;
  * dims are ``Dim.DYNAMIC`` hints, not named ``Dim``s: with named dims torch 2.11
    fails on a guard it cannot prove (``min(16*tokens, 32*tokens) == 16*tokens``);
  * device literals (``arange(..., device=cpu)``) are stored as ``{"device": ..}``
    and replaced by the executor's device, so a graph captured on the meta device
    or the CPU runs on a GPU.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind

from ..errors import WorkbenchError
from .ir import Graph, Node, Param, Ref, TensorSpec, dtype_name

#: How far the symbolic dims may range in a captured graph.
MAX_BATCH = 1024
MAX_TOKENS = 1 << 17

#: a decoder layer's module path: ``model.layers.3``, or ``transformer.h.3`` (GPT-2, Falcon)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")


#: config fields later stages read by these names, filled in from the config's attributes where its JSON has
#: other names for them (transformers' ``attribute_map``)
_STANDARD_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


@dataclass
class Captured:
    """A captured graph and the values of its buffers and constants (weights stay in the checkpoint)."""

    graph: Graph
    constants: dict[str, torch.Tensor]


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def capture(model: torch.nn.Module, *, max_batch: int = MAX_BATCH, max_tokens: int = MAX_TOKENS) -> Captured:
    """Export ``model`` and lower it into a ``Graph``.

    The model may live on the meta device (its weights are never read), which is
    how an 8B-parameter preset is captured on a laptop.
    """
    model = model.eval()
    device = next(model.parameters()).device
    ids = torch.randint(0, 2, (2, 8), device=device)
    pos = torch.arange(8, device=device).expand(2, 8).contiguous()
    # Dim.DYNAMIC accepts guards that hold over the range instead of proving them: torch 2.11
    # cannot prove `min(16*tokens, 32*tokens) == 16*tokens` for a named Dim and refuses to export.
    batch = torch.export.Dim.DYNAMIC(min=1, max=max_batch)
    tokens = torch.export.Dim.DYNAMIC(min=1, max=max_tokens)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes={
                "input_ids": {0: batch, 1: tokens}, "position_ids": {0: batch, 1: tokens}})
    except Exception as e:  # torch.export raises many types; name the model and the cause
        arch = getattr(getattr(model, "config", None), "architectures", None)
        raise WorkbenchError(f"torch.export failed for {arch or type(model).__name__}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    export_seconds = time.perf_counter() - start
    graph, constants = _lower(ep, model, max_batch, max_tokens)
    config = getattr(model, "config", None)
    graph.meta.update({
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "config": json.loads(config.to_json_string(use_diff=False)) if config is not None else {},
        "dtype": dtype_name(next(model.parameters()).dtype),
        "captured_on": device.type,
        "export_seconds": round(export_seconds, 3),
        "torch": torch.__version__,
    })
    graph.meta["config"].pop("torch_dtype", None)
    for key in _STANDARD_CONFIG_KEYS:  # GPT-2 names them n_layer, n_positions, ...: later stages read these names
        if key not in graph.meta["config"] and getattr(config, key, None) is not None:
            graph.meta["config"][key] = getattr(config, key)
    return Captured(graph, constants)


def _lower(ep: torch.export.ExportedProgram, model: torch.nn.Module, max_batch: int,
           max_tokens: int) -> tuple[Graph, dict[str, torch.Tensor]]:
    aliases = _tied_names(model)
    sig = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    values: dict[str, str] = {}  # fx node name -> IR value name
    inputs: dict[str, TensorSpec] = {}
    params: dict[str, Param] = {}
    constants: dict[str, torch.Tensor] = {}
    nodes: list[Node] = []
    outputs: list[str] = []
    symbols: dict[Any, str] = {}
    buffers = dict(model.named_buffers())

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for n in placeholders:  # name the symbolic dims after the user inputs' dims
        if sig[n.name].kind == InputKind.USER_INPUT:
            for dim_name, d in zip(("batch", "tokens"), n.meta["val"].shape):
                if isinstance(d, torch.SymInt):
                    symbols.setdefault(d.node.expr, dim_name)

    for n in ep.graph.nodes:
        if n.op == "placeholder":
            spec = sig[n.name]
            if spec.kind == InputKind.USER_INPUT:
                values[n.name] = n.name
                inputs[n.name] = _spec(n.meta["val"], symbols)
                continue
            name = spec.target.removeprefix("m.")
            kind = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
                    InputKind.CONSTANT_TENSOR: "constant"}.get(spec.kind)
            if kind is None:
                raise WorkbenchError(f"cannot capture input {n.name!r} of kind {spec.kind.name}")
            values[n.name] = name
            params[name] = Param(name, kind, _spec(n.meta["val"], symbols),
                                 [a for a in aliases.get(name, []) if a != name])
            if kind != "parameter":
                value = buffers.get(name, ep.constants.get(spec.target))
                if value is None or value.is_meta:
                    raise WorkbenchError(f"buffer {name!r} has no value (meta device); build the model "
                                         "with workbench.models so buffers stay real")
                constants[name] = value.detach().cpu().contiguous()
        elif n.op == "call_function":
            module = _module_path(n)
            layer = _LAYER_RE.search(module)
            nodes.append(Node(n.name, _op_name(n.target), _convert(n.args, values), _convert(n.kwargs, values),
                              _out_specs(n.meta.get("val"), symbols), module, int(layer.group(1)) if layer else None))
            values[n.name] = n.name
        elif n.op == "output":
            outputs = [values[a.name] for a in n.args[0]]
        else:
            raise WorkbenchError(f"cannot capture graph node {n.name!r} of kind {n.op!r} "
                                 f"(target {n.target}); this model uses a construct the IR does not support")

    # export reports min=2 (its 0/1 specialisation of the example sizes); nothing in the traced
    # graph depends on that, and the tests run it at batch=1 and tokens=1.
    dims = {"batch": {"min": 1, "max": max_batch}, "tokens": {"min": 1, "max": max_tokens}}
    graph = Graph(inputs, params, nodes, outputs, dims)
    graph.validate()
    return graph, constants


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    raise WorkbenchError(f"cannot capture a call to {target!r}: only ATen ops and size arithmetic are supported")


def _module_path(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if path.startswith("m.") or path == "m":
            return path.removeprefix("m").removeprefix(".")
    return ""


def _convert(v: Any, values: dict[str, str]) -> Any:
    if isinstance(v, torch.fx.Node):
        return Ref(values[v.name])
    if isinstance(v, (list, tuple)):
        return [_convert(x, values) for x in v]
    if isinstance(v, dict):
        return {k: _convert(x, values) for k, x in v.items()}
    return v


def _dim(d: Any, symbols: dict[Any, str]) -> int | str:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    if expr.is_number:
        return int(expr)
    import sympy

    renamed = expr.subs({s: sympy.Symbol(symbols[s]) for s in expr.free_symbols if s in symbols})
    unknown = [s for s in renamed.free_symbols if s.name not in symbols.values()]
    if unknown:
        raise WorkbenchError(f"captured shape depends on data ({renamed}); the IR supports shapes "
                             "that depend only on batch and tokens")
    return str(renamed)


def _spec(val: Any, symbols: dict[Any, str]) -> TensorSpec:
    try:
        contiguous = bool(val.is_contiguous())
    except Exception:  # symbolic strides that cannot be decided statically
        contiguous = True
    return TensorSpec([_dim(d, symbols) for d in val.shape], dtype_name(val.dtype), contiguous)


def _out_specs(val: Any, symbols: dict[Any, str]) -> list[TensorSpec | None]:
    if isinstance(val, torch.Tensor):
        return [_spec(val, symbols)]
    if isinstance(val, (list, tuple)):
        return [_spec(v, symbols) if isinstance(v, torch.Tensor) else None for v in val]
    return [None] if val is not None else []
