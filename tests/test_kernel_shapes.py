"""Every Triton kernel at the shapes of the supported model families, under TRITON_INTERPRET=1, against the
reference ops on random inputs (never zeros), outputs poisoned with NaN.

    family           heads / KV heads x head dim   group   hidden   intermediate   vocab
    SmolLM2-135M     9 / 3 x 64                    3       576      1536           49152 (tied embeddings)
    Qwen2-0.5B       14 / 2 x 64                   7       896      4864           151936 (tied)
    Qwen2-7B         28 / 4 x 128                  7       3584     18944          152064
    13B class        40 / 8 x 128                  5       5120     13824          152064
    Llama-3.2-3B     12 / 4 x 128 (its group 3)    3       3072     8192           128256
    Phi-2            32 / 32 x 80                  MHA     2560     10240          51200
    Phi-3-mini       32 / 32 x 96                  MHA     3072     8192           32064
    Gemma-2B         8 / 1 x 256                   MQA 8   2048     16384          256000
    Gemma-7B         16 / 16 x 256                 MHA     3072     24576          256000
    MHA              16 / 16 x 64                  1
    GPT-2 XL         25 / 25 x 64                  MHA     1600     6400 (GELU)    50257 (tied)
    Pythia-6.9B      32 / 32 x 128 (rotary 32)     MHA     4096     16384 (GELU)   50432
    Falcon-7B        71 / 1 x 64                   MQA 71  4544     18176 (GELU)   65024 (tied)

Few tokens per case (the interpreter costs ~0.5 ms per program instance): each family runs the attention paths
that matter at its shape rather than their cross product, and every path (prefill, decode and chunked prompts in
one step, two launches with ``DECODE``, split-KV, FP8 cache as int16 pairs and byte by byte, the step's own keys
read back from the cache, RoPE inside, a sliding window) runs at head dims 80, 96 and 256 and at groups 3, 5 and 7.
GEMMs keep the real sizes' odd remainders (K = 576 is 4.5 K tiles of 128, N = 960 or 32001 not a multiple of the
tile). ``bench/kernel_shapes.py`` runs the same families at full size on the GPU.
"""

import pytest
import torch
import triton

from conftest import rel_err
from test_kernels_attention import make_step, on_fp8_grid, rope_tables, step_positions
from test_kernels_pointwise import fp8_close
from workbench.graph.executor import DEFAULTS, Program, gpu_fallback_notes, meta_arguments
from workbench.graph.ir import Graph, Node, Param, Ref, TensorSpec
from workbench.kernels import fused
from workbench.kernels import gemm as G
from workbench.kernels import triton_attention as ta
from workbench.kernels import triton_pointwise as tp
from workbench.kernels.autotune import TunedChoices
from workbench.kernels.registry import REGISTRY
from workbench.kernels.triton_sampling import greedy_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN: a row a kernel misses (a padding row's token left
    unwritten, a head past a power of two) fails the test."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    monkeypatch.setattr(torch, "empty", empty)


# --- attention -------------------------------------------------------------------------------------------------

SMALL = {"BLOCK_Q": 4, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "SPLITS": 1}  # key tiles of one page
PATHS = {
    "default": ta.CONFIGS[0],                                  # BLOCK_Q 16, 64-key tiles gathered across pages
    "small": SMALL,                                            # at groups 3, 5, 7: blocks of 5, 6, 4 tokens
    "two_launches": {**SMALL, "DECODE": {**SMALL, "BLOCK_N": 32}},  # decodes in a launch of their own
    "bytes": {**ta.CONFIGS[0], "PAIRS": False},                # an FP8 cache byte by byte
    "own_from_cache": {**SMALL, "NEW_FROM_CACHE": True},       # FP8: the step's own keys read back from the cache
    "split": {**SMALL, "SPLITS": 4},                           # split-KV
}
# (id, heads, kv_heads, head_dim, kv cache dtype, RoPE inside, paths, sliding window); the step: a decode after 13
# cached tokens, a 23-token prompt (two query blocks at every group) and a 3-token chunk after 6; split-KV runs on a
# decode step of its own (contexts 40 and 21)
ATTENTION = [
    ("smollm2-bf16", 9, 3, 64, torch.bfloat16, True, ["default", "two_launches", "split"], None),
    ("smollm2-fp8", 9, 3, 64, FP8, True, ["default", "bytes", "own_from_cache", "split"], None),
    ("smollm2-window", 9, 3, 64, torch.bfloat16, False, ["small"], 8),
    ("qwen2-0.5b-bf16", 14, 2, 64, torch.bfloat16, False, ["default", "two_launches", "split"], None),
    ("qwen2-0.5b-fp8", 14, 2, 64, FP8, False, ["default"], None),
    ("qwen2-7b-bf16", 28, 4, 128, torch.bfloat16, True, ["default"], None),
    ("qwen2-7b-fp8", 28, 4, 128, FP8, False, ["default", "two_launches"], None),
    ("13b-bf16", 40, 8, 128, torch.bfloat16, False, ["default", "small"], None),
    ("13b-fp8", 40, 8, 128, FP8, True, ["own_from_cache", "split"], None),
    ("group3-bf16", 12, 4, 128, torch.bfloat16, False, ["two_launches", "split"], None),
    ("group3-fp8", 12, 4, 128, FP8, True, ["default", "bytes"], None),
    ("phi2-bf16", 32, 32, 80, torch.bfloat16, True, ["default", "two_launches"], None),
    ("phi2-fp8", 32, 32, 80, FP8, False, ["default", "bytes", "split"], None),
    ("phi3-bf16", 32, 32, 96, torch.bfloat16, False, ["default", "split"], None),
    ("phi3-fp8", 32, 32, 96, FP8, True, ["default", "own_from_cache"], None),
    ("gemma2b-bf16", 8, 1, 256, torch.bfloat16, True, ["default", "two_launches", "split"], None),
    ("gemma2b-fp8", 8, 1, 256, FP8, True, ["default", "bytes", "own_from_cache", "two_launches", "split"], None),
    ("gemma2b-window", 8, 1, 256, FP8, False, ["default"], 8),
    ("gemma7b-bf16", 16, 16, 256, torch.bfloat16, False, ["default", "split"], None),
    ("gemma7b-fp8", 16, 16, 256, FP8, True, ["default"], None),
    ("mha64", 16, 16, 64, torch.bfloat16, True, ["default", "two_launches"], None),
    ("gpt2xl-bf16", 25, 25, 64, torch.bfloat16, False, ["default"], None),
    ("falcon7b-bf16", 71, 1, 64, torch.bfloat16, True, ["default", "split"], None),
    ("falcon7b-fp8", 71, 1, 64, FP8, True, ["small"], None),
]


def family_step(new, context, heads, kv_heads, head_dim, kv_dtype, seed):
    """``make_step`` at a family's heads, in pages of 16 (the runtime's), its cache bf16 or FP8 (per-layer scales,
    new K/V on the e4m3 grid so that storing rounds nothing: the interpreter's own e4m3 rounding carries
    wrongly); returns (step, (k_scale, v_scale))."""
    step = list(make_step(new, context, kv_heads=kv_heads, group=heads // kv_heads, head_dim=head_dim, page=16,
                          dtype=torch.bfloat16, seed=seed))
    if kv_dtype != FP8:
        return step, (None, None)
    scales = (2.0 ** -4, 2.0 ** -6)
    step[1], step[2] = on_fp8_grid(step[1] * 3, scales[0]), on_fp8_grid(step[2] * 0.5, scales[1])
    step[3] = (step[3].float() * 4).clamp(-448, 448).to(FP8)
    return step, scales


@pytest.mark.parametrize("heads,kv_heads,head_dim,kv_dtype,rope,paths,window",
                         [case[1:] for case in ATTENTION], ids=[case[0] for case in ATTENTION])
def test_paged_attention_at_family_shapes(heads, kv_heads, head_dim, kv_dtype, rope, paths, window):
    for path in paths:
        new, context = ([1, 1], [40, 21]) if path == "split" else ([1, 23, 3], [13, 0, 6])
        (q, k, v, cache, slots, tables, lens, qsl), scales = family_step(new, context, heads, kv_heads, head_dim,
                                                                         kv_dtype, seed=len(path))
        positions = step_positions(lens, qsl)
        rot = dict(zip(("cos", "sin"), rope_tables(positions, head_dim, torch.bfloat16))) if rope else {}
        ref_cache, tri_cache = cache.clone(), cache.clone()
        ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, None, window, *scales, **rot)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, None, window, *scales,
                                 config=PATHS[path], **rot)
        assert out.shape == q.shape and torch.isfinite(out.float()).all(), path
        if rope:  # the kernel rotates in fp32 and rounds once (workbench.rope's rounding), the reference per op
            blk, off = slots // 16, slots % 16
            got, want = tri_cache[:, blk, off].float(), ref_cache[:, blk, off].float()
            assert torch.equal(got[1], want[1]), path  # V is not rotated
            # rotated keys a bf16 step or two apart (the interpreter truncates; the reference's products round
            # before they cancel), over FP8 then an e4m3 step apart
            tol = 2e-2 if kv_dtype == FP8 else 1e-2
            assert rel_err(got[0], want[0]) < tol, path
            if kv_dtype == FP8:  # against the reference over the keys the kernel stored (on the grid: kept as they are)
                k_st, v_st = ((x * sc).to(torch.bfloat16).transpose(0, 1)[None] for x, sc in zip(got, scales))
                ref = fused.paged_attention(fused.rope(q, rot["cos"], rot["sin"]), k_st, v_st, cache.clone(), slots,
                                            tables, lens, qsl, None, window, *scales)
            assert rel_err(out, ref) < 1e-2, path
        else:  # the new K/V in the same slots, the very bytes
            assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8)), path
            assert rel_err(out, ref) < 1e-2, path


@pytest.mark.parametrize("group", [3, 5, 6, 7, 1, 2, 4, 8, 16])
def test_query_rows_are_a_power_of_two_holding_whole_groups(group):
    """Every config's rows at every group: a power of two >= 16 (tl.arange, tl.dot), as many whole tokens as
    fit; at power-of-two groups exactly the rows the config always had (tuned timings stay valid)."""
    for config in ta.CONFIGS:
        rows, block_q = ta.query_rows(config["BLOCK_Q"], group)
        assert rows >= 16 and rows & (rows - 1) == 0 and rows >= config["BLOCK_Q"] * group
        assert block_q >= config["BLOCK_Q"] and block_q * group <= rows < (block_q + 1) * group + 16
        if group & (group - 1) == 0:
            assert (rows, block_q) == (max(config["BLOCK_Q"], -(-16 // group)) * group,
                                       max(config["BLOCK_Q"], -(-16 // group)))
    assert ta.query_rows(16, 3) == (64, 21) and ta.query_rows(4, 7) == (32, 4)


@pytest.mark.parametrize("heads,kv_heads,head_dim,dropped", [
    (32, 8, 128, []),            # Llama-3-8B: every config stays
    (28, 4, 128, [64]),          # Qwen2-7B, group 7: BLOCK_Q 64 would be 512 rows
    (8, 1, 256, [32, 64]),       # Gemma-2B: 256 and 512 rows of 256 (192 and 320 KB of shared memory)
    (16, 16, 256, []),           # Gemma-7B, MHA: 64 rows at most
    (32, 1, 128, [16, 32, 64]),  # 32 query heads per KV head: no prompt config fits, the smallest decode one runs
])
def test_prune_drops_query_tiles_no_program_can_hold(heads, kv_heads, head_dim, dropped, monkeypatch):
    for new in ([1, 1, 1], [9, 30, 1]):  # decode, and a prompt step beside a decode
        q = torch.empty(1, heads, sum(new), head_dim, device="meta")
        cache = torch.empty(2, 8, 16, kv_heads, head_dim, device="meta", dtype=torch.bfloat16)
        qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
        args = (q, q, q, cache, None, None, torch.empty(len(new)), qsl)
        kept = ta.prune(ta.CONFIGS, args, {})
        monkeypatch.setattr(ta, "MAX_QUERY_TILE", 1 << 30)
        everything = ta.prune(ta.CONFIGS, args, {})
        monkeypatch.undo()
        assert kept and all(ta.query_rows(c["BLOCK_Q"], heads // kv_heads)[0] * triton.next_power_of_2(head_dim)
                            <= ta.MAX_QUERY_TILE for c in kept if len(kept) > 1)
        assert {c["BLOCK_Q"] for c in everything} - {c["BLOCK_Q"] for c in kept} == \
            {b for b in dropped if any(c["BLOCK_Q"] == b for c in everything)}
        if not dropped:
            assert kept == everything


def test_write_kv_at_odd_head_counts_and_dims():
    """K/V of 3 KV heads of 80 (two halves of 40 in blocks of 64) scattered with RoPE into an FP8 cache: the
    rotated values, saturated and rounded as the cache holds them, and the fp16 copies of them."""
    _, k, v, cache, slots, _, lens, qsl = make_step([5, 2], [3, 14], kv_heads=3, group=1, head_dim=80, page=16,
                                                    dtype=torch.bfloat16, seed=3)
    cos, sin = (t.reshape(-1, 80) for t in rope_tables(step_positions(lens, qsl), 80, torch.bfloat16))
    k_out, v_out = (torch.empty(1, k.shape[2], 3, 80, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    fp8 = (cache.float() * 4).clamp(-448, 448).to(FP8)
    ta.write_kv(k, v, fp8, slots, 0.01, 0.02, cos, sin, k_out, v_out)
    stored = fp8[:, slots // 16, slots % 16].to(torch.float16)  # [2, tokens, kv_heads, 80]
    assert torch.equal(k_out[0].transpose(0, 1), stored[0]) and torch.equal(v_out[0].transpose(0, 1), stored[1])
    want_v = (v[0].transpose(0, 1).float() / 0.02).clamp(-448, 448).to(FP8).to(torch.float16)
    assert torch.equal(stored[1], want_v)
    rotated = (fused.rope(k.float(), cos.float()[None, None], sin.float()[None, None]) / 0.01).clamp(-448, 448)
    assert rel_err(stored[0].float(), rotated[0].transpose(0, 1)) < 0.05  # e4m3 keeps 3 bits


def test_attention_tactic_refuses_only_odd_head_dims():
    opdef = REGISTRY.get("workbench.paged_attention")
    for head_dim, refused in ((80, False), (96, False), (256, False), (15, True)):
        cache = torch.empty(2, 8, 16, 3, head_dim, device="meta")
        reason = opdef.unsupported("triton", (None, None, None, cache), {})
        assert bool(reason) == refused and (not refused or "odd" in reason)


# --- pointwise ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [576, 896, 3072, 5120])
def test_norms_at_family_hidden_sizes(hidden):
    x, r = torch.randn(3, hidden, dtype=torch.bfloat16) * 3, torch.randn(3, hidden, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16)
    scale = torch.tensor(4.0 / 448)
    for config in (tp.CONFIGS["rms_norm"][0], tp.CONFIGS["rms_norm"][2]):  # 1 and 4 rows per program (of 3)
        assert rel_err(tp.rms_norm(x, w, 1e-6, config=config), fused.rms_norm(x, w, 1e-6)) < 1e-2
        y, s = tp.add_rms_norm(x, r, w, 1e-6, config=config)
        ry, rs = fused.add_rms_norm(x, r, w, 1e-6)
        assert rel_err(s, rs) < 1e-2 and rel_err(y, ry) < 1e-2
        fp8_close(tp.rms_norm_fp8(x, w, 1e-6, scale, config=config), fused.rms_norm_fp8(x, w, 1e-6, scale))
        fp8_close(tp.add_rms_norm_fp8(x, r, w, 1e-6, scale, config=config)[0],
                  fused.add_rms_norm_fp8(x, r, w, 1e-6, scale)[0])


@pytest.mark.parametrize("intermediate", [1536, 4864, 18944])
def test_silu_mul_at_family_intermediate_sizes(intermediate):
    gate_up = torch.randn(2, 2 * intermediate, dtype=torch.bfloat16) * 2
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]  # the fused gate/up GEMM's halves
    scale = torch.tensor(4.0 / 448)
    assert rel_err(tp.silu_mul(gate, up), fused.silu_mul(gate, up)) < 1e-2
    fp8_close(tp.silu_mul_fp8(gate, up, scale), fused.silu_mul_fp8(gate, up, scale))


@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 64), (14, 64), (28, 128), (40, 128), (32, 80), (32, 96),
                                            (8, 256), (1, 256)])
def test_rope_at_family_head_shapes(heads, head_dim):
    tokens = 3
    x = torch.randn(1, tokens, heads * head_dim, dtype=torch.bfloat16).view(1, tokens, heads, head_dim).transpose(1, 2)
    cos, sin = rope_tables(torch.tensor([0, 5, 1000]), head_dim, torch.bfloat16)
    for config in (tp.CONFIGS["rope"][0], tp.CONFIGS["rope"][1]):  # all heads in one program, or blocks of 8
        assert rel_err(tp.rope(x, cos, sin, config), fused.rope(x, cos, sin)) < 1e-2


@pytest.mark.parametrize("hidden", [1600, 4544])
def test_layer_norms_at_family_hidden_sizes(hidden):
    """GPT-2 XL's and Falcon-7B's LayerNorms (4544: a block of 8192 columns, 3648 of them masked)."""
    from workbench.kernels import fused_ln, triton_ln as tk

    x, r = torch.randn(3, hidden, dtype=torch.bfloat16) * 3, torch.randn(3, hidden, dtype=torch.bfloat16)
    w, b = (1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16), (0.1 * torch.randn(hidden)).to(torch.bfloat16)
    scale = torch.tensor(4.0 / 448)
    for config in (tk.CONFIGS["layer_norm"][0], tk.CONFIGS["layer_norm"][2]):  # 1 and 4 rows per program (of 3)
        assert rel_err(tk.layer_norm(x, w, b, 1e-5, config=config), fused_ln.layer_norm(x, w, b, 1e-5)) < 1e-2
        y, s = tk.add_layer_norm(x, r, w, b, 1e-5, config=config)
        ry, rs = fused_ln.add_layer_norm(x, r, w, b, 1e-5)
        assert rel_err(s, rs) < 1e-2 and rel_err(y, ry) < 1e-2
        fp8_close(tk.layer_norm_fp8(x, w, b, 1e-5, scale, config=config), fused_ln.layer_norm_fp8(x, w, b, 1e-5, scale))


@pytest.mark.parametrize("intermediate,mode", [(6400, "tanh"), (16384, "none"), (18176, "none")])
def test_gelu_at_family_intermediate_sizes(intermediate, mode):
    from workbench.kernels import fused_ln, triton_ln as tk

    h = torch.randn(2, intermediate, dtype=torch.bfloat16) * 3
    assert rel_err(tk.gelu(h, mode), fused_ln.gelu(h, mode)) < 1e-2
    # FP8 from fp32 x: in bf16 the reference rounds tanh(u) before 1 + tanh(u) cancels, so in the negative tail
    # its small values (which a small scale magnifies) stand apart from the kernel's one rounding
    h32, scale = h.float(), torch.tensor(4.0 / 448)
    fp8_close(tk.gelu_fp8(h32, mode, scale), fused_ln.gelu_fp8(h32, mode, scale))


@pytest.mark.parametrize("heads,head_dim,rotary", [(32, 128, 32), (8, 64, 16), (16, 80, 20)])
def test_partial_rope_at_family_head_shapes(heads, head_dim, rotary):
    """Pythia-6.9B, Pythia-70M, and an odd half-width (10): q as NeoX's chunk of the per-head interleaved qkv."""
    from workbench.kernels import fused_ln, triton_ln as tk

    tokens = 3
    qkv = torch.randn(1, tokens, heads, 3 * head_dim, dtype=torch.bfloat16).transpose(1, 2)
    q = qkv.chunk(3, -1)[0]
    cos, sin = rope_tables(torch.tensor([0, 5, 1000]), rotary, torch.bfloat16)
    for config in (tk.CONFIGS["partial_rope"][0], tk.CONFIGS["partial_rope"][1]):
        assert rel_err(tk.partial_rope(q, cos, sin, config), fused_ln.partial_rope(q, cos, sin)) < 1e-2


# --- gemm ------------------------------------------------------------------------------------------------------

def randn(*shape, dtype=torch.float32, scale=1.0):
    t = torch.randn(*shape) * scale
    return (t + 0.01 * torch.sign(t)).to(dtype)


GEMV16, GEMV8 = G.GEMV_CONFIGS["16bit"][0], G.GEMV_CONFIGS["8bit"][0]
SPLIT16, SPLIT8 = G.CONFIGS["16bit"][-1], G.CONFIGS["8bit"][-1]
# (K, N) of real linears: SmolLM2's qkv (576 -> 960), a gate half (576 -> 1536) and down (1536 -> 576), Qwen2-0.5B's
# qkv with its bias (896 -> 1152) and a slice of its down projection's K (4864 -> 896: K a multiple of 64 only)
LINEARS = [(576, 960, False), (576, 1536, False), (1536, 576, False), (896, 1152, True), (4864, 896, False)]


@pytest.mark.parametrize("k,n,with_bias", LINEARS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_bf16_linear_at_family_shapes(m, k, n, with_bias):
    x, w = randn(m, k, dtype=torch.bfloat16), randn(n, k, dtype=torch.bfloat16, scale=k ** -0.5)
    bias = randn(n, dtype=torch.bfloat16) if with_bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    for config in [None] + ([GEMV16] if m == 1 else [SPLIT16] if m == 5 else []):
        assert rel_err(G.linear(x, w, bias, config=config), ref) < 1e-2, config


@pytest.mark.parametrize("k,n,with_bias", [LINEARS[0], LINEARS[2], LINEARS[3]])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_quantized_linears_at_family_shapes(m, k, n, with_bias):
    """fp8, int8 and weight-only int8 (Triton) with per-channel weight scales and dynamic per-token x scales, in
    fp32 out (the interpreter's bf16 rounding truncates)."""
    x = randn(m, k, dtype=torch.bfloat16, scale=2.0)
    w = randn(n, k) * (1 + torch.rand(n, 1))
    bias = randn(n, dtype=torch.bfloat16) if with_bias else None
    w8s, wis = G.fp8_scale(w, dim=1).reshape(-1), G.int8_scale(w, dim=1).reshape(-1)
    w8, wi = G.quantize_fp8(w, w8s.reshape(-1, 1)), G.quantize_int8(w, wis.reshape(-1, 1))
    f32 = torch.float32
    for c16, c8 in [(None, None)] + ([(GEMV16, GEMV8)] if m == 1 else [(SPLIT16, SPLIT8)] if m == 5 else []):
        assert rel_err(G.fp8_linear_triton(x, w8, w8s, None, bias, f32, config=c8),
                       G.fp8_linear(x, w8, w8s, None, bias, f32)) < 1e-5
        assert rel_err(G.int8_linear_triton(x, wi, wis, None, bias, f32, config=c8),
                       G.int8_linear(x, wi, wis, None, bias, f32)) < 1e-5
        assert rel_err(G.w8_linear_triton(x, wi, wis, bias, config=c16), G.w8_linear(x, wi, wis, bias)) < 1e-2


@pytest.mark.parametrize("m,config", [(1, G._gemv(256, 1024, 4)), (5, None)])
def test_lm_head_over_an_odd_vocabulary(m, config):
    """A tied lm_head (the embedding table [vocab, hidden] as the weight) over 32001 tokens: N ends in a partial
    tile / GEMV block, K = 576 in a partial K tile. (The GEMV in blocks of 256 rows: the tuning space's 8-16 would
    be 2000-4000 programs under the interpreter, for the same masking.)"""
    emb = randn(32001, 576, dtype=torch.bfloat16, scale=576 ** -0.5)
    x = randn(m, 576, dtype=torch.bfloat16)
    assert rel_err(G.linear(x, emb, config=config), (x.float() @ emb.float().t()).to(torch.bfloat16)) < 1e-2


# --- sampling ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,vocab", [(1, 49152), (1, 151936), (2, 32001)])
def test_greedy_over_family_vocabularies(rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16)
    logits[0, vocab - 1] = logits[0].max() + 1  # the last column: in the partial last block of the last chunk
    tokens, logprobs = greedy_logprobs(logits)
    want = logits.float().argmax(-1)
    assert tokens.tolist() == want.tolist() and tokens[0].item() == vocab - 1
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.float(), -1).gather(1, want[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


# --- fallbacks: supports hooks, default_impl, the build's notes ------------------------------------------------

def fp8_head_graph(vocab: int, out_dtype: str = "bfloat16") -> Graph:
    """A one-node graph: an FP8 lm_head (per-channel weight scales, x quantized per token) over ``vocab`` tokens."""
    x = TensorSpec(["tokens", 576], "bfloat16")
    params = {"w": Param("w", "quantized", TensorSpec([vocab, 576], "float8_e4m3fn")),
              "ws": Param("ws", "quantized", TensorSpec([vocab], "float32"))}
    kwargs = {} if out_dtype == "bfloat16" else {"out_dtype": getattr(torch, out_dtype)}
    node = Node("lm_head", "workbench.fp8_linear", [Ref("x"), Ref("w"), Ref("ws"), None, None], kwargs,
                [TensorSpec(["tokens", vocab], out_dtype)])
    return Graph({"x": x}, params, [node], ["lm_head"], {"tokens": {"min": 1, "max": 8192}})


def test_scaled_mm_default_falls_back_to_triton_with_a_note():
    """torch._scaled_mm needs K and N multiples of 16 (and bf16 out with row-wise scales): its ``supports`` says
    so from static shapes, and the GPU default moves to the Triton tiles with that one line."""
    opdef = REGISTRY.get("workbench.fp8_linear")
    for vocab, out_dtype, reason in ((49152, "bfloat16", None), (49152, "float32", "writes only bfloat16"),
                                     (32001, "bfloat16", "multiples of 16, got K=576, N=32001")):
        graph = fp8_head_graph(vocab, out_dtype)
        name, notes = opdef.default_impl(*meta_arguments(graph)(graph.nodes[0]))
        if reason is None:
            assert (name, notes) == ("scaled_mm", [])
        else:
            assert name == "triton" and len(notes) == 1 and reason in notes[0]
            assert notes[0].startswith("workbench.fp8_linear: tactic scaled_mm skipped (torch._scaled_mm")


def test_gpu_fallback_notes_are_the_gpu_programs_notes():
    """``gpu_fallback_notes`` (no weights, no GPU) says what ``Program.for_gpu_steps()`` records."""
    graph = fp8_head_graph(32001)
    notes = gpu_fallback_notes(graph)
    assert len(notes) == 1 and "scaled_mm skipped" in notes[0] and "N=32001" in notes[0]
    params = {"w": torch.zeros(32001, 576, dtype=FP8), "ws": torch.ones(32001)}
    program = Program(graph, params, tactics=DEFAULTS, graph_safe=True)
    assert program.notes == notes and program.implementations() == {"lm_head": "triton"}
    assert gpu_fallback_notes(fp8_head_graph(49152)) == []
    # a tuned choice that is graph-safe runs as tuned: nothing to note
    assert gpu_fallback_notes(graph, {"lm_head": ("triton", None)}) == []
    assert gpu_fallback_notes(graph, {"lm_head": ("reference", None)}) == []


def test_gpu_fallback_notes_of_a_whole_model(tiny_program):
    """tiny-llama's optimized graph: every op's GPU default applies (the attention's Triton tactic included), so
    there is nothing to note, as in the GPU program; a tuned choice that is not graph-safe is replaced, with the
    GPU program's line; an op with no graph-safe implementation is named."""
    assert gpu_fallback_notes(tiny_program.graph) == tiny_program.for_gpu_steps().notes == []
    attn = [n.name for n in tiny_program.graph.nodes if n.op == "workbench.paged_attention"]
    # tuned elsewhere: the reference, which reads the host
    tuned = TunedChoices([8], [{a: ("reference", None) for a in attn}])
    notes = gpu_fallback_notes(tiny_program.graph, tuned)
    assert notes == tiny_program.with_choices(tuned).for_gpu_steps().notes
    assert notes == ["workbench.paged_attention: reference is not CUDA-graph safe, running triton"]
    opdef = REGISTRY.get("workbench.paged_attention")
    triton = opdef.tactics.pop("triton")
    try:
        notes = gpu_fallback_notes(tiny_program.graph)
    finally:
        opdef.tactics["triton"] = triton
    assert notes == ["workbench.paged_attention: no CUDA-graph safe implementation; GPU steps with it run eagerly"]
