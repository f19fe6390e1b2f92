"""How much faster a tuning's kernels compile on several threads (``kernels/precompile.py``): the GEMM kernel's
whole tuning space (bf16 and FP8 tiles, split-K, GEMV), compiled for sm_90 one after the other and then from pools
of threads, each run into an empty Triton cache. The compiler needs no GPU, so this runs on any machine.

    python3 bench/compile_threads.py                     # threads 1, 2, 4, ... up to the cores
    python3 bench/compile_threads.py --threads 1,8,16

The ratio column is each pool's speed-up over one thread, measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 is its default

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from workbench.kernels import gemm as G  # noqa: E402

POINTERS = {"A", "B", "C", "SA", "SB", "BIAS"}


def sources() -> list[tuple[ASTSource, dict]]:
    """(source, options) of every config of the GEMM and GEMV kernels' spaces, bf16 and FP8, for one shape."""
    out = []
    for space, (a, c, dot) in {"16bit": ("*bf16", "*bf16", "native"), "8bit": ("*fp8e4nv", "*bf16", "native")}.items():
        for config in G.CONFIGS[space] + G.GEMV_CONFIGS[space]:
            gemv = config.get("GEMV", False)
            fn = G._gemv_kernel if gemv else G._gemm_kernel
            scale = 2 if space == "8bit" else 0
            consts = dict(BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], A_SCALE=scale, B_SCALE=scale and 2,
                          HAS_BIAS=False, EVEN_K=True)
            if gemv:
                consts["INT"] = False
            else:
                split = config.get("SPLIT_K", 1)
                consts.update(BLOCK_M=config["BLOCK_M"], GROUP_M=config["GROUP_M"], SPLIT_K=split, DOT=dot)
                c = "*fp32" if split > 1 else c
            types = {"A": a, "B": a, "C": c, "SA": "*fp32", "SB": "*fp32", "BIAS": "*bf16"}
            names = fn.arg_names
            signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS}
            source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                               attrs=attrs)
            out.append((source, {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}))
    return out


def compile_all(threads: int) -> float:
    """Seconds to compile every source on ``threads`` threads into a fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        work = sources()
        target = GPUTarget("cuda", 90, 32)
        t0 = time.perf_counter()
        if threads == 1:
            for source, options in work:
                triton.compile(source, target=target, options=options)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda w: triton.compile(w[0], target=target, options=w[1]), work))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", help="comma-separated pool sizes (default: 1, 2, 4, ... up to the cores)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    pools = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({1, *(2 ** i for i in range(1, 5) if 2 ** i <= cores), cores})
    n = len(sources())
    compile_all(1 if 1 in pools else pools[0])  # warm-up: imports, the compiler's first use (not counted)
    rows = [(t, compile_all(t)) for t in pools]
    base = dict(rows).get(1)
    print(f"\n{n} GEMM/GEMV configs (bf16 + FP8) compiled for sm_90; triton {triton.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'threads':>7} {'seconds':>8} {'per config':>10} {'speed-up vs 1':>14}")
    for t, s in rows:
        print(f"{t:>7} {s:>8.1f} {s / n:>10.2f} {f'{base / s:.2f}x' if base else '-':>14}")


if __name__ == "__main__":
    main()
