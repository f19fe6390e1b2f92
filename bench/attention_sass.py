"""The paged-attention kernel compiled for sm_90 without a GPU: registers, shared memory, and what one
iteration of its main loop (the cached keys, BLOCK_N of them) issues, read off the SASS.

    python3 bench/attention_sass.py                       # the decode configs over an FP8 cache
    python3 bench/attention_sass.py --kv bf16 --step prefill --rope

Device time is the scarce thing; the compiler's output is free. This compiles exactly what a launch
would (integer strides and pointers specialized as divisible by 16, as Triton's JIT does for them) with
the installed Triton and the ``cuobjdump`` its wheel ships. The GPU machine runs triton 3.6: for the
same SASS here, ``pip install triton==3.6.0`` into a separate virtualenv and run this script with it.

Columns: registers per thread, static shared memory, SASS instructions in the kernel and in the main
loop (the longest backward branch), then per loop iteration: asynchronous copies (``LDGSTS``,
cp.async), ordinary global loads (``LDG``, e.g. block-table entries), CTA barriers, tensor-core MMAs
and e4m3 unpack conversions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels import triton_attention as ta  # noqa: E402

#: integer arguments that are multiples of 16 at every real launch (strides of [.., head_dim] rows, head_dim
#: 128); the JIT specializes such values, so the offline compile must say so or its loads are not vectorized
DIVISIBLE = {"sq_h", "sq_t", "sk_h", "sk_t", "sv_h", "sv_t", "so_h", "so_t", "sc_blk", "sc_off", "sc_h", "sp_s",
             "sp_h", "sp_t", "scos_t"}
FLOATS = {"s_scale", "v_scale", "cap", "cap_scale"}


def pointer_types(kv: str, step: str) -> dict[str, str]:
    cache = "*fp8e4nv" if kv == "fp8" else "*bf16"
    own = "*fp16" if kv == "fp8" and step == "prefill" else "*bf16"  # write_kv's side buffers over an FP8 cache
    return {"Q": "*bf16", "K": own, "V": own, "KC": cache, "VC": cache, "O": "*bf16", "BT": "*i64",
            "SEQ_LENS": "*i64", "QSL": "*i64", "O_PART": "*fp32", "LSE": "*fp32", "COS": "*bf16", "SIN": "*bf16",
            "BLOCK_SEQ": "*i32"}


def compile_config(config: dict, *, kv: str, step: str, rope: bool, group: int = 4, head_dim: int = 128,
                   page: int = 16, softcap: bool = False):
    """(compiled kernel, constexprs) of ``_paged_attention_kernel`` at ``config`` for sm_90."""
    fn = ta._paged_attention_kernel
    names = fn.arg_names
    fp8 = kv == "fp8"
    pairs = fp8 and config.get("PAIRS", True)
    decode = step == "decode"
    rows, block_q = ta.query_rows(config["BLOCK_Q"], group)  # as the launcher sizes a program's query rows
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                  BLOCK_Q=block_q, BLOCK_N=config["BLOCK_N"],
                  PAGE=page, HAS_WINDOW=False, DOT_FP32=False, SPLITS=config.get("SPLITS", 1),
                  NEW_FROM_INPUT=not fp8 or not decode, DOT_F16=fp8, ROPE=rope, PAIRS=pairs, PAIRS_ASM=pairs,
                  SEQ_MODE=0, ROWS=rows, NORM=False, SOFTCAP=softcap)
    ptrs = pointer_types(kv, step)
    signature = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in ptrs or n in DIVISIBLE}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": config["num_warps"], "num_stages": config["num_stages"],
                                     **({"maxnreg": config["maxnreg"]} if "maxnreg" in config else {})})
    return kernel, consts


def cuobjdump() -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else "cuobjdump"


def sass_report(cubin: bytes) -> dict:
    """Registers, and instruction counts in the kernel and in one iteration of its longest loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    lines = []  # (address, opcode)
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []  # backward branches: (length, start, end)
    for addr, op, rest in lines:
        target = re.match(r"\s*0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((addr - int(target.group(1), 16), int(target.group(1), 16), addr))
    _, lo, hi = max(loops) if loops else (0, 0, -1)
    body = Counter(op for addr, op, _ in lines if lo <= addr <= hi)

    def count(prefix):
        return sum(n for op, n in body.items() if op.startswith(prefix))

    regs = re.findall(r"REG:(\d+)", usage)
    return {"regs": int(regs[0]) if regs else None, "instrs": len(lines), "loop_instrs": sum(body.values()),
            "ldgsts": count("LDGSTS"), "ldg": count("LDG."), "bar": count("BAR.SYNC"),
            "mma": count("HMMA") + count("HGMMA"), "unpack": count("F2FP.F16.E4M3")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", default="fp8", choices=("fp8", "bf16"), help="the KV cache's dtype")
    ap.add_argument("--step", default="decode", choices=("decode", "prefill"),
                    help="decode: the step's own key read back from the cache; prefill: read from k/v")
    ap.add_argument("--rope", action="store_true", help="RoPE inside the kernel (the runtime's graphs)")
    ap.add_argument("--page", type=int, default=16, help="tokens per KV block (the runtime's block size)")
    ap.add_argument("--configs", type=json.loads,
                    help='a JSON list of configs to compile instead of the tuning space\'s, e.g. '
                         '\'[{"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 1, "num_stages": 3}]\'')
    args = ap.parse_args()
    configs = args.configs or [c for c in ta.CONFIGS if (c["BLOCK_Q"] <= 4) == (args.step == "decode")]
    print(f"triton {triton.__version__}, sm_90; {args.kv} cache, {args.step}, rope {args.rope}; GROUP 4, head dim 128, "
          f"page {args.page}")
    print(f"{'config':<58} {'regs':>5} {'shared':>7} {'instrs':>7} {'loop':>6} {'LDGSTS':>7} {'LDG':>5} {'BAR':>5} "
          f"{'MMA':>5} {'unpack':>7}")
    for config in configs:
        kernel, _ = compile_config(config, kv=args.kv, step=args.step, rope=args.rope, page=args.page)
        r = sass_report(kernel.asm["cubin"])
        label = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"{label:<58} {r['regs']:>5} {kernel.metadata.shared:>7} {r['instrs']:>7} {r['loop_instrs']:>6} "
              f"{r['ldgsts']:>7} {r['ldg']:>5} {r['bar']:>5} {r['mma']:>5} {r['unpack']:>7}")


if __name__ == "__main__":
    main()
