"""Triton paged attention vs torch SDPA on the same data, and vs the copy-bandwidth ceiling.

    python bench/attention.py [--sections vs_sdpa,rope,pairs,own,split]

decode   batch 64, 4096 tokens of context each, one new token, 32 query / 8 KV heads, head dim 128:
         the paged kernel reads K/V through block tables; the baseline is SDPA (GQA) over the same
         K/V laid out dense; "of copy" counts the K/V bytes read over the copy ceiling measured here.
prefill  4 sequences × 4096 new tokens, causal, same heads: the paged kernel (writing the cache too)
         vs SDPA's flash backend on dense [4, heads, 4096, 128]; TFLOP/s counts the causal half.
decode fp8  the batch-64 decode over an e4m3 KV cache (scales per layer): half the bytes to read;
         the baseline is SDPA over the same values dequantized to bf16.
SDPA is timed with each backend that takes the inputs (flash, cuDNN, memory-efficient): "vs SDPA" is
against flash, as the issue's goals state, and "vs fastest" against the fastest of them.
Every config of the kernel's tuning space is timed; outputs are checked against SDPA first, and
the FP8 cache writes against torch's own e4m3 rounding (bit-exact, on the GPU).
rope     RoPE inside the kernel (q rotated as it is loaded, k as it is stored: the graph's
         ``fuse_rope_into_attention``) against the two rope kernels then the kernel, same inputs.
pairs    over an FP8 cache: the cache read as int16 pairs (the kernel's default) against byte by byte
         (``"PAIRS": False``), same inputs, each at its best config.
own      over an FP8 cache, steps with prompt tokens: the step's own keys read contiguous, as ``write_kv``
         leaves them beside the cache in fp16 (the default) against read back from the cache through the block
         table (``"NEW_FROM_CACHE": True``), each at its best config; a prefill, a chunked continuation
         and a mixed step (decodes beside prompt chunks); prompt configs (BLOCK_Q >= 16) in one launch.
split    over an FP8 cache, a mixed step (decodes beside prompt chunks): one launch at a prompt config
         against the decodes in a launch of their own (``"DECODE"``), each at its best prompt config.
prompt   over an FP8 cache with RoPE inside, pages of ``--prompt-page`` stored head-major (the runtime's steps
         with prompt tokens): every config of ``--prompt-configs`` (default: the tuning space's prompt configs,
         without their PAIRS False variants, and PROMPT_EXTRA) at every step of ``--prompt-steps``, a mixed
         step's decodes at ``DECODE_CONFIG``; TFLOP/s counts the causal half of
         the prompts; steps of equal prompts after no context are also timed with SDPA flash and cuDNN on
         dense bf16 q/k/v of the same shapes (no cache to write, no RoPE): "vs flash" is their ratio.
decode   over an FP8 cache with RoPE inside (the runtime's decode steps): every config of ``--decode-configs``
         at every KV page size of ``--pages`` and step of ``--decode-steps``, each against the copy ceiling
         (the K/V bytes the step reads over the time), outputs compared with the reference op's (PyTorch).
The paged kernel's time includes scattering the step's K/V into the cache; SDPA writes nothing.
Both are timed as CUDA-graph replays of 10 calls (kernel time, no host launch overhead; what the
autotuner and a graph-replaying runtime see).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.graph.paged import new_kv_cache  # noqa: E402
from workbench.kernels import triton_attention as ta  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402

#: SDPA backends timed per case (those that refuse the inputs are skipped); "vs SDPA" is against flash
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}



def rel_err(out, ref):
    """|out - ref| / |ref| over all elements, in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def sdpa_times(sdpa, labels, args, device):
    """ms of ``sdpa(backend)`` for each SDPA backend of ``labels`` that takes the inputs (the others are left out),
    timed as CUDA-graph replays."""
    times = {}
    for label in labels:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sdpa(BACKENDS[label])
        except RuntimeError:
            continue
        times[label] = time_fn(lambda b=BACKENDS[label]: sdpa(b), repeats=args.repeats, device=device,
                               graph_calls=10).median_ms
    return times


def paged_inputs(seqs, context, new, heads, kv_heads, head_dim, page, device, dtype, kv_dtype=None):
    """A cache holding ``context`` tokens per sequence in shuffled blocks, plus ``new`` tokens to add."""
    return step_inputs([new] * seqs, [context] * seqs, device, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       page=page, dtype=dtype, kv_dtype=kv_dtype or dtype)


def step_inputs(new, context, device, *, heads=32, kv_heads=8, head_dim=128, page=16, dtype=torch.bfloat16,
                kv_dtype=torch.float8_e4m3fn, layout="nhd"):
    """A step of ``len(new)`` sequences with ``new[i]`` tokens after ``context[i]`` cached ones (a cache of random
    values, in shuffled blocks). ``layout`` "hnd" stores each block head-major ([kv_heads, page, head_dim]: a
    head's keys of one block contiguous) behind the same [2, blocks, page, kv_heads, head_dim] view."""
    per_seq = [-(-(c + n) // page) for c, n in zip(context, new)]
    cache = torch.randn(2, sum(per_seq), page, kv_heads, head_dim, device=device, dtype=dtype).to(kv_dtype)
    if layout == "hnd":  # the runtime's cache (``new_kv_cache``), holding the same values
        cache = new_kv_cache(sum(per_seq), page, kv_heads, head_dim, kv_dtype, device).copy_(cache)
    perm = torch.randperm(sum(per_seq), device=device)
    tables = torch.zeros(len(new), max(per_seq), dtype=torch.long, device=device)
    slots, used = [], 0
    for i, (c, n, p) in enumerate(zip(context, new, per_seq)):
        tables[i, :p] = perm[used:used + p]
        used += p
        pos = torch.arange(c, c + n, device=device)
        slots.append(tables[i, pos // page] * page + pos % page)
    tokens = sum(new)
    q = torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([c + n for c, n in zip(context, new)], device=device)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], device=device)
    return q, k, v, cache, torch.cat(slots), tables, lens, qsl


def dense_kv(cache, tables, seqs, total):
    """The cache's K and V as dense [seqs, kv_heads, total, head_dim] (the SDPA baseline's layout)."""
    kv = cache[:, tables].reshape(2, seqs, -1, *cache.shape[3:])[:, :, :total]
    return kv[0].transpose(1, 2).contiguous(), kv[1].transpose(1, 2).contiguous()


def run(name, seqs, context, new, args, device, ceiling, kv_dtype=torch.bfloat16):
    heads, kv_heads, head_dim, page = 32, 8, 128, 16
    q, k, v, cache, slots, tables, lens, qsl = paged_inputs(seqs, context, new, heads, kv_heads, head_dim, page,
                                                            device, torch.bfloat16, kv_dtype)
    total = context + new
    out = ta.paged_attention(q, k, v, cache, slots, tables, lens, qsl)  # also writes the new K/V
    kd, vd = dense_kv(cache.to(torch.bfloat16), tables, seqs, total)
    qd = q[0].transpose(0, 1).reshape(seqs, new, heads, head_dim).transpose(1, 2).contiguous()
    mask = None
    if new > 1:  # causal over the new tokens, all of the context visible
        mask = torch.arange(total, device=device)[None, :] <= context + torch.arange(new, device=device)[:, None]

    def sdpa(backend=None):
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            if new > 1 and context == 0:
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)

    ref = sdpa()
    ours = out[0].transpose(0, 1).reshape(seqs, new, heads, head_dim).transpose(1, 2)
    err = rel_err(ours, ref)
    backends = sdpa_times(sdpa, BACKENDS, args, device)  # each that takes these inputs; the goal's baseline is flash
    base_label = "flash" if "flash" in backends else min(backends, key=backends.get)
    timed = [(c, time_fn(lambda c=c: ta.paged_attention(q, k, v, cache, slots, tables, lens, qsl, config=c),
                         repeats=args.repeats, device=device, graph_calls=10))
             for c in ta.prune(ta.CONFIGS, (q, k, v, cache, slots, tables, lens, qsl), {})]
    best_cfg, best = min(timed, key=lambda ct: ct[1].median_ms)
    kv_bytes = 2 * seqs * total * kv_heads * head_dim * cache.element_size()
    causal = 0.5 if context == 0 and new > 1 else 1.0
    flops = 4 * seqs * heads * new * total * head_dim * causal
    return {"case": name, "kv": str(kv_dtype).removeprefix("torch."), "seqs": seqs, "context": context, "new": new, "rel_err": err,
            "sdpa_backend": base_label, "sdpa_ms": backends[base_label], "sdpa_all_ms": backends,
            "fastest_sdpa": min(backends, key=backends.get), "triton_ms": best.median_ms,
            "default_ms": timed[0][1].median_ms, "best_config": best_cfg,
            "vs_sdpa": backends[base_label] / best.median_ms, "vs_fastest_sdpa": min(backends.values()) / best.median_ms,
            "kv_gbps": kv_bytes / (best.median_ms * 1e-3) / 1e9, "of_copy": kv_bytes / (best.median_ms * 1e-3) / 1e9 / ceiling,
            "tflops": flops / (best.median_ms * 1e-3) / 1e12, "sdpa_tflops": flops / (backends[base_label] * 1e-3) / 1e12,
            "all": [(c, t.median_ms) for c, t in timed]}


def fastest(fn, configs, args, device):
    """(ms, config) of the fastest of ``fn(config)`` over ``configs``, each timed as CUDA-graph replays."""
    timed = [(time_fn(lambda c=c: fn(c), repeats=args.repeats, device=device, graph_calls=10).median_ms, c)
             for c in configs]
    return min(timed, key=lambda t: t[0])


def variants(call, configs, args, device):
    """Two variants of a kernel, ``call(config, True)`` and ``call(config, False)``: the relative difference of
    the first from the second (at the first config), and (ms, config) of the fastest config of each."""
    a, b = call(configs[0], True), call(configs[0], False)
    err = rel_err(a, b)
    return (err, *(fastest(lambda c, f=f: call(c, f), configs, args, device) for f in (True, False)))


def run_rope(name, seqs, context, new, args, device, kv_dtype=torch.bfloat16):
    """RoPE inside the kernel (``cos``/``sin``: q rotated as it loads, k as it is stored) against the rope
    kernels then the kernel, on the same pre-RoPE q/k: outputs compared, each timed at its best config."""
    from workbench.kernels import triton_pointwise as tp

    heads, kv_heads, head_dim, page = 32, 8, 128, 16
    q, k, v, cache, slots, tables, lens, qsl = paged_inputs(seqs, context, new, heads, kv_heads, head_dim, page,
                                                            device, torch.bfloat16, kv_dtype)
    cos, sin = rope_tables((context + torch.arange(new, device=device)).repeat(seqs), head_dim, device)
    scales = (0.05, 0.02) if kv_dtype != torch.bfloat16 else (None, None)
    inputs = (q, k, v, cache, slots, tables, lens, qsl, None, None, *scales)
    configs = ta.prune(ta.CONFIGS, inputs[:8], {})
    def fused(config=None):
        return ta.paged_attention(*inputs, config=config, cos=cos, sin=sin)

    def unfused(config=None):
        return ta.paged_attention(tp.rope(q, cos, sin), tp.rope(k, cos, sin), *inputs[2:], config=config)

    fused_out, unfused_out = fused(), unfused()
    err = rel_err(fused_out, unfused_out)

    (fused_ms, _), (unfused_ms, _) = fastest(fused, configs, args, device), fastest(unfused, configs, args, device)
    return {"case": name, "kv": str(kv_dtype).removeprefix("torch."), "seqs": seqs, "context": context, "new": new,
            "rope_inside_ms": fused_ms, "rope_kernels_ms": unfused_ms, "speedup": unfused_ms / fused_ms, "rel_err": err}


def run_own(name, new, context, args, device):
    """Over an FP8 cache: the step's own keys read from write_kv's fp16 copies (default) against read back from
    the cache (``"NEW_FROM_CACHE"``); outputs compared, each at its best config."""
    inputs = (*step_inputs(new, context, device), None, None, 0.05, 0.02)
    configs = [c for c in ta.prune(ta.CONFIGS, inputs[:8], {}) if "DECODE" not in c and c["BLOCK_Q"] >= 16]

    def call(config, own):
        return ta.paged_attention(*inputs, config={**config, "NEW_FROM_CACHE": not own})

    err, (own_ms, own_cfg), (cache_ms, _) = variants(call, configs, args, device)
    flops = sum(4 * 32 * n * (c + (n + 1) / 2) * 128 for c, n in zip(context, new))  # causal over the new tokens
    print(f"{name}: own {own_ms:.3f} ms, from the cache {cache_ms:.3f} ms, rel err {err:.1e}", flush=True)
    return {"case": name, "own_ms": own_ms, "cache_ms": cache_ms, "speedup": cache_ms / own_ms,
            "own_tflops": flops / (own_ms * 1e-3) / 1e12, "cache_tflops": flops / (cache_ms * 1e-3) / 1e12,
            "rel_err": err, "own_config": own_cfg}


def run_split(name, new, context, args, device):
    """Over an FP8 cache, a mixed step: one launch at a prompt config against the step's decodes in a launch of
    their own (``"DECODE"``: ``ta.DECODE_CONFIG``); outputs compared, each at its best prompt config."""
    inputs = (*step_inputs(new, context, device), None, None, 0.05, 0.02)
    configs = [c for c in ta.prune(ta.CONFIGS, inputs[:8], {})
               if "DECODE" not in c and "PAIRS" not in c and c["BLOCK_Q"] >= 16]

    def call(config, split):
        return ta.paged_attention(*inputs, config={**config, "DECODE": ta.DECODE_CONFIG} if split else config)

    err, (split_ms, split_cfg), (one_ms, one_cfg) = variants(call, configs, args, device)
    print(f"{name}: split {split_ms:.3f} ms ({split_cfg}), one launch {one_ms:.3f} ms ({one_cfg}), "
          f"{one_ms / split_ms:.2f}x, rel err {err:.1e}", flush=True)
    return {"case": name, "split_ms": split_ms, "one_ms": one_ms, "speedup": one_ms / split_ms, "rel_err": err,
            "split_config": split_cfg, "one_config": one_cfg}


#: decode configs the ``decode`` section sweeps by default (BLOCK_Q 4: the GROUP 4 query heads of one KV head)
DECODE_SWEEP = [{"BLOCK_Q": 4, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                for n, w, s in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3), (64, 2, 2), (64, 2, 3),
                                (32, 1, 4), (32, 2, 3), (32, 2, 4), (32, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3))]


#: prompt configs the ``prompt`` section times beside the tuning space's: registers capped so that two
#: programs of 8 warps share an SM (the uncapped ones take 255 registers, the whole register file)
PROMPT_EXTRA = [{"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "maxnreg": 128},
    {"BLOCK_Q": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
    {"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": 128},
    {"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 168}]


def parse_step(text):
    """"8x1024x0+512x1x1500" (SEQSxNEWxCONTEXT groups) -> (new tokens per sequence, context per sequence)."""
    new, context = [], []
    for group in text.split("+"):
        seqs, n, c = map(int, group.split("x"))
        new, context = new + [n] * seqs, context + [c] * seqs
    return new, context


def reference_output(inputs, cos, sin):
    """The reference op's output (``workbench.kernels.fused.paged_attention``, PyTorch) for a step, in fp32,
    on a copy of the cache."""
    from workbench.kernels import fused

    return fused.paged_attention(*inputs[:3], inputs[3].clone(), *inputs[4:], cos=cos, sin=sin).float()


def against_reference(call, configs, ref, label, args, device):
    """(config, ms, relative difference from ``ref``) of ``call(config)`` for each config, timed as CUDA-graph
    replays; a config that cannot run here (resources) is printed, not fatal."""
    for config in configs:
        try:
            err = rel_err(call(config), ref)
            ms = time_fn(lambda c=config: call(c), repeats=args.repeats, device=device, graph_calls=10).median_ms
        except Exception as e:  # noqa: BLE001
            print(f"  {label} {json.dumps(config)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        yield config, ms, err


def run_prompt(step, page, configs, args, device):
    """A step with prompt tokens over an FP8 cache with RoPE inside at each config (decodes beside prompts in a
    launch of their own): ms, TFLOP/s, the relative difference from the reference op's output; for equal
    prompts after no context, SDPA flash and cuDNN on dense bf16 inputs of the same shapes."""
    torch.manual_seed(0)
    new, context = parse_step(step)
    inputs = (*step_inputs(new, context, device, page=page, layout="hnd"), None, None, 0.05, 0.02)
    heads, head_dim = inputs[0].shape[1], inputs[0].shape[3]
    positions = torch.cat([torch.arange(c, c + n, device=device) for n, c in zip(new, context)])
    cos, sin = rope_tables(positions, head_dim, device)
    mixed = 1 in new and max(new) > 1
    flops = sum(4 * heads * n * (c + (n + 1) / 2) * head_dim for n, c in zip(new, context))

    def call(config):
        return ta.paged_attention(*inputs, config={**config, "DECODE": ta.DECODE_CONFIG} if mixed else config,
                                  cos=cos, sin=sin)

    row = {"step": step, "page": page, "tflop": flops / 1e12, "sdpa_ms": {}, "configs": []}
    if len(set(new)) == 1 and not any(context):  # the SDPA baseline: equal prompts, causal, nothing cached
        qd, kd, vd = (torch.randn(len(new), h, new[0], head_dim, device=device, dtype=torch.bfloat16)
                      for h in (heads, inputs[1].shape[1], inputs[1].shape[1]))

        def sdpa(backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

        row["sdpa_ms"] = sdpa_times(sdpa, ("flash", "cudnn"), args, device)
    for config, ms, err in against_reference(call, configs, reference_output(inputs, cos, sin), step, args, device):
        print(f"  {step} {json.dumps(config)}: {ms:.4f} ms, {flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s, "
              f"rel err {err:.1e}", flush=True)
        row["configs"].append({"config": config, "ms": ms, "rel_err": err})
    return row


def rope_tables(positions, head_dim, device):
    """Llama-3's cos/sin rows ([1, 1, tokens, head_dim], bf16) at the given positions."""
    inv = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = positions.float()[:, None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return tuple(f(ang).to(torch.bfloat16)[None, None] for f in (torch.cos, torch.sin))


def run_decode(seqs, context, page, configs, args, device, ceiling, layout="nhd"):
    """One decode step over an FP8 cache with RoPE inside at each config: ms, share of the copy ceiling, and the
    relative difference from the reference op's output (configs that fail to run are reported, not fatal)."""
    torch.manual_seed(0)  # the same values in either layout
    inputs = (*step_inputs([1] * seqs, [context] * seqs, device, page=page, layout=layout), None, None, 0.05, 0.02)
    kv_heads, head_dim = inputs[3].shape[3:]
    cos, sin = rope_tables(torch.full((seqs,), context, device=device), head_dim, device)
    kv_bytes = 2 * seqs * (context + 1) * kv_heads * head_dim * inputs[3].element_size()
    label = f"{layout} page {page:>3} {seqs}x{context}"

    def call(config):
        return ta.paged_attention(*inputs, config=config, cos=cos, sin=sin)

    out = []
    for config, ms, err in against_reference(call, configs, reference_output(inputs, cos, sin), label, args, device):
        of_copy = kv_bytes / (ms * 1e-3) / 1e9 / ceiling
        print(f"  {label} {json.dumps(config)}: {ms:.4f} ms, {of_copy:.1%} of copy, rel err {err:.1e}", flush=True)
        out.append({"seqs": seqs, "context": context, "page": page, "layout": layout, "config": config, "ms": ms,
                    "of_copy": of_copy, "rel_err": err})
    return out


def fp8_write_is_exact(device) -> bool:
    k, v = (torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16) * 40 for _ in range(2))
    cache = torch.zeros(2, 256, 16, 8, 128, device=device, dtype=torch.float8_e4m3fn)
    slots = torch.randperm(256 * 16, device=device)[:4096]
    # and the fp16 copies a prompt step's attention reads (token-major, as paged_attention allocates them)
    k_out, v_out = (torch.empty(1, 4096, 8, 128, device=device, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    ta.write_kv(k, v, cache, slots, 0.1, 0.05, k_out=k_out, v_out=v_out)
    flat = cache.view(2, -1, 8, 128)
    want_k = (k[0].transpose(0, 1).float() / 0.1).clamp(-448, 448).to(torch.float8_e4m3fn)
    want_v = (v[0].transpose(0, 1).float() / 0.05).clamp(-448, 448).to(torch.float8_e4m3fn)
    return bool(torch.equal(flat[0, slots].view(torch.uint8), want_k.view(torch.uint8))
                and torch.equal(flat[1, slots].view(torch.uint8), want_v.view(torch.uint8))
                and torch.equal(k_out[0].transpose(0, 1), want_k.to(torch.float16))
                and torch.equal(v_out[0].transpose(0, 1), want_v.to(torch.float16)))


def run_pairs(name, seqs, context, new, args, device, ceiling):
    """An FP8 cache read as int16 pairs against byte by byte: outputs compared, each at its best config."""
    heads, kv_heads, head_dim, page = 32, 8, 128, 16
    q, k, v, cache, slots, tables, lens, qsl = paged_inputs(seqs, context, new, heads, kv_heads, head_dim, page,
                                                            device, torch.bfloat16, torch.float8_e4m3fn)
    inputs = (q, k, v, cache, slots, tables, lens, qsl, None, None, 0.05, 0.02)
    configs = ta.prune(ta.CONFIGS, inputs[:8], {})

    def call(config, pairs):
        return ta.paged_attention(*inputs, config={**config, "PAIRS": pairs})

    err, (pairs_ms, pairs_cfg), (bytes_ms, bytes_cfg) = variants(call, configs, args, device)
    kv_bytes = 2 * seqs * (context + new) * kv_heads * head_dim
    return {"case": name, "seqs": seqs, "context": context, "new": new, "pairs_ms": pairs_ms, "bytes_ms": bytes_ms,
            "speedup": bytes_ms / pairs_ms, "pairs_of_copy": kv_bytes / (pairs_ms * 1e-3) / 1e9 / ceiling,
            "bytes_of_copy": kv_bytes / (bytes_ms * 1e-3) / 1e9 / ceiling, "rel_err": err,
            "pairs_config": pairs_cfg, "bytes_config": bytes_cfg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sections", default="vs_sdpa,rope,pairs,own,split",
                    help="which comparisons to run (vs_sdpa: the decode/prefill rows against SDPA)")
    ap.add_argument("--decode-configs", type=json.loads, default=DECODE_SWEEP,
                    help="decode section: a JSON list of configs (default: DECODE_SWEEP)")
    ap.add_argument("--pages", default="16,32,64", help="decode section: KV page sizes (tokens per block)")
    ap.add_argument("--decode-steps", default="512x1500,128x1500", help="decode section: SEQSxCONTEXT steps")
    ap.add_argument("--layouts", default="nhd,hnd",
                    help="decode section: cache block layouts (nhd: [page, kv_heads, head_dim], hnd: [kv_heads, page, ..])")
    ap.add_argument("--prompt-steps", default="8x1024x0,4x4096x0,8x960x0+512x1x1500,8x1024x1024",
                    help="prompt section: steps of SEQSxNEWxCONTEXT groups joined by +")
    ap.add_argument("--prompt-page", type=int, default=64, help="prompt section: KV page size")
    ap.add_argument("--prompt-configs", type=json.loads,
                    help="prompt section: a JSON list of configs (default: the tuning space's prompt configs and "
                         "PROMPT_EXTRA)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    device = "cuda"
    ceiling = copy_gbps(device)
    rows = [run("decode", 64, 4096, 1, args, device, ceiling),
            run("decode (batch 1)", 1, 32768, 1, args, device, ceiling),
            run("decode fp8", 64, 4096, 1, args, device, ceiling, torch.float8_e4m3fn),
            run("prefill", 4, 0, 4096, args, device, ceiling)] if "vs_sdpa" in sections else []
    rope_rows = [run_rope("decode (batch 1)", 1, 1024, 1, args, device),
                 run_rope("decode", 64, 4096, 1, args, device),
                 run_rope("decode fp8", 256, 1500, 1, args, device, torch.float8_e4m3fn),
                 run_rope("prefill", 4, 0, 4096, args, device)] if "rope" in sections else []
    pairs_rows = [run_pairs("decode fp8", 64, 4096, 1, args, device, ceiling),
                  run_pairs("decode fp8", 256, 1500, 1, args, device, ceiling),
                  run_pairs("decode fp8", 384, 1500, 1, args, device, ceiling),
                  run_pairs("prefill fp8", 4, 0, 4096, args, device, ceiling)] if "pairs" in sections else []
    own_rows = [run_own("prefill fp8, 4 x 4096", [4096] * 4, [0] * 4, args, device),
                run_own("chunks fp8, 8 x 1024 after 1024", [1024] * 8, [1024] * 8, args, device),
                run_own("mixed fp8, 377 x 1 after 1500 + 7 x 1117", [1] * 377 + [1117] * 7, [1500] * 377 + [0] * 7,
                        args, device)] if "own" in sections else []
    split_rows = [run_split("mixed fp8, 512 x 1 after 1500 + 8 x 960", [1] * 512 + [960] * 8, [1500] * 512 + [0] * 8,
                            args, device),
                  run_split("mixed fp8, 432 x 1 after 192 + 8 x 970", [1] * 432 + [970] * 8, [192] * 432 + [0] * 8,
                            args, device)] if "split" in sections else []
    decode_rows = []
    if "decode" in sections:
        for step in args.decode_steps.split(","):
            seqs, context = map(int, step.split("x"))
            for page in map(int, args.pages.split(",")):
                for layout in args.layouts.split(","):
                    decode_rows += run_decode(seqs, context, page, args.decode_configs, args, device, ceiling, layout)
    prompt_rows = []
    if "prompt" in sections:
        configs = args.prompt_configs or [c for c in ta.CONFIGS if c["BLOCK_Q"] >= 16] + PROMPT_EXTRA
        configs = configs + [{**configs[0], "NEW_FROM_CACHE": True}]  # own keys from the cache: the same outputs
        prompt_rows = [run_prompt(step, args.prompt_page, configs, args, device) for step in args.prompt_steps.split(",")]
    exact = fp8_write_is_exact(device)
    gpu = torch.cuda.get_device_name()
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "copy_gbps": ceiling, "rows": rows, "rope": rope_rows, "pairs": pairs_rows,
                                        "own": own_rows, "split": split_rows, "decode": decode_rows,
                                        "prompt": prompt_rows}, indent=1,
                                       default=str))
    print(f"FP8 cache writes (and their fp16 copies) bit-exact against torch's e4m3 rounding: {exact}")
    print(f"\n{gpu}, torch {torch.__version__}; 32/8 heads, head dim 128, bf16, KV pages of 16; copy {ceiling:.0f} GB/s")
    if rows:
        print("SDPA ms per backend (flash is the goals' baseline; the fastest is shown too):")
        for r in rows:
            print(f"  {r['case']:<18} " + ", ".join(f"{b} {ms:.3f}" for b, ms in r["sdpa_all_ms"].items()))
        print(f"{'case':<18} {'seqs x ctx+new':<16} {'SDPA ms':>8} {'triton ms':>10} {'vs SDPA':>8} {'vs fastest':>10} "
              f"{'KV GB/s':>8} {'of copy':>8} {'TFLOP/s':>8} {'rel err':>8}  best config")
        for r in rows:
            print(f"{r['case']:<18} {r['seqs']}x{r['context']}+{r['new']:<9} {r['sdpa_ms']:>8.3f} {r['triton_ms']:>10.3f} "
                  f"{r['vs_sdpa']:>7.2f}x {r['vs_fastest_sdpa']:>6.2f}x ({r['fastest_sdpa']}) {r['kv_gbps']:>8.0f} "
                  f"{r['of_copy']:>8.1%} {r['tflops']:>8.1f} {r['rel_err']:>8.1e}  {r['best_config']}")
    if rope_rows:
        print("\nRoPE inside the kernel vs the rope kernels + the kernel (same pre-RoPE q/k; each at its best config):")
        print(f"{'case':<18} {'kv':<14} {'seqs x ctx+new':<16} {'inside ms':>10} {'kernels ms':>11} {'speedup':>8} "
              f"{'rel err':>8}")
        for r in rope_rows:
            print(f"{r['case']:<18} {r['kv']:<14} {r['seqs']}x{r['context']}+{r['new']:<9} {r['rope_inside_ms']:>10.4f} "
                  f"{r['rope_kernels_ms']:>11.4f} {r['speedup']:>7.2f}x {r['rel_err']:>8.1e}")
    if pairs_rows:
        print("\nFP8 cache read as int16 pairs vs byte by byte (same inputs; each at its best config):")
        print(f"{'case':<18} {'seqs x ctx+new':<16} {'pairs ms':>9} {'of copy':>8} {'bytes ms':>9} {'of copy':>8} "
              f"{'speedup':>8} {'rel err':>8}  pairs config")
        for r in pairs_rows:
            print(f"{r['case']:<18} {r['seqs']}x{r['context']}+{r['new']:<9} {r['pairs_ms']:>9.4f} {r['pairs_of_copy']:>8.1%} "
                  f"{r['bytes_ms']:>9.4f} {r['bytes_of_copy']:>8.1%} {r['speedup']:>7.2f}x {r['rel_err']:>8.1e}  "
                  f"{r['pairs_config']}")
    if own_rows:
        print("\nFP8 cache, steps with prompt tokens: own keys from write_kv's fp16 copies vs read back from the cache "
              "(each at its best config):")
        print(f"{'case':<42} {'own ms':>8} {'TFLOP/s':>8} {'cache ms':>9} {'TFLOP/s':>8} {'speedup':>8} {'rel err':>8}  "
              "own config")
        for r in own_rows:
            print(f"{r['case']:<42} {r['own_ms']:>8.3f} {r['own_tflops']:>8.1f} {r['cache_ms']:>9.3f} "
                  f"{r['cache_tflops']:>8.1f} {r['speedup']:>7.2f}x {r['rel_err']:>8.1e}  {r['own_config']}")


    if decode_rows:
        print("\nDecode over an FP8 cache, RoPE inside: the fastest configs per step, page size and block layout")
        print(f"{'step':<10} {'layout':<6} {'page':>5} {'ms':>8} {'of copy':>8} {'vs nhd/16 best':>15}  config")
        for step in sorted({(r['seqs'], r['context']) for r in decode_rows}):
            rows_ = [r for r in decode_rows if (r['seqs'], r['context']) == step]
            base = min((r['ms'] for r in rows_ if (r['page'], r['layout']) == (16, "nhd")), default=None)
            for page, layout in sorted({(r['page'], r['layout']) for r in rows_}):
                picked = sorted((r for r in rows_ if (r['page'], r['layout']) == (page, layout)), key=lambda r: r['ms'])
                for r in picked[:3]:
                    vs = f"{base / r['ms']:.3f}x" if base else "-"
                    print(f"{step[0]}x{step[1]:<6} {layout:<6} {page:>5} {r['ms']:>8.4f} {r['of_copy']:>8.1%} "
                          f"{vs:>15}  {json.dumps(r['config'])}")
    if prompt_rows:
        print(f"\nSteps with prompt tokens over an FP8 cache, RoPE inside, pages of {args.prompt_page} head-major: the "
              "fastest configs (SDPA: dense bf16, no cache, no RoPE)")
        print(f"{'step':<24} {'ms':>8} {'TFLOP/s':>8} {'flash ms':>9} {'vs flash':>9} {'cudnn ms':>9} {'vs cudnn':>9}  config")
        for r in prompt_rows:
            for c in sorted(r["configs"], key=lambda c: c["ms"])[:3]:
                fl, cu = r["sdpa_ms"].get("flash"), r["sdpa_ms"].get("cudnn")
                print(f"{r['step']:<24} {c['ms']:>8.4f} {r['tflop'] / (c['ms'] * 1e-3):>8.1f} "
                      f"{fl or float('nan'):>9.4f} {(fl or float('nan')) / c['ms']:>8.2f}x "
                      f"{cu or float('nan'):>9.4f} {(cu or float('nan')) / c['ms']:>8.2f}x  {json.dumps(c['config'])}")


if __name__ == "__main__":
    main()
