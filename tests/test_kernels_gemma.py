"""Gemma's Triton kernels under TRITON_INTERPRET=1 against their references: GeGLU (``gelu_mul``, its FP8
producer) and soft-capping (``softcap``), at several shapes (odd ones too), strided gate/up as the fused gate_up
GEMM's slices, outputs poisoned with NaN. The soft cap inside the paged attention is in test_kernels_attention."""

import pytest
import torch

from conftest import KERNEL_TOL, rel_err
from workbench.kernels import fused
from workbench.kernels import triton_gemma as tg
from workbench.kernels.gemm import quantize_fp8

TOL = KERNEL_TOL
pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: NaN-filled outputs



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 96), (3, 130), (7, 1000)])
def test_gelu_mul_on_slices_of_a_fused_output(rows, cols, dtype):
    g = torch.Generator().manual_seed(12)
    fused_out = (torch.randn(rows, 2 * cols, generator=g) * 3).to(dtype)  # gate | up, as fuse_parallel_linears does
    gate, up = fused_out[:, :cols], fused_out[:, cols:]
    ref = fused.gelu_mul(gate, up)
    for config in tg.CONFIGS["gelu_mul"][:3]:
        out = tg.gelu_mul(gate, up, config)
        assert out.dtype == ref.dtype and torch.isfinite(out.float()).all()
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_mul_fp8_on_slices_of_a_fused_output(dtype):
    """As test_kernels_pointwise's FP8 producers: the interpreter's fp32 -> e4m3 conversion rounds some values to a
    neighbour of torch's, so most bytes must match and every value be a neighbour at worst."""
    from test_kernels_pointwise import fp8_close

    torch.manual_seed(3)
    gate_up = torch.randn(6, 2 * 100, dtype=dtype) * 2
    gate, up = gate_up[:, :100], gate_up[:, 100:]
    scale = torch.tensor(0.007)
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    ref = fused.gelu_mul_fp8(gate, up, scale)
    assert torch.equal(bits(ref), bits(quantize_fp8(fused.gelu_mul(gate, up), scale)))
    for config in tg.CONFIGS["gelu_mul"][:2]:
        fp8_close(tg.gelu_mul_fp8(gate, up, scale, config), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cap", [((2, 3, 512), 30.0), ((1, 1, 77), 1.0), ((5, 300), 0.25)])
def test_softcap(shape, cap, dtype):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g) * 4 * cap).to(dtype)  # most values in tanh's bend, some saturated
    ref = fused.softcap(x, cap)
    for config in tg.CONFIGS["softcap"][:2]:
        out = tg.softcap(x, cap, config)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert rel_err(out, ref) < TOL[dtype] and out.abs().max() <= cap


# (new tokens per sequence, cached context per sequence, kv heads, group): prefill, decode, a mixed step
ATTENTION_CASES = [([19], [0], 2, 1), ([1, 1, 1], [5, 16, 33], 2, 2), ([1, 9, 3], [30, 0, 17], 1, 4)]


@pytest.mark.parametrize("new,context,kv_heads,group,head_dim,window,dtype", [
    (*ATTENTION_CASES[0], 16, None, torch.float32), (*ATTENTION_CASES[1], 16, 8, torch.bfloat16),
    (*ATTENTION_CASES[2], 48, 8, torch.float32), (*ATTENTION_CASES[2], 16, 8, torch.bfloat16),
    (*ATTENTION_CASES[0], 256, 5, torch.bfloat16), (*ATTENTION_CASES[2], 256, 5, torch.float32)],
    ids=["prefill-16", "decode-16-window", "mixed-48-window", "mixed-16-window-bf16", "prefill-256-window",
         "mixed-256-window"])
def test_paged_attention_softcap_matches_reference(new, context, kv_heads, group, head_dim, window, dtype):
    """Soft-capped scores inside the Triton paged attention (Gemma 2's attn_logit_softcapping) against the
    reference, at head dims 16, 48 (not a power of two) and 256 (Gemma's), with and without a sliding window,
    the default config, a small one and split-KV; a cap of 1.5 on scores of a few units bends them all."""
    from test_kernels_attention import make_step
    from workbench.kernels import triton_attention as ta

    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=head_dim, page=4, dtype=dtype)
    q = q * 3
    scale = head_dim ** -0.5
    ref_cache = cache.clone()
    ref = fused.paged_attention(q, k, v, ref_cache, slots, tables, lens, qsl, scale, window, softcap=1.5)
    plain = fused.paged_attention(q, k, v, cache.clone(), slots, tables, lens, qsl, scale, window)
    assert rel_err(plain, ref) > 0.05  # the cap matters at these scores
    configs = [ta.CONFIGS[0], {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}]
    if head_dim == 256:
        configs = configs[1:]  # the interpreter at 256-wide tiles: one config
    for config in configs:
        tri_cache = cache.clone()
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, scale, window, config=config,
                                 softcap=1.5)
        assert torch.equal(tri_cache, ref_cache)
        assert torch.isfinite(out.float()).all()
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_paged_attention_softcap_over_an_fp8_cache():
    """An FP8 cache: the scores' K scale goes inside the tanh (raw · scale · k_scale / cap)."""
    from test_kernels_attention import make_step
    from workbench.kernels import triton_attention as ta

    q, k, v, cache, slots, tables, lens, qsl = make_step([1, 6], [9, 3], kv_heads=2, group=2, head_dim=32, page=4,
                                                         dtype=torch.bfloat16, seed=5)
    cache = (cache.float() / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn)
    args = (q * 3, k, v)
    ref = fused.paged_attention(*args, cache.clone(), slots, tables, lens, qsl, 0.2, None, 0.05, 0.04, softcap=2.0)
    out = ta.paged_attention(*args, cache.clone(), slots, tables, lens, qsl, 0.2, None, 0.05, 0.04, softcap=2.0)
    assert rel_err(out, ref) < 2e-2


# What Triton 3.9 compiled for sm_90 asked for (bench/attention_sass.py's compile_config, bf16, a prompt step with
# RoPE inside; BENCHMARKS.md, 2026-12-07): (BLOCK_Q, BLOCK_N, warps, stages, group, head dim) -> bytes
COMPILED_SHARED_MEMORY = {
    (16, 64, 4, 2, 2, 256): 86016, (32, 64, 8, 3, 8, 256): 327680, (4, 64, 4, 2, 2, 256): 75776,
    (16, 64, 4, 3, 2, 256): 151552, (4, 128, 4, 3, 2, 256): 274432, (32, 64, 8, 2, 2, 256): 163840,
    (32, 128, 8, 3, 4, 128): 229376, (16, 64, 8, 2, 2, 256): 86016, (32, 64, 4, 2, 2, 256): 163840,
    (64, 32, 4, 2, 2, 256): 131072, (16, 64, 4, 1, 2, 256): 53248, (32, 64, 4, 1, 2, 256): 98304,
    (32, 32, 8, 3, 2, 256): 131072, (16, 32, 4, 3, 2, 256): 83968,
}


def test_attention_shared_memory_is_what_the_compiler_asked_for_and_prune_fits_it():
    """``shared_memory`` reproduces the compiled kernels' figures (the 327,680 B of BENCHMARKS.md's Gemma-2B
    failure among them); ``prune`` cuts every config's stages to the H100's 232,448 B at Gemma's head dim 256
    (Gemma-2-9B: 16 query heads, 8 KV heads; Gemma-2B: 8 and 1), and a config that fits is left as it was."""
    from workbench.kernels import triton_attention as ta
    from workbench.kernels.gemm import H100_SMEM_BYTES

    for (bq, bn, warps, stages, group, head_dim), need in COMPILED_SHARED_MEMORY.items():
        config = {"BLOCK_Q": bq, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "SPLITS": 1}
        assert ta.shared_memory(config, group, head_dim) == need
    assert H100_SMEM_BYTES == 232448
    for heads, kv_heads in ((16, 8), (8, 1)):
        for new in ([1, 1, 1], [9, 30, 1]):
            q = torch.empty(1, heads, sum(new), 256, device="meta")
            cache = torch.empty(2, 8, 16, kv_heads, 256, device="meta", dtype=torch.bfloat16)
            qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
            kept = ta.prune(ta.CONFIGS, (q, q, q, cache, None, None, torch.empty(len(new)), qsl), {})
            group = heads // kv_heads
            assert kept and all(ta.shared_memory(c, group, 256) <= H100_SMEM_BYTES for c in kept)
            assert any(c["num_stages"] >= 2 for c in kept)
            space = [{k: v for k, v in o.items() if k != "num_stages"} for o in ta.CONFIGS]
            for c in kept:  # each kept config is one of the space, at most with fewer stages
                assert {k: v for k, v in c.items() if k not in ("num_stages", "DECODE", "PAIRS")} in space
    fits = ta.CONFIGS[0]
    assert ta.fit_stages(fits, 2, 256, H100_SMEM_BYTES) is fits
    assert ta.fit_stages({"BLOCK_Q": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, 2, 256,
                         H100_SMEM_BYTES)["num_stages"] == 2
    assert ta.fit_stages({"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, 8, 256,
                         H100_SMEM_BYTES)["num_stages"] == 1


@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 7, 130)])
def test_rms_norm_with_gemmas_fp32_weight_over_bf16_rounds_once(shape):
    """Gemma's derived 1 + w stays fp32: ``rms_norm`` then multiplies in fp32 and rounds once to x's dtype (bf16 out),
    as Gemma's module does; the kernel does the same, with the residual add and as an FP8 producer too (to bf16's
    tolerance: the interpreter's bf16 conversion truncates, so its bits cannot be compared here)."""
    from test_kernels_pointwise import fp8_close
    from workbench.kernels import triton_pointwise as tp

    x, r = (torch.randn(shape) * 3).to(torch.bfloat16), torch.randn(shape).to(torch.bfloat16)
    w = 1 + 0.5 * torch.randn(shape[-1])
    gemma = ((x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)) * w).to(torch.bfloat16)
    ref = fused.rms_norm(x, w, 1e-6)
    assert ref.dtype == torch.bfloat16 and torch.equal(ref, gemma)
    for config in tp.CONFIGS["rms_norm"][:3]:
        out = tp.rms_norm(x, w, 1e-6, config=config)
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
        normed, total = tp.add_rms_norm(x, r, w, 1e-6, config=config)
        ref_normed, ref_total = fused.add_rms_norm(x, r, w, 1e-6)
        assert rel_err(total, ref_total) < 1e-2 and rel_err(normed, ref_normed) < 1e-2
    scale = torch.tensor(0.02)
    fp8_close(tp.rms_norm_fp8(x, w, 1e-6, scale), fused.rms_norm_fp8(x, w, 1e-6, scale))


@pytest.mark.parametrize("new,context,kv_heads,group,head_dim,kv_dtype", [
    ([5, 1, 3], [0, 9, 4], 2, 2, 32, torch.bfloat16), ([1, 1], [12, 3], 1, 4, 256, torch.bfloat16),
    ([6, 1], [2, 7], 2, 2, 32, torch.float8_e4m3fn)], ids=["mixed-bf16", "decode-hd256", "mixed-fp8"])
def test_gemma3_qk_norms_inside_the_attention_round_once_after_the_fp32_weight(new, context, kv_heads, group,
                                                                              head_dim, kv_dtype):
    """Gemma 3's q/k norms inside the paged attention: fp32 weights (the derived 1 + w) over bf16 q and k, normed,
    times the weight in fp32, rounded once (``rms_norm``'s rounding for an fp32 weight), then rotated; against the
    reference (rms_norm, RoPE, attention) and against the unfused Triton path (rms_norm and rope kernels, then the
    kernel), at head dims 32 and 256, over a bf16 and an FP8 cache, with a sliding window."""
    from test_kernels_attention import make_step, rope_tables, step_positions
    from workbench.kernels import triton_attention as ta
    from workbench.kernels import triton_pointwise as tp

    q, k, v, cache, slots, tables, lens, qsl = make_step(new, context, kv_heads=kv_heads, group=group,
                                                         head_dim=head_dim, page=4, dtype=torch.bfloat16, seed=9)
    q, k = q * 3 + 1, k * 2 - 1
    g = torch.Generator().manual_seed(3)
    qw, kw = (1 + 0.3 * torch.randn(head_dim, generator=g) for _ in range(2))  # fp32
    cos, sin = rope_tables(step_positions(lens, qsl), head_dim, torch.bfloat16)
    scales = (0.05, 0.02) if kv_dtype == torch.float8_e4m3fn else (None, None)
    cache = (cache.float() * 4).clamp(-448, 448).to(kv_dtype) if scales[0] else cache
    inside = dict(cos=cos, sin=sin, q_norm=qw, k_norm=kw, norm_eps=1e-6)
    scale, window = 24 ** -0.5, 6
    ref = fused.paged_attention(q, k, v, cache.clone(), slots, tables, lens, qsl, scale, window, *scales, **inside)
    qn, kn = tp.rope(tp.rms_norm(q, qw, 1e-6), cos, sin), tp.rope(tp.rms_norm(k, kw, 1e-6), cos, sin)
    assert qn.dtype == torch.bfloat16
    config = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}
    tri_cache, unfused_cache = cache.clone(), cache.clone()
    want = ta.paged_attention(qn, kn, v, unfused_cache, slots, tables, lens, qsl, scale, window, *scales,
                              config=config)
    out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, scale, window, *scales, config=config,
                             **inside)
    assert torch.equal(tri_cache.view(torch.uint8), unfused_cache.view(torch.uint8)) and torch.equal(out, want)
    assert rel_err(out, ref) < (2e-2 if kv_dtype == torch.bfloat16 else 4e-2)


def test_cost_models_count_the_gates_and_the_caps():
    """GeGLU about 10 FLOPs an element (silu_mul's elementwise 1), its bytes the inputs and output; the soft cap 6
    FLOPs a score on top of the attention's matmuls, and nothing without it."""
    from workbench.graph.ir import TensorSpec
    from workbench.kernels import OpCall
    from workbench.kernels.registry import REGISTRY

    sizes = {"tokens": 10}
    x = TensorSpec([1, "tokens", 128], "bfloat16")
    gelu = REGISTRY.get("workbench.gelu_mul").cost(OpCall([x, x], {}, [x], sizes))
    assert (gelu.flops, gelu.bytes) == (10 * 1280, 3 * 1280 * 2)
    q, kv = TensorSpec([1, 8, "tokens", 64], "bfloat16"), TensorSpec([1, 2, "tokens", 64], "bfloat16")
    attention = REGISTRY.get("workbench.attention").cost
    plain = attention(OpCall([q, kv, kv, None, 0.1], {}, [q], sizes))
    capped = attention(OpCall([q, kv, kv, None, 0.1], {"softcap": 50.0}, [q], sizes))
    assert capped.flops - plain.flops == 6 * 8 * 10 * 10 and capped.bytes == plain.bytes
    logits = TensorSpec([1, "tokens", 512], "float32")
    cap = REGISTRY.get("workbench.softcap").cost(OpCall([logits, 30.0], {}, [logits], sizes))
    assert (cap.flops, cap.bytes) == (6 * 5120, 2 * 5120 * 4)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 7, 130)])
def test_norm_add_rms_norm(shape, dtype, weight_dtype):
    """Gemma's post-norm, residual add and next norm in one kernel, against the reference (the rms_norm then
    add_rms_norm it replaces): fp32, Gemma's fp32 (1 + w) weights over bf16, and Llama-style bf16 weights; 1, 2 and
    4 rows per program; and its FP8 producer."""
    from test_kernels_pointwise import fp8_close

    g = torch.Generator().manual_seed(13)
    x, r = ((torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(2))
    w1, w2 = ((1 + 0.3 * torch.randn(shape[-1], generator=g)).to(weight_dtype) for _ in range(2))
    ref_normed, ref_total = fused.norm_add_rms_norm(x, r, w1, w2, 1e-6)
    unfused = fused.add_rms_norm(r, fused.rms_norm(x, w1, 1e-6), w2, 1e-6)
    assert torch.equal(ref_normed, unfused[0]) and torch.equal(ref_total, unfused[1])
    assert ref_normed.dtype == dtype
    for config in tg.CONFIGS["norm_add_rms_norm"][:3]:
        normed, total = tg.norm_add_rms_norm(x, r, w1, w2, 1e-6, config)
        assert normed.dtype == ref_normed.dtype and total.dtype == ref_total.dtype
        assert rel_err(total, ref_total) < TOL[dtype] and rel_err(normed, ref_normed) < TOL[dtype]
    # the FP8 output against the reference's quantized norm of the kernel's own sum: under the interpreter (whose
    # bf16 conversion truncates) a sum that cancels to a few ulps can differ from the reference's by one of them
    scale = torch.tensor(0.01)
    q, total = tg.norm_add_rms_norm_fp8(x, r, w1, w2, 1e-6, scale)
    assert rel_err(total, ref_total) < TOL[dtype]
    fp8_close(q, fused.rms_norm_fp8(total, w2, 1e-6, scale))
