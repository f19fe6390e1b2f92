"""Triton paged attention under TRITON_INTERPRET=1 against the reference op: prefill, decode and
mixed batches, GQA groups, shuffled physical blocks, sliding windows, fp32 and bf16."""

import pytest
import torch

from conftest import rel_err
from workbench.errors import WorkbenchError
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
    ([5, 0, 1, 0, 0, 7], [0, 3, 12, 0, 0, 4], 2, 2),  # empty sequences between and after (a CUDA graph's padding)
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
                   {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 4}):  # split-KV
        tri_cache.copy_(cache)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, window, config=config)
        assert torch.equal(tri_cache, ref_cache)  # the new K/V went to the same slots
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


# tiny-mistral: a sliding window of 16, which 9 prompt tokens and 12 decoded cross (and the first 16-token block);
# tiny-qwen3: q/k norms and RoPE inside
@pytest.mark.parametrize("model", ["tiny-mistral", "tiny-qwen3"])
def test_tactic_runs_a_whole_paged_graph(model, checked_optimize):
    from workbench.graph.executor import Program
    from workbench.evaluate import paged_greedy

    program = checked_optimize(model).program
    graph, params = program.graph, program.params
    prompt = torch.randint(0, 512, (9,))
    reference = paged_greedy(Program(graph, params), prompt, 12)
    assert paged_greedy(Program(graph, params, tactics={"workbench.paged_attention": "triton"}), prompt, 12) == reference


def test_write_kv_scatters_to_slots_through_strided_inputs():
    q, k, v, cache, slots, tables, lens, qsl = make_step([3, 5], [2, 0], kv_heads=2, group=2, head_dim=16,
                                                         page=4, dtype=torch.bfloat16, seed=3)
    k_strided = torch.randn(1, k.shape[2], 2, 16).to(torch.bfloat16).transpose(1, 2)  # [1, kv_heads, tokens, d] view
    expected, got = cache.clone(), cache.clone()
    flat = expected.view(2, -1, 2, 16)
    flat[0, slots], flat[1, slots] = k_strided[0].transpose(0, 1), v[0].transpose(0, 1)
    ta.write_kv(k_strided, v, got, slots)
    assert torch.equal(got, expected)


def test_round_e4m3_is_torchs_rounding():
    """``_round_e4m3`` (arithmetic, no conversion instructions) against torch's e4m3 rounding at every e4m3 value,
    the midpoints between neighbours (ties to even), just either side of them, and random values up to ±448."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, ta._round_e4m3(tl.load(X + i, mask=i < n)), mask=i < n)

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9)),
                   torch.rand(4000) * 448, torch.rand(1000) * 0.02])
    x = torch.cat([x, -x])
    y = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert (x.view(torch.int32) == (-0.0 * torch.ones(1)).view(torch.int32)).any()  # -0 is among them
    assert torch.equal(y.view(torch.int32), x.to(torch.float8_e4m3fn).float().view(torch.int32))  # bits: -0 kept


@pytest.mark.parametrize("rope", [False, True])
def test_write_kv_copies_what_it_stores(rope):
    """``k_out``/``v_out`` receive K and V as the cache holds them, token-major like the attention's side buffers:
    rotated (a bf16 cache: its very contents); over an FP8 cache value / scale rounded to e4m3 (torch's rounding,
    the very bytes the cache gets), here in fp16."""
    _, k, v, cache, slots, _, lens, qsl = make_step([6, 3], [1, 4], kv_heads=2, group=1, head_dim=16, page=4,
                                                    dtype=torch.bfloat16, seed=4)
    k, v = k * 20, v * 3  # off the e4m3 grid, some values beyond 448 * scale: saturated
    rot = dict(zip(("cos", "sin"), rope_tables(step_positions(lens, qsl), 16, torch.bfloat16))) if rope else {}
    rot = {name: t.reshape(-1, 16) for name, t in rot.items()}

    def side_buffers(dtype):
        return (torch.full((1, k.shape[2], 2, 16), float("nan"), dtype=dtype).transpose(1, 2) for _ in range(2))

    k_rot, v_copy = side_buffers(torch.bfloat16)
    bf16 = cache.clone()
    ta.write_kv(k, v, bf16, slots, k_out=k_rot, v_out=v_copy, **rot)
    stored = bf16.view(2, -1, 2, 16)[:, slots]  # [2, tokens, kv_heads, 16]
    assert torch.equal(k_rot[0].transpose(0, 1), stored[0]) and torch.equal(v_copy, v)
    assert torch.equal(k_rot, k) != rope

    k_out, v_out = side_buffers(torch.float16)
    fp8 = cache.to(torch.float8_e4m3fn)
    ta.write_kv(k, v, fp8, slots, 0.1, 0.05, k_out=k_out, v_out=v_out, **rot)
    stored = fp8.view(2, -1, 2, 16)[:, slots].to(torch.float16)
    assert torch.equal(k_out[0].transpose(0, 1), stored[0]) and torch.equal(v_out[0].transpose(0, 1), stored[1])
    for out, x, scale in ((k_out, k_rot, 0.1), (v_out, v, 0.05)):
        want = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float16)
        assert torch.equal(out, want)
    assert (k_out.abs() == 448).any()


def gqa_step(new, context, page, kv_dtype, *, seed):
    """``make_step`` with GQA 4 over 2 KV heads of 16, in a bf16 or an FP8 cache: (step, (k_scale, v_scale)),
    the new K/V on the FP8 grid (see ``test_fp8_kv_cache_matches_reference``) and the scales None for bf16."""
    step = list(make_step(new, context, kv_heads=2, group=4, head_dim=16, page=page, dtype=torch.bfloat16, seed=seed))
    if kv_dtype == torch.bfloat16:
        return step, (None, None)
    scales = (0.0625, 0.015625)
    step[1], step[2] = on_fp8_grid(step[1] * 0.1, scales[0]), on_fp8_grid(step[2] * 0.01, scales[1])
    step[3] = (step[3].float() * 4).clamp(-448, 448).to(kv_dtype)
    return step, scales


@pytest.mark.parametrize("page", [8, 16])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("window", [None, 8])
def test_tiles_within_one_page_read_one_block_table_entry(page, kv_dtype, window):
    """Pages of a multiple of BLOCK_N tokens (the runtime's blocks of 32 or 64 at BLOCK_N 32-64): each key tile
    lies in one page, whose block-table entry the kernel loads once, as a scalar. Decode, chunked continuations
    and split-KV, across page boundaries and with tiles cut short at the context's end."""
    (q, k, v, cache, slots, tables, lens, qsl), scales = gqa_step([1, 1, 9, 1, 3], [5, 17, 0, 40, 23], page, kv_dtype,
                                                                  seed=12)
    ref_cache = cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, window, *scales)
    for config in ({"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1},
                   {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2},
                   {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1, "NEW_FROM_CACHE": True}):
        tri_cache = cache.clone()
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, window, *scales, config=config)
        assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
        assert rel_err(out, ref) < 1e-2, config


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_head_major_blocks_behind_the_same_view(kv_dtype):
    """A cache whose blocks are stored head-major ([kv_heads, page, head_dim]: one head's keys of a block
    contiguous) behind the usual [2, blocks, page, kv_heads, head_dim] view: the kernels follow its strides, so
    the new K/V land in the same logical slots and the outputs are the reference's."""
    (q, k, v, cache, slots, tables, lens, qsl), scales = gqa_step([1, 1, 6, 1], [5, 17, 3, 40], 8, kv_dtype, seed=13)
    ref_cache = cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, None, *scales)
    for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}):
        hnd = cache.transpose(2, 3).contiguous().transpose(2, 3)
        assert not hnd.is_contiguous() and torch.equal(hnd.view(torch.uint8), cache.view(torch.uint8))
        out = ta.paged_attention(q, k, v, hnd, slots, tables, lens, qsl, 0.3, None, *scales, config=config)
        assert torch.equal(hnd.view(torch.uint8), ref_cache.view(torch.uint8))
        assert rel_err(out, ref) < 1e-2, config


def on_fp8_grid(x, scale):
    """x rounded to values that e4m3 holds exactly after dividing by ``scale`` (a power of two)."""
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


@pytest.mark.parametrize("new,context,kv_heads,group", CASES[1:])
def test_fp8_kv_cache_matches_reference(new, context, kv_heads, group):
    """An e4m3 cache with per-layer K and V scales: both store value / scale and read back times it.

    The new K/V are drawn on the FP8 grid, so storing them rounds nothing: the interpreter's
    float -> e4m3 rounding is wrong where rounding carries into the exponent (7.9 -> 4, not 8;
    the GPU is right), which ``test_write_kv_fp8_rounding`` pins separately."""
    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=16, page=4, dtype=torch.bfloat16, seed=1)
    k_scale, v_scale = 2.0 ** -4, 2.0 ** -6
    k, v = on_fp8_grid(k * 3, k_scale), on_fp8_grid(v * 0.5, v_scale)
    fp8 = (cache.float() * 4).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref_cache, tri_cache = fp8.clone(), fp8.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, None, k_scale, v_scale)
    for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}):
        tri_cache.copy_(fp8)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, None, k_scale, v_scale,
                                 config=config)
        assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_cache_read_in_int16_pairs(head_dim):
    """At the family's head dims an FP8 cache is read as int16 pairs (even and odd elements in separate dots):
    the result matches the reference and the byte-by-byte path, on a mixed decode/prefill/continuation step."""
    q, k, v, cache, slots, tables, lens, qsl = make_step([1, 6, 3], [9, 0, 5], kv_heads=2, group=4,
                                                         head_dim=head_dim, page=4, dtype=torch.bfloat16, seed=8)
    k_scale, v_scale = 2.0 ** -4, 2.0 ** -6
    k, v = on_fp8_grid(k * 3, k_scale), on_fp8_grid(v * 0.5, v_scale)
    fp8 = (cache.float() * 4).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref_cache = fp8.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, None, None, k_scale, v_scale)
    outs = []
    for pairs in (True, False):
        for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}):
            tri_cache = fp8.clone()
            out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, None, None, k_scale, v_scale,
                                     config=dict(config, PAIRS=pairs))
            assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
            assert rel_err(out, ref) < 1e-2
            outs.append(out)
    assert rel_err(outs[0], outs[2]) < 2e-3 and rel_err(outs[1], outs[3]) < 2e-3


@pytest.mark.parametrize("head_dim,rope", [(16, False), (64, False), (16, True)])
def test_fp8_prompt_steps_see_their_own_keys_as_the_cache_holds_them(head_dim, rope):
    """Over an FP8 cache, a step with prompt tokens reads its own keys contiguous from the fp16 copies write_kv
    makes of what it stores: off the e4m3 grid, some saturated, the same result as reading them back from the
    cache (``NEW_FROM_CACHE``) and the reference's. Keys not rounded would differ by ~10%."""
    q, k, v, cache, slots, tables, lens, qsl = make_step([1, 6, 9, 3], [9, 0, 0, 5], kv_heads=2, group=4,
                                                         head_dim=head_dim, page=4, dtype=torch.bfloat16, seed=11)
    k_scale, v_scale = 0.05, 0.02
    k = k * 20  # some past 448 * k_scale: saturated
    assert (k.abs() > 448 * k_scale).any()
    rot = dict(zip(("cos", "sin"), rope_tables(step_positions(lens, qsl), head_dim, torch.bfloat16))) if rope else {}
    fp8 = (cache.float() * 4).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref = fused.paged_attention(q, k, v, fp8.clone(), slots, tables, lens, qsl, None, None, k_scale, v_scale, **rot)
    base = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}
    caches, outs = [], []
    for config in (dict(base, NEW_FROM_CACHE=True), base, ta.CONFIGS[0], dict(ta.CONFIGS[0], PAIRS=False)):
        caches.append(fp8.clone())
        outs.append(ta.paged_attention(q, k, v, caches[-1], slots, tables, lens, qsl, None, None, k_scale, v_scale,
                                       config=config, **rot))
    for c, out in zip(caches[1:], outs[1:]):
        assert torch.equal(c.view(torch.uint8), caches[0].view(torch.uint8))
        assert rel_err(out, outs[0]) < 1e-3  # bf16 outputs: one ulp is 4e-3
        # the reference rounds each dequantized key to bf16, and its rotation may round a key one bf16 step apart
        assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("kv_dtype,rope", [(torch.bfloat16, False), (torch.float8_e4m3fn, False),
                                           (torch.float8_e4m3fn, True)])
def test_mixed_step_decodes_in_a_launch_of_their_own(kv_dtype, rope, monkeypatch):
    """A config with a ``DECODE`` sub-config runs a mixed step's single-token sequences (decodes, and a
    one-token prompt) in a launch of their own: each launch writes exactly its rows (outputs poisoned with
    NaN first), and the step equals the one-launch result (and, over a bf16 cache, the reference)."""
    new, context = [1, 6, 1, 9, 1, 3], [9, 0, 14, 0, 0, 5]
    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=2, group=4, head_dim=16, page=4,
                                                         dtype=torch.bfloat16, seed=5)
    scales = (0.05, 0.02) if kv_dtype != torch.bfloat16 else (None, None)
    cache = (cache.float() * 4).clamp(-448, 448).to(kv_dtype) if scales[0] else cache
    rot = dict(zip(("cos", "sin"), rope_tables(step_positions(lens, qsl), 16, torch.bfloat16))) if rope else {}
    ref_cache = cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, None, None, *scales, **rot)
    prompt = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}
    decode = {"BLOCK_Q": 4, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    empty = torch.empty

    def poisoned(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    outs, caches = [], []
    configs = [prompt, {**prompt, "DECODE": decode}]
    if scales[0]:  # over an FP8 cache: the prompt launch reading its own keys back from the cache, too
        configs.append({**prompt, "DECODE": decode, "NEW_FROM_CACHE": True})
    for config in configs:
        caches.append(cache.clone())
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", poisoned)
            outs.append(ta.paged_attention(q, k, v, caches[-1], slots, tables, lens, qsl, None, None, *scales,
                                           config=config, **rot))
        assert torch.isfinite(outs[-1].float()).all()
    for c, out in zip(caches[1:], outs[1:]):
        assert torch.equal(c.view(torch.uint8), caches[0].view(torch.uint8))
        assert rel_err(out, outs[0]) < 1e-3  # other tiles: a few outputs a bf16 step apart
    assert rope or torch.equal(caches[0].view(torch.uint8), ref_cache.view(torch.uint8))
    assert rel_err(outs[1], ref) < 1e-2
    with pytest.raises(WorkbenchError, match="cannot split the keys"):
        ta.paged_attention(q, k, v, cache.clone(), slots, tables, lens, qsl, None, None, *scales,
                           config={**prompt, "DECODE": {**decode, "SPLITS": 4}}, **rot)


def test_block_sequence_map_of_a_mixed_steps_prompt_launch():
    """``_block_seq_kernel`` (one sequence per query block, -1 for decode blocks and blocks past a sequence's
    tokens) against the map written out in Python, over more blocks than one of its programs covers."""
    g = torch.Generator().manual_seed(3)
    new = [int(n) for n in torch.randint(0, 12, (300,), generator=g)]
    new = [1 if i % 3 else n for i, n in enumerate(new)]  # decodes among prompts and empty padding sequences
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    block_q = 4
    programs = qsl[-1].item() // block_q + len(new)
    want = [-1] * programs
    for i, n in enumerate(new):
        first = qsl[i].item() // block_q + i
        for j in range(-(-n // block_q)):
            want[first + j] = i if n > 1 else -1
    got = torch.empty(programs, dtype=torch.int32)
    ta._block_seq_kernel[(-(-programs // 256),)](qsl, got, len(new), programs, BLOCK_Q=block_q, BLOCK=256)
    assert got.tolist() == want


def test_prune_offers_decode_launches_for_mixed_steps_only():
    for new, want in (([1, 16, 3], True), ([6, 3], False), ([1, 1], False)):
        q, k, v, cache, slots, tables, lens, qsl = make_step(new, [2] * len(new), kv_heads=2, group=2, head_dim=64,
                                                             page=4, dtype=torch.bfloat16, seed=9)
        kept = ta.prune(ta.CONFIGS, (q, k, v, cache, slots, tables, lens, qsl), {})
        split = [c for c in kept if "DECODE" in c]
        assert bool(split) == want
        decode = new == [1, 1]
        assert all((c["BLOCK_Q"] < 16) == decode for c in kept if "maxnreg" in c)  # each step kind's own caps
        assert any("maxnreg" in c for c in kept)
        assert decode or all(c["BLOCK_Q"] >= 16 for c in kept)  # prompt steps: prompt configs only
        if want:
            assert split == [{**c, "DECODE": ta.DECODE_CONFIG} for c in kept if "DECODE" not in c]


def test_prune_offers_bytes_and_pairs_for_fp8_prefill_only():
    """Split-KV configs for decode only; over an FP8 cache, prefill steps also time each config byte by byte (and
    never reading their own keys back from the cache, which lost everywhere once write_kv made their copies)."""
    for dtype, new, want_bytes in ((torch.float8_e4m3fn, [6, 3], True), (torch.float8_e4m3fn, [1, 1], False),
                                   (torch.bfloat16, [6, 3], False)):
        q, k, v, cache, slots, tables, lens, qsl = make_step(new, [2, 5], kv_heads=2, group=2, head_dim=64, page=4,
                                                             dtype=torch.bfloat16, seed=9)
        kept = ta.prune(ta.CONFIGS, (q, k, v, cache.to(dtype), slots, tables, lens, qsl), {})
        decode = new == [1, 1]
        assert any(c["SPLITS"] > 1 for c in kept) == decode
        bytewise = [c for c in kept if c.get("PAIRS") is False]
        assert bool(bytewise) == want_bytes
        assert not any(c.get("NEW_FROM_CACHE") for c in kept)
        if want_bytes:
            assert [{**c, "PAIRS": False} for c in kept if "PAIRS" not in c] == bytewise


def test_write_kv_fp8_rounding():
    """Off-grid values: the stored bytes are torch's e4m3 rounding of value / scale (saturated), -0 included.
    The kernel rounds in arithmetic first (``_round_e4m3``), so even the interpreter, whose own float -> e4m3
    conversion carries wrongly (7.9 -> 4), stores them exactly; bench/attention.py checks the same on the GPU."""
    _, k, v, cache, slots, _, _, _ = make_step([6, 3], [1, 4], kv_heads=2, group=1, head_dim=16, page=4,
                                               dtype=torch.bfloat16, seed=2)
    k = k * 50  # some values beyond 448 * scale: saturated
    k[0, 0, 0, :3] = torch.tensor([-0.0, 0.0, -1e-4])
    scale = 0.1
    ref, got = cache.to(torch.float8_e4m3fn), cache.to(torch.float8_e4m3fn)
    flat = ref.view(2, -1, 2, 16)
    flat[0, slots] = (k[0].transpose(0, 1).float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    flat[1, slots] = (v[0].transpose(0, 1).float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    ta.write_kv(k, v, got, slots, scale, scale)
    assert (ref.float().abs() == 448).sum() > 0  # saturation was exercised
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama_head_dims_in_fp16(head_dim):
    """The head dims of the Llama/Mistral/Qwen2 family, in fp16, on a mixed decode/prefill/continuation step."""
    q, k, v, cache, slots, tables, lens, qsl = make_step([1, 6, 3], [9, 0, 5], kv_heads=2, group=4,
                                                         head_dim=head_dim, page=4, dtype=torch.float16, seed=4)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl)
    for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}):
        tri_cache.copy_(cache)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, config=config)
        assert torch.equal(tri_cache, ref_cache)
        assert torch.isfinite(out.float()).all() and out.dtype == torch.float16
        assert rel_err(out, ref) < 2e-3


def rope_tables(positions, head_dim, dtype, base=10000.0):
    """cos/sin as the graph feeds them: [1, 1, tokens, head_dim], one row per token's position."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ang = positions.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype)[None, None], ang.sin().to(dtype)[None, None]


def step_positions(lens, qsl):
    return torch.cat([torch.arange(int(n) - int(e - s), int(n)) for n, s, e in zip(lens, qsl[:-1], qsl[1:])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new,context,kv_heads,group", [CASES[1], CASES[3], CASES[4]])
def test_rope_inside_matches_rope_then_attention(new, context, kv_heads, group, dtype):
    """cos/sin given: q and k arrive before RoPE; the kernel rotates q as it loads it and k as it stores it.
    Equal to the reference (RoPE, then attention) and to the unfused Triton path (rope kernels, then the
    kernel), with the cache holding the rotated keys."""
    from workbench.kernels import triton_pointwise as tp

    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=16, page=4, dtype=dtype, seed=5)
    cos, sin = rope_tables(step_positions(lens, qsl), 16, dtype)
    ref_cache, tri_cache, unfused_cache = cache.clone(), cache.clone(), cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, None, cos=cos, sin=sin)
    assert not torch.equal(ref_cache, cache)
    want = ta.paged_attention(tp.rope(q, cos, sin), tp.rope(k, cos, sin), v, unfused_cache, slots, tables, lens,
                              qsl, 0.3)
    for config in (ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}):
        tri_cache.copy_(cache)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, config=config, cos=cos, sin=sin)
        assert torch.equal(tri_cache, unfused_cache)  # the rotated keys, rounded as the rope kernel rounds them
        assert rel_err(tri_cache, ref_cache) < (1e-6 if dtype == torch.float32 else 1e-2)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(out, want) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_rope_inside_with_fp8_cache():
    """The FP8 cache stores the rotated keys / k_scale; attention reads them back from it."""
    q, k, v, cache, slots, tables, lens, qsl = make_step([5, 1, 3], [0, 9, 4], kv_heads=2, group=2, head_dim=16,
                                                         page=4, dtype=torch.bfloat16, seed=6)
    cos, sin = rope_tables(step_positions(lens, qsl), 16, torch.bfloat16)
    fp8 = (cache.float() * 4).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref_cache, tri_cache = fp8.clone(), fp8.clone()
    fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, 0.3, None, 0.05, 0.02, cos=cos, sin=sin)
    out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, None, 0.05, 0.02, cos=cos, sin=sin)
    r, g = ref_cache.float(), tri_cache.float()
    # the kernel's rotation may round a key one bf16 step from torch's, and its e4m3 byte to a neighbour
    assert ((g - r).abs() <= 0.5 * r.abs() + 1e-3).all()
    # the attention against the reference over the keys the kernel stored: they are on the FP8 grid, so the
    # reference stores them as is
    flat = tri_cache.view(2, -1, 2, 16)
    k_stored = (flat[0, slots].float() * 0.05).to(torch.bfloat16).transpose(0, 1)[None]
    v_stored = (flat[1, slots].float() * 0.02).to(torch.bfloat16).transpose(0, 1)[None]
    again = fp8.clone()
    ref_stored = fused.paged_attention(fused.rope(q, cos, sin), k_stored, v_stored, again, slots, tables, lens, qsl,
                                       0.3, None, 0.05, 0.02)
    assert torch.equal(again.view(torch.uint8), tri_cache.view(torch.uint8))
    assert rel_err(out, ref_stored) < 1e-2


QK_NORM_STEPS = [([7, 21, 1], [0, 0, 0], 2, 2, 32),    # packed prefills
                 ([1, 9, 3], [30, 0, 17], 1, 4, 64),   # mixed decode / prefill / chunk, MQA
                 ([1, 1, 1], [5, 16, 33], 2, 2, 128)]  # decode
FP32, BF16 = (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)
FP8_CACHE = (torch.bfloat16, torch.float8_e4m3fn)


@pytest.mark.parametrize("new,context,kv_heads,group,head_dim,dtype,kv_dtype", [
    (*QK_NORM_STEPS[0], *FP32), (*QK_NORM_STEPS[0], *FP8_CACHE), (*QK_NORM_STEPS[1], *BF16),
    (*QK_NORM_STEPS[1], *FP8_CACHE), (*QK_NORM_STEPS[2], *BF16), (*QK_NORM_STEPS[2], *FP32)],
    ids=["prefill-fp32", "prefill-fp8", "mixed-bf16", "mixed-fp8", "decode-bf16", "decode-fp32"])
def test_qk_norm_inside_matches_norm_rope_then_attention(new, context, kv_heads, group, head_dim, dtype, kv_dtype):
    """q_norm/k_norm given (Qwen3; with RoPE inside): the kernel norms each q row as it loads it and write_kv
    norms each head of K before rotating and storing it. Equal to the reference (rms_norm, RoPE, attention) and
    to the unfused Triton path (rms_norm and rope kernels, then the kernel), the cache holding the same keys;
    prefill, mixed and decode steps, split-KV and a mixed step's decodes in a launch of their own."""
    from workbench.kernels import triton_pointwise as tp

    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=head_dim, page=4, dtype=dtype, seed=9)
    q, k = q * 3 + 1, k * 2 - 1  # rows whose RMS is not 1
    g = torch.Generator().manual_seed(3)
    qw, kw = ((1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2))
    cos, sin = rope_tables(step_positions(lens, qsl), head_dim, dtype)
    scales = (0.05, 0.02) if kv_dtype == torch.float8_e4m3fn else (None, None)
    cache = (cache.float() * 4).clamp(-448, 448).to(kv_dtype) if scales[0] else cache
    inside = dict(cos=cos, sin=sin, q_norm=qw, k_norm=kw, norm_eps=1e-6)
    ref = fused.paged_attention(q, k, v, cache.clone(), slots, tables, lens, qsl, 0.3, None, *scales, **inside)
    assert rel_err(ref, fused.paged_attention(fused.rope(fused.rms_norm(q, qw, 1e-6), cos, sin),
                                              fused.rope(fused.rms_norm(k, kw, 1e-6), cos, sin), v, cache.clone(),
                                              slots, tables, lens, qsl, 0.3, None, *scales)) == 0
    qn, kn = tp.rope(tp.rms_norm(q, qw, 1e-6), cos, sin), tp.rope(tp.rms_norm(k, kw, 1e-6), cos, sin)
    fp32 = dtype == torch.float32
    small = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}
    for config in (ta.CONFIGS[0], {**small, "SPLITS": 2}, {**small, "DECODE": {**small, "BLOCK_N": 16}}):
        tri_cache, unfused_cache = cache.clone(), cache.clone()
        want = ta.paged_attention(qn, kn, v, unfused_cache, slots, tables, lens, qsl, 0.3, None, *scales,
                                  config=config)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, 0.3, None, *scales, config=config,
                                 **inside)
        assert torch.isfinite(out.float()).all()
        if fp32:  # the fused norms sum the squares in another order than the rms_norm kernel: the last bit differs
            assert rel_err(tri_cache, unfused_cache) < 1e-6 and rel_err(out, want) < 1e-6
        else:  # rounded to bf16 (and e4m3), the very values the unfused kernels give at the same config
            assert torch.equal(tri_cache.view(torch.uint8), unfused_cache.view(torch.uint8))
            assert torch.equal(out, want)
        # over an FP8 cache the unfused kernels are as far from the reference (2.8e-2 measured at the first step:
        # the reference dequantizes the e4m3 keys to bf16), and the fused ones equal them
        assert rel_err(out, ref) < (1e-5 if fp32 else 2e-2 if kv_dtype == dtype else 4e-2)


def test_attention_output_is_token_major():
    """The output is a [1, heads, tokens, dim] view of token-major memory: the graph's transpose + reshape after
    attention is then a view, not a copy."""
    q, k, v, cache, slots, tables, lens, qsl = make_step([3, 4], [2, 0], kv_heads=2, group=2, head_dim=16, page=4,
                                                         dtype=torch.float32, seed=7)
    out = ta.paged_attention(q, k, v, cache, slots, tables, lens, qsl)
    assert out.transpose(1, 2).is_contiguous()


def test_bad_rope_tables_and_odd_head_dims_are_refused():
    from workbench.errors import WorkbenchError

    q, k, v, cache, slots, tables, lens, qsl = make_step([3, 2], [1, 0], kv_heads=2, group=2, head_dim=16, page=4,
                                                         dtype=torch.float32, seed=8)
    cos, sin = rope_tables(torch.arange(4), 16, torch.float32)  # 4 rows for 5 tokens
    with pytest.raises(WorkbenchError, match="one per token"):
        ta.paged_attention(q, k, v, cache, slots, tables, lens, qsl, cos=cos, sin=sin)
    odd = torch.zeros(2, 4, 4, 2, 15)
    with pytest.raises(WorkbenchError, match="head_dim must be even"):
        ta.write_kv(k[..., :15], v[..., :15], odd, slots)
