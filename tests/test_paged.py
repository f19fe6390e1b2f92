"""Paged attention: the same graph serves prefill, decode and mixed steps over a block cache."""

import pytest
import torch

from conftest import rel_err
from workbench.errors import WorkbenchError
from workbench.evaluate import greedy as recompute_greedy, paged_greedy
from workbench.graph.paged import PagedLayout, SimplePagedCache, cache_for, is_paged, step_inputs
from workbench.kernels.gemm import batch_invariant
from workbench.models import PRESETS, ModelSource
from workbench.pipeline import optimize
from workbench.quant import PrecisionPlan, calibrate, quantized_program


#: RoPE families, whose rotary moves into the paged attention (Falcon-7B's layout: one KV head for 4 query heads);
#: tiny-gpt2 has learned absolute positions instead, and tiny-neox's partial rotary stays its own op before it
ROPE = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-falcon-mqa", "tiny-gemma2"]


@pytest.fixture(scope="module", params=[*ROPE, "tiny-gpt2", "tiny-neox"])
def programs(request, checked_optimize):
    result = checked_optimize(request.param)
    reports = result.reports
    names = ["insert_paged_attention", "fuse_rope_into_attention", "fuse_qk_norm_into_attention"]
    assert [r.name for r in reports[-3:]] == names
    assert all(r.accepted for r in reports) and bool(reports[-3].matches)
    assert bool(reports[-2].matches) == (request.param in ROPE)
    assert bool(reports[-1].matches) == (request.param == "tiny-qwen3")  # only Qwen3 has per-head q/k norms
    return result.captured_program(), result.program


def test_mixed_prefill_and_decode_steps_match_recompute(programs):
    full, paged = programs
    cache = cache_for(paged.graph, num_blocks=16)
    a, b, c = (torch.randint(0, 512, (n,)).tolist() for n in (20, 37, 5))
    # step 1: two prefills in one flat batch (b crosses two block boundaries at block size 16)
    (logits,) = paged.run(**cache.step_inputs([(0, a), (1, b)]))
    assert rel_err(logits[0, :20], full(torch.tensor(a))) < 1e-5
    assert rel_err(logits[0, 20:], full(torch.tensor(b))) < 1e-5
    # step 2: a decodes one token, b continues with three (chunked), c starts
    a2, b2 = a + [7], b + [1, 2, 3]
    (logits,) = paged.run(**cache.step_inputs([(0, [7]), (1, [1, 2, 3]), (2, c)]))
    assert rel_err(logits[0, 0], full(torch.tensor(a2))[-1]) < 1e-5
    assert rel_err(logits[0, 1:4], full(torch.tensor(b2))[-3:]) < 1e-5
    assert rel_err(logits[0, 4:], full(torch.tensor(c))) < 1e-5
    assert cache.lengths == {0: 21, 1: 40, 2: 5}
    assert [len(cache.blocks[s]) for s in (0, 1, 2)] == [2, 3, 1]


def test_cached_greedy_equals_recompute(programs):
    full, paged = programs
    prompt = torch.randint(0, 512, (11,))
    assert paged_greedy(paged, prompt, 30) == recompute_greedy(full, prompt, 30)  # crosses blocks 1 -> 3


def test_cache_bookkeeping_and_errors(programs):
    _, paged = programs
    cache = SimplePagedCache(PagedLayout(block_size=4, layers=[0], kv_heads=2, head_dim=8, dtype="float32"), 3)
    inputs = cache.step_inputs([(0, [1, 2, 3, 4, 5]), (1, [6])])
    assert inputs["slot_mapping"].tolist() == [0, 1, 2, 3, 4, 8]
    assert inputs["block_tables"].tolist() == [[0, 1], [2, 0]]
    assert inputs["seq_lens"].tolist() == [5, 1] and inputs["query_start_loc"].tolist() == [0, 5, 6]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0]]
    with pytest.raises(WorkbenchError, match="KV cache full"):
        cache.step_inputs([(1, [1, 2, 3, 4])])
    cache.free(0)
    assert sorted(cache.free_blocks) == [0, 1]
    with pytest.raises(WorkbenchError, match="paged KV cache"):
        paged.logits(torch.tensor([1, 2, 3]))


def test_step_inputs_from_context_lengths_and_block_tables():
    """The one builder of a step's metadata (the executor's and the simple cache's): slots through each table,
    positions after the cached tokens, tables padded with the fill."""
    step = step_inputs(4, [(6, [7, 8, 9], [5, 2, 9]), (0, [1], [3])], table_fill=11)
    assert step.input_ids == [7, 8, 9, 1] and step.position_ids == [6, 7, 8, 0]
    assert step.slot_mapping == [2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0, 3 * 4 + 0]
    assert (step.block_tables, step.table_width) == ([5, 2, 9, 3, 11, 11], 3)
    assert (step.seq_lens, step.query_start_loc) == ([9, 1], [0, 3, 4])
    t = step.tensors("cpu")
    assert t["block_tables"].tolist() == [[5, 2, 9], [3, 11, 11]] and t["input_ids"].shape == (1, 4)
    with pytest.raises(WorkbenchError, match="needs 3 blocks of 4, its block table has 2"):
        step_inputs(4, [(8, [1], [0, 1])])


def test_layout_is_read_once_from_the_graph(programs):
    _, paged = programs
    layout = PagedLayout.from_graph(paged.graph)
    assert (layout.block_size, layout.layers, layout.dtype, layout.scales) == (16, (0, 1), "float32", None)
    assert PagedLayout(**{**layout.to_meta(), "layers": range(2)}) == layout  # the meta is its serialized form
    assert layout.cache_inputs == {"kv_cache_0": 0, "kv_cache_1": 1}
    assert set(layout.cache_inputs) <= set(paged.graph.inputs)
    assert layout.blocks_for(16) == 1 and layout.blocks_for(17) == 2
    caches = layout.new_caches(3, "cpu")
    assert [tuple(t.shape) for t in caches.values()] == [(2, 3, 16, layout.kv_heads, layout.head_dim)] * 2
    assert sum(t.nbytes for t in caches.values()) == 3 * layout.bytes_per_block
    with pytest.raises(WorkbenchError, match="layers must list the attention layers' indices.*range\\(32\\)"):
        PagedLayout(block_size=16, layers=32, kv_heads=2, head_dim=8, dtype="float32")
    with pytest.raises(WorkbenchError, match="2 \\(k_scale, v_scale\\) pairs for 1 layers"):
        PagedLayout(block_size=16, layers=[0], kv_heads=2, head_dim=8, dtype="float8_e4m3fn",
                    scales=[(1.0, 1.0), (1.0, 1.0)])


def test_window_less_paged_attention_is_rejected_on_mistral(monkeypatch):
    """The pass check sees 40-token sequences, past tiny-mistral's window of 16: dropping the
    window makes logits drift, and the pass is rejected rather than silently kept."""
    from workbench.graph.passes import paged

    monkeypatch.setattr(paged, "sliding_window", lambda config, layer: None)
    result = optimize("tiny-mistral", device="cpu", check=True)
    last = next(r for r in result.reports if r.name == "insert_paged_attention")
    assert not last.accepted
    assert last.first_diverging.startswith("paged_attention")
    assert not is_paged(result.graph)


#: SmolLM2's layer shape (hidden 576, 9 query / 3 KV heads of 64, MLP 1536), one layer: wide enough that CPU BLAS
#: picks its kernels and K-splits by the number of rows, which made a row's result depend on its neighbours
SMOL_LAYER = dict(PRESETS["tiny-llama"], hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, num_hidden_layers=1, vocab_size=1024)


@pytest.fixture(scope="module")
def smol_layer():
    return {dtype: optimize(ModelSource("random", "smol-layer", None, SMOL_LAYER, 0), dtype=dtype,
                            device="cpu").program for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "fp8", "int8_sq", "int8_wo"])
def test_a_sequences_rows_do_not_depend_on_the_other_sequences_in_its_step(smol_layer, precision):
    """Batch invariance on the CPU, in every precision: a sequence's values at every node are bit-identical
    whether its prefill or its decode step runs alone or beside other sequences (issue 25: `LLM`'s greedy text
    for a prompt changed with the other prompts of its batch, because CPU BLAS results depend on the number of
    rows; the references multiply in fixed row blocks, ``gemm.rows_matmul``)."""
    program = smol_layer["bfloat16" if precision == "bfloat16" else "float32"]
    g = torch.Generator().manual_seed(11)
    if precision in ("fp8", "int8_sq", "int8_wo"):
        stats = calibrate(program, torch.randint(1, 1024, (256,), generator=g), samples=4, seq_len=64,
                          progress=False)
        program = quantized_program(program, PrecisionPlan.uniform(program.graph, precision), stats)
    seqs = [torch.randint(1, 1024, (n,), generator=g).tolist() for n in (9, 23, 5, 40, 17)]

    def rows(values, start, count):
        return {k: (v[0] if isinstance(v, tuple) else v)[:, start:start + count] for k, v in values.items()
                if isinstance(v[0] if isinstance(v, tuple) else v, torch.Tensor) and k in nodes}

    nodes = {n.name for n in program.graph.nodes if n.out is not None and len(n.out.shape) >= 2
             and n.out.shape[1] == "tokens" and n.out.dtype in ("bfloat16", "float32")}
    assert len(nodes) > 5
    together, alone = cache_for(program.graph, device="cpu"), cache_for(program.graph, device="cpu")
    with batch_invariant():  # as the runtime's steps run
        batch = program.run(keep_all=True, **together.step_inputs(list(enumerate(seqs))))
        single = program.run(keep_all=True, **alone.step_inputs([(1, seqs[1])]))
        for name in nodes:
            assert torch.equal(rows(batch, 9, 23)[name], rows(single, 0, 23)[name]), name
        batch = program.run(keep_all=True, **together.step_inputs([(i, [7 + i]) for i in range(5)]))
        single = program.run(keep_all=True, **alone.step_inputs([(1, [8])]))
        for name in nodes:
            assert torch.equal(rows(batch, 1, 1)[name], rows(single, 0, 1)[name]), name


def test_llm_gives_a_prompt_the_same_tokens_alone_and_in_a_batch(smol_layer):
    """The runtime's steps run under batch_invariant(): `LLM` gives each prompt the tokens it gives it alone."""
    from workbench.runtime.engine import LLM
    from workbench.runtime.sampling import SamplingParams

    llm = LLM(smol_layer["float32"], num_blocks=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 1024, (n,), generator=g).tolist() for n in (7, 30, 12, 19, 3, 25)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    batch = [o.token_ids for o in llm.generate(prompts, params)]
    assert batch == [llm.generate([p], params)[0].token_ids for p in prompts]
