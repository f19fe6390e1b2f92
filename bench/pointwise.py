"""Triton pointwise kernels vs the torch eager chains they replace and vs the copy-bandwidth ceiling.

The LayerNorm families' kernels (``triton_ln``: layer_norm, add_layer_norm, gelu, partial_rope) are measured in the
same table, at GPT-NeoX-6.9B's sizes, and Gemma's (``triton_gemma``: norm_add_rms_norm, gelu_mul, softcap) at
Gemma-2-9B's.

    python bench/pointwise.py --tokens 16384

For each fused op at Llama-3-8B's sizes: every config of the kernel's tuning space
(CUDA events, median of repeats), the torch eager reference, and a device copy
measured in the same process (bytes read + written / time: the ceiling).
The table's key columns: achieved GB/s as a share of the copy ceiling, and the
speed-up over eager. Each kernel's output is checked against the reference first.
Kernels and eager chains are timed as CUDA-graph replays of 5 calls: call by call, the host's time
to launch (tens of µs in Python launchers) lands between the events and is counted as kernel time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels import fused  # noqa: E402
from workbench.kernels.gemm import quantize_fp8  # noqa: E402
from workbench.kernels import triton_gemma as tg  # noqa: E402
from workbench.kernels import triton_pointwise as tp  # noqa: E402
from workbench.kernels import fused_ln, triton_ln as tk  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402



def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cases(tokens: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    hidden, inter, heads, head_dim = 4096, 14336, 32, 128
    x, r = randn(tokens, hidden), randn(tokens, hidden)
    w = 1 + 0.1 * randn(hidden)
    yield ("rms_norm", f"{tokens}x{hidden}", "rms_norm", lambda c: tp.rms_norm(x, w, 1e-5, config=c),
           lambda: fused.rms_norm(x, w, 1e-5), nbytes(x, w, x))
    yield ("add_rms_norm", f"{tokens}x{hidden}", "rms_norm", lambda c: tp.add_rms_norm(x, r, w, 1e-5, config=c),
           lambda: fused.add_rms_norm(x, r, w, 1e-5), nbytes(x, r, w, x, x))
    gate_up = randn(tokens, 2 * inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    yield ("silu_mul", f"{tokens}x{inter} (slices)", "silu_mul", lambda c: tp.silu_mul(gate, up, config=c),
           lambda: fused.silu_mul(gate, up), nbytes(gate_up, gate))
    scale = torch.tensor(4.0 / 448, device=device)  # static FP8 x scale: |value| > 4 saturates
    q8 = torch.empty(tokens, hidden, device=device, dtype=torch.float8_e4m3fn)
    # the fp8 producers must write exactly quantize_fp8 of their unfused kernel's output
    yield ("rms_norm_fp8", f"{tokens}x{hidden}", "rms_norm", lambda c: tp.rms_norm_fp8(x, w, 1e-5, scale, config=c),
           lambda: fused.rms_norm_fp8(x, w, 1e-5, scale), nbytes(x, w, q8),
           lambda: quantize_fp8(tp.rms_norm(x, w, 1e-5), scale))
    yield ("add_rms_norm_fp8", f"{tokens}x{hidden}", "rms_norm",
           lambda c: tp.add_rms_norm_fp8(x, r, w, 1e-5, scale, config=c),
           lambda: fused.add_rms_norm_fp8(x, r, w, 1e-5, scale), nbytes(x, r, w, x, q8),
           lambda: quantize_fp8(tp.add_rms_norm(x, r, w, 1e-5)[0], scale))
    yield ("silu_mul_fp8", f"{tokens}x{inter} (slices)", "silu_mul", lambda c: tp.silu_mul_fp8(gate, up, scale, config=c),
           lambda: fused.silu_mul_fp8(gate, up, scale), nbytes(gate_up) + tokens * inter,
           lambda: quantize_fp8(tp.silu_mul(gate, up), scale))
    batch = 4
    t_per = tokens // batch
    q = randn(batch, t_per, heads * head_dim).view(batch, t_per, heads, head_dim).transpose(1, 2)
    emb = randn(batch, 1, t_per, head_dim)
    cos, sin = emb.cos(), emb.sin()
    yield ("rope", f"{batch}x{heads}x{t_per}x{head_dim} (transposed)", "rope",
           lambda c: tp.rope(q, cos, sin, config=c), lambda: fused.rope(q, cos, sin), nbytes(q, cos, sin, q))
    yield from layernorm_cases(tokens, randn, scale, batch)
    yield from gemma_cases(tokens, randn)


def layernorm_cases(tokens: int, randn, scale, batch: int):
    """The LayerNorm families' kernels (``triton_ln``) at GPT-NeoX-6.9B's sizes (hidden 4096, MLP 16384, 32 heads
    of 128 with a rotary quarter), and GPT-2 XL's tanh GELU (MLP 6400)."""
    hidden, inter, heads, head_dim = 4096, 16384, 32, 128
    x, r = randn(tokens, hidden), randn(tokens, hidden)
    w, b = 1 + 0.1 * randn(hidden), 0.1 * randn(hidden)
    q8 = torch.empty(tokens, hidden, device=x.device, dtype=torch.float8_e4m3fn)
    yield ("layer_norm", f"{tokens}x{hidden}", "layer_norm", lambda c: tk.layer_norm(x, w, b, 1e-5, config=c),
           lambda: fused_ln.layer_norm(x, w, b, 1e-5), nbytes(x, w, b, x))
    yield ("add_layer_norm", f"{tokens}x{hidden}", "layer_norm",
           lambda c: tk.add_layer_norm(x, r, w, b, 1e-5, config=c), lambda: fused_ln.add_layer_norm(x, r, w, b, 1e-5),
           nbytes(x, r, w, b, x, x))
    yield ("layer_norm_fp8", f"{tokens}x{hidden}", "layer_norm",
           lambda c: tk.layer_norm_fp8(x, w, b, 1e-5, scale, config=c),
           lambda: fused_ln.layer_norm_fp8(x, w, b, 1e-5, scale), nbytes(x, w, b, q8),
           lambda: quantize_fp8(tk.layer_norm(x, w, b, 1e-5), scale))
    h = randn(tokens, inter)
    yield ("gelu", f"{tokens}x{inter}", "gelu", lambda c: tk.gelu(h, "none", config=c),
           lambda: fused_ln.gelu(h, "none"), nbytes(h, h))
    h2 = randn(tokens, 6400)
    yield ("gelu (tanh)", f"{tokens}x6400", "gelu", lambda c: tk.gelu(h2, "tanh", config=c),
           lambda: fused_ln.gelu(h2, "tanh"), nbytes(h2, h2))
    t_per = tokens // batch
    qkv = randn(batch, t_per, heads, 3 * head_dim).transpose(1, 2)
    q = qkv[..., :head_dim]  # NeoX's q: a chunk of the per-head interleaved qkv
    emb = randn(batch, 1, t_per, head_dim // 8)
    cos, sin = torch.cat([emb.cos()] * 2, -1), torch.cat([emb.sin()] * 2, -1)
    yield ("partial_rope", f"{batch}x{heads}x{t_per}x{head_dim} rot {head_dim // 4}", "partial_rope",
           lambda c: tk.partial_rope(q, cos, sin, config=c), lambda: fused_ln.partial_rope(q, cos, sin),
           nbytes(q, cos, sin, q))


def gemma_cases(tokens: int, randn):
    """Gemma's kernels (``triton_gemma``) at Gemma-2-9B's sizes: GeGLU, the post-norm + residual add + next norm
    (fp32 1 + w weights), the final logits' cap."""
    hidden, inter, vocab = 3584, 14336, 256000
    x, r = randn(tokens, hidden), randn(tokens, hidden)
    w1, w2 = (0.1 * randn(hidden)).float() + 1, (0.1 * randn(hidden)).float() + 1
    yield ("norm_add_rms_norm", f"{tokens}x{hidden} (fp32 w)", "norm_add_rms_norm",
           lambda c: tg.norm_add_rms_norm(x, r, w1, w2, 1e-6, config=c),
           lambda: fused.norm_add_rms_norm(x, r, w1, w2, 1e-6), nbytes(x, r, w1, w2, x, x))
    gate_up = randn(tokens, 2 * inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    yield ("gelu_mul", f"{tokens}x{inter} (slices)", "gelu_mul", lambda c: tg.gelu_mul(gate, up, config=c),
           lambda: fused.gelu_mul(gate, up), nbytes(gate_up, gate))
    logits = randn(max(tokens // 64, 1), vocab).float() * 20
    yield ("softcap", f"{logits.shape[0]}x{vocab} (fp32)", "softcap", lambda c: tg.softcap(logits, 30.0, config=c),
           lambda: fused.softcap(logits, 30.0), nbytes(logits, logits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device, dtype = "cuda", getattr(torch, args.dtype)
    ceiling = copy_gbps(device)
    rows = []
    for name, shape, space, kernel, eager, moved, *unfused in cases(args.tokens, device, dtype):
        out, ref = kernel(None), eager()
        outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outs, refs))
        # an fp8 producer's bytes are exactly its unfused kernel's output quantized (the interpreter on the CPU
        # cannot check this); the reference's norm itself differs from the kernel's by rounding (rel err above)
        exact = None
        if unfused:
            q = outs[0]
            u = unfused[0]()
            exact = torch.equal(q.view(torch.uint8), u.view(torch.uint8))
            if not exact:  # how many bytes, and how far apart (in fp8 steps: adjacent codes differ by 1)
                differ = q.view(torch.uint8) != u.view(torch.uint8)
                steps = (q.view(torch.uint8).int() - u.view(torch.uint8).int()).abs()[differ].max().item()
                exact = f"{differ.float().mean().item():.1e} off, <= {steps} step"
        eager_t = time_fn(eager, repeats=args.repeats, device=device, graph_calls=5)
        configs = [(c, time_fn(lambda c=c: kernel(c), repeats=args.repeats, device=device, graph_calls=5))
                   for c in {**tp.CONFIGS, **tk.CONFIGS, **tg.CONFIGS}[space]]
        best_cfg, best = min(configs, key=lambda ct: ct[1].median_ms)
        default = configs[0][1]
        gbps = moved / (best.median_ms * 1e-3) / 1e9
        rows.append({"op": name, "shape": shape, "bytes": moved, "rel_err": err, "fp8_bit_exact": exact, "eager_ms": eager_t.median_ms,
                     "default_ms": default.median_ms, "best_ms": best.median_ms, "best_config": best_cfg,
                     "gbps": gbps, "of_copy": gbps / ceiling, "vs_eager": eager_t.median_ms / best.median_ms,
                     "all_configs": [(c, t.median_ms) for c, t in configs]})
    gpu = torch.cuda.get_device_name()
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "copy_gbps": ceiling,
                                        "rows": rows}, indent=1, default=str))
    print(f"\n{gpu}, torch {torch.__version__}, {args.dtype}; copy ceiling measured here: {ceiling:.0f} GB/s")
    print(f"{'op':<17} {'shape':<30} {'eager ms':>9} {'triton ms':>10} {'GB/s':>7} {'of copy':>8} "
          f"{'vs eager':>9} {'rel err':>8} {'fp8 exact':>9}  best config")
    for r in rows:
        print(f"{r['op']:<17} {r['shape']:<30} {r['eager_ms']:>9.3f} {r['best_ms']:>10.3f} {r['gbps']:>7.0f} "
              f"{r['of_copy']:>8.1%} {r['vs_eager']:>8.2f}x {r['rel_err']:>8.1e} {'-' if r['fp8_bit_exact'] is None else str(r['fp8_bit_exact']):>9}  "
              f"{r['best_config']}")


if __name__ == "__main__":
    main()
