"""Triton kernels of the LayerNorm families' fused ops (``kernels/triton_ln.py``), under TRITON_INTERPRET=1, against
their references (``kernels/fused_ln.py``): random inputs, small and odd shapes, strided inputs as the passes make
them, outputs poisoned with NaN; the FP8 variants against the reference then quantization; a whole tiny-neox graph
on the tactics."""

import pytest
import torch

from conftest import KERNEL_TOL, kernel_close, rel_err
from workbench.kernels import fused_ln as ref
from workbench.kernels import triton_ln as tk

TOL = KERNEL_TOL
pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest: NaN-filled outputs


close = kernel_close


def fp8_close(q, expected):
    """As in test_kernels_pointwise: the interpreter's float -> e4m3 conversion rounds some values to a neighbour
    (and carries wrongly), so most bytes must match and every value be a neighbour at worst."""
    assert q.dtype == expected.dtype == torch.float8_e4m3fn and q.shape == expected.shape
    a, b = q.float(), expected.float()
    assert torch.isfinite(a).all() and (a != b).float().mean() < 0.25
    assert ((a - b).abs() <= 0.5 * b.abs() + 2 ** -9).all()


def affine(cols, dtype, bias=True):
    w = (1 + 0.1 * torch.randn(cols)).to(dtype)
    return w, ((0.1 * torch.randn(cols)).to(dtype) if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 7, 130)])
def test_layer_norm(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    for bias in (True, False):
        w, b = affine(shape[-1], dtype, bias)
        for config in tk.CONFIGS["layer_norm"][:3]:  # 1, 2 and 4 rows per program (rows not a multiple of 4 too)
            close(tk.layer_norm(x, w, b, 1e-5, config=config), ref.layer_norm(x, w, b, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 100)])
def test_add_layer_norm(shape, dtype):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b = affine(shape[-1], dtype)
    y, s = tk.add_layer_norm(x, r, w, b, 1e-5, config=tk.CONFIGS["layer_norm"][1])
    ry, rs = ref.add_layer_norm(x, r, w, b, 1e-5)
    close(s, rs, dtype)
    close(y, ry, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 32), (6, 100), (3, 1030)])
@pytest.mark.parametrize("mode", ["none", "tanh"])
def test_gelu(rows, cols, dtype, mode):
    x = (torch.randn(rows, 2 * cols) * 4).to(dtype)[:, :cols]  # a strided view: rows a whole row apart
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-3]).to(dtype)  # tanh's saturated ends
    for config in tk.CONFIGS["gelu"][:3]:
        close(tk.gelu(x, mode, config=config), ref.gelu(x, mode), dtype)


def test_gelu_tanh_reference_is_gpt2s_formula():
    """The reference computes GPT-2's activation (transformers' NewGELUActivation) to the bit, and
    aten.gelu(approximate='tanh') to rounding."""
    from transformers.activations import NewGELUActivation

    x = torch.randn(4, 300) * 3
    assert torch.equal(ref.gelu(x, "tanh"), NewGELUActivation()(x))
    assert rel_err(ref.gelu(x, "tanh"), torch.nn.functional.gelu(x, approximate="tanh")) < 1e-6
    assert torch.equal(ref.gelu(x, "none"), torch.nn.functional.gelu(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,t,d,r", [(1, 2, 3, 16, 4), (2, 5, 4, 64, 16), (1, 3, 1, 24, 6), (1, 4, 2, 32, 32)])
def test_partial_rope_on_interleaved_views(b, h, t, d, r, dtype):
    """NeoX's q and k: chunks of a [batch, heads, tokens, 3·head_dim] view of the packed qkv output (strided); the
    rotary width r from rotary_pct (a quarter of the head in Pythia, odd halves such as 3 too, all of it)."""
    qkv = torch.randn(b, t, h, 3 * d).transpose(1, 2).to(dtype)
    x = qkv.chunk(3, -1)[1]
    angles = torch.randn(b, 1, t, r // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    for config in tk.CONFIGS["partial_rope"][:2]:
        close(tk.partial_rope(x, cos, sin, config=config), ref.partial_rope(x, cos, sin), dtype)


def test_partial_rope_reference_is_the_rope_of_the_head_then_the_rest():
    from workbench.kernels import fused

    x, angles = torch.randn(2, 3, 5, 32), torch.randn(2, 1, 5, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    out = ref.partial_rope(x, cos, sin)
    assert torch.equal(out[..., :8], fused.rope(x[..., :8], cos, sin)) and torch.equal(out[..., 8:], x[..., 8:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_variants(dtype):
    """The FP8 producers' kernels: the unfused value rounded, divided by the scale, saturated (some values at ±448)."""
    from workbench.kernels.gemm import quantize_fp8

    torch.manual_seed(3)
    x, r = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype)
    x[:, 0] = 30
    w, b = affine(96, dtype)
    scale = torch.tensor(2.0 / 448)
    expected = ref.layer_norm_fp8(x, w, b, 1e-5, scale)
    assert torch.equal(expected.view(torch.uint8), quantize_fp8(ref.layer_norm(x, w, b, 1e-5), scale).view(torch.uint8))
    assert (expected.float().abs() == 448).any()
    fp8_close(tk.layer_norm_fp8(x, w, b, 1e-5, scale), expected)
    q, s = tk.add_layer_norm_fp8(x, r, w, b, 1e-5, scale)
    rq, rs = ref.add_layer_norm_fp8(x, r, w, b, 1e-5, scale)
    close(s, rs, dtype)
    fp8_close(q, rq)
    for mode in ("none", "tanh"):
        fp8_close(tk.gelu_fp8(x, mode, torch.tensor(0.01)), ref.gelu_fp8(x, mode, torch.tensor(0.01)))


def test_tactics_and_configs_are_registered_for_the_autotuner():
    from workbench.kernels.autotune import _candidates, tactic_ops
    from workbench.kernels.registry import REGISTRY

    ops = tactic_ops()
    for op in ("layer_norm", "add_layer_norm", "layer_norm_fp8", "add_layer_norm_fp8", "gelu", "gelu_fp8",
               "partial_rope"):
        assert f"workbench.{op}" in ops and REGISTRY.get(f"workbench.{op}").default_impl()[0] == "triton"
    x = torch.empty(4, 64)
    names = [(t, c) for t, c, _ in _candidates("workbench.layer_norm", (x, x[0], x[0], 1e-5), {})]
    assert names[0] == ("reference", None) and len(names) == 1 + len(tk.CONFIGS["layer_norm"])
    cost = REGISTRY.get("workbench.layer_norm").cost
    from workbench.graph.ir import TensorSpec
    from workbench.kernels.cost import OpCall

    spec = TensorSpec(["tokens", 64], "bfloat16")
    c = cost(OpCall([spec, TensorSpec([64], "bfloat16"), TensorSpec([64], "bfloat16"), 1e-5], {}, [spec],
                    {"tokens": 8}))
    assert c.bytes == 2 * (8 * 64 * 2) + 2 * 64 * 2 and c.flops == 7 * 8 * 64


@pytest.fixture(scope="module")
def neox_program(checked_optimize):
    """tiny-neox's optimized graph: layer_norm, add_layer_norm, gelu and partial_rope in one graph."""
    return checked_optimize("tiny-neox").program


def test_triton_tactics_run_a_whole_optimized_graph(neox_program):
    from workbench.evaluate import logits_fn
    from workbench.graph.executor import Program
    from workbench.kernels.registry import REGISTRY

    reference = neox_program
    graph = reference.graph
    triton_program = Program(graph, reference.params, tactics="triton")
    used = {n.op for n in graph.nodes} & set(REGISTRY.names())
    assert {"workbench.layer_norm", "workbench.add_layer_norm", "workbench.gelu", "workbench.partial_rope"} <= used
    ids = torch.randint(0, 512, (1, 13))
    assert rel_err(logits_fn(triton_program)(ids), logits_fn(reference)(ids)) < 1e-5


def test_autotune_offers_every_config_of_the_layernorm_kernels(tmp_path, neox_program):
    """On tiny-neox's graph the autotuner times the reference and every config of each new op's tuning space
    (planted timings: the interpreter's mean nothing) and chooses the fastest, the last config of each space."""
    from conftest import prefill_then_decode
    from test_autotune import PlantedTimer
    from workbench.kernels.autotune import TimingCache, autotune

    program = neox_program
    cache = TimingCache.open(tmp_path / "timings.json")
    choices = autotune(program, prefill_then_decode(program), cache, timer=PlantedTimer(), progress=False)
    ops = {"workbench.layer_norm": "layer_norm", "workbench.add_layer_norm": "layer_norm", "workbench.gelu": "gelu",
           "workbench.partial_rope": "partial_rope"}
    nodes = {n.name: ops[n.op] for n in program.graph.nodes if n.op in ops}
    assert set(nodes.values()) == set(ops.values())
    for name, space in nodes.items():
        assert choices[name] == ("triton", tk.CONFIGS[space][-1])
    for entry in cache.entries.values():
        if entry["op"] in ops:
            assert [t["config"] for t in entry["timings"]] == [None, *tk.CONFIGS[ops[entry["op"]]]]
