"""Triton paged attention under TRITON_INTERPRET=1 against the reference op: prefill, decode and
mixed batches, GQA groups, shuffled physical blocks, sliding windows, fp32 and bf16."""

import pytest
import torch

from conftest import rel_err
from workbench.kernels import fused
from workbench.kernels import triton_attention as ta


def make_step(new_tokens, context, *, kv_heads, group, head_dim, page, dtype, seed=0):
    """A step of len(new_tokens) sequences; sequence i already has context[i] tokens cached."""
    g = torch.Generator().manual_seed(seed)
    seqs = len(new_tokens)
    lens = [c + n for c, n in zip(context, new_tokens)]
    pages = [-(-n // page) for n in lens]
    num_blocks = sum(pages) + 3
    physical = torch.randperm(num_blocks, generator=g)  # blocks scattered through the cache
    tables, used = torch.zeros(seqs, max(pages), dtype=torch.long), 0
    for i, p in enumerate(pages):
        tables[i, :p] = physical[used:used + p]
        used += p
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)  # old context: random
    slots = torch.cat([tables[i, torch.arange(c, c + n) // page] * page + torch.arange(c, c + n) % page
                       for i, (c, n) in enumerate(zip(context, new_tokens))])
    total = sum(new_tokens)
    q = torch.randn(1, total, kv_heads * group, head_dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(1, kv_heads, total, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, total, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()])
    return q, k, v, cache, slots, tables, torch.tensor(lens), qsl


CASES = [  # (new tokens per sequence, cached context per sequence, kv heads, group)
    ([19], [0], 2, 1),                       # one prefill, MHA
    ([7, 21, 1], [0, 0, 0], 2, 2),           # packed prefills
    ([1, 1, 1, 1], [5, 16, 33, 40], 2, 4),   # decode: one new token each, GQA 4
    ([1, 9, 3], [30, 0, 17], 1, 4),          # mixed decode / prefill / chunked continuation, MQA
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new,context,kv_heads,group", CASES)
@pytest.mark.parametrize("window", [None, 8])
def test_matches_reference(new, context, kv_heads, group, window, dtype):
    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=16, page=4, dtype=dtype)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, window)
    for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1},
                   {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 3}):  # split-KV
        tri_cache.copy_(cache)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, window, config=config)
        assert torch.equal(tri_cache, ref_cache)  # the new K/V went to the same slots
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_tactic_runs_a_whole_paged_graph():
    from workbench.graph.executor import Program, resolve_params
    from workbench.graph.passes import run_passes
    from workbench.models import load_model
    from workbench.pipeline import capture_source, graph_weights
    from workbench.runtime.paged_cache import paged_greedy

    lm = load_model("tiny-mistral")  # sliding window 16: decoding 30 tokens crosses it
    captured = capture_source(lm.source)
    base = {**graph_weights(captured.graph, lm.source), **captured.constants}
    graph, _ = run_passes(captured.graph, base, check=False)
    params = resolve_params(graph, base)
    prompt = torch.randint(0, 512, (9,))
    reference = paged_greedy(Program(graph, params), prompt, 24)
    assert paged_greedy(Program(graph, params, tactics={"workbench.paged_attention": "triton"}), prompt, 24) == reference
