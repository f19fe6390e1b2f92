"""How fast can a decode step's KV cache be read at all? The attention kernel's access pattern with no attention.

    python3 bench/read_probe.py --steps 512x1500,384x1500 --page 64

Decode attention over an FP8 cache reads at 86-88% of the copy bandwidth on the H200 (``bench/attention.py
--sections decode``). This bench separates the access pattern from the kernel's work: a Triton kernel with the
attention kernel's grid (one program per sequence and KV head) and reads (the sequence's pages through the block
table, BLOCK_N keys of one head per tile, K and V as int16 pairs) that only xors what it loads. Beside it, the same
bytes read as one flat array, and the copy ceiling. "of copy" is the bytes read over the time, against the copy
bandwidth measured here (which counts read + written bytes); a read-only stream can exceed 100%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import step_inputs  # noqa: E402
from workbench.kernels import triton_attention as ta  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402


@triton.jit
def _paged_read_kernel(KC, VC, BT, SEQ_LENS, OUT, sc_blk, sc_off, sc_h, sbt,
                       PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D2: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    length = tl.load(SEQ_LENS + seq)
    d2 = tl.arange(0, D2)
    acc = tl.zeros([BLOCK_N, D2], tl.int32)
    KC16 = KC.to(tl.pointer_type(tl.int16), bitcast=True)
    VC16 = VC.to(tl.pointer_type(tl.int16), bitcast=True)
    for n0 in range(0, length, BLOCK_N):
        kv = n0 + tl.arange(0, BLOCK_N)
        ok = kv < length
        page = tl.load(BT + seq * sbt + n0 // PAGE).to(tl.int64)
        base16 = (page * sc_blk + (kv % PAGE) * sc_off + head * sc_h) // 2
        k = tl.load(KC16 + base16[:, None] + d2[None, :], mask=ok[:, None], other=0)
        v = tl.load(VC16 + base16[:, None] + d2[None, :], mask=ok[:, None], other=0)
        acc = acc ^ k.to(tl.int32) ^ v.to(tl.int32)
    tl.store(OUT + seq * tl.num_programs(1) + head, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _flat_read_kernel(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = acc ^ tl.load(X + offs, mask=offs < n, other=0)
    tl.store(OUT + pid, tl.sum(acc, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="512x1500,384x1500")
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--configs", type=json.loads,
                    default=[{"BLOCK_N": n, "num_warps": w, "num_stages": s}
                             for n, w, s in ((64, 4, 1), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3),
                                             (32, 4, 4))])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = "cuda"
    ceiling = copy_gbps(device)
    rows = []

    def timed(step, label, fn, nbytes):  # one row: ms of fn as CUDA-graph replays, and nbytes over it against copy
        ms = time_fn(fn, repeats=args.repeats, device=device, graph_calls=10).median_ms
        rows.append((step, label, ms, nbytes / ms / 1e6 / ceiling))
        print(f"  {step} {label}: {ms:.4f} ms, {rows[-1][3]:.1%} of copy", flush=True)

    for step in args.steps.split(","):
        seqs, context = map(int, step.split("x"))
        torch.manual_seed(0)
        q, k, v, cache, slots, tables, lens, qsl = step_inputs([1] * seqs, [context] * seqs, device, page=args.page,
                                                               layout="hnd")
        kv_heads, head_dim = cache.shape[3], cache.shape[4]
        nbytes = 2 * seqs * (context + 1) * kv_heads * head_dim * cache.element_size()
        out = torch.empty(seqs, kv_heads, dtype=torch.int32, device=device)
        kc, vc = cache[0], cache[1]
        # the attention kernel itself, same cache, for comparison
        timed(step, "attention " + json.dumps(ta.DECODE_CONFIG),
              lambda: ta.paged_attention(q, k, v, cache, slots, tables, lens, qsl, None, None, 0.05, 0.02,
                                         config=ta.DECODE_CONFIG), nbytes)
        for cfg in args.configs:
            if args.page % cfg["BLOCK_N"]:
                print(f"  skipped {cfg}: a tile must lie in one page", flush=True)
                continue

            def call(cfg=cfg):
                _paged_read_kernel[(seqs, kv_heads)](kc, vc, tables, lens, out, kc.stride(0), kc.stride(1),
                                                     kc.stride(2), tables.stride(0), PAGE=args.page,
                                                     BLOCK_N=cfg["BLOCK_N"], D2=head_dim // 2,
                                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                                     **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}))
            timed(step, "paged " + json.dumps(cfg), call, nbytes)
        storage = cache if cache.is_contiguous() else cache.transpose(2, 3)  # head-major: contiguous underneath
        flat = storage.reshape(-1).view(torch.int32)
        n = flat.numel()
        for block, iters, warps in ((1024, 8, 4), (2048, 8, 8), (4096, 4, 8)):
            grid = triton.cdiv(n, block * iters)
            sink = torch.empty(grid, dtype=torch.int32, device=device)
            timed(step, f"flat whole cache BLOCK {block} ITERS {iters} warps {warps}",
                  lambda: _flat_read_kernel[(grid,)](flat, sink, n, BLOCK=block, ITERS=iters, num_warps=warps), n * 4)
    print(f"\n{torch.cuda.get_device_name()}; copy {ceiling:.0f} GB/s; pages of {args.page}, head-major, FP8")
    print(f"{'step':<10} {'ms':>8} {'of copy':>8}  read")
    for step, label, ms, frac in rows:
        print(f"{step:<10} {ms:>8.4f} {frac:>8.1%}  {label}")


if __name__ == "__main__":
    main()
