"""The workbench IR: a topologically ordered list of ops over named values.

A ``Graph`` is what every stage reads and writes, and what the executors run.
It is deliberately small and JSON-serialisable:

    inputs   user inputs, in call order          e.g. input_ids [batch, tokens] int64
    params   weights/buffers/constants by name    e.g. model.layers.0.mlp.up_proj.weight
    nodes    (name, op, args, kwargs, outputs)    op is a name in the op registry
    outputs  names of the values returned         e.g. ["linear_14"]

Values in ``args``/``kwargs`` are encoded so that JSON keeps their type:

    {"ref": "name"}            another value (input, param or node output)
    {"dtype": "bfloat16"}      a torch dtype
    {"device": "cpu"}          a device; executors substitute the device they run on
    {"layout": "strided"}      a torch layout
    {"memory_format": "..."}   a torch memory format
    {"float": "inf"}           a non-finite float
    [..]                       a list (int lists, tensor lists)

Shapes are lists whose entries are ints or strings: a string is a sympy
expression over the symbolic dims named in ``Graph.dims`` (``"tokens"``,
``"2*tokens"``). ``Graph.bind`` evaluates them for concrete sizes.

Invariant: a node only refers to inputs, params and nodes that come before it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import WorkbenchError

IR_VERSION = 1

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool, torch.complex64)}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise WorkbenchError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Ref:
    """A reference to a named value of the graph."""

    name: str


@dataclass
class TensorSpec:
    """Shape (ints or sympy expressions over ``Graph.dims``), dtype and layout of one value."""

    shape: list[int | str]
    dtype: str
    contiguous: bool = True

    def numel(self, sizes: dict[str, int]) -> int:
        return math.prod(_eval_dim(d, sizes) for d in self.shape)

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(_eval_dim(d, sizes) for d in self.shape)

    def nbytes(self, sizes: dict[str, int]) -> int:
        return self.numel(sizes) * dtype_from_name(self.dtype).itemsize


@functools.lru_cache(maxsize=4096)
def _compile_expr(expr: str):
    import sympy

    e = sympy.sympify(expr)
    syms = sorted(e.free_symbols, key=lambda s: s.name)
    return [s.name for s in syms], sympy.lambdify(syms, e, modules="math")


def _eval_dim(d: int | str, sizes: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    names, fn = _compile_expr(d)
    try:
        return int(fn(*(sizes[n] for n in names)))
    except KeyError as e:
        raise WorkbenchError(f"shape expression {d!r} needs a size for {e.args[0]!r}") from None


@dataclass
class Param:
    """A named tensor the graph reads: a weight (``parameter``), a ``buffer`` or a ``constant``.

    ``aliases`` are other names of the same tensor in the checkpoint (tied embeddings:
    ``lm_head.weight`` is ``model.embed_tokens.weight``).

    ``derived`` says how a parameter that a pass created is computed from checkpoint
    tensors when weights are loaded, e.g. a fused QKV weight:
    ``{"op": "cat", "dim": 0, "inputs": [[name, [aliases..]], ...]}``.
    """

    name: str
    kind: str
    spec: TensorSpec
    aliases: list[str] = field(default_factory=list)
    derived: dict[str, Any] | None = None
    #: tensor parallelism: the pieces of a stored tensor each rank holds (``passes.tensor_parallel``)
    shard: dict[str, Any] | None = None


@dataclass
class Node:
    name: str
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[TensorSpec | None]
    module: str = ""
    layer: int | None = None

    def refs(self) -> Iterator[str]:
        """Names of the values this node reads, in argument order."""
        yield from _iter_refs(self.args)
        yield from _iter_refs(list(self.kwargs.values()))

    @property
    def out(self) -> TensorSpec | None:
        return self.outputs[0] if self.outputs else None


def _iter_refs(values: Any) -> Iterator[str]:
    for v in values:
        if isinstance(v, Ref):
            yield v.name
        elif isinstance(v, (list, tuple)):
            yield from _iter_refs(v)


@dataclass
class Graph:
    inputs: dict[str, TensorSpec]
    params: dict[str, Param]
    nodes: list[Node]
    outputs: list[str]
    dims: dict[str, dict[str, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- lookups -------------------------------------------------------------------------
    def specs(self) -> dict[str, TensorSpec | None]:
        """Shape/dtype of every value by name: inputs, params and each node's (first) output."""
        out: dict[str, TensorSpec | None] = dict(self.inputs)
        out.update({k: p.spec for k, p in self.params.items()})
        out.update({n.name: n.out for n in self.nodes})
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def bind(self, **sizes: int) -> dict[str, int]:
        """Check concrete sizes against the dims' ranges; dims not given take their minimum."""
        unknown = set(sizes) - set(self.dims)
        if unknown:
            raise WorkbenchError(f"graph has no dim {', '.join(sorted(unknown))} (dims: {', '.join(self.dims)})")
        out = {}
        for dim, rng in self.dims.items():
            size = sizes.get(dim, rng.get("min", 1))
            if not rng.get("min", 0) <= size <= rng.get("max", size):
                raise WorkbenchError(f"{dim}={size} is outside the graph's range {rng}")
            out[dim] = size
        return out

    def validate(self) -> None:
        """Every ref names an earlier value; outputs exist. Raises WorkbenchError otherwise."""
        seen = set(self.inputs) | set(self.params)
        for n in self.nodes:
            for r in n.refs():
                if r not in seen:
                    raise WorkbenchError(f"graph node {n.name!r} reads {r!r}, which is not defined before it")
            if n.name in seen:
                raise WorkbenchError(f"graph defines {n.name!r} twice")
            seen.add(n.name)
        for o in self.outputs:
            if o not in seen:
                raise WorkbenchError(f"graph output {o!r} is not defined")

    # ---- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "dims": self.dims,
            "inputs": {k: dataclasses.asdict(v) for k, v in self.inputs.items()},
            "params": {k: {"kind": p.kind, "aliases": p.aliases, **dataclasses.asdict(p.spec),
                           **({"derived": p.derived} if p.derived else {}),
                           **({"shard": p.shard} if p.shard else {})} for k, p in self.params.items()},
            "nodes": [{"name": n.name, "op": n.op, "args": encode_value(n.args),
                       "kwargs": encode_value(n.kwargs),
                       "outputs": [dataclasses.asdict(o) if o else None for o in n.outputs],
                       "module": n.module, "layer": n.layer} for n in self.nodes],
            "outputs": self.outputs,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Graph":
        version = data.get("ir_version")
        if version != IR_VERSION:
            raise WorkbenchError(f"graph IR version {version!r} is not supported (this workbench reads "
                                 f"version {IR_VERSION}); re-run `workbench capture`")
        params = {}
        for k, p in data["params"].items():
            p = dict(p)
            kind, aliases, derived = p.pop("kind"), p.pop("aliases"), p.pop("derived", None)
            shard = p.pop("shard", None)
            params[k] = Param(k, kind, TensorSpec(**p), aliases, derived, shard)
        nodes = [Node(n["name"], n["op"], decode_value(n["args"]), decode_value(n["kwargs"]),
                      [TensorSpec(**o) if o else None for o in n["outputs"]], n["module"], n["layer"])
                 for n in data["nodes"]]
        g = cls({k: TensorSpec(**v) for k, v in data["inputs"].items()}, params, nodes,
                list(data["outputs"]), data["dims"], data.get("meta", {}))
        g.validate()
        return g

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def loads(cls, text: str) -> "Graph":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"graph file is not valid JSON ({e}); re-run `workbench capture`") from None
        return cls.from_json(data)


def encode_value(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"ref": v.name}
    if isinstance(v, torch.dtype):
        return {"dtype": dtype_name(v)}
    if isinstance(v, torch.device):
        return {"device": v.type}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": str(v)}
    if isinstance(v, (list, tuple)):
        return [encode_value(x) for x in v]
    if isinstance(v, dict):
        return {k: encode_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise WorkbenchError(f"cannot store a value of type {type(v).__name__} in the graph IR: {v!r}")


def decode_value(v: Any) -> Any:
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1:
            (k, x), = v.items()
            if k == "ref":
                return Ref(x)
            if k == "dtype":
                return dtype_from_name(x)
            if k == "device":
                return torch.device(x)
            if k == "layout":
                return _LAYOUTS[x]
            if k == "memory_format":
                return _MEMORY_FORMATS[x]
            if k == "float":
                return float(x)
        return {k: decode_value(x) for k, x in v.items()}
    return v
