"""The paged KV cache of a graph after ``insert_paged_attention``: its layout, its tensors, and one step's inputs.

After the pass the graph takes a flat batch (batch dim 1) of new tokens from any number of sequences, plus
the attention metadata of the step and one cache tensor per attention layer:

    input_ids        [1, tokens]        new tokens of every sequence, back to back
    position_ids     [1, tokens]        their positions (each sequence continues where it stopped)
    slot_mapping     [tokens]           cache slot (block * block_size + offset) each new token's K/V goes to
    block_tables     [seqs, max_blocks] each sequence's blocks, padded (with 0, or the runtime's scratch block)
    seq_lens         [seqs]             tokens in each sequence after this step (context + new)
    query_start_loc  [seqs + 1]         where each sequence's new tokens start in the flat batch
    kv_cache_<layer> [2, num_blocks, block_size, kv_heads, head_dim]

The cache tensors have that shape but store each block head-major ([kv_heads, block_size, head_dim]:
``new_kv_cache``), so that a KV head's keys of one block are contiguous; the kernels follow the strides.

Three things here, each used by every stage that runs a paged graph (passes' checks, calibration, tuning,
evaluation, the runtime):

* ``PagedLayout``: the cache's shape, dtype and FP8 scales, read once from the graph (``from_graph``). The
  graph keeps it as ``meta["paged"]`` (``to_meta``; the serialized form in graph and engine files) and the
  scales on its ``workbench.paged_attention`` nodes (``k_scale=``, ``v_scale=``); nothing else reads those.
* ``step_inputs``: the metadata of one step from each sequence's context length, new tokens and block table.
  The runtime's executor (its block manager's tables) and ``SimplePagedCache`` both build their steps with it.
* ``SimplePagedCache`` (``cache_for(graph)``): blocks from a free list, one block list per sequence; the
  minimum to run a paged graph outside the runtime (no ref counts, prefix caching or eviction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

import torch

from ..errors import WorkbenchError
from .ir import Ref, dtype_from_name, dtype_name

#: The op whose nodes read and write the cache, and carry its scales by name.
OP = "workbench.paged_attention"
#: ``paged_attention``'s positional arguments before the scales: q, k, v, kv_cache, the four metadata inputs,
#: scale, window. Graphs written before the scales went by name (``k_scale=``, ``v_scale=``) held them at 10, 11.
_LEGACY_SCALES_AT = 10


def _positive_int(value, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkbenchError(f"{what} must be a positive integer, got {value!r}; {fix}")
    return value


def cache_input(layer: int) -> str:
    """The graph input that holds ``layer``'s KV cache."""
    return f"kv_cache_{layer}"


#: How to give a graph paged attention, for every error about one without it: ``insert_paged_attention`` rewrites
#: ``fuse_attention``'s nodes, so unticking fuse_attention leaves it matching nothing.
RERUN_PASSES = ("re-run the passes with fuse_attention and insert_paged_attention (`workbench optimize` --force, "
                "or tick both in the passes widget and run it again)")


def whole_size(size, what: str = "the tensor-parallel size") -> int:
    """``size`` if it is a whole number >= 1 (not a bool), else one line naming ``what``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise WorkbenchError(f"{what} must be a whole number >= 1, got {size!r}")
    return size


def kv_heads_per_rank(kv_heads: int, size: int) -> int:
    """The KV heads each of ``size`` tensor-parallel ranks caches: ``kv_heads / size`` when ``size`` divides them,
    else (``kv_heads`` divides ``size``) one, each KV head replicated whole on ``size / kv_heads`` ranks (the ranks
    whose query heads read it). Any other size is refused in one line."""
    if kv_heads % size and size % kv_heads:
        raise WorkbenchError(f"tensor-parallel size {size} neither divides the {kv_heads} KV heads nor is a multiple "
                             f"of them (to replicate each on {size} / {kv_heads} ranks); use a TP size that divides "
                             f"{kv_heads} or that {kv_heads} divides")
    return kv_heads // size if kv_heads % size == 0 else 1


def is_paged(graph) -> bool:
    """Whether ``graph`` attends over a paged KV cache (``insert_paged_attention`` ran on it)."""
    return bool(graph.meta.get("paged"))


@dataclass(frozen=True)
class PagedLayout:
    """The paged KV cache of a graph: ``block_size`` tokens per block; one cache tensor for each attention
    layer in ``layers`` (their indices), ``kv_heads`` × ``head_dim`` per token for K and for V; elements of
    ``dtype`` (a torch dtype name: ``"bfloat16"``, ``"float8_e4m3fn"``, ...). ``scales``: an FP8 cache's
    ``(k_scale, v_scale)`` per layer, in the order of ``layers`` (None: the cache holds K and V as they are).

    ``from_graph`` reads a graph's; built by hand it plans a cache for a model's numbers
    (``PagedLayout(block_size=16, layers=range(32), kv_heads=8, head_dim=128, dtype="bfloat16")``).

    ``tensor_parallel_size``: the layout is one rank's of a graph sharded over that many ranks, ``kv_heads`` that
    rank's (a replicated KV head counts whole on each rank that holds it); ``from_graph`` reads it from a sharded
    graph, and ``planned(tensor_parallel_size=N)`` plans one rank's cache from a whole model's layout.
    """
    block_size: int
    layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    dtype: str
    scales: tuple[tuple[float, float], ...] | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.layers, int) or not isinstance(self.layers, Iterable):
            raise WorkbenchError(f"KV layout: layers must list the attention layers' indices, got {self.layers!r}; "
                                 "e.g. layers=range(32) for 32 layers")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
            raise WorkbenchError(f"KV layout: layers must be one or more layer indices >= 0, got {self.layers!r}; "
                                 "read the layout from a paged graph (PagedLayout.from_graph) or give the model's")
        for name in ("kv_heads", "head_dim"):
            _positive_int(getattr(self, name), f"KV layout: {name}", "read the layout from a paged graph "
                          "(PagedLayout.from_graph) or give the model's numbers")
        _positive_int(self.block_size, "KV layout: block_size", "pass the tokens per KV block, e.g. block_size=16")
        _positive_int(self.tensor_parallel_size, "KV layout: tensor_parallel_size", "pass the number of ranks the "
                      "model is sharded over (1: one device)")
        # normalizes "torch.bfloat16" to "bfloat16" and refuses unknown names
        object.__setattr__(self, "dtype", dtype_name(dtype_from_name(str(self.dtype))))
        if self.scales is not None:
            scales = tuple((float(k), float(v)) for k, v in self.scales)
            if len(scales) != len(self.layers):
                raise WorkbenchError(f"KV layout: {len(scales)} (k_scale, v_scale) pairs for {len(self.layers)} "
                                     "layers; give one pair per layer")
            object.__setattr__(self, "scales", scales)

    @classmethod
    def from_graph(cls, graph) -> "PagedLayout":
        """The layout of a graph after ``insert_paged_attention``: ``meta["paged"]`` and its attention nodes'
        ``k_scale`` / ``v_scale``."""
        meta = graph.meta.get("paged")
        if not meta:
            raise WorkbenchError(f"this graph has no paged attention, so it has no KV cache: {RERUN_PASSES}")
        layers = list(meta["layers"])
        by_cache = {cache_input(i): i for i in layers}
        scales = {}
        for n in graph.nodes:
            if n.op == OP and ("k_scale" in n.kwargs or "v_scale" in n.kwargs):
                cache = n.args[3] if len(n.args) > 3 else n.kwargs.get("kv_cache")
                layer = by_cache.get(cache.name) if isinstance(cache, Ref) else None
                if layer is None:
                    raise WorkbenchError(f"node {n.name!r} carries KV scales but reads no cache of layers {layers}")
                scales[layer] = (n.kwargs.get("k_scale") or 1.0, n.kwargs.get("v_scale") or 1.0)
        if scales and set(scales) != set(layers):
            missing = sorted(set(layers) - set(scales))
            raise WorkbenchError(f"the KV cache has scales for some layers but not {missing}; re-run the quant "
                                 "stage (`workbench quantize`) on the optimized graph")
        return cls(block_size=meta["block_size"], layers=layers, kv_heads=meta["kv_heads"],
                   head_dim=meta["head_dim"], dtype=meta["dtype"],
                   scales=tuple(scales[i] for i in layers) if scales else None,
                   tensor_parallel_size=int(graph.meta.get("tensor_parallel", {}).get("size", 1)))

    def to_meta(self) -> dict:
        """The layout as the graph keeps it (``graph.meta["paged"]``); the scales stay on the attention nodes, the
        tensor-parallel size in ``graph.meta["tensor_parallel"]``."""
        return {"block_size": self.block_size, "layers": list(self.layers), "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype}

    def store(self, graph) -> None:
        """Record this layout as ``graph``'s (what ``insert_paged_attention`` and an FP8 cache's quantization do);
        the caller keeps the graph's cache inputs and attention nodes' scales in step with it."""
        graph.meta["paged"] = self.to_meta()

    def planned(self, *, dtype: str | None = None, block_size: int | None = None,
                tensor_parallel_size: int | None = None) -> "PagedLayout":
        """This layout with another cache ``dtype`` or ``block_size``, or one rank's of ``tensor_parallel_size``:
        to plan a cache the graph does not have yet (an FP8 cache before quantizing, larger blocks, the model on
        several GPUs: ``kv_heads_per_rank``). A new dtype drops the scales. Only a whole model's layout (size 1)
        is planned for another size."""
        dtype = self.dtype if dtype is None else dtype
        same = dtype_name(dtype_from_name(str(dtype))) == self.dtype
        size, kv_heads = self.tensor_parallel_size, self.kv_heads
        if tensor_parallel_size is not None:
            _positive_int(tensor_parallel_size, "KV layout: tensor_parallel_size", "pass the number of ranks the "
                          "model is sharded over (1: one device)")
        if tensor_parallel_size is not None and tensor_parallel_size != size:
            if size != 1:
                raise WorkbenchError(f"KV layout: this is one rank's layout of tensor-parallel size {size}; plan "
                                     f"size {tensor_parallel_size} from the unsharded graph's layout")
            size, kv_heads = tensor_parallel_size, kv_heads_per_rank(kv_heads, tensor_parallel_size)
        return replace(self, dtype=dtype, block_size=self.block_size if block_size is None else block_size,
                       scales=self.scales if same else None, kv_heads=kv_heads, tensor_parallel_size=size)

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def element_size(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """What one cached token costs over every layer: 2 (K and V) × layers × kv_heads × head_dim × element."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens of one sequence."""
        return -(-tokens // self.block_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": self.bytes_per_token, "bytes_per_block": self.bytes_per_block}

    # ---- the graph's cache inputs --------------------------------------------------------------------------
    @property
    def cache_inputs(self) -> dict[str, int]:
        """graph input name -> the layer whose cache it holds."""
        return {cache_input(i): i for i in self.layers}

    def scale_of(self, layer: int) -> tuple[float, float] | None:
        """``layer``'s (k_scale, v_scale); None for a cache without scales."""
        return None if self.scales is None else self.scales[self.layers.index(layer)]

    def new_caches(self, num_blocks: int, device: str | torch.device) -> dict[str, torch.Tensor]:
        """Every layer's cache tensor (``new_kv_cache``), zeroed, by graph input name."""
        return {name: new_kv_cache(num_blocks, self.block_size, self.kv_heads, self.head_dim, self.torch_dtype,
                                   device) for name in self.cache_inputs}


def new_kv_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str | torch.device) -> torch.Tensor:
    """One layer's KV cache, zeroed: shape [2, num_blocks, block_size, kv_heads, head_dim], stored head-major
    within each block (a transposed view of [2, num_blocks, kv_heads, block_size, head_dim]). A decode program
    reads one KV head's keys block by block: contiguous runs of block_size × head_dim instead of head_dim-long
    rows strided by kv_heads × head_dim. On the H200, a 512 × 1500 decode over an FP8 cache in blocks of 64
    read 2.7% faster so (bench/attention.py --sections decode)."""
    return torch.zeros(2, num_blocks, kv_heads, block_size, head_dim, dtype=dtype, device=device).transpose(2, 3)


def scales_by_name(graph) -> int:
    """Move the KV scales of ``graph``'s paged attention nodes from positions 10 and 11 (graphs and engines
    written before they went by name) to ``k_scale=`` / ``v_scale=``, in place; returns the nodes changed."""
    changed = 0
    for n in graph.nodes:
        if n.op == OP and len(n.args) > _LEGACY_SCALES_AT:
            k_scale, v_scale = (list(n.args[_LEGACY_SCALES_AT:]) + [None, None])[:2]
            n.args = list(n.args[:_LEGACY_SCALES_AT])
            n.kwargs = {**n.kwargs, **{k: v for k, v in (("k_scale", k_scale), ("v_scale", v_scale))
                                       if v is not None}}
            changed += 1
    return changed


# ---- one step's inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepInputs:
    """One step's attention metadata as host lists, in the order the flat batch holds the sequences (see the
    module docstring for each input). ``block_tables`` is flat: ``len(seq_lens)`` rows of ``table_width``."""
    input_ids: list[int]
    position_ids: list[int]
    slot_mapping: list[int]
    block_tables: list[int]
    table_width: int
    seq_lens: list[int]
    query_start_loc: list[int]

    def tensors(self, device: str | torch.device) -> dict[str, torch.Tensor]:
        """The graph's inputs besides the caches, as int64 tensors on ``device``."""
        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        return {"input_ids": t([self.input_ids]), "position_ids": t([self.position_ids]),
                "slot_mapping": t(self.slot_mapping),
                "block_tables": t(self.block_tables).view(len(self.seq_lens), self.table_width),
                "seq_lens": t(self.seq_lens), "query_start_loc": t(self.query_start_loc)}


def step_inputs(block_size: int, seqs: Iterable[tuple[int, Sequence[int], Sequence[int]]], *,
                table_fill: int = 0) -> StepInputs:
    """The metadata of one step over ``seqs``: per sequence (tokens already cached, its new token ids, its
    block table, long enough for both). Each new token at position p goes to slot
    ``table[p // block_size] * block_size + p % block_size``; the tables are padded with ``table_fill`` to the
    longest."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    starts, lens, tables = [0], [], []
    for cached, tokens, table in seqs:
        end = cached + len(tokens)
        if -(-end // block_size) > len(table):
            raise WorkbenchError(f"a sequence of {end} tokens needs {-(-end // block_size)} blocks of {block_size}, "
                                 f"its block table has {len(table)}; reserve its blocks before the step")
        ids += tokens
        pos += range(cached, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, end)]
        starts.append(starts[-1] + len(tokens))
        lens.append(end)
        tables.append(table)
    if not tables:
        raise WorkbenchError("a step needs at least one sequence")
    width = max(len(t) for t in tables)
    flat: list[int] = []
    for table in tables:
        flat += table
        flat += [table_fill] * (width - len(table))
    return StepInputs(ids, pos, slots, flat, width, lens, starts)


# ---- a cache outside the runtime --------------------------------------------------------------------------
@dataclass
class SimplePagedCache:
    """Blocks of ``layout``'s cache from a free list, one block list per sequence: the minimum to run a
    paged graph outside the runtime (tests, the passes' numeric checks, calibration, tuning, evaluation)."""
    layout: PagedLayout
    num_blocks: int
    device: str | torch.device = "cpu"
    free_blocks: list[int] = field(init=False)
    blocks: dict[int, list[int]] = field(init=False, default_factory=dict)
    lengths: dict[int, int] = field(init=False, default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.tensors = self.layout.new_caches(self.num_blocks, self.device)

    def free(self, seq_id: int) -> None:
        self.free_blocks.extend(reversed(self.blocks.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def _reserve(self, seq_id: int, new_tokens: int) -> None:
        """Blocks for ``new_tokens`` more tokens of ``seq_id``, allocated as needed."""
        start = self.lengths.get(seq_id, 0)
        blocks = self.blocks.setdefault(seq_id, [])
        need = self.layout.blocks_for(start + new_tokens) - len(blocks)
        if need > len(self.free_blocks):
            raise WorkbenchError(f"KV cache full: sequence {seq_id} needs {need} more blocks, "
                                 f"{len(self.free_blocks)} free of {self.num_blocks}")
        blocks += [self.free_blocks.pop() for _ in range(need)]
        self.lengths[seq_id] = start + new_tokens

    def step_inputs(self, batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        """Graph inputs for one step: ``batch`` lists (sequence id, its new token ids)."""
        seqs = []
        for seq_id, tokens in batch:
            cached = self.lengths.get(seq_id, 0)
            self._reserve(seq_id, len(tokens))
            seqs.append((cached, tokens, self.blocks[seq_id]))
        return {**step_inputs(self.layout.block_size, seqs).tensors(self.device), **self.tensors}


def cache_for(graph, *, num_blocks: int = 64, device: str | torch.device = "cpu") -> SimplePagedCache:
    """A cache shaped for a graph after ``insert_paged_attention``."""
    return SimplePagedCache(PagedLayout.from_graph(graph), num_blocks, device)
