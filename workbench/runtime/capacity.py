"""KV-cache capacity planning: how many blocks fit on a GPU and how many requests they hold at once.

The paged cache (``workbench/graph/paged.py``) keeps one tensor per attention layer,
``[2, num_blocks, block_size, kv_heads, head_dim]`` (K and V), so a cached token costs the same
in every block and the whole cache is a count of blocks. Before allocating it, the runtime
(and a user choosing a GPU, a KV dtype or a memory fraction) asks how big it can be; this is
vLLM's "# GPU blocks" / "maximum concurrency" log line and TensorRT-LLM's
``kv_cache_free_gpu_memory_fraction``:

    bytes_per_token    = 2 (K and V) × layers × kv_heads × head_dim × element size
    bytes_per_block    = bytes_per_token × block_size
    kv_budget_bytes    = floor(memory_bytes × fraction) − weights_bytes − activation_bytes
    num_blocks         = kv_budget_bytes // bytes_per_block
    tokens             = num_blocks × block_size
    blocks_per_request = ceil((prompt_len + output_len) / block_size)
    max_concurrency    = num_blocks // blocks_per_request

``memory_bytes`` is whatever the caller budgets from: the device's total memory (then the
weights and the activation workspace come off it) or its free memory after loading the
weights (then pass ``weights_bytes=0``). ``max_concurrency`` is the worst case in which every
request holds its peak (prompt and all of its output) at the same time; in-flight batching
staggers requests and prefix caching shares blocks, so a server usually runs more.

Planning is arithmetic on the graph's :class:`~workbench.graph.paged.PagedLayout` (its ``bytes_per_token``
and ``bytes_per_block``); nothing here touches a GPU except :func:`device_memory`, which asks CUDA (lazily) for
the free and total bytes:

    layout = PagedLayout.from_graph(graph).planned(dtype="float8_e4m3fn")   # plan an FP8 cache
    plan = plan_capacity(layout, memory_bytes=80 * 2**30, weights_bytes=16 * 10**9,
                         prompt_len=1000, output_len=1000)
    print(plan.summary())
    # KV cache: 58469 blocks of 16 tokens (935504 tokens, 57.10 GiB, fp8 e4m3); 1000+1000-token requests: 467 at once
    concurrency_table(layout, memory_bytes=80 * 2**30, weights_bytes=16 * 10**9,
                      fractions=[0.8, 0.9], lengths=[(1000, 1000), (8000, 500)])   # a DataFrame to plot

Tensor parallelism: every number is one GPU's. A graph sharded over N ranks (or ``layout.planned(
tensor_parallel_size=N)``) caches each rank's KV heads only (``kv_heads_per_rank``: ``kv_heads / N``, or one
replicated head, counted whole, when there are fewer KV heads than ranks), and ``plan_graph`` takes a rank's
weights (``rank_weights_bytes``: its slices, plus the replicated norms and embeddings whole); the summary says so:

    plan_graph(graph, memory_bytes=80 * 2**30, prompt_len=1000, output_len=1000, tensor_parallel_size=2)
    llama3_8b = PagedLayout(block_size=16, layers=range(32), kv_heads=8, head_dim=128, dtype="bfloat16")
    plan_capacity(llama3_8b.planned(tensor_parallel_size=2), memory_bytes=80 * 2**30, weights_bytes=8 * 10**9,
                  prompt_len=1000, output_len=1000).summary()
    # KV cache per GPU of tensor-parallel size 2 (4 KV heads each): 66098 blocks of 16 tokens (1057568 tokens,
    # 64.55 GiB, bf16); 1000+1000-token requests: 528 at once
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from ..errors import WorkbenchError
from ..graph.paged import PagedLayout

GIB = 2**30

#: Short dtype names for summaries, as vLLM and TensorRT-LLM print them.
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
          "float8_e4m3fn": "fp8 e4m3", "float8_e5m2": "fp8 e5m2"}


def _positive_int(value, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkbenchError(f"{what} must be a positive integer, got {value!r}; {fix}")
    return value


@dataclass(frozen=True)
class CapacityPlan:
    """How many KV blocks a memory budget holds and how many requests of one shape fit in them.

    The inputs (memory, fraction, weights, activations, request lengths) are kept beside the
    results so a plan explains itself. Build it with :func:`plan_capacity`.
    """
    layout: PagedLayout
    memory_bytes: int
    fraction: float
    weights_bytes: int
    activation_bytes: int
    prompt_len: int
    output_len: int
    kv_budget_bytes: int
    num_blocks: int
    tokens: int
    blocks_per_request: int
    max_concurrency: int

    @property
    def kv_bytes(self) -> int:
        """Bytes the cache tensors take: whole blocks only, so at most ``kv_budget_bytes``."""
        return self.num_blocks * self.layout.bytes_per_block

    def summary(self) -> str:
        """One line, like vLLM's startup log; with tensor parallelism, one GPU's (the size and its KV heads named)."""
        layout = self.layout
        dtype = _SHORT.get(layout.dtype, layout.dtype)
        where = "KV cache"
        if layout.tensor_parallel_size > 1:
            heads = f"{layout.kv_heads} KV head{'s' if layout.kv_heads != 1 else ''}"
            where = f"KV cache per GPU of tensor-parallel size {layout.tensor_parallel_size} ({heads} each)"
        line = (f"{where}: {self.num_blocks} blocks of {self.layout.block_size} tokens "
                f"({self.tokens} tokens, {self.kv_bytes / GIB:.2f} GiB, {dtype}); "
                f"{self.prompt_len}+{self.output_len}-token requests: {self.max_concurrency} at once")
        if self.max_concurrency == 0:
            line += f" (one needs {self.blocks_per_request} blocks)"
        return line

    def to_dict(self) -> dict:
        return {**asdict(self), "layout": self.layout.to_dict(), "kv_bytes": self.kv_bytes}


def plan_capacity(layout: PagedLayout, *, memory_bytes: int, fraction: float = 0.9, prompt_len: int,
                  output_len: int, weights_bytes: int = 0, activation_bytes: int = 0) -> CapacityPlan:
    """The KV cache that ``fraction`` of ``memory_bytes`` holds after the weights and activations.

    ``memory_bytes`` is the device's total or free memory (see :func:`device_memory`).
    """
    _positive_int(memory_bytes, "memory_bytes", "pass the device's total or free memory in bytes, "
                  "e.g. 80 * 2**30 for an 80 GiB GPU")
    if not 0 < fraction <= 1:  # also refuses NaN
        raise WorkbenchError(f"fraction must lie in (0, 1], got {fraction}; it is the share of memory_bytes "
                             "the engine may use (weights, activations and KV cache), e.g. 0.9")
    for name, value in (("weights_bytes", weights_bytes), ("activation_bytes", activation_bytes),
                        ("prompt_len", prompt_len), ("output_len", output_len)):
        if value < 0:
            raise WorkbenchError(f"{name} must be >= 0, got {value}")
    if prompt_len + output_len == 0:
        raise WorkbenchError("prompt_len + output_len is 0, so a request holds no KV cache; "
                             "give the request shape to plan for, e.g. prompt_len=1000, output_len=1000")
    usable = math.floor(memory_bytes * fraction)
    budget = usable - weights_bytes - activation_bytes
    if budget <= 0:
        raise WorkbenchError(
            f"no memory left for the KV cache: {fraction} × {memory_bytes / GIB:.2f} GiB = {usable / GIB:.2f} GiB, "
            f"minus {weights_bytes / GIB:.2f} GiB of weights and {activation_bytes / GIB:.2f} GiB of activations, "
            f"leaves {budget / GIB:.2f} GiB; raise fraction, use a device with more memory, quantize the weights, "
            "or pass weights_bytes=0 if memory_bytes is the free memory after loading them")
    num_blocks = budget // layout.bytes_per_block
    # a request holds its prompt and every output token at its peak, in whole blocks
    blocks_per_request = -(-(prompt_len + output_len) // layout.block_size)
    return CapacityPlan(layout, memory_bytes, fraction, weights_bytes, activation_bytes, prompt_len, output_len,
                        kv_budget_bytes=budget, num_blocks=num_blocks, tokens=num_blocks * layout.block_size,
                        blocks_per_request=blocks_per_request, max_concurrency=num_blocks // blocks_per_request)


def rank_weights_bytes(graph) -> int:
    """The bytes of one rank's weights: every param of ``graph`` at its shape and dtype; a sharded graph's
    (``passes.tensor_parallel``) are one rank's slices, and its replicated tensors (norms, embeddings) count
    whole. Derived params (a fused QKV weight, a folded RoPE table) count as the tensors they are at run time."""
    total = 0
    for p in graph.params.values():
        if any(not isinstance(d, int) for d in p.spec.shape):
            raise WorkbenchError(f"parameter {p.name} has a symbolic shape {p.spec.shape}; pass weights_bytes")
        total += p.spec.nbytes({})
    return total


def plan_graph(graph, *, memory_bytes: int, fraction: float = 0.9, prompt_len: int, output_len: int,
               weights_bytes: int | None = None, activation_bytes: int = 0, tensor_parallel_size: int | None = None,
               dtype: str | None = None, block_size: int | None = None) -> CapacityPlan:
    """``plan_capacity`` of one GPU running ``graph`` (paged): its KV layout (``dtype`` / ``block_size`` planned
    as ``PagedLayout.planned``) and, unless ``weights_bytes`` is given, its weights (``rank_weights_bytes``).
    ``tensor_parallel_size`` N > 1 plans one rank of an unsharded graph sharded over N (``shard_tensor_parallel``:
    its KV heads and slices); a sharded graph is planned at its own size."""
    from ..graph.paged import PagedLayout

    size = int(graph.meta.get("tensor_parallel", {}).get("size", 1))
    if tensor_parallel_size is not None:
        _positive_int(tensor_parallel_size, "tensor_parallel_size", "pass the number of GPUs the model is sharded "
                      "over (1: one)")
    if tensor_parallel_size is not None and tensor_parallel_size != size:
        from ..graph.passes.tensor_parallel import shard_tensor_parallel

        if size != 1:
            raise WorkbenchError(f"this graph is sharded for tensor-parallel size {size}; plan size "
                                 f"{tensor_parallel_size} from the unsharded graph")
        graph, _ = shard_tensor_parallel(graph, tensor_parallel_size)
    layout = PagedLayout.from_graph(graph).planned(dtype=dtype, block_size=block_size)
    return plan_capacity(layout, memory_bytes=memory_bytes, fraction=fraction, prompt_len=prompt_len,
                         output_len=output_len, activation_bytes=activation_bytes,
                         weights_bytes=rank_weights_bytes(graph) if weights_bytes is None else weights_bytes)


#: The share of a GPU's free memory, after the weights are loaded, that ``LLM`` and ``workbench serve`` give the
#: KV cache unless told otherwise (the rest is the steps' activations and CUDA graphs' memory pool).
DEFAULT_MEMORY_FRACTION = 0.9
#: The KV cache's budget on the CPU, where free memory says little about what a process may take (vLLM's CPU
#: backend likewise takes a fixed ``VLLM_CPU_KVCACHE_SPACE``).
CPU_KV_BYTES = 256 * 2**20


def runtime_plan(layout: PagedLayout, device, *, max_model_len: int, max_num_seqs: int,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> CapacityPlan:
    """The KV cache a runtime allocates when it is given no block count: on a GPU, what ``memory_fraction`` of the
    free memory holds (call it once the weights are on the device); on the CPU, ``CPU_KV_BYTES``; either way no
    more blocks than ``max_num_seqs`` sequences of ``max_model_len`` tokens could ever fill. The plan's
    concurrency line is for requests of ``max_model_len`` tokens, half prompt and half output."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = device_memory(device)
        memory, fraction = free, memory_fraction
    else:
        memory, fraction = CPU_KV_BYTES, 1.0
    plan = plan_capacity(layout, memory_bytes=memory, fraction=fraction, prompt_len=max_model_len // 2,
                         output_len=max_model_len - max_model_len // 2)
    need = max_num_seqs * plan.blocks_per_request
    if plan.num_blocks > need:  # more would never be used: the same plan, capped
        from dataclasses import replace

        plan = replace(plan, num_blocks=need, tokens=need * layout.block_size,
                       max_concurrency=need // plan.blocks_per_request)
    if plan.num_blocks < 1:
        raise WorkbenchError(f"the KV cache gets no block: {plan.summary()}; free GPU memory, raise the memory "
                             "fraction or give a block count")
    return plan


def device_memory(device="cuda") -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, from ``torch.cuda.mem_get_info``, after handing the caching
    allocator's unused blocks back (what a build or a weight load left cached is free for the KV cache).

    It creates the CUDA context if there is none yet (no tensor memory).
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        raise WorkbenchError(f"device_memory reads CUDA devices, not {str(dev)!r}; "
                             "pass memory_bytes to plan_capacity explicitly")
    if not torch.cuda.is_available():
        raise WorkbenchError("no CUDA device here to read free memory from; pass memory_bytes explicitly "
                             "(e.g. memory_bytes=80 * 2**30 to plan for an 80 GiB GPU)")
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    return int(free), int(total)


def concurrency_table(layout: PagedLayout, *, memory_bytes: int, fractions: Iterable[float],
                      lengths: Iterable[tuple[int, int]], weights_bytes: int = 0, activation_bytes: int = 0):
    """One row per (fraction, (prompt_len, output_len)): the plan's blocks, tokens, GiB and concurrency.

    A fraction that leaves no memory for the cache raises, as :func:`plan_capacity` does.
    """
    import pandas as pd

    lengths = list(lengths)
    rows = []
    for fraction in fractions:
        for prompt_len, output_len in lengths:
            p = plan_capacity(layout, memory_bytes=memory_bytes, fraction=fraction, prompt_len=prompt_len,
                              output_len=output_len, weights_bytes=weights_bytes, activation_bytes=activation_bytes)
            rows.append({"fraction": fraction, "prompt_len": prompt_len, "output_len": output_len,
                         "num_blocks": p.num_blocks, "tokens": p.tokens, "kv_gib": p.kv_bytes / GIB,
                         "max_concurrency": p.max_concurrency})
    return pd.DataFrame(rows, columns=["fraction", "prompt_len", "output_len", "num_blocks", "tokens", "kv_gib",
                                       "max_concurrency"])
