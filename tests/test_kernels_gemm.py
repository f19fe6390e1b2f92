"""GEMM tactics under TRITON_INTERPRET=1 against the references, and the references against plain fp32.

Random inputs (never zeros), M in {1, 5, 33} (one row, fewer rows than a tile, more than two tiles),
K and N that are not multiples of the K tile (masked K loop) and that are, bias and no bias,
per-tensor and per-channel weight scales, static and dynamic activation scales, split-K configs,
outputs poisoned (NaN for floats, the type's minimum for ints).

The interpreter's fp32→bf16 cast truncates instead of rounding, so bf16 outputs differ from the
references by up to one bf16 step; each quantized kernel is therefore also checked with fp32 output,
tightly. Its float→fp8 casts are wrong too (no saturation, no rounding carry), so the Triton fp8
quantizer runs only on a GPU; on the CPU the tactics quantize with the torch helpers.
"""

import os

import pytest
import torch

from conftest import rel_err
from workbench.errors import WorkbenchError
from workbench.kernels import gemm as G
from workbench.kernels.registry import REGISTRY

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FP8 = torch.float8_e4m3fn
TESTED_16BIT = [G.CONFIGS["16bit"][0], G.CONFIGS["16bit"][-1]]  # one 128x256 tile; 16-row tiles with split-K 4
TESTED_8BIT = [G.CONFIGS["8bit"][0], G.CONFIGS["8bit"][-1]]
TINY_SPLIT = G._cfg(16, 32, 32, 2, 4, 2, split=3)  # several tiles each way, K split unevenly
TINY_GEMV = G._gemv(32, 32, 4)  # the M = 1 kernel: N and K both end in partial blocks at these shapes


def configs_at(tiles: list[dict], m: int) -> list[dict]:
    """The configs a case runs at ``m`` rows: ``tiles``, the split-K tile, and the GEMV up to 5 rows. The GEMV
    runs one program per row (grid axis 1) on that row's offsets alone, so 5 rows check them; at 33 rows it
    would run the same program 33 times over (about 0.4 s a call under the interpreter)."""
    return [*tiles, TINY_SPLIT, *([TINY_GEMV] if m <= 5 else [])]


def _works(fn) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, NotImplementedError):
        return False


HAS_CPU_SCALED_MM = _works(lambda: torch._scaled_mm(torch.ones(16, 16, dtype=FP8), torch.ones(16, 16, dtype=FP8).t(),
                                                    scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                                                    out_dtype=torch.bfloat16))
HAS_CPU_INT_MM = _works(lambda: torch._int_mm(torch.ones(17, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8)))
needs_scaled_mm = pytest.mark.skipif(not HAS_CPU_SCALED_MM, reason="this torch build has no CPU torch._scaled_mm")
needs_int_mm = pytest.mark.skipif(not HAS_CPU_INT_MM, reason="this torch build has no CPU torch._int_mm")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN (floats) or the type's minimum (ints, which the
    quantizers never produce): an element a kernel misses fails the test."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point() and t.element_size() > 1:
            return t.fill_(float("nan"))
        if not t.is_floating_point() and t.dtype != torch.bool:
            return t.fill_(torch.iinfo(t.dtype).min)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def close(out, ref, tol):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < tol


def randn(*shape, dtype=torch.float32, scale=1.0):
    """Normal values pushed away from zero (no exact zeros anywhere)."""
    t = torch.randn(*shape) * scale
    return (t + 0.01 * torch.sign(t)).to(dtype)


def quantized_weight(n, k, kind, per_channel):
    w = randn(n, k) * (1 + torch.rand(n, 1))  # rows of different ranges: per-channel scales matter
    scale_fn, quant_fn = (G.fp8_scale, G.quantize_fp8) if kind == "fp8" else (G.int8_scale, G.quantize_int8)
    scale = scale_fn(w, dim=1).reshape(-1) if per_channel else scale_fn(w)
    return w, quant_fn(w, scale.reshape(-1, 1) if per_channel else scale), scale


# --- quantization helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, -1])
def test_quantize_round_trip_error_is_bounded(dim):
    t = randn(7, 96, scale=3.0) * torch.logspace(-2, 2, 7)[:, None]  # rows of very different ranges
    s8 = G.fp8_scale(t, dim)
    q8 = G.quantize_fp8(t, s8)
    assert q8.dtype == FP8 and s8.dtype == torch.float32 and s8.shape == (() if dim is None else (7, 1))
    # e4m3: 3 mantissa bits -> half a step is |t|/16 for normals, scale/1024 for subnormals
    err = (q8.float() * s8 - t).abs()
    assert (err <= torch.maximum(t.abs() / 16, s8 / 1024) * (1 + 1e-6)).all()
    assert (q8.float().abs().amax(-1 if dim else None) == 448).all()  # amax maps to the largest fp8
    si = G.int8_scale(t, dim)
    qi = G.quantize_int8(t, si)
    assert qi.dtype == torch.int8 and (qi.abs() <= 127).all()
    assert ((qi.float() * si - t).abs() <= si / 2 * (1 + 1e-6)).all()


def test_scales_are_never_zero_and_static_scales_saturate():
    zeros = torch.zeros(3, 8)
    for scale_fn, quant_fn in ((G.fp8_scale, G.quantize_fp8), (G.int8_scale, G.quantize_int8)):
        s = scale_fn(zeros, -1)
        assert (s > 0).all() and (quant_fn(zeros, s).float() == 0).all()
    big = torch.tensor([1000.0, -1000.0, 3.0])
    assert G.quantize_fp8(big, torch.tensor(1.0)).float().tolist() == [448.0, -448.0, 3.0]
    assert G.quantize_int8(big, torch.tensor(1.0)).tolist() == [127, -127, 3]
    assert G.quantize_int8(torch.tensor([0.5, 1.5, 2.5, -2.5]), torch.tensor(1.0)).tolist() == [0, 2, 2, -2]


@pytest.mark.parametrize("static", [False, True])
def test_triton_int8_quantizer_matches_the_helpers(static):
    x = randn(5, 100, dtype=torch.bfloat16, scale=4.0)
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5])  # ties: round half to even, as torch.round
    scale = torch.tensor(1.0) if static else None
    q, s = G._quantize_rows(x, scale, torch.int8)
    q_ref, s_ref = G._quantize_x(x, scale, torch.int8)  # the torch path (x is on the CPU)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET")) or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU without TRITON_INTERPRET: the interpreter's float->fp8 casts neither "
                           "saturate nor carry rounding into the exponent")
@pytest.mark.parametrize("static", [False, True])
def test_triton_fp8_quantizer_matches_the_helpers(static):
    x = randn(5, 3000, dtype=torch.bfloat16, scale=4.0).cuda()
    scale = torch.tensor(0.01, device="cuda") if static else None  # static: many values saturate
    q, s = G._quantize_rows(x, scale, FP8)
    s_ref = G.fp8_scale(x, -1).reshape(-1) if scale is None else scale.reshape(1)
    # torch may divide by a scalar as a multiply by its reciprocal: the scales agree to one ulp
    assert torch.allclose(s, s_ref, rtol=2**-23, atol=0)
    assert torch.equal(q.float(), G.quantize_fp8(x, s.reshape(-1, 1) if scale is None else scale).float())


# --- the references against plain fp32 --------------------------------------------------------------------

@pytest.mark.parametrize("kind,static", [("fp8", False), ("fp8", True), ("int8", False), ("int8", True), ("w8", None)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_references_are_dequantized_fp32_matmuls(kind, per_channel, static):
    x, bias = randn(2, 5, 64, dtype=torch.bfloat16), randn(48, dtype=torch.bfloat16)
    w, wq, ws = quantized_weight(48, 64, "fp8" if kind == "fp8" else "int8", per_channel)
    x64 = x.double().reshape(10, 64)
    if kind == "w8":
        out, xd = G.w8_linear(x, wq, ws, bias), x64
    else:
        scale_fn, quant_fn, op = ((G.fp8_scale, G.quantize_fp8, G.fp8_linear) if kind == "fp8"
                                  else (G.int8_scale, G.quantize_int8, G.int8_linear))
        sx = scale_fn(x) if static else None
        out = op(x, wq, ws, sx, bias)
        rows = sx if static else scale_fn(x.reshape(10, 64), -1)
        xd = quant_fn(x.reshape(10, 64), rows).double() * rows.double()
    wd = wq.double() * ws.double().reshape(-1, 1)
    expected = (torch.einsum("mk,nk->mn", xd, wd) + bias.double()).reshape(2, 5, 48)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
    assert rel_err(out, expected) < 4e-3  # one bf16 rounding
    # and close to the unquantized product, within the formats' quantization error
    bound = {"fp8": 0.08, "int8": 0.03, "w8": 0.02}[kind]
    assert rel_err(out, x.float() @ w.t() + bias.float()) < bound


def test_fp8_reference_out_dtype():
    x = randn(3, 32, dtype=torch.float16)
    _, wq, ws = quantized_weight(16, 32, "fp8", True)
    assert G.fp8_linear(x, wq, ws).dtype == torch.float16
    assert G.fp8_linear(x, wq, ws, out_dtype=torch.float32).dtype == torch.float32


# --- the bf16/fp16 linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k,n", [(72, 48), (64, 96)])
def test_linear_matches_aten(m, k, n, dtype):
    x = randn(1, m, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=0.2)
    b = randn(n, dtype=dtype)
    for config in configs_at(TESTED_16BIT, m):
        for bias in (None, b):
            close(G.linear(x, w, bias, config=config), torch.nn.functional.linear(x, w, bias), TOL[dtype])


def test_linear_on_strided_views_and_by_default_config():
    big = randn(40, 3, 80)
    x = big[:, 1, 8:72]  # rows 240 elements apart, not contiguous
    wbig = randn(50, 100, scale=0.2)
    w = wbig[:48, 10:74]  # a slice: row stride 100
    for config in (None, TINY_SPLIT, TINY_GEMV):
        close(G.linear(x, w, config=config), torch.nn.functional.linear(x, w), 1e-5)
    close(G.linear(x[0], w), torch.nn.functional.linear(x[0], w), 1e-5)  # 1-D x


def test_linear_rejects_what_it_cannot_do():
    with pytest.raises(WorkbenchError, match="one dtype"):
        G.linear(randn(2, 32, dtype=torch.bfloat16), randn(16, 32))
    with pytest.raises(WorkbenchError, match="do not multiply"):
        G.linear(randn(2, 32), randn(16, 31))


def test_linear_tactic_runs_a_whole_graph(tiny_program):
    from workbench.graph.executor import Program
    from workbench.evaluate import logits_fn

    assert REGISTRY.get("aten.linear.default").tactics["triton"] is G.linear
    graph, params = tiny_program.graph, tiny_program.params
    ids = torch.randint(0, 512, (1, 9))
    reference = logits_fn(Program(graph, params))(ids)
    ours = logits_fn(Program(graph, params, tactics={"aten.linear.default": "triton"}))(ids)
    assert rel_err(ours, reference) < 1e-5


# --- fp8 -----------------------------------------------------------------------------------------------------

QUANT_CASES = [  # (M, per-channel weight scale, static activation scale, bias)
    (1, True, False, False), (5, False, True, True), (33, True, False, True), (33, False, False, False),
    (5, True, True, False), (1, False, True, True),
]


@pytest.mark.parametrize("m,per_channel,static,with_bias", QUANT_CASES)
@pytest.mark.parametrize("k,n", [(72, 48), (64, 96)])
def test_fp8_triton_matches_reference(m, k, n, per_channel, static, with_bias):
    x = randn(m, k, dtype=torch.bfloat16, scale=2.0)
    _, wq, ws = quantized_weight(n, k, "fp8", per_channel)
    sx = G.fp8_scale(x) * 1.3 if static else None  # a static scale from calibration: not this batch's amax
    bias = randn(n, dtype=torch.bfloat16) if with_bias else None
    for config in configs_at(TESTED_8BIT, m):
        for out_dtype in (torch.float32, torch.bfloat16):
            close(G.fp8_linear_triton(x, wq, ws, sx, bias, out_dtype, config=config),
                  G.fp8_linear(x, wq, ws, sx, bias, out_dtype), TOL[out_dtype])


@needs_scaled_mm
@pytest.mark.parametrize("m,per_channel,static,with_bias", QUANT_CASES)
def test_fp8_scaled_mm_matches_reference(m, per_channel, static, with_bias):
    x = randn(2, m, 64, dtype=torch.bfloat16, scale=2.0)
    _, wq, ws = quantized_weight(48, 64, "fp8", per_channel)
    sx = G.fp8_scale(x) if static else None
    bias = randn(48, dtype=torch.bfloat16) if with_bias else None
    out_dtypes = [torch.bfloat16] + ([torch.float32, torch.float16] if static and not per_channel else [])
    for out_dtype in out_dtypes:  # per-tensor scales can write any float dtype; fp32 adds the bias afterwards
        for config in G.SCALED_MM_CONFIGS:
            close(G.fp8_linear_scaled_mm(x, wq, ws, sx, bias, out_dtype, config=config),
                  G.fp8_linear(x, wq, ws, sx, bias, out_dtype), TOL[out_dtype])


def test_fp8_scaled_mm_refuses_what_cublas_cannot_do():
    """Checked on every device, before any kernel runs, so the autotuner records inf with a clear reason."""
    _, wq, ws = quantized_weight(48, 40, "fp8", True)
    with pytest.raises(WorkbenchError, match="multiples of 16, got K=40"):
        G.fp8_linear_scaled_mm(randn(4, 40, dtype=torch.bfloat16), wq, ws, out_dtype=torch.bfloat16)
    _, wq, ws = quantized_weight(48, 64, "fp8", True)
    with pytest.raises(WorkbenchError, match="writes only bfloat16, not torch.float16"):
        G.fp8_linear_scaled_mm(randn(4, 64, dtype=torch.float16), wq, ws)  # dynamic: row-wise scales
    with pytest.raises(WorkbenchError, match="weight must be a 2-D torch.float8_e4m3fn"):
        G.fp8_linear_scaled_mm(randn(4, 64, dtype=torch.bfloat16), wq.float(), ws)


def test_quantized_ops_reject_bad_arguments():
    x = randn(4, 64, dtype=torch.bfloat16)
    _, wq, ws = quantized_weight(48, 64, "fp8", True)
    for call, match in [
        (lambda: G.fp8_linear(randn(4, 63, dtype=torch.bfloat16), wq, ws), "share K"),
        (lambda: G.fp8_linear(x, wq, ws[:5]), "1 value .per tensor. or N=48"),
        (lambda: G.fp8_linear_triton(x, wq, ws, input_scale=torch.ones(4)), "static per-tensor"),
        (lambda: G.fp8_linear_triton(x, wq, ws, bias=torch.ones(47)), "bias must hold N=48"),
        (lambda: G.fp8_linear(x, wq, ws, out_dtype=torch.int8), "out_dtype"),
        (lambda: G.int8_linear(x, wq, ws), "torch.int8"),
        (lambda: G.fp8_linear(x.to(torch.int8), wq, ws), "or torch.float8_e4m3fn already quantized"),
        (lambda: G.w8_linear(x.int(), wq.view(torch.int8), ws), "x must be bfloat16"),
    ]:
        with pytest.raises(WorkbenchError, match=match):
            call()


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("per_token", [False, True])
def test_x_quantized_upstream_is_the_same_linear(kind, per_token):
    """x handed over already quantized (with its scale, per tensor or per token) gives exactly what the op
    computes when it quantizes x itself, in every tactic; the output then defaults to bfloat16."""
    qdtype, scale_fn, quant_fn = ((FP8, G.fp8_scale, G.quantize_fp8) if kind == "fp8"
                                  else (torch.int8, G.int8_scale, G.quantize_int8))
    op = G.fp8_linear if kind == "fp8" else G.int8_linear
    m, k, n = 33, 64, 48
    x = randn(3, m, k, dtype=torch.bfloat16, scale=2.0)
    _, wq, ws = quantized_weight(n, k, kind, True)
    bias = randn(n, dtype=torch.bfloat16)
    sx = scale_fn(x, dim=-1) if per_token else scale_fn(x) * 1.3
    xq = quant_fn(x, sx)
    inside = op(x, wq, ws, None if per_token else sx, bias, torch.float32)  # the op quantizes x the same way
    upstream = op(xq, wq, ws, sx, bias, torch.float32)
    assert torch.equal(upstream, inside)
    assert op(xq, wq, ws, sx, bias).dtype == torch.bfloat16
    tactics = [G.fp8_linear_triton] if kind == "fp8" else [G.int8_linear_triton]
    if kind == "fp8" and HAS_CPU_SCALED_MM:
        tactics.append(G.fp8_linear_scaled_mm)
    if kind == "int8" and HAS_CPU_INT_MM:
        tactics.append(G.int8_linear_int_mm)
    for fn in tactics:
        for out_dtype in (torch.bfloat16, None):
            close(fn(xq, wq, ws, sx, bias, out_dtype), op(xq, wq, ws, sx, bias, out_dtype), TOL[torch.bfloat16])
    with pytest.raises(WorkbenchError, match=f"x is already {qdtype}, so input_scale must be"):
        op(xq, wq, ws)
    with pytest.raises(WorkbenchError, match=f"one per token .{3 * m}.; got 5 values"):
        op(xq, wq, ws, torch.ones(5))


# --- int8 and weight-only int8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("m,per_channel,static,with_bias", QUANT_CASES)
@pytest.mark.parametrize("k,n", [(72, 48), (64, 96)])
def test_int8_triton_matches_reference(m, k, n, per_channel, static, with_bias):
    _, wq, ws = quantized_weight(n, k, "int8", per_channel)
    for dtype in (torch.float32, torch.bfloat16):  # the output is x's dtype
        x = randn(m, k, dtype=dtype, scale=2.0)
        sx = G.int8_scale(x) * 1.3 if static else None
        bias = randn(n, dtype=dtype) if with_bias else None
        for config in configs_at(TESTED_8BIT, m):
            close(G.int8_linear_triton(x, wq, ws, sx, bias, config=config), G.int8_linear(x, wq, ws, sx, bias),
                  TOL[dtype])


@needs_int_mm
@pytest.mark.parametrize("per_channel,static,with_bias", [(True, False, True), (False, True, False)])
def test_int8_int_mm_matches_reference(per_channel, static, with_bias):
    _, wq, ws = quantized_weight(48, 64, "int8", per_channel)
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(3, 11, 64, dtype=dtype)  # 33 rows: _int_mm needs more than 16
        sx = G.int8_scale(x) if static else None
        bias = randn(48, dtype=dtype) if with_bias else None
        close(G.int8_linear_int_mm(x, wq, ws, sx, bias), G.int8_linear(x, wq, ws, sx, bias), TOL[dtype])


def test_int8_int_mm_refuses_what_cublas_cannot_do():
    _, wq, ws = quantized_weight(48, 64, "int8", True)
    with pytest.raises(WorkbenchError, match="more than 16 rows.*got M=16"):
        G.int8_linear_int_mm(randn(16, 64), wq, ws)
    _, wq, ws = quantized_weight(48, 60, "int8", True)
    with pytest.raises(WorkbenchError, match="multiples of 8.*K=60"):
        G.int8_linear_int_mm(randn(20, 60), wq, ws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k,n", [(72, 48), (64, 96)])
def test_w8_triton_matches_reference(m, k, n, dtype):
    x = randn(m, k, dtype=dtype)
    _, wq, ws = quantized_weight(n, k, "int8", True)
    b = randn(n, dtype=dtype)
    for config in configs_at(TESTED_16BIT, m):
        for bias in (None, b):
            close(G.w8_linear_triton(x, wq, ws, bias, config=config), G.w8_linear(x, wq, ws, bias), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_w8_dequant_tactic_matches_reference(dtype, per_channel):
    """Dequantize-then-GEMM: exact in fp32 up to the matmul's order, one weight rounding in bf16."""
    x = randn(33, 72, dtype=dtype)
    _, wq, ws = quantized_weight(48, 72, "int8", per_channel)
    b = randn(48, dtype=dtype)
    for bias in (None, b):
        out = G.w8_linear_dequant(x, wq, ws, bias)
        assert out.dtype == dtype and out.shape == (33, 48)
        close(out, G.w8_linear(x, wq, ws, bias), TOL[dtype])


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("k", [40, 4100])  # one block, and several with a masked tail
def test_dequantize_weight_kernel(per_channel, k):
    """The Triton dequantizer (GPU path, run by the interpreter) gives the torch path's values."""
    _, wq, ws = quantized_weight(6, k, "int8", per_channel)
    expected = G.dequantize_weight(wq, ws, torch.float32)
    assert torch.equal(expected, wq.float() * (ws.reshape(-1, 1) if per_channel else ws))
    out = torch.full((6, k), float("nan"))
    block = min(2048, 1 << (k - 1).bit_length())
    grid = (6, -(-k // block))
    G._dequant_rows_kernel[grid](wq, G._flat(ws), out, k, wq.stride(0), out.stride(0), PER_ROW=per_channel,
                                 BLOCK=block)
    assert torch.equal(out, expected)


def test_the_tensor_core_dot_path(monkeypatch):
    """The GPU's dot (operands in their own dtype, int8 weights converted to x's dtype in registers) also runs
    exactly under the interpreter for fp8 and fp16 (its bf16 arithmetic is wrong, so tests use fp32 dots)."""
    real = G._dot_mode
    monkeypatch.setattr(G, "_dot_mode", lambda dtype: "native" if dtype in (FP8, torch.float16) else real(dtype))
    x = randn(33, 72, dtype=torch.float16)
    w = randn(48, 72, dtype=torch.float16, scale=0.2)
    _, w8, s8 = quantized_weight(48, 72, "fp8", True)
    _, wi, si = quantized_weight(48, 72, "int8", True)
    for config in [*TESTED_16BIT, TINY_SPLIT, TINY_GEMV]:
        close(G.linear(x, w, config=config), torch.nn.functional.linear(x, w), TOL[torch.float16])
        close(G.w8_linear_triton(x, wi, si, config=config), G.w8_linear(x, wi, si), TOL[torch.float16])
    for config in [*TESTED_8BIT, TINY_SPLIT, TINY_GEMV]:
        close(G.fp8_linear_triton(x * 50, w8, s8, out_dtype=torch.float32, config=config),  # products up to 448²
              G.fp8_linear(x * 50, w8, s8, out_dtype=torch.float32), TOL[torch.float32])


# --- registration, costs, pruning ----------------------------------------------------------------------------

def test_tactics_and_costs_are_registered():
    from workbench.graph.ir import TensorSpec
    from workbench.kernels.cost import OpCall

    expected = {"aten.linear.default": {"triton"}, "workbench.fp8_linear": {"scaled_mm", "triton"},
                "workbench.int8_linear": {"int_mm", "triton"}, "workbench.w8_linear": {"triton", "dequant"}}
    for op, tactics in expected.items():
        assert tactics <= set(REGISTRY.get(op).tactics)
    assert G.linear.configs and G.fp8_linear_scaled_mm.configs == G.SCALED_MM_CONFIGS
    # x [4, 64] bf16, weight [32, 64] fp8 (one byte each), per-channel scales fp32, output [4, 32] bf16
    call = OpCall([TensorSpec([4, 64], "bfloat16"), TensorSpec([32, 64], "float8_e4m3fn"),
                   TensorSpec([32], "float32")], {}, [TensorSpec([4, 32], "bfloat16")], {})
    cost = REGISTRY.get("workbench.fp8_linear").cost(call)
    assert cost.flops == 2 * 4 * 32 * 64
    assert cost.bytes == 4 * 64 * 2 + 32 * 64 + 32 * 4 + 4 * 32 * 2


def test_prune_drops_configs_over_the_shared_memory_budget():
    configs = G.CONFIGS["16bit"]
    limit = 100 * 1024
    kept = G.prune_configs(configs, 4096, 4096, 4096, a_bytes=2, b_bytes=2, smem_limit=limit)
    over = [c for c in configs if G.smem_bytes(c, 2, 2) > limit]
    assert over and not any(c in kept for c in over)
    assert all(G.smem_bytes(c, 2, 2) <= limit and c["SPLIT_K"] == 1 for c in kept)  # split-K is for small M
    # 128x256x64 in 3 stages: (128 + 256) * 64 * 2 bytes * 3 = 144 KiB: fits an H100, not 100 KiB
    assert G.smem_bytes(G._cfg(128, 256, 64, 8, 8, 3), 2, 2) == 147456
    assert G._cfg(128, 256, 64, 8, 8, 3) in G.prune_configs(configs, 4096, 4096, 4096, a_bytes=2, b_bytes=2)


def test_prune_drops_row_tiles_far_taller_than_m_and_never_empties():
    configs = G.CONFIGS["8bit"]
    decode = G.prune_configs(configs, 1, 4096, 4096, a_bytes=1, b_bytes=1)
    assert decode and all(c["BLOCK_M"] <= 64 for c in decode) and any(c["SPLIT_K"] > 1 for c in decode)
    assert {c["BLOCK_M"] for c in G.prune_configs(configs, 64, 4096, 4096, a_bytes=1, b_bytes=1)} == {16, 32, 64, 128}
    prefill = G.prune_configs(configs, 300, 4096, 4096, a_bytes=1, b_bytes=1)
    assert prefill == [c for c in configs if c["SPLIT_K"] == 1]  # nothing too tall; split-K is for M <= 64
    assert G.prune_configs(configs, 1, 64, 64, a_bytes=1, b_bytes=1, smem_limit=1) == [
        min(configs, key=lambda c: (G.smem_bytes(c, 1, 1), c["SPLIT_K"]))]


def test_gemv_configs_are_for_one_row_and_rank_first_there():
    """GEMV configs survive pruning at M = 1 only, the cost model ranks them first there, and the never-empty
    fallback is a tile config."""
    space = G.CONFIGS["8bit"] + G.GEMV_CONFIGS["8bit"]
    one = G.prune_configs(space, 1, 4096, 4096, a_bytes=1, b_bytes=1)
    assert all(c in one for c in G.GEMV_CONFIGS["8bit"])
    assert not any(c.get("GEMV") for c in G.prune_configs(space, 2, 4096, 4096, a_bytes=1, b_bytes=1))
    assert not G.prune_configs(space, 2, 64, 64, a_bytes=1, b_bytes=1, smem_limit=1)[0].get("GEMV")
    ranked = sorted(one, key=lambda c: G.predicted_cost(c, 1, 4096, 4096, 132))
    assert all(c.get("GEMV") for c in ranked[:len(G.GEMV_CONFIGS["8bit"])])
    x = torch.empty(1, 1, 4096, device="meta", dtype=torch.bfloat16)
    w16 = torch.empty(4096, 4096, device="meta", dtype=torch.bfloat16)
    assert G.GEMV_CONFIGS["16bit"][0] in G.linear.prune(G.linear.configs, (x, w16), {})


def test_gemv_streams_a_transposed_weight_and_int8_sums_exactly():
    """A weight whose K is not contiguous is copied for the GEMV; int8 x int8 sums stay exact in int32
    (127² x 2048 overflows fp32's 24-bit mantissa)."""
    x = randn(1, 72)
    wt = randn(72, 48, scale=0.2)
    close(G.linear(x, wt.t(), config=TINY_GEMV), torch.nn.functional.linear(x, wt.t()), 1e-5)
    xi = torch.full((1, 2048), 127, dtype=torch.int8)
    wi = torch.full((40, 2048), 127, dtype=torch.int8)
    out = torch.empty(1, 40, dtype=torch.float32)
    G._gemm(xi, wi.t(), out, TINY_GEMV)
    assert torch.equal(out, torch.full((1, 40), 127.0 * 127 * 2048 + 0.0))


def test_tactic_prune_reads_shapes_from_the_arguments():
    x = torch.empty(2, 1, 4096, device="meta", dtype=torch.bfloat16)  # decode: M = 2
    w8 = torch.empty(4096, 4096, device="meta", dtype=FP8)
    pruned = G.fp8_linear_triton.prune(G.fp8_linear_triton.configs, (x, w8, torch.ones(1)), {})
    assert pruned == G.prune_configs(G.CONFIGS["8bit"], 2, 4096, 4096, a_bytes=1, b_bytes=1)
    w16 = torch.empty(4096, 4096, device="meta", dtype=torch.bfloat16)
    big = torch.empty(8192, 4096, device="meta", dtype=torch.bfloat16)
    assert G.linear.prune(G.linear.configs, (big, w16), {}) == G.prune_configs(
        G.CONFIGS["16bit"], 8192, 4096, 4096, a_bytes=2, b_bytes=2)


# --- the benchmark's CPU-side parts ---------------------------------------------------------------------------

def test_bench_arguments_and_shapes(monkeypatch, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "gemm.py"
    spec = importlib.util.spec_from_file_location("bench_gemm", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gemm", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    opts = bench.parse_args([])
    assert opts.out == tmp_path and not opts.quick and opts.sections == ("fp8", "bf16", "int8")
    full = bench.shapes(opts)
    assert len(full) == 1 + 4 * 7 and full[0] == bench.Shape("8192^3", 8192, 8192, 8192)
    assert bench.Shape("down", 1, 4096, 14336) in full and bench.Shape("gate_up", 8192, 28672, 4096) in full
    quick = bench.shapes(bench.parse_args(["--quick", "--out", "x", "--sections", "fp8"]))
    assert len(quick) == 1 + 4 * 3 and {s.m for s in quick[1:]} == {1, 64, 4096}
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "fp4"])
    assert 2 <= bench.copies(bench.Shape("o", 1, 4096, 4096), opts) <= 16


def test_cost_model_ranks_tiles_by_padded_work_per_wave():
    """Decode (M=1): the 16-row tiles waste least; M=4096: large tiles fill whole waves and rank first."""
    from workbench.kernels.gemm import CONFIGS, predicted_cost

    def best(M, N, K):
        return min(CONFIGS["16bit"], key=lambda c: predicted_cost(c, M, N, K, 132))

    assert best(1, 4096, 4096)["BLOCK_M"] == 16
    big = best(4096, 4096, 4096)
    assert big["BLOCK_M"] * big["BLOCK_N"] >= 128 * 128
    assert best(1, 4096, 4096).get("SPLIT_K", 1) > 1  # a few output tiles: split K to fill the SMs
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1}
    step = 128 * 128 * 64  # compute-bound tile: a step costs its multiply-adds
    assert predicted_cost(cfg, 130, 128, 128, 132)[0] == 1 * 2 * step  # 2 x 1 tiles (one mostly padding), one wave
    assert predicted_cost(cfg, 128, 128 * 133, 64, 132)[0] == 2 * step  # 133 tiles: a second wave
    thin = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1}
    assert predicted_cost(thin, 16, 64, 64, 132)[0] == 64 * (16 + 64) * 64  # load-bound: costs its loads
