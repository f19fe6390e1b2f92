"""Every Triton kernel at the shapes of the supported model families, on the GPU, against its reference op.

    python3 bench/kernel_shapes.py                          # the table; exit status 1 if any row fails
    python3 bench/kernel_shapes.py --sections attention,compile256 --only Gemma --jobs 1

The cases run in worker processes, ``--jobs`` at a time (default 8): most of the time is Triton compiling each
kernel variant (a head-dim-256 attention kernel takes seconds), which the workers do in parallel on the host's
CPUs; each worker's rows are printed in order.

The families (``FAMILIES``): head dims 64, 80, 96, 128, 256; query / KV heads 9/3, 14/2, 12/2, 28/4, 40/8, 24/8,
32/8, 8/1, 16/8 (groups 3, 7, 6, 7, 5, 3, 4, 8, 2) and MHA at 32/32 and 16/16; hidden 576 to 5120, intermediate 1536 to
24576, vocabularies 32k to 256k. Sections:

attention  ``workbench.paged_attention``'s Triton tactic on a mixed step (decodes beside a prompt and a chunked
           continuation, over 1-1000 cached tokens, pages of 16 stored head-major as the runtime stores them)
           in a bf16 and an FP8 cache, and a decode step at split-KV; at the odd shapes (``FULL``: head dims 80,
           96, 256, groups 3, 5, 7, MQA; every family with ``--full``) also RoPE inside either cache, the
           decodes in a launch of their own (``DECODE``), an FP8 cache byte by byte and its step's own keys read
           back from it, a decode config, and a prefill at a prompt config
pointwise  rms_norm, add_rms_norm, their fp8 variants, silu_mul (slices of a fused gate/up output), its fp8
           variant, rope (q and k heads) at each family's hidden, intermediate and head sizes, 7 and 512 rows; for
           Gemma 2 and 3 also gelu_mul and norm_add_rms_norm (fp32 1 + w weights) and its fp8 variant
gemm       each family's qkv (with a bias), o, gate/up and down linears (and the lm_head, bf16) at M = 1, 5, 33,
           512: the bf16 tile (the untuned default config), the GEMV at M = 1, split-K at M = 5; fp8, int8 and
           weight-only int8 (Triton) at M = 1, 5, 33 likewise; torch._scaled_mm at 5 and 512
sampling   greedy argmax and its log-probability over vocabularies 32000, 32001, 32064, 49152, 151936,
           256000 at 1, 7 and 512 rows
compile256 the attention configs with the largest tiles that ``prune`` offers at head dim 256 (Gemma-2B's 8 / 1:
           128 query rows x 256; 128-key tiles, 4 stages, register caps) and the defaults, compiled and run,
           prefill and decode, bf16 and FP8: register and shared-memory pressure (the tiles ``prune`` drops ask
           for more shared memory than an SM has)

Each row: section, family, op, shape, path (config), rel err = ||out - ref|| / ||ref||, max err =
max |out - ref| / max |ref|, the tolerance the rel err is held to, PASS / FAIL (or the error's first line).
The references run in PyTorch on the same inputs; bf16 tolerances cover one rounding of the output, FP8
ones a key rounded to a neighbouring e4m3 value. Only torch, triton and workbench are imported.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.graph.paged import new_kv_cache  # noqa: E402
from workbench.kernels import fused  # noqa: E402
from workbench.kernels import gemm as G  # noqa: E402
from workbench.kernels import triton_attention as ta  # noqa: E402
from workbench.kernels import triton_gemma as tg  # noqa: E402
from workbench.kernels import triton_pointwise as tp  # noqa: E402
from workbench.kernels.triton_sampling import greedy_logprobs  # noqa: E402

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


@dataclass(frozen=True)
class Family:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def shape(self) -> str:
        return f"{self.heads}/{self.kv_heads}x{self.head_dim}"


FAMILIES = [
    Family("SmolLM2-135M", 9, 3, 64, 576, 1536, 49152),
    Family("Qwen2-0.5B", 14, 2, 64, 896, 4864, 151936),
    Family("Qwen2-1.5B", 12, 2, 128, 1536, 8960, 151936),
    Family("Qwen2-7B", 28, 4, 128, 3584, 18944, 152064),
    Family("Qwen2.5-14B", 40, 8, 128, 5120, 13824, 152064),
    Family("Llama-3.2-3B", 24, 8, 128, 3072, 8192, 128256),
    Family("Llama-3-8B", 32, 8, 128, 4096, 14336, 128256),
    Family("Phi-2", 32, 32, 80, 2560, 10240, 51200),
    Family("Phi-3-mini", 32, 32, 96, 3072, 8192, 32064),
    Family("Gemma-2B", 8, 1, 256, 2048, 16384, 256000),
    Family("Gemma-7B", 16, 16, 256, 3072, 24576, 256000),
    Family("Gemma-2-9B", 16, 8, 256, 3584, 14336, 256000),
    Family("Gemma-3-12B", 16, 8, 256, 3840, 15360, 262208),
]
VOCABS = [32000, 32001, 32064, 49152, 151936, 256000]


class Table:
    """The rows so far; each printed as it is added (a hang still shows how far it got)."""

    COLUMNS = ("section", "family", "op", "shape", "path", "rel err", "max err", "tol", "result")
    WIDTHS = (10, 13, 17, 22, 34, 9, 9, 6, 0)

    def __init__(self, header: bool = True) -> None:
        self.failed = 0
        self.rows = 0
        if header:
            print(self.header_line(), flush=True)

    @classmethod
    def header_line(cls) -> str:
        return cls._line(cls.COLUMNS)

    @classmethod
    def _line(cls, cells) -> str:
        return " ".join(str(c).ljust(w) for c, w in zip(cells, cls.WIDTHS)).rstrip()

    def check(self, section, family, op, shape, path, call, tol) -> None:
        """``call()`` -> (out, ref) or a list of them (compared jointly); exceptions are failures."""
        try:
            pairs = call()
            pairs = pairs if isinstance(pairs, list) else [pairs]
            rel = max(rel_err(o, r) for o, r in pairs)
            mx = max(max_err(o, r) for o, r in pairs)
            ok = rel < tol and all(torch.isfinite(o.float()).all() for o, _ in pairs)
            cells = (f"{rel:.2e}", f"{mx:.2e}", f"{tol:g}", "PASS" if ok else "FAIL")
        except Exception as e:  # noqa: BLE001 - a failure is a row of the table
            ok = False
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            cells = ("-", "-", f"{tol:g}", f"FAIL {type(e).__name__}: {msg[:120]}")
        self.failed += not ok
        self.rows += 1
        print(self._line((section, family, op, shape, path, *cells)), flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# --- attention ---------------------------------------------------------------------------------------------

def attention_step(fam: Family, new: list[int], context: list[int], page: int, kv_dtype, device, seed: int):
    """(q, k, v, cache, slots, tables, lens, qsl, scales): ``len(new)`` sequences, ``new[i]`` tokens after
    ``context[i]`` cached ones, in shuffled blocks of the runtime's head-major cache holding random values;
    an FP8 cache with per-layer scales (its new K/V off the e4m3 grid, a few saturated)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = [-(-(c + n) // page) for c, n in zip(context, new)]
    num_blocks = sum(pages) + 3
    cache = new_kv_cache(num_blocks, page, fam.kv_heads, fam.head_dim, kv_dtype, device)
    cache.copy_(torch.randn(cache.shape, device=device, generator=g).mul(4 if kv_dtype == FP8 else 1).to(kv_dtype))
    perm = torch.randperm(num_blocks, device=device, generator=g)
    tables = torch.zeros(len(new), max(pages), dtype=torch.int32, device=device)
    slots, used = [], 0
    for i, (c, n, p) in enumerate(zip(context, new, pages)):
        tables[i, :p] = perm[used:used + p].int()
        used += p
        pos = torch.arange(c, c + n, device=device)
        slots.append(tables[i, pos // page].long() * page + pos % page)
    tokens = sum(new)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=torch.float32).to(BF16)

    q = randn(1, tokens, fam.heads, fam.head_dim).transpose(1, 2)
    k, v = randn(1, fam.kv_heads, tokens, fam.head_dim), randn(1, fam.kv_heads, tokens, fam.head_dim)
    # an FP8 cache's per-layer scales: |k| beyond 2.5 and |v| beyond 3 saturate (about 1% and 0.3%); scores stay
    # of order one (a peaked softmax would turn a key rounded one e4m3 step apart into a different output)
    scales = (2.5 / 448, 3.0 / 448) if kv_dtype == FP8 else (None, None)
    lens = torch.tensor([c + n for c, n in zip(context, new)], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cache, torch.cat(slots), tables, lens, qsl, scales


def rope_tables(lens, qsl, head_dim, device, base=10000.0):
    """cos/sin [1, 1, tokens, head_dim] at each new token's position."""
    pos = torch.cat([torch.arange(int(n) - int(e - s), int(n)) for n, s, e in
                     zip(lens.tolist(), qsl[:-1].tolist(), qsl[1:].tolist())]).to(device)
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = pos.float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(BF16)[None, None], ang.sin().to(BF16)[None, None]


def attention_case(fam, new, context, kv_dtype, config, rope, device, seed=0, page=16):
    """A call for ``Table.check``: the kernel against the reference on the same step, outputs and caches."""

    def call():
        q, k, v, cache, slots, tables, lens, qsl, scales = attention_step(fam, new, context, page, kv_dtype,
                                                                          device, seed)
        rot = dict(zip(("cos", "sin"), rope_tables(lens, qsl, fam.head_dim, device))) if rope else {}
        ref_cache, tri_cache = cache.clone(), cache.clone()
        ref = fused.paged_attention(q, k, v, ref_cache, slots, tables.long(), lens, qsl, None, None, *scales, **rot)
        out = ta.paged_attention(q, k, v, tri_cache, slots, tables, lens, qsl, None, None, *scales, config=config,
                                 **rot)
        # the new K/V as stored: the reference's values (RoPE inside: a key may round one step apart)
        blk, off = slots // page, slots % page
        return [(out, ref), (tri_cache[:, blk, off].float(), ref_cache[:, blk, off].float())]

    return call


def short(config: dict) -> str:
    """A config in a table cell: Q16 N64 w4 s2 (split, reg, DECODE, bytes, own keys from the cache where set)."""
    keys = {"BLOCK_Q": "Q", "BLOCK_N": "N", "num_warps": "w", "num_stages": "s", "SPLITS": "split", "maxnreg": "reg"}
    text = " ".join(f"{keys[k]}{v}" for k, v in config.items() if k in keys and not (k == "SPLITS" and v == 1))
    extras = [" +DECODE" if "DECODE" in config else "", " bytes" if config.get("PAIRS") is False else "",
              " own-from-cache" if config.get("NEW_FROM_CACHE") else ""]
    return text + "".join(extras)


#: The families whose shapes are the odd ones (head dims 80, 96, 256; groups 3, 5, 7, MQA): every path runs there;
#: elsewhere the default config in both caches and a split-KV decode (each path compiles its own kernel variant)
FULL = {"SmolLM2-135M", "Qwen2-0.5B", "Qwen2.5-14B", "Phi-2", "Phi-3-mini", "Gemma-2B"}


def run_attention(table: Table, fam: Family, device, full: bool) -> None:
    small = {"BLOCK_Q": 4, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "SPLITS": 1}
    steps = {"mixed": ([1, 37, 5, 1, 1], [300, 0, 77, 1023, 2], 16, "mixed 45 tok"),  # decodes, a prompt, a chunk
             "decode": ([1] * 6, [1500, 17, 640, 1, 64, 999], 16, "decode 6"),
             "prefill": ([300, 129], [0, 64], 64, "prefill 300+129")}
    # (step, cache, config, RoPE inside)
    cases = [("mixed", BF16, ta.CONFIGS[0], False), ("mixed", FP8, ta.CONFIGS[0], True),
             ("decode", FP8, ta.CONFIGS[-4], True)]
    if full or fam.name in FULL:
        cases += [("mixed", BF16, ta.CONFIGS[0], True), ("mixed", FP8, ta.CONFIGS[0], False),
                  ("mixed", BF16, {**ta.CONFIGS[8], "DECODE": ta.DECODE_CONFIG}, False),
                  ("mixed", FP8, {**ta.CONFIGS[8], "DECODE": ta.DECODE_CONFIG}, True),
                  ("mixed", FP8, {**ta.CONFIGS[0], "PAIRS": False}, True),
                  ("mixed", FP8, {**small, "NEW_FROM_CACHE": True}, False),
                  ("decode", BF16, ta.CONFIGS[1], False), ("decode", BF16, ta.CONFIGS[-4], True),
                  ("decode", FP8, ta.CONFIGS[1], False), ("prefill", BF16, ta.CONFIGS[8], True)]
    for step, kv_dtype, config, rope in cases:
        new, ctx, page, label = steps[step]
        table.check("attention", fam.name, f"paged_attn {'bf16' if kv_dtype == BF16 else 'fp8'}",
                    f"{fam.shape} {label}", short(config) + (" rope" if rope else ""),
                    attention_case(fam, new, ctx, kv_dtype, config, rope, device, seed=len(step), page=page),
                    1e-2 if kv_dtype == BF16 else 2e-2)


#: compile256's configs: the defaults and the largest of those ``ta.prune`` offers at Gemma-2B's shape (group 8,
#: head dim 256: query tiles up to ``ta.MAX_QUERY_TILE``, 128 rows), 128-key tiles, 4 stages, register caps, split-KV
LARGEST = [c for c in ta.CONFIGS + [ta.DECODE_CONFIG]
           if ta.query_rows(c["BLOCK_Q"], 8)[0] * 256 <= ta.MAX_QUERY_TILE
           and (c is ta.CONFIGS[0] or c is ta.DECODE_CONFIG or c["BLOCK_Q"] >= 16 or c["BLOCK_N"] == 128
                or c["num_stages"] >= 4 or "maxnreg" in c or c.get("SPLITS", 1) == 4)]


def run_compile256(table: Table, config: dict, device) -> None:
    """One attention config at head dim 256 (Gemma-2B: group 8, 8 query rows per token), in both caches."""
    fam = next(f for f in FAMILIES if f.name == "Gemma-2B")
    decode = config["BLOCK_Q"] < 16
    new, ctx = ([1] * 4, [700, 64, 1, 333]) if decode else ([200, 57], [0, 130])
    for kv_dtype, kv in ((BF16, "bf16"), (FP8, "fp8")):
        table.check("compile256", fam.name, f"paged_attn {kv}", f"{fam.shape} {'decode' if decode else 'prefill'}",
                    short(config), attention_case(fam, new, ctx, kv_dtype, config, False, device, seed=3, page=64),
                    1e-2 if kv_dtype == BF16 else 2e-2)


# --- pointwise ---------------------------------------------------------------------------------------------

def run_pointwise(table: Table, fam: Family, device) -> None:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(BF16)

    def fp8_pair(out, ref):  # bytes compared as values: the GPU rounds as torch does
        return out.float(), ref.float()

    for rows in (7, 512):
        x, r = randn(rows, fam.hidden, scale=3), randn(rows, fam.hidden)
        w = 1 + 0.1 * randn(fam.hidden)
        scale = torch.tensor(4.0 / 448, device=device)
        h = f"{rows}x{fam.hidden}"
        table.check("pointwise", fam.name, "rms_norm", h, "default",
                    lambda: (tp.rms_norm(x, w, 1e-6), fused.rms_norm(x, w, 1e-6)), 1e-2)
        table.check("pointwise", fam.name, "add_rms_norm", h, "default",
                    lambda: list(zip(tp.add_rms_norm(x, r, w, 1e-6), fused.add_rms_norm(x, r, w, 1e-6))), 1e-2)
        table.check("pointwise", fam.name, "rms_norm_fp8", h, "ROWS 8",
                    lambda: fp8_pair(tp.rms_norm_fp8(x, w, 1e-6, scale, config=tp.CONFIGS["rms_norm"][4]),
                                     fused.rms_norm_fp8(x, w, 1e-6, scale)), 1e-2)
        table.check("pointwise", fam.name, "add_rms_norm_fp8", h, "default",
                    lambda: fp8_pair(tp.add_rms_norm_fp8(x, r, w, 1e-6, scale)[0],
                                     fused.add_rms_norm_fp8(x, r, w, 1e-6, scale)[0]), 1e-2)
        gate_up = randn(rows, 2 * fam.intermediate, scale=2)
        gate, up = gate_up[:, :fam.intermediate], gate_up[:, fam.intermediate:]
        i = f"{rows}x{fam.intermediate} slices"
        table.check("pointwise", fam.name, "silu_mul", i, "default",
                    lambda: (tp.silu_mul(gate, up), fused.silu_mul(gate, up)), 1e-2)
        table.check("pointwise", fam.name, "silu_mul_fp8", i, "default",
                    lambda: fp8_pair(tp.silu_mul_fp8(gate, up, scale), fused.silu_mul_fp8(gate, up, scale)), 1e-2)
        if fam.name.startswith(("Gemma-2-", "Gemma-3-")):  # GeGLU; the post-norm + add + norm, fp32 1 + w weights
            w1, w2 = 1 + 0.1 * randn(fam.hidden).float(), 1 + 0.1 * randn(fam.hidden).float()
            table.check("pointwise", fam.name, "gelu_mul", i, "default",
                        lambda: (tg.gelu_mul(gate, up), fused.gelu_mul(gate, up)), 1e-2)
            table.check("pointwise", fam.name, "norm_add_rms_norm", h + " fp32 w", "default",
                        lambda: list(zip(tg.norm_add_rms_norm(x, r, w1, w2, 1e-6),
                                         fused.norm_add_rms_norm(x, r, w1, w2, 1e-6))), 1e-2)
            table.check("pointwise", fam.name, "norm_add_rms_norm_fp8", h + " fp32 w", "default",
                        lambda: fp8_pair(tg.norm_add_rms_norm_fp8(x, r, w1, w2, 1e-6, scale)[0],
                                         fused.norm_add_rms_norm_fp8(x, r, w1, w2, 1e-6, scale)[0]), 1e-2)
        qkv = randn(1, rows, (fam.heads + 2 * fam.kv_heads) * fam.head_dim)
        q = qkv[..., :fam.heads * fam.head_dim].view(1, rows, fam.heads, fam.head_dim).transpose(1, 2)
        k = qkv[..., fam.heads * fam.head_dim:(fam.heads + fam.kv_heads) * fam.head_dim].view(
            1, rows, fam.kv_heads, fam.head_dim).transpose(1, 2)
        lens, qsl = torch.tensor([rows]), torch.tensor([0, rows])
        cos, sin = rope_tables(lens, qsl, fam.head_dim, device)
        for name, t in (("q", q), ("k", k)):
            table.check("pointwise", fam.name, f"rope {name}", f"{rows}x{t.shape[1]}x{fam.head_dim}", "default",
                        lambda t=t: (tp.rope(t, cos, sin), fused.rope(t, cos, sin)), 1e-2)


# --- gemm --------------------------------------------------------------------------------------------------

def run_gemm(table: Table, fam: Family, device) -> None:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=BF16, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    gemv16, gemv8 = G.GEMV_CONFIGS["16bit"][0], G.GEMV_CONFIGS["8bit"][0]
    split16, split8 = G.CONFIGS["16bit"][-1], G.CONFIGS["8bit"][-1]
    q_out = (fam.heads + 2 * fam.kv_heads) * fam.head_dim
    linears = [("qkv", q_out, fam.hidden), ("o", fam.hidden, fam.heads * fam.head_dim),
               ("gate_up", 2 * fam.intermediate, fam.hidden), ("down", fam.hidden, fam.intermediate)]
    for name, n, k in linears:
        w = randn(n, k, scale=k ** -0.5)
        w8s = G.fp8_scale(w.float(), dim=1).reshape(-1)
        w8 = G.quantize_fp8(w.float(), w8s.reshape(-1, 1))
        wis = G.int8_scale(w.float(), dim=1).reshape(-1)
        wi = G.quantize_int8(w.float(), wis.reshape(-1, 1))
        bias = randn(n) if name == "qkv" else None  # Qwen2's qkv bias
        for m in (1, 5, 33, 512):
            x = randn(m, k)
            shape = f"{m}x{k} @ {k}x{n}"
            # the untuned default tile everywhere; the GEMV at M = 1, split-K at M = 5 (the tuned decode paths)
            configs = {1: [("default", None, None), ("GEMV", gemv16, gemv8)],
                       5: [("split-K 4", split16, split8)]}.get(m, [("default", None, None)])
            for label, c16, c8 in configs:
                table.check("gemm", fam.name, f"linear {name}", shape, label,
                            lambda c16=c16: (G.linear(x, w, bias, config=c16),
                                             torch.nn.functional.linear(x.float(), w.float(),
                                                                        None if bias is None else bias.float())),
                            1e-2)
                if m == 512:
                    continue  # the quantized tiles at 33 rows already run several row tiles
                table.check("gemm", fam.name, f"fp8 {name}", shape, f"triton {label}",
                            lambda c8=c8: (G.fp8_linear_triton(x, w8, w8s, None, bias, config=c8),
                                           G.fp8_linear(x, w8, w8s, None, bias)), 2e-2)
                table.check("gemm", fam.name, f"int8 {name}", shape, f"triton {label}",
                            lambda c8=c8: (G.int8_linear_triton(x, wi, wis, None, bias, config=c8),
                                           G.int8_linear(x, wi, wis, None, bias)), 1e-2)
                table.check("gemm", fam.name, f"w8 {name}", shape, f"triton {label}",
                            lambda c16=c16: (G.w8_linear_triton(x, wi, wis, bias, config=c16),
                                             G.w8_linear(x, wi, wis, bias)), 1e-2)
            if m in (5, 512):
                table.check("gemm", fam.name, f"fp8 {name}", shape, "scaled_mm",
                            lambda: (G.fp8_linear_scaled_mm(x, w8, w8s, None, bias),
                                     G.fp8_linear(x, w8, w8s, None, bias)), 2e-2)
    w = randn(fam.vocab, fam.hidden, scale=fam.hidden ** -0.5)  # the lm_head (tied: the embedding)
    for m in (1, 5):
        x = randn(m, fam.hidden)
        for label, c in [("default", None)] + ([("GEMV", gemv16)] if m == 1 else []):
            table.check("gemm", fam.name, "linear lm_head", f"{m}x{fam.hidden} @ {fam.hidden}x{fam.vocab}",
                        label, lambda c=c: (G.linear(x, w, config=c), x.float() @ w.float().t()), 1e-2)


# --- sampling ----------------------------------------------------------------------------------------------

def run_sampling(table: Table, vocab: int, device) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    for rows in (1, 7, 512):
        logits = (torch.randn(rows, vocab, device=device, generator=g) * 3).to(BF16)

        def call(logits=logits):
            tokens, logprobs = greedy_logprobs(logits)
            lf = logits.float()
            want = lf.argmax(-1)
            if not torch.equal(tokens, want):
                raise AssertionError(f"{int((tokens != want).sum())} rows took another token")
            # as probabilities: their relative error is the log-probability's absolute error
            return logprobs.exp(), lf.log_softmax(-1).gather(1, want[:, None])[:, 0].exp()

        table.check("sampling", "-", "greedy_logprobs", f"{rows}x{vocab}", "default", call, 1e-4)


def tasks(args, device) -> list[tuple[str, Callable[[Table], None]]]:
    """The run's units of work, in table order: (label, fn(table)) per section and family (per config in
    compile256, per vocabulary in sampling). ``--jobs`` runs them in worker processes (``--task i``)."""
    families = [f for f in FAMILIES if re.search(args.only, f.name)]
    units = {"attention": [(f.name, functools.partial(run_attention, fam=f, device=device, full=args.full))
                           for f in families],
             "compile256": [(short(c), functools.partial(run_compile256, config=c, device=device))
                            for c in LARGEST],
             "pointwise": [(f.name, functools.partial(run_pointwise, fam=f, device=device)) for f in families],
             "gemm": [(f.name, functools.partial(run_gemm, fam=f, device=device)) for f in families],
             "sampling": [(str(v), functools.partial(run_sampling, vocab=v, device=device)) for v in VOCABS]}
    return [(f"{section} {label}", fn) for section in args.sections.split(",") for label, fn in units[section]]


def run_workers(args, n_tasks: int) -> tuple[int, int]:
    """Every task in a worker process of its own, ``args.jobs`` at a time (Triton compiles each kernel variant on
    the host's CPU: in parallel the table takes a fraction of the time); their rows printed in task order.
    Returns (rows, failed)."""
    base = [sys.executable, __file__, "--worker", "--sections", args.sections, "--only", args.only] + \
        (["--full"] if args.full else [])

    def work(i: int) -> str:
        done = subprocess.run(base + ["--task", str(i)], capture_output=True, text=True)
        return done.stdout + (f"# task {i} exited {done.returncode}: {done.stderr.strip()[-300:]}\n"
                              if done.returncode not in (0, 1) else "")

    rows = failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for out in pool.map(work, range(n_tasks)):  # in order, as each is done
            for line in out.splitlines():
                summary = re.match(r"# (\d+) rows, (\d+) failed", line)
                if summary:
                    rows, failed = rows + int(summary[1]), failed + int(summary[2])
                elif line.startswith("# task"):
                    failed += 1
                    print(line, flush=True)
                else:
                    print(line, flush=True)
    return rows, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="attention,compile256,pointwise,gemm,sampling")
    ap.add_argument("--only", default="", help="regex: only the families whose name matches")
    ap.add_argument("--full", action="store_true", help="attention: every path at every family (about 4x the "
                    "kernel variants to compile)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes (default: up to 8); 1 runs everything in this process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET"):  # a smoke test of this script (use --only and small sections)
        device = "cpu"
    else:
        sys.exit("bench/kernel_shapes.py runs the kernels on a GPU (tests/test_kernel_shapes.py runs them under "
                 "the interpreter)")
    work = tasks(args, device)
    if args.worker:  # one task's rows, no header, and its count
        table = Table(header=False)
        work[args.task][1](table)
        print(f"# {table.rows} rows, {table.failed} failed", flush=True)
        sys.exit(1 if table.failed else 0)
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, triton "
          f"{triton.__version__}; {len(work)} tasks, {args.jobs} at a time", flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        print(Table.header_line(), flush=True)
        rows, failed = run_workers(args, len(work))
    else:
        table = Table()
        for _, fn in work:
            fn(table)
        rows, failed = table.rows, table.failed
    print(f"# {rows} rows, {failed} failed, in {time.perf_counter() - t0:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
