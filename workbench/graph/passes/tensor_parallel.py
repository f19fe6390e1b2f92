"""Tensor parallelism as a graph pass: Megatron's sharding of an optimized decoder graph over ``size`` ranks.

    graph, report = shard_tensor_parallel(graph, 2)      # one graph for every rank; params say which slice
    params = rank_params(graph, full_params, rank=1)     # rank 1's slices of the unsharded weights
    graph, reports = shard_and_fuse(graph, 2)            # what the runtime runs: sharded, then sharded_pipeline()

Per decoder layer (found from its attention node and its MLP activation, so fused and packed projections alike):

* **q/k/v column-parallel**, split by heads: rank r computes query heads ``r·H/n .. (r+1)·H/n`` and the KV heads
  they read. With fewer KV heads than ranks each KV head is **replicated** on the ``n / kv_heads`` ranks whose
  query heads use it (the KV cache of a rank holds its own heads only). A projection that packs q, k and v by
  heads (GPT-NeoX per head, Falcon per KV group or queries-then-k-then-v) gives each rank its heads' columns,
  and the view and splits after it take the rank's head counts (``packed_qkv``).
* **o row-parallel**: its input columns are the rank's heads; an ``all_reduce`` sums the partial outputs.
* **gate/up (or GPT-2's fc) column-parallel, down row-parallel** + ``all_reduce``: rank r holds ``intermediate / n``
  columns.
* **lm_head column-parallel** over the vocabulary + ``all_gather`` of the logits (rows selected for sampling are
  gathered only); replicated, with a note, when ``n`` does not divide the vocabulary.
* **Embeddings replicated**: a lookup reads one row per token, so splitting the table saves memory but costs an
  all-reduce of every step's hidden states; a tied lm_head gets its own (sharded) view of the same tensor.

A bias of a row-parallel linear is added once, after the all-reduce. Quantized linears shard their per-channel
scales with their output channels (column-parallel); per-tensor scales, and a row-parallel linear's output-channel
scales, stay whole; a SmoothQuant divisor in front of a row-parallel linear shards with its input columns.

The sharded graph is one graph for all ranks: each sharded param keeps the name and the per-rank shape, with
``Param.shard = {"source": stored name, "dim": d, "ranks": [[[start, end], ...] per rank]}``, the pieces of the
stored tensor along ``d`` that a rank concatenates. Weights stay one file set: a rank reads only its slices
(``rank_params``; ``engine.load`` reads them straight from safetensors). ``graph.meta["tensor_parallel"]``
records the size. Every value's shape is re-derived for one rank. A TP size that does not divide the query heads,
the intermediate size or (replication) the KV heads is refused in one line naming the dimension.

``shard_and_fuse`` is what the runtime, an engine's loading and the tune stage run: this pass, then the passes
registered for sharded graphs (``register_pass(..., sharded=True)``, ``sharded_pipeline()``: the all-reduce fused
with the residual add and norm after it, ``passes/collective.py``), each with its own report.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch

from ...errors import WorkbenchError
from ..ir import Graph, Node, Param, Ref, TensorSpec, dtype_from_name
from ..paged import OP as PAGED_OP
from ..paged import kv_heads_per_rank, whole_size
from ..rewrite import Rewriter
from .manager import Match, PassReport

ATTENTION = {PAGED_OP, "workbench.attention"}
#: gated activations (gate, up): SwiGLU, and Gemma's GeGLU
ACTIVATIONS = {"workbench.silu_mul", "workbench.silu_mul_fp8", "workbench.gelu_mul", "workbench.gelu_mul_fp8"}
GELU = {"workbench.gelu", "workbench.gelu_fp8"}  # one input: GPT-2's fc
#: linear ops -> the argument index of their bias
LINEARS = {"aten.linear.default": 2, "workbench.fp8_linear": 4, "workbench.int8_linear": 4,
           "workbench.w8_linear": 3}
#: ops a projection's output passes through on its way to attention / the activation (data arg first)
THROUGH = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
           "aten.contiguous.default", "aten.slice.Tensor", "aten.unsqueeze.default", "aten.permute.default",
           "aten.clone.default", "aten._to_copy.default", "aten.to.dtype", "aten.mul.Tensor", "workbench.rope",
           "workbench.partial_rope", "workbench.rms_norm"}


#: ops that cut q, k and v (or heads) out of a projection whose output holds them packed per head or per group
HEAD_SPLITS = {"operator.getitem", "aten.chunk.default", "aten.split_with_sizes.default", "aten.split.Tensor",
               "aten.select.int", "aten.flatten.using_ints"}
VIEWS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}


def _last_dim(rw: Rewriter, n: Node) -> bool:
    spec = rw.spec(n.args[0])
    return spec is not None and n.args[1] in (-1, len(spec.shape) - 1)


def _source(rw: Rewriter, v: Any, layer: int | None, what: str) -> tuple[Node, int, int]:
    """(the linear that produces ``v``, the first and last+1 output column of it that ``v`` is): walking back
    through views, transposes, casts, norms and RoPE; a slice of the linear's output on the way narrows it."""
    node = rw.producer(v)
    start = end = None
    for _ in range(16):
        if node is None:
            break
        if node.op in LINEARS:
            spec = node.out
            columns = spec.shape[-1] if spec is not None else None
            if not isinstance(columns, int):
                break
            return node, start or 0, columns if end is None else end
        if node.op in ("operator.getitem", "aten.chunk.default", "aten.split_with_sizes.default",
                       "aten.split.Tensor"):
            raise WorkbenchError(f"tensor parallelism: layer {layer}'s {what} is cut from its projection in a "
                                 "packed layout the pass does not know (it knows GPT-NeoX's per head and Falcon's "
                                 "per KV group and multi-query ones); run this model with tensor_parallel_size 1")
        if node.op not in THROUGH:
            break
        if node.op == "aten.slice.Tensor" and _last_dim(rw, node):
            up = rw.producer(node.args[0])
            if up is not None and up.op in LINEARS and len(node.args) >= 4:
                start, end = node.args[2], node.args[3]
        node = rw.producer(node.args[0])
    raise WorkbenchError(f"tensor parallelism: cannot find the projection behind layer {layer}'s {what}; shard the "
                         "optimized graph (after the default passes: `workbench optimize`)")


def _packed(rw: Rewriter, q: Any) -> tuple[Node, Node] | None:
    """(the projection, the view right after it that lays its output out by heads) when attention's query is cut
    from a packed q/k/v projection (a head split on the way back, as GPT-NeoX and Falcon do), else None."""
    node, split = rw.producer(q), False
    for _ in range(16):
        if node is None:
            return None
        src = rw.producer(node.args[0]) if node.args and isinstance(node.args[0], Ref) else None
        if node.op in VIEWS and src is not None and src.op in LINEARS:
            return (src, node) if split else None
        if node.op in HEAD_SPLITS:
            split = True
        elif node.op not in THROUGH:
            return None
        node = src
    return None


def _reader(rw: Rewriter, v: str, layer: int | None, what: str) -> tuple[Node, list[Node]]:
    """(the linear that reads ``v`` as its input, the nodes between): walking forward through views."""
    chain: list[Node] = []
    name = v
    for _ in range(16):
        users = rw.users.get(name, [])
        if len(users) != 1:
            break
        (u,) = users
        if u.op in LINEARS and isinstance(u.args[0], Ref) and u.args[0].name == name:
            return u, chain
        if u.op not in THROUGH or not (isinstance(u.args[0], Ref) and u.args[0].name == name):
            break
        chain.append(u)
        name = u.name
    raise WorkbenchError(f"tensor parallelism: cannot find the linear that reads layer {layer}'s {what}; shard "
                         "the optimized graph (after the default passes: `workbench optimize`)")


def _split(start: int, size: int, parts: int, rank: int) -> list[int]:
    step = size // parts
    return [start + rank * step, start + (rank + 1) * step]


def _kv_rows(start: int, kv_heads: int, head_dim: int, parts: int, rank: int) -> list[int]:
    """Rank ``rank``'s columns of ``kv_heads`` K (or V) heads from ``start``: its share, or (fewer heads than
    ranks) the one head it replicates."""
    if kv_heads % parts == 0:
        return _split(start, kv_heads * head_dim, parts, rank)
    h = rank // (parts // kv_heads)
    return [start + h * head_dim, start + (h + 1) * head_dim]


class _Sharder:
    def __init__(self, graph: Graph, size: int) -> None:
        self.g, self.n = graph, size
        self.rw = Rewriter(graph)
        cfg = graph.meta.get("config", {})
        self.cfg = cfg
        self.shards: dict[str, dict] = {}  # param -> shard spec
        self.columns: dict[str, list[list[list[int]]]] = {}  # column linear -> per rank its output ranges
        self.matches: list[Match] = []
        self.notes: list[str] = []

    # ---- params ---------------------------------------------------------------------------------------------
    def shard_param(self, ref: Any, dim: int, ranks: list[list[list[int]]], node: Node) -> Any:
        """Give param ``ref`` the per-rank pieces ``ranks`` along ``dim``; a param also read whole elsewhere
        (a tied embedding) gets a sharded twin read by ``node`` only. Returns the ref ``node`` reads."""
        name = ref.name
        p = self.g.params[name]
        spec = {"source": name, "dim": dim, "ranks": ranks}
        if name in self.shards:
            if self.shards[name] != spec:
                raise WorkbenchError(f"tensor parallelism: parameter {name} would be split two ways")
            return ref
        readers = [u for u in self.rw.users.get(name, []) if u is not node]
        if readers:
            twin = f"{name}.tp"
            self.g.params[twin] = Param(twin, p.kind, copy.deepcopy(p.spec))
            node.args = [Ref(twin) if a == ref else a for a in node.args]
            node.kwargs = {k: Ref(twin) if v == ref else v for k, v in node.kwargs.items()}
            self.rw.refresh()
            name, p = twin, self.g.params[twin]
            spec = {**spec, "source": ref.name}
        shape = list(p.spec.shape)
        shape[dim] = sum(e - s for s, e in ranks[0])
        p.spec = TensorSpec(shape, p.spec.dtype, p.spec.contiguous)
        p.shard = spec
        self.shards[name] = spec
        return Ref(name)

    def _params(self, node: Node) -> list[tuple[str, Any]]:
        """(where, ref) of the param tensors a node reads, weight excluded: ('arg', i) or ('kw', key)."""
        found = [(("arg", i), a) for i, a in enumerate(node.args) if i != 1 and isinstance(a, Ref)
                 and a.name in self.g.params]
        return found + [(("kw", k), v) for k, v in node.kwargs.items() if isinstance(v, Ref) and v.name in self.g.params]

    # ---- linears --------------------------------------------------------------------------------------------
    def column(self, lin: Node, ranks: list[list[list[int]]]) -> None:
        """Split ``lin``'s output channels: rank r computes the pieces ``ranks[r]``; its slices move to them."""
        if lin.name in self.columns:
            if self.columns[lin.name] != ranks:
                raise WorkbenchError(f"tensor parallelism: {lin.name} would be split two ways")
            return
        self.columns[lin.name] = ranks
        w = lin.args[1]
        N = self.g.params[w.name].spec.shape[0]
        lin.args[1] = self.shard_param(w, 0, ranks, lin)
        for _where, ref in self._params(lin):  # bias, per-channel scales: with the output channels
            spec = self.g.params[ref.name].spec
            if spec.shape and spec.shape[0] == N and len(spec.shape) <= 2 and N > 1:
                new = self.shard_param(ref, 0, ranks, lin)
                lin.args = [new if a == ref else a for a in lin.args]
                lin.kwargs = {k: new if v == ref else v for k, v in lin.kwargs.items()}
        # the output's slices: each old column range maps to its place in the rank's concatenated pieces
        local, at = [], 0
        for s, e in ranks[0]:
            local.append((s, e, at))
            at += e - s
        for u in self.rw.users.get(lin.name, []):
            if u.op == "aten.slice.Tensor" and _last_dim(self.rw, u) and len(u.args) >= 4:
                start, end = u.args[2], u.args[3]
                hit = [(s, e, a) for s, e, a in local if s <= start < e or (start <= s and e <= end)]
                if not hit:  # this slice is another rank's piece only: it cannot be formed on rank 0's layout
                    raise WorkbenchError(f"tensor parallelism: slice {u.name} of {lin.name} is not split with it")
                u.args = [*u.args[:2], hit[0][2], hit[-1][2] + hit[-1][1] - hit[-1][0]]

    def row(self, lin: Node, chain: list[Node], ranks: list[list[list[int]]], what: str) -> Node:
        """Split ``lin``'s input channels (pieces ``ranks[r]``), then an all-reduce of its output."""
        w = lin.args[1]
        K = self.g.params[w.name].spec.shape[1]
        lin.args[1] = self.shard_param(w, 1, ranks, lin)
        local_k = sum(e - s for s, e in ranks[0])
        for n in chain:  # a view to the full width on the way (GPT-2's [-1, hidden]) takes the rank's width
            if n.op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default") \
                    and isinstance(n.args[1], list) and n.args[1] and n.args[1][-1] == K:
                n.args = [n.args[0], [*n.args[1][:-1], local_k], *n.args[2:]]
        for n in chain:  # a SmoothQuant divisor on the way: shards with the input channels
            for ref in [a for a in n.args if isinstance(a, Ref) and a.name in self.g.params]:
                spec = self.g.params[ref.name].spec
                if spec.shape and spec.shape[-1] == K and K > 1:
                    new = self.shard_param(ref, len(spec.shape) - 1, ranks, n)
                    n.args = [new if a == ref else a for a in n.args]
        bias_at = LINEARS[lin.op]
        bias = lin.args[bias_at] if len(lin.args) > bias_at else lin.kwargs.get("bias")
        if isinstance(bias, Ref):
            if len(lin.args) > bias_at:
                lin.args[bias_at] = None
            else:
                lin.kwargs["bias"] = None
        reduce = Node(self.rw.fresh(f"all_reduce_{lin.layer}"), "workbench.all_reduce", [Ref(lin.name)], {},
                      [copy.deepcopy(lin.out)], lin.module, lin.layer)
        created = [reduce]
        if isinstance(bias, Ref):
            created.append(Node(self.rw.fresh(f"{reduce.name}_bias"), "aten.add.Tensor", [Ref(reduce.name), bias],
                                {}, [copy.deepcopy(lin.out)], lin.module, lin.layer))
        self._insert_after(lin, created)
        self.matches.append(Match(what, lin.layer, [lin.name], [lin.name, *(c.name for c in created)]))
        return created[-1]

    def _insert_after(self, node: Node, new: list[Node]) -> None:
        """Put ``new`` (not yet in the graph) right after ``node``; its readers (and the outputs) read the last of
        them instead."""
        self.rw.replace_uses(node.name, Ref(new[-1].name))
        at = self.g.nodes.index(node) + 1
        self.g.nodes[at:at] = new
        self.rw.refresh()

    # ---- the layers -----------------------------------------------------------------------------------------
    def attention(self, att: Node) -> None:
        n, layer = self.n, att.layer
        heads = int(self.cfg.get("num_attention_heads") or 0)
        kv_heads = int(self.cfg.get("num_key_value_heads") or heads)
        if not heads:
            raise WorkbenchError("tensor parallelism: the graph's config has no num_attention_heads")
        if heads % n:
            raise WorkbenchError(f"tensor-parallel size {n} does not divide the {heads} query heads; use a TP size "
                                 f"that divides {heads}")
        local_kv = kv_heads_per_rank(kv_heads, n)  # refuses a size that neither divides nor replicates them
        packed = _packed(self.rw, att.args[0])
        head_dim = (self.packed_qkv(att, *packed, heads, kv_heads, local_kv) if packed is not None
                    else self.separate_qkv(att, heads, kv_heads))
        o, chain = _reader(self.rw, att.name, layer, "attention output")
        self.row(o, chain, [[_split(0, heads * head_dim, n, r)] for r in range(n)], "o row-parallel + all_reduce")
        if att.op == PAGED_OP:
            cache = att.args[3]
            spec = self.g.inputs[cache.name]
            self.g.inputs[cache.name] = TensorSpec([*spec.shape[:3], local_kv, *spec.shape[4:]], spec.dtype,
                                                   spec.contiguous)
            self.local_kv_heads = local_kv

    def separate_qkv(self, att: Node, heads: int, kv_heads: int) -> int:
        """q, k and v each a run of columns of one projection or their own (Llama, Qwen, Gemma, GPT-2...); returns
        the head dim."""
        n, layer = self.n, att.layer
        sources = [_source(self.rw, att.args[i], layer, what) for i, what in enumerate(("q", "k", "v"))]
        head_dim = (sources[0][2] - sources[0][1]) // heads
        if head_dim * heads != sources[0][2] - sources[0][1] or any(
                e - s != kv_heads * head_dim for _, s, e in sources[1:]):
            raise WorkbenchError(f"tensor parallelism: layer {layer}'s q/k/v widths do not match {heads} query and "
                                 f"{kv_heads} KV heads")

        by_linear: dict[str, tuple[Node, list[list[list[int]]]]] = {}
        for (lin, s, _e), role in zip(sources, ("q", "k", "v")):
            entry = by_linear.setdefault(lin.name, (lin, [[] for _ in range(n)]))
            for r in range(n):
                entry[1][r].append(_split(s, heads * head_dim, n, r) if role == "q"
                                   else _kv_rows(s, kv_heads, head_dim, n, r))
        for lin, ranks in by_linear.values():
            self.column(lin, ranks)
        self.matches.append(Match("q/k/v column-parallel" + (" (KV heads replicated)" if kv_heads < n else ""),
                                  layer, [], [lin.name for lin, _ in by_linear.values()]))
        return head_dim

    def packed_qkv(self, att: Node, lin: Node, view: Node, heads: int, kv_heads: int, local_kv: int) -> int:
        """q, k and v packed in one projection by heads, the view after it laying them out (its head counts and the
        splits after it become the rank's):

        * GPT-NeoX, ``[.., heads, 3·d]``: each head's q, k, v together; rank r's heads are one run of columns.
        * Falcon's new architecture, ``[.., kv_heads, group + 2, d]``: per KV head its group of query heads, then
          its k and v; rank r holds whole groups, or (fewer KV heads than ranks) part of one group's queries and
          that group's k and v.
        * Falcon multi-query, ``[.., heads + 2·kv_heads, d]`` split ``[heads, kv, kv]``: the queries, then k, then
          v; rank r's queries and its KV heads (replicated when fewer than ranks).

        Returns the head dim."""
        n, layer = self.n, att.layer
        width = lin.out.shape[-1] if lin.out is not None else None
        shape = view.args[1] if len(view.args) > 1 and isinstance(view.args[1], list) else None
        if not isinstance(width, int) or shape is None or width % (heads + 2 * kv_heads):
            raise WorkbenchError(f"tensor parallelism: layer {layer}'s packed q/k/v projection {lin.name} is not "
                                 f"{heads} query and {kv_heads} KV heads wide; run it with tensor_parallel_size 1")
        d = width // (heads + 2 * kv_heads)
        local_h = heads // n
        users = self.rw.users.get(view.name, [])
        tail = shape[-3:]
        if len(shape) >= 2 and shape[-1] == 3 * d and shape[-2] in (heads, -1) and kv_heads == heads:
            kind = "per head (GPT-NeoX)"
            ranks = [[_split(0, width, n, r)] for r in range(n)]  # rank r's heads: one run of columns
            if shape[-2] == heads:
                view.args[1] = [*shape[:-2], local_h, shape[-1]]
        elif len(shape) >= 3 and tail[2] == d and tail[0] in (kv_heads, -1) and \
                tail[1] in (heads // kv_heads + 2, -1) and tail[:2] != [-1, -1]:
            kind = "per KV group (Falcon)"
            group = heads // kv_heads
            if kv_heads % n == 0:
                local_g = group
                ranks = [[_split(0, width, n, r)] for r in range(n)]
            else:  # rank r: part of KV head r // m's queries, and that KV head's k and v
                m = n // kv_heads
                local_g = group // m
                ranks = []
                for r in range(n):
                    base, j = (r // m) * (group + 2) * d, r % m
                    ranks.append([[base + j * local_g * d, base + (j + 1) * local_g * d],
                                  [base + group * d, base + (group + 2) * d]])
            view.args[1] = [*shape[:-3], -1 if tail[0] == -1 else local_kv, -1 if tail[1] == -1 else local_g + 2, d]
            for u in users:  # the query slice [0:group] and the selects of k (group) and v (group + 1)
                if u.op == "aten.slice.Tensor" and len(u.args) >= 4 and u.args[3] == group:
                    u.args = [*u.args[:3], local_g, *u.args[4:]]
                elif u.op == "aten.select.int" and len(u.args) >= 3 and u.args[2] in (group, group + 1):
                    u.args = [*u.args[:2], u.args[2] - group + local_g, *u.args[3:]]
        elif len(shape) >= 2 and shape[-1] == d and shape[-2] in (heads + 2 * kv_heads, -1) and len(users) == 1 \
                and users[0].op == "aten.split_with_sizes.default" and list(users[0].args[1]) == [heads, kv_heads,
                                                                                                    kv_heads]:
            kind = "queries then k then v (Falcon multi-query)"
            ranks = [[_split(0, heads * d, n, r), _kv_rows(heads * d, kv_heads, d, n, r),
                      _kv_rows((heads + kv_heads) * d, kv_heads, d, n, r)] for r in range(n)]
            if shape[-2] != -1:
                view.args[1] = [*shape[:-2], local_h + 2 * local_kv, d]
            split = users[0]
            split.args = [split.args[0], [local_h, local_kv, local_kv], *split.args[2:]]
        else:
            raise WorkbenchError(f"tensor parallelism: layer {layer}'s q/k/v are cut from {lin.name} in a packed "
                                 f"layout the pass does not know (view {view.name} to {shape}); run this model "
                                 "with tensor_parallel_size 1")
        self.column(lin, ranks)
        self.matches.append(Match(f"q/k/v column-parallel, packed {kind}" +
                                  (" (KV heads replicated)" if kv_heads < n else ""), layer, [], [lin.name]))
        return d

    def mlp(self, act: Node) -> None:
        n, layer = self.n, act.layer
        if act.op in GELU:  # fc column-parallel, the down projection row-parallel
            fc, s, e = _source(self.rw, act.args[0], layer, "MLP input")
            if (e - s) % n:
                raise WorkbenchError(f"tensor-parallel size {n} does not divide the intermediate size {e - s}; use "
                                     f"a TP size that divides {e - s}")
            self.column(fc, [[_split(s, e - s, n, r)] for r in range(n)])
            self.matches.append(Match("fc column-parallel", layer, [], [fc.name]))
            down, chain = _reader(self.rw, act.name, layer, "MLP activation")
            self.row(down, chain, [[_split(0, e - s, n, r)] for r in range(n)], "down row-parallel + all_reduce")
            return
        (gate, gs, ge), (up, us, ue) = (_source(self.rw, act.args[i], layer, what) for i, what in
                                        enumerate(("gate", "up")))
        inter = ge - gs
        if inter % n:
            raise WorkbenchError(f"tensor-parallel size {n} does not divide the intermediate size {inter}; use a TP "
                                 f"size that divides {inter}")
        if gate is up:
            self.column(gate, [[_split(gs, inter, n, r), _split(us, ue - us, n, r)] for r in range(n)])
        else:
            self.column(gate, [[_split(gs, inter, n, r)] for r in range(n)])
            self.column(up, [[_split(us, ue - us, n, r)] for r in range(n)])
        self.matches.append(Match("gate/up column-parallel", layer, [], sorted({gate.name, up.name})))
        down, chain = _reader(self.rw, act.name, layer, "MLP activation")
        self.row(down, chain, [[_split(0, inter, n, r)] for r in range(n)], "down row-parallel + all_reduce")

    def lm_head(self) -> None:
        out = self.rw.by_name.get(self.g.outputs[0])
        if out is None or out.op not in LINEARS:
            self.notes.append("lm_head not found at the graph's output: replicated")
            return
        vocab = out.out.shape[-1] if out.out is not None else None
        if not isinstance(vocab, int) or vocab % self.n:
            self.notes.append(f"lm_head replicated: tensor-parallel size {self.n} does not divide the vocabulary "
                              f"({vocab})")
            return
        self.column(out, [[_split(0, vocab, self.n, r)] for r in range(self.n)])
        gather = Node(self.rw.fresh("all_gather_logits"), "workbench.all_gather", [Ref(out.name), -1], {},
                      [copy.deepcopy(out.out)], out.module, out.layer)
        self._insert_after(out, [gather])
        self.matches.append(Match("lm_head column-parallel + all_gather", None, [out.name], [out.name, gather.name]))


def shard_tensor_parallel(graph: Graph, size: int) -> tuple[Graph, PassReport]:
    """The graph one rank of ``size`` runs (the same for every rank; see the module docstring) and its report."""
    import time

    whole_size(size)
    if graph.meta.get("tensor_parallel", {}).get("size", 1) != 1:
        raise WorkbenchError(f"this graph is sharded already (tensor-parallel size "
                             f"{graph.meta['tensor_parallel']['size']}); shard the unsharded graph")
    start = time.perf_counter()
    g = copy.deepcopy(graph)
    before = len(g.nodes)
    s = _Sharder(g, size)
    if size > 1:
        for att in [n for n in g.nodes if n.op in ATTENTION]:
            s.attention(att)
        for act in [n for n in g.nodes if n.op in ACTIVATIONS | GELU]:
            s.mlp(act)
        s.lm_head()
        layers = int(s.cfg.get("num_hidden_layers") or 0)
        found = {m.layer for m in s.matches if m.what.startswith("down")}
        if layers and len(found) != layers:
            missing = sorted(set(range(layers)) - found)
            raise WorkbenchError(f"tensor parallelism: no MLP activation found in layers {missing}; this family's "
                                 "MLP is not one the sharding pass knows")
        if "paged" in g.meta and hasattr(s, "local_kv_heads"):
            g.meta["paged"] = {**g.meta["paged"], "kv_heads": s.local_kv_heads}
        reinfer_specs(g, size)
    g.meta["tensor_parallel"] = {"size": size}
    g.validate()
    report = PassReport("shard_tensor_parallel", f"Megatron sharding over {size} ranks: column-parallel q/k/v and "
                        "gate/up, row-parallel o and down with an all-reduce, lm_head over the vocabulary",
                        s.matches, before, len(g.nodes), 0, 0, None, True, seconds=round(time.perf_counter() - start, 3),
                        notes=s.notes)
    return g, report


def shard_and_fuse(graph: Graph, size: int) -> tuple[Graph, list[PassReport]]:
    """``shard_tensor_parallel``, then ``sharded_pipeline()`` on the sharded graph: (the graph every rank runs, the
    reports, the sharding pass's first). One rank (``size`` 1) gets the sharding pass only (it has no collectives
    to fuse). The fusions are not checked numerically here: in one process a collective is the identity, so a
    check would run the whole graph and prove nothing about the sum (tests/test_tensor_parallel.py checks them
    over gloo ranks)."""
    from .manager import run_passes, sharded_pipeline

    sharded, report = shard_tensor_parallel(graph, size)
    names = sharded_pipeline()
    if size == 1 or not names:
        return sharded, [report]
    fused, reports = run_passes(sharded, {}, names, check=False)
    # the optimize stage's passes, then these (``run_passes`` records the ones it ran only)
    fused.meta = {**fused.meta, "passes": [*sharded.meta.get("passes", []), *fused.meta["passes"]]}
    return fused, [report, *reports]


# ---- shapes ---------------------------------------------------------------------------------------------------

def reinfer_specs(graph: Graph, size: int = 1, *, sizes: Mapping[str, int] | None = None) -> None:
    """Recompute every node's output shapes after the params' and inputs' shapes changed: each node's reference
    runs on meta tensors at small sizes of the symbolic dims; a dim that was symbolic stays so. Paged attention
    (its reference reads sequence lengths on the host) takes its query's shape; an all-gather over ``size``
    ranks multiplies its dim."""
    from ...kernels.registry import REGISTRY

    dims = dict(sizes or {})
    for d, rng in graph.dims.items():  # sizes unlikely to coincide with a model's widths
        dims.setdefault(d, max(rng.get("min", 1), min(rng.get("max", 7), {"batch": 1}.get(d, 7))))
    specs = graph.specs()
    env: dict[str, Any] = {}

    def meta(v):
        if isinstance(v, Ref):
            if v.name in env:
                return env[v.name]
            spec = specs.get(v.name)
            if spec is None:
                raise WorkbenchError(f"tensor parallelism: value {v.name} has no shape to re-derive from")
            return torch.empty(spec.concrete_shape(dims), dtype=dtype_from_name(spec.dtype), device="meta")
        if isinstance(v, list):
            return [meta(x) for x in v]
        if isinstance(v, dict):
            return {k: meta(x) for k, x in v.items()}
        return v

    for name in graph.inputs:
        env[name] = meta(Ref(name))
    for name in graph.params:
        env[name] = meta(Ref(name))
    for node in graph.nodes:
        args, kwargs = [meta(a) for a in node.args], {k: meta(v) for k, v in node.kwargs.items()}
        if node.op == PAGED_OP or node.op == "workbench.attention":
            q = args[0]
            value: Any = torch.empty(q.shape, dtype=_out_dtype(node, q), device="meta")
        elif node.op == "workbench.all_gather":  # one rank's reference is the identity: the gathered shape
            x, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", -1))
            shape = list(x.shape)
            shape[dim] *= size
            value = torch.empty(shape, dtype=x.dtype, device="meta")
        else:
            fn: Callable = REGISTRY.get(node.op).reference
            try:
                value = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - named in one line
                raise WorkbenchError(f"tensor parallelism: cannot re-derive the shape of {node.name} ({node.op}): "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        env[node.name] = value
        outs = list(value) if isinstance(value, (tuple, list)) and all(
            isinstance(x, torch.Tensor) for x in value) else [value]
        node.outputs = [_respec(old, new) for old, new in zip(node.outputs, outs)] if node.outputs else node.outputs


def _out_dtype(node: Node, q: torch.Tensor) -> torch.dtype:
    spec = node.out
    return dtype_from_name(spec.dtype) if spec is not None else q.dtype


def _respec(old: TensorSpec | None, new: Any) -> TensorSpec | None:
    if old is None or not isinstance(new, torch.Tensor) or len(old.shape) != new.dim():
        return old
    shape = [d if isinstance(d, str) else int(s) for d, s in zip(old.shape, new.shape)]
    return TensorSpec(shape, old.dtype, old.contiguous)


# ---- weights --------------------------------------------------------------------------------------------------

def rank_params(graph: Graph, params: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s values of ``graph``'s params from the unsharded ``params`` (by stored name): a sharded
    param is its pieces of the stored tensor, concatenated; every other param is taken as it is."""
    size = graph.meta.get("tensor_parallel", {}).get("size", 1)
    if not 0 <= rank < size:
        raise WorkbenchError(f"rank {rank} is outside the graph's tensor-parallel size {size}")
    out = {}
    for name, p in graph.params.items():
        shard = p.shard
        if shard is None:
            if name in params:
                out[name] = params[name]
            continue
        full = params[shard["source"]]
        out[name] = torch.cat([full.narrow(shard["dim"], s, e - s) for s, e in shard["ranks"][rank]],
                              dim=shard["dim"]).contiguous()
    return out

