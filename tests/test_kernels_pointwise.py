"""Triton kernels for the pointwise fused ops, under TRITON_INTERPRET=1, against the references.

Random inputs (never zeros), several shapes, strided inputs as the passes produce them
(slices of a fused GEMM output, transposed views), outputs poisoned with NaN.
"""

import pytest
import torch

from conftest import KERNEL_TOL, kernel_close, rel_err
from workbench.kernels import fused
from workbench.kernels import triton_pointwise as tp

TOL = KERNEL_TOL
pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: NaN-filled outputs



close = kernel_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 7, 130)])
def test_rms_norm(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    for config in tp.CONFIGS["rms_norm"][:3]:  # 1, 2 and 4 rows per program (rows not a multiple of 4 too)
        close(tp.rms_norm(x, w, 1e-5, config=config), fused.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 9, 3, 64), (5, 14, 2, 128), (3, 4, 2, 32)])
def test_per_head_rms_norm_on_slices_of_a_fused_qkv(tokens, heads, kv_heads, head_dim, dtype):
    """Qwen3's q/k norm: [batch, tokens, heads, head_dim] views of the fused QKV output's q and k slices,
    normed over head_dim with a head_dim weight. The kernel reads the strided heads in place (no copy)."""
    qkv = torch.randn(2, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    q = qkv[..., :heads * head_dim].view(2, tokens, heads, head_dim)
    k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(2, tokens, kv_heads, head_dim)
    w = (1 + 0.1 * torch.randn(head_dim)).to(dtype)
    for x in (q, k, q[:1, :1]):  # a decode step's single token too
        assert tp._head_rows(x)[3] == (x.shape[2] if x.shape[0] * x.shape[1] > 1 else 1)  # two levels, or plain rows
        for config in tp.CONFIGS["rms_norm"][:3]:  # rows per program that split a token's heads, or not
            close(tp.rms_norm(x, w, 1e-6, config=config), fused.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 100)])
def test_add_rms_norm(shape, dtype):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    y, s = tp.add_rms_norm(x, r, w, 1e-6)
    ry, rs = fused.add_rms_norm(x, r, w, 1e-6)
    close(s, rs, dtype)
    close(y, ry, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 32), (6, 100), (4, 600)])
def test_silu_mul_on_slices_of_a_fused_output(rows, cols, dtype):
    gate_up = torch.randn(rows, 2 * cols, dtype=dtype) * 2
    gate, up = gate_up[:, :cols], gate_up[:, cols:]  # strided, as after horizontal fusion
    for config in tp.CONFIGS["silu_mul"][:2]:
        close(tp.silu_mul(gate, up, config), fused.silu_mul(gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,t,d", [(1, 2, 3, 16), (2, 4, 5, 64)])
def test_rope_on_transposed_views(b, h, t, d, dtype):
    x = torch.randn(b, t, h * d, dtype=dtype).view(b, t, h, d).transpose(1, 2)  # as the graph feeds it
    pos = torch.randint(0, 50, (b, t))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[..., None].float() * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    for config in [*tp.CONFIGS["rope"][:2], {"HEADS": 2, "num_warps": 1}]:  # all heads in one program, or split
        close(tp.rope(x, cos, sin, config), fused.rope(x, cos, sin), dtype)


def fp8_close(q, ref):
    """The interpreter's float -> e4m3 conversion rounds some values to a neighbour of torch's (and carries
    wrongly), and its bf16 rounding truncates: most bytes must match and every value be a neighbour at worst
    (a wrong scale or clamp is off by far more); bench/pointwise.py compares the bytes on the GPU."""
    assert q.dtype == ref.dtype == torch.float8_e4m3fn and q.shape == ref.shape
    g, r = q.float(), ref.float()
    assert torch.isfinite(g).all()
    assert (g != r).float().mean() < 0.25
    assert ((g - r).abs() <= 0.5 * r.abs() + 2 ** -9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 7, 130)])
def test_rms_norm_fp8(shape, dtype):
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=dtype) * 3
    x[..., 0] = 40  # normed to about 6 in every row
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    scale = torch.tensor(2.5 / 448)  # values beyond 2.5 saturate at ±448
    ref = fused.rms_norm_fp8(x, w, 1e-5, scale)
    assert (ref.float().abs() == 448).any() and (ref.float().abs() < 448).float().mean() > 0.9
    for config in tp.CONFIGS["rms_norm"][:3]:
        fp8_close(tp.rms_norm_fp8(x, w, 1e-5, scale, config=config), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 100)])
def test_add_rms_norm_fp8(shape, dtype):
    torch.manual_seed(3)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    scale = torch.tensor(0.011)
    q, s = tp.add_rms_norm_fp8(x, r, w, 1e-6, scale)
    rq, rs = fused.add_rms_norm_fp8(x, r, w, 1e-6, scale)
    close(s, rs, dtype)
    fp8_close(q, rq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 32), (6, 100)])
def test_silu_mul_fp8_on_slices_of_a_fused_output(rows, cols, dtype):
    torch.manual_seed(3)
    gate_up = torch.randn(rows, 2 * cols, dtype=dtype) * 2
    gate, up = gate_up[:, :cols], gate_up[:, cols:]
    scale = torch.tensor(0.007)
    for config in tp.CONFIGS["silu_mul"][:2]:
        fp8_close(tp.silu_mul_fp8(gate, up, scale, config), fused.silu_mul_fp8(gate, up, scale))


def test_fp8_producers_match_the_unfused_op_then_quantize():
    """The references round exactly as the unfused op followed by the GEMM's own quantization of x."""
    from workbench.kernels.gemm import quantize_fp8

    x, r = torch.randn(4, 48, dtype=torch.bfloat16), torch.randn(4, 48, dtype=torch.bfloat16)
    w, scale = (1 + 0.1 * torch.randn(48)).to(torch.bfloat16), torch.tensor(0.004)
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(bits(fused.rms_norm_fp8(x, w, 1e-5, scale)), bits(quantize_fp8(fused.rms_norm(x, w, 1e-5), scale)))
    q, s = fused.add_rms_norm_fp8(x, r, w, 1e-5, scale)
    n, s2 = fused.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(bits(q), bits(quantize_fp8(n, scale))) and torch.equal(s, s2)
    assert torch.equal(bits(fused.silu_mul_fp8(x, r, scale)), bits(quantize_fp8(fused.silu_mul(x, r), scale)))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])  # Qwen3: per-head q/k norms on strided slices
def test_triton_tactics_run_a_whole_optimized_graph(model):
    from workbench.graph.executor import Program
    from workbench.graph.passes import DEFAULT_PIPELINE
    from workbench.pipeline import optimize
    from workbench.evaluate import logits_fn

    # without moving RoPE into the attention, so the rope kernel runs in the graph too
    names = [p for p in DEFAULT_PIPELINE if p != "fuse_rope_into_attention"]
    reference = optimize(model, device="cpu", passes=names).program
    graph, params = reference.graph, reference.params
    triton_program = Program(graph, params, tactics="triton")
    used = {n.op for n in graph.nodes} & {"workbench.rms_norm", "workbench.add_rms_norm", "workbench.silu_mul",
                                          "workbench.rope"}
    assert len(used) == 4
    ids = torch.randint(0, 512, (1, 21))
    assert rel_err(logits_fn(triton_program)(ids), logits_fn(reference)(ids)) < 1e-5


def test_tactics_on_the_cpu_without_the_interpreter_fail_clearly(monkeypatch):
    from workbench.errors import WorkbenchError
    from workbench.graph.executor import Program
    from workbench.graph.ir import Graph

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(WorkbenchError, match="Triton tactics run on a CUDA device"):
        Program(Graph({}, {}, [], [], {}), {}, tactics="triton")
