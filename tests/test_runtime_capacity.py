"""KV-cache capacity planning: bytes per token, blocks in a budget, requests at once, and the refusals."""

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.graph.ir import Graph
from workbench.graph.paged import PagedLayout, cache_for
from workbench.runtime.capacity import (GIB, CapacityPlan, concurrency_table, device_memory, plan_capacity, plan_graph,
                                        rank_weights_bytes, runtime_plan)

#: Llama-3-8B: 32 layers, 8 KV heads (GQA), head_dim 128. Built by hand: capturing the 8B
#: graph without weights takes ~20 s on a CPU, beyond this file's budget.
LLAMA3_8B = dict(layers=range(32), kv_heads=8, head_dim=128, block_size=16)
H100 = 80 * GIB
WEIGHTS_8B = 16 * 10**9


@pytest.fixture(scope="module")
def optimized(checked_optimize):
    return checked_optimize("tiny-llama")


@pytest.fixture(scope="module")
def graphs(optimized):
    """tiny-llama's graph as captured (no paged attention) and after every pass."""
    return optimized.captured.graph, optimized.graph


def test_tiny_llama_layout_matches_its_graph_and_the_allocated_cache(graphs):
    _, graph = graphs
    paged = graph.meta["paged"]  # the layout's serialized form
    layout = PagedLayout.from_graph(graph)
    assert (layout.layers, layout.kv_heads, layout.head_dim, layout.dtype, layout.block_size) == (
        tuple(paged["layers"]), paged["kv_heads"], paged["head_dim"], paged["dtype"], paged["block_size"])
    assert layout.to_meta() == paged
    element = torch.empty((), dtype=getattr(torch, paged["dtype"])).element_size()
    assert layout.bytes_per_token == 2 * len(paged["layers"]) * paged["kv_heads"] * paged["head_dim"] * element
    assert layout.bytes_per_block == layout.bytes_per_token * paged["block_size"]
    # tiny-llama on the CPU: 2 layers, 2 KV heads, head_dim 16, float32, 16-token blocks
    assert (layout.bytes_per_token, layout.bytes_per_block) == (2 * 2 * 2 * 16 * 4, 512 * 16)
    # what the planner counts is what the paged cache allocates
    cache = cache_for(graph, num_blocks=5)
    assert sum(t.nbytes for t in cache.tensors.values()) == 5 * layout.bytes_per_block


def test_planned_layouts_plan_a_cache_the_graph_does_not_have(graphs):
    _, graph = graphs
    base = PagedLayout.from_graph(graph)
    fp8 = base.planned(dtype="float8_e4m3fn", block_size=32)
    assert (fp8.dtype, fp8.block_size) == ("float8_e4m3fn", 32)
    assert fp8.bytes_per_token == base.bytes_per_token // 4  # float32 -> 1 byte
    assert fp8.bytes_per_block == fp8.bytes_per_token * 32
    assert graph.meta["paged"]["block_size"] == 16  # the graph is not changed


def test_llama3_8b_bytes_per_token():
    bf16 = PagedLayout(**LLAMA3_8B, dtype="bfloat16")
    assert bf16.bytes_per_token == 131072 == 32 * 8 * 128 * 2 * 2
    assert bf16.bytes_per_block == 2 * 2**20  # 2 MiB per 16-token block
    assert PagedLayout(**LLAMA3_8B, dtype="float8_e4m3fn").bytes_per_token == 65536
    assert PagedLayout(**LLAMA3_8B, dtype="torch.bfloat16").dtype == "bfloat16"


def test_worked_plan_llama3_8b_on_80_gib():
    layout = PagedLayout(**LLAMA3_8B, dtype="bfloat16")
    plan = plan_capacity(layout, memory_bytes=H100, fraction=0.9, weights_bytes=WEIGHTS_8B,
                         prompt_len=1000, output_len=1000)
    budget = 80 * 2**30 * 9 // 10 - 16 * 10**9
    assert plan.kv_budget_bytes == budget == 61_309_411_328
    assert plan.num_blocks == budget // (131072 * 16) == 29234
    assert plan.tokens == 29234 * 16 == 467_744
    assert plan.blocks_per_request == math.ceil(2000 / 16) == 125
    assert plan.max_concurrency == 29234 // 125 == 233
    assert plan.kv_bytes == 29234 * 2 * 2**20
    assert plan.summary() == ("KV cache: 29234 blocks of 16 tokens (467744 tokens, 57.10 GiB, bf16); "
                              "1000+1000-token requests: 233 at once")
    d = plan.to_dict()
    assert d["num_blocks"] == 29234 and d["max_concurrency"] == 233 and d["kv_bytes"] == plan.kv_bytes
    assert d["layout"]["bytes_per_token"] == 131072 and d["layout"]["dtype"] == "bfloat16"

    # an FP8 cache holds twice the blocks; activations come off the budget too
    fp8 = plan_capacity(PagedLayout(**LLAMA3_8B, dtype="float8_e4m3fn"), memory_bytes=H100, fraction=0.9,
                        weights_bytes=WEIGHTS_8B, activation_bytes=2 * GIB, prompt_len=1000, output_len=1000)
    assert fp8.num_blocks == (budget - 2 * 2**30) // (65536 * 16) == 56421
    assert fp8.max_concurrency == 56421 // 125 == 451


def test_blocks_per_request_rounds_up_and_partial_blocks_are_dropped():
    layout = PagedLayout(layers=[0], kv_heads=1, head_dim=4, dtype="float32", block_size=4)  # 32 B/token, 128 B/block
    plan = plan_capacity(layout, memory_bytes=1000, fraction=1.0, prompt_len=5, output_len=0)
    assert (plan.kv_budget_bytes, plan.num_blocks, plan.tokens) == (1000, 7, 28)  # 1000 // 128
    assert (plan.blocks_per_request, plan.max_concurrency) == (2, 3)  # 5 tokens -> 2 blocks
    plan = plan_capacity(layout, memory_bytes=1000, fraction=1.0, prompt_len=0, output_len=8)
    assert (plan.blocks_per_request, plan.max_concurrency) == (2, 3)
    # a request larger than the whole cache: a plan, with zero at once, that says why
    plan = plan_capacity(layout, memory_bytes=1000, fraction=1.0, prompt_len=100, output_len=0)
    assert (plan.blocks_per_request, plan.max_concurrency) == (25, 0)
    assert plan.summary().endswith("100+0-token requests: 0 at once (one needs 25 blocks)")
    assert isinstance(plan, CapacityPlan)


def test_bad_layouts_say_what_to_fix(graphs):
    captured, _ = graphs
    with pytest.raises(WorkbenchError, match="re-run the passes with fuse_attention and insert_paged_attention"):
        PagedLayout.from_graph(captured)
    empty = Graph(inputs={}, params={}, nodes=[], outputs=[], dims={})
    with pytest.raises(WorkbenchError, match="no paged attention.*`workbench optimize`"):
        PagedLayout.from_graph(empty)
    for bad in (0, -16, 16.0, "16", True):
        with pytest.raises(WorkbenchError, match=r"block_size must be a positive integer, got .*block_size=16"):
            PagedLayout(layers=range(2), kv_heads=2, head_dim=16, dtype="bfloat16", block_size=bad)
    _, graph = graphs
    with pytest.raises(WorkbenchError, match="block_size must be a positive integer, got 0"):
        PagedLayout.from_graph(graph).planned(block_size=0)
    with pytest.raises(WorkbenchError, match="kv_heads must be a positive integer, got 0"):
        PagedLayout(layers=range(2), kv_heads=0, head_dim=16, dtype="bfloat16", block_size=16)
    with pytest.raises(WorkbenchError, match="unknown dtype 'fp7'; use one of .*bfloat16"):
        PagedLayout(layers=range(2), kv_heads=2, head_dim=16, dtype="fp7", block_size=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fraction=0.0), r"fraction must lie in \(0, 1\], got 0.0; .*e.g. 0.9"),
    (dict(fraction=1.5), r"fraction must lie in \(0, 1\], got 1.5"),
    (dict(fraction=-0.1), r"fraction must lie in \(0, 1\]"),
    (dict(fraction=float("nan")), r"fraction must lie in \(0, 1\], got nan"),
    (dict(prompt_len=-1), "prompt_len must be >= 0, got -1"),
    (dict(output_len=-5), "output_len must be >= 0, got -5"),
    (dict(prompt_len=0, output_len=0), "prompt_len \\+ output_len is 0.*prompt_len=1000, output_len=1000"),
    (dict(weights_bytes=-1), "weights_bytes must be >= 0"),
    (dict(activation_bytes=-1), "activation_bytes must be >= 0"),
    (dict(memory_bytes=0), r"memory_bytes must be a positive integer, got 0; .*80 \* 2\*\*30"),
    # 0.9 × 16 GiB = 14.40 GiB < 16 GB of weights
    (dict(memory_bytes=16 * GIB), r"no memory left for the KV cache: 0.9 × 16.00 GiB = 14.40 GiB, minus 14.90 GiB "
                                  r"of weights and 0.00 GiB of activations, leaves -0.50 GiB; raise fraction"),
    (dict(weights_bytes=0, activation_bytes=72 * GIB), "no memory left for the KV cache: .* 72.00 GiB of activations"),
])
def test_bad_plans_say_what_to_fix(kwargs, message):
    args = dict(memory_bytes=H100, fraction=0.9, weights_bytes=WEIGHTS_8B, prompt_len=1000, output_len=1000)
    with pytest.raises(WorkbenchError, match=message):
        plan_capacity(PagedLayout(**LLAMA3_8B, dtype="bfloat16"), **{**args, **kwargs})


def test_device_memory_reads_cuda_or_asks_for_memory_bytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WorkbenchError, match="no CUDA device here.*pass memory_bytes explicitly"):
        device_memory()
    with pytest.raises(WorkbenchError, match="reads CUDA devices, not 'cpu'.*memory_bytes"):
        device_memory("cpu")
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: seen.append(dev) or (70 * GIB, H100))
    assert device_memory("cuda:1") == (70 * GIB, H100)
    assert seen == [torch.device("cuda:1")]


def test_concurrency_table_rows():
    layout = PagedLayout(**LLAMA3_8B, dtype="bfloat16")
    table = concurrency_table(layout, memory_bytes=H100, fractions=[0.5, 0.9], weights_bytes=WEIGHTS_8B,
                              lengths=[(1000, 1000), (8000, 500)])
    assert list(table.columns) == ["fraction", "prompt_len", "output_len", "num_blocks", "tokens", "kv_gib",
                                   "max_concurrency"]
    half = (80 * 2**30 // 2 - 16 * 10**9) // 2**21  # 2 MiB blocks
    full = (80 * 2**30 * 9 // 10 - 16 * 10**9) // 2**21
    assert (half, full) == (12850, 29234)
    exact = ["fraction", "prompt_len", "output_len", "num_blocks", "tokens", "max_concurrency"]
    assert table[exact].values.tolist() == [
        [0.5, 1000, 1000, half, half * 16, half // 125],
        [0.5, 8000, 500, half, half * 16, half // math.ceil(8500 / 16)],
        [0.9, 1000, 1000, full, full * 16, full // 125],
        [0.9, 8000, 500, full, full * 16, full // 532],
    ]
    assert table["max_concurrency"].tolist() == [102, 24, 233, 54]
    assert table["kv_gib"].tolist() == [half * 2 / 1024, half * 2 / 1024, full * 2 / 1024, full * 2 / 1024]


# ---- tensor parallelism: one GPU's numbers ----------------------------------------------------------------------

def test_a_sharded_graph_plans_one_gpu_its_kv_heads_and_weights(optimized):
    """A rank of tiny-llama (2 KV heads) caches half the KV bytes per token at TP-2 (one KV head each) and at TP-4
    too (each KV head replicated on two ranks, counted whole on each), holds its slices of the weights plus the
    replicated tensors, and its plan and the runtime's name the size; an unsharded graph planned for 2 ranks is
    the TP-2 graph's plan."""
    from workbench.graph.passes.tensor_parallel import rank_params, shard_tensor_parallel

    graph, params = optimized.graph, optimized.program.params
    whole = PagedLayout.from_graph(graph)
    assert (whole.kv_heads, whole.tensor_parallel_size) == (2, 1)
    args = dict(memory_bytes=64 * 2**20, prompt_len=100, output_len=100)
    one = plan_graph(graph, **args)
    assert one.weights_bytes == rank_weights_bytes(graph) == sum(t.nbytes for t in params.values())
    assert one.summary().startswith("KV cache: ")
    for size, kv_heads in ((2, 1), (4, 1)):
        sharded, _ = shard_tensor_parallel(graph, size)
        layout = PagedLayout.from_graph(sharded)
        assert (layout.kv_heads, layout.tensor_parallel_size) == (kv_heads, size)
        assert layout.bytes_per_token * 2 == whole.bytes_per_token  # 1 of 2 KV heads; at TP-4 replicated, whole
        assert layout == whole.planned(tensor_parallel_size=size)  # by hand, the same per-rank layout
        plan = plan_graph(sharded, **args)
        rank0 = rank_params(sharded, params, 0)
        assert plan.weights_bytes == rank_weights_bytes(sharded) == sum(t.nbytes for t in rank0.values())
        assert plan.weights_bytes < one.weights_bytes and plan.num_blocks > one.num_blocks
        assert plan == plan_graph(graph, **args, tensor_parallel_size=size)
        assert plan.summary().startswith(f"KV cache per GPU of tensor-parallel size {size} (1 KV head each): "
                                         f"{plan.num_blocks} blocks of 16 tokens")
    cpu = runtime_plan(layout, "cpu", max_model_len=64, max_num_seqs=2)
    assert cpu.summary() == ("KV cache per GPU of tensor-parallel size 4 (1 KV head each): 8 blocks of 16 tokens "
                             "(128 tokens, 0.00 GiB, fp32); 32+32-token requests: 2 at once")


def test_kv_heads_per_rank_by_hand():
    """Llama-3-8B's 8 KV heads over 2 GPUs: 4 each, half the bytes per token; one KV head (MQA) over 2 GPUs: the
    same bytes per token on each (replicated); a size that neither divides nor replicates them, one line."""
    bf16 = PagedLayout(**LLAMA3_8B, dtype="bfloat16")
    tp2 = bf16.planned(tensor_parallel_size=2)
    assert (tp2.kv_heads, tp2.bytes_per_token) == (4, 131072 // 2)
    plan = plan_capacity(tp2, memory_bytes=H100, weights_bytes=8 * 10**9, prompt_len=1000, output_len=1000)
    assert plan.summary() == ("KV cache per GPU of tensor-parallel size 2 (4 KV heads each): 66098 blocks of 16 "
                              "tokens (1057568 tokens, 64.55 GiB, bf16); 1000+1000-token requests: 528 at once")
    mqa = PagedLayout(**{**LLAMA3_8B, "kv_heads": 1}, dtype="bfloat16")
    assert mqa.planned(tensor_parallel_size=2).bytes_per_token == mqa.bytes_per_token
    for bad, message in ((lambda: bf16.planned(tensor_parallel_size=3), "tensor-parallel size 3 neither divides "
                          "the 8 KV heads nor is a multiple of them"),
                         (lambda: tp2.planned(tensor_parallel_size=4), "this is one rank's layout of tensor-parallel "
                          "size 2; plan size 4 from the unsharded graph's layout"),
                         (lambda: bf16.planned(tensor_parallel_size=0), "tensor_parallel_size must be a positive "
                          "integer, got 0"),
                         (lambda: bf16.planned(tensor_parallel_size=True), "tensor_parallel_size must be a positive "
                          "integer, got True")):
        with pytest.raises(WorkbenchError, match=message) as e:
            bad()
        assert "\n" not in str(e.value)
    assert tp2.planned(tensor_parallel_size=2) == tp2


def test_plan_graph_refuses_another_size_of_a_sharded_graph(optimized):
    from workbench.graph.passes.tensor_parallel import shard_tensor_parallel

    sharded, _ = shard_tensor_parallel(optimized.graph, 2)
    with pytest.raises(WorkbenchError, match="sharded for tensor-parallel size 2; plan size 4 from the unsharded "
                                             "graph") as e:
        plan_graph(sharded, memory_bytes=H100, prompt_len=1, output_len=1, tensor_parallel_size=4)
    assert "\n" not in str(e.value)
    with pytest.raises(WorkbenchError, match="tensor_parallel_size must be a positive integer, got 2.0"):
        plan_graph(optimized.graph, memory_bytes=H100, prompt_len=1, output_len=1, tensor_parallel_size=2.0)
