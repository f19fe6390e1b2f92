"""Which GPU kernels give a row the same result whatever other rows share the call (issue 25: batch invariance).

    python3 bench/batch_invariance.py                # the table; logs nothing else
    python3 bench/batch_invariance.py --rows 1,2,8,64,256 --shapes smollm2
    TRITON_INTERPRET=1 python3 bench/batch_invariance.py --rows 1,2,5 --shapes tiny     # on the CPU

A request's logits depend on the rows that share its step only if some kernel's result for one row changes with
the number of rows (M) it is called with. For each linear path the runtime can run (cuBLAS through torch's
``linear``, the Triton tile at its per-M default config, the Triton tile with one config held for every M, the
M = 1 GEMV, split-K, ``torch._scaled_mm`` and the Triton FP8 / INT8 tiles) and for greedy sampling, row 0 of a
call with M rows (row 0 the same input every time, the others random) is compared with the call of one row:
bitwise equal, or the largest difference relative to the output's scale. Inputs are random, never zeros.

The table's last column names the M values whose row 0 differed from M = 1. A path whose config or kernel changes
with M (the defaults pick tiles by M; tuned engines pick configs per token bucket) is not invariant even where
each config is; the "held" rows show whether a fixed config is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels import gemm as G  # noqa: E402
from workbench.kernels.triton_sampling import greedy_logprobs  # noqa: E402

#: (name, K, N): one model's linears (qkv, o, gate/up, down) and its lm_head
SHAPES = {
    "tiny": [("qkv", 128, 96), ("lm_head", 128, 512)],  # a smoke test under TRITON_INTERPRET=1 on the CPU
    "smollm2": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
                ("lm_head", 576, 49152)],
    "llama8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                ("lm_head", 4096, 128256)],
}


def paths(K: int, N: int, device):
    """name -> fn(x [M, K]) -> [M, N] for each linear path at this shape (weights made once)."""
    g = torch.Generator(device=device).manual_seed(K * 7 + N)
    w = (torch.randn(N, K, generator=g, device=device) / K ** 0.5).to(torch.bfloat16)
    w_scale = (w.float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    w8 = (w.float() / w_scale).to(torch.float8_e4m3fn)
    i_scale = (w.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    wi = (w.float() / i_scale).round().clamp(-127, 127).to(torch.int8)
    held16 = G.CONFIGS["16bit"][5]  # 64x128x64: fits every M
    held8 = G.CONFIGS["8bit"][5]
    split16 = next((c for c in G.CONFIGS["16bit"] if c.get("SPLIT_K", 1) > 1 and K >= c["SPLIT_K"] * c["BLOCK_K"]),
                   {**held16, "SPLIT_K": 2})
    out = {
        "cuBLAS (torch linear)": lambda x: torch.nn.functional.linear(x, w),
        "triton tile, default per M": lambda x: G.linear(x, w),
        "triton tile, one config": lambda x: G.linear(x, w, config=held16),
        "triton split-K, one config": lambda x: G.linear(x, w, config=split16),
        "fp8 scaled_mm (per-token x)": lambda x: G.fp8_linear_scaled_mm(x, w8, w_scale.reshape(N)),
        "fp8 triton, default per M": lambda x: G.fp8_linear_triton(x, w8, w_scale.reshape(N)),
        "fp8 triton, one config": lambda x: G.fp8_linear_triton(x, w8, w_scale.reshape(N), config=held8),
        "int8 triton, default per M": lambda x: G.int8_linear_triton(x, wi, i_scale.reshape(N)),
    }
    gemv = G.GEMV_CONFIGS["16bit"][0]
    out["M=1 GEMV vs tile (row 0 only)"] = lambda x: (G.linear(x, w, config=gemv) if x.shape[0] == 1
                                                      else G.linear(x, w, config=held16))
    return out


def compare(fn, K: int, rows: list[int], device) -> tuple[str, float]:
    """M values whose row 0 differs from the call of one row; the largest difference / max |row 0|."""
    g = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(1, K, generator=g, device=device).to(torch.bfloat16)
    ref = fn(x0)[0].float()
    differ, worst = [], 0.0
    for M in rows:
        if M == 1:
            continue
        x = torch.cat([x0, torch.randn(M - 1, K, generator=g, device=device).to(torch.bfloat16)])
        row = fn(x)[0].float()
        if not torch.equal(row, ref):
            differ.append(M)
            worst = max(worst, ((row - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item())
    return (",".join(map(str, differ)) or "none"), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,8,16,33,64,256,512")
    ap.add_argument("--shapes", default="smollm2,llama8b")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [int(r) for r in args.rows.split(",")]
    table = []
    for model in args.shapes.split(","):
        for name, K, N in SHAPES[model]:
            for path, fn in paths(K, N, device).items():
                try:
                    differ, worst = compare(fn, K, rows, device)
                except Exception as e:  # a path that refuses the shape: its first line
                    differ, worst = f"error: {str(e).splitlines()[0][:80]}", float("nan")
                table.append((model, name, f"{K}x{N}", path, differ, worst))
        vocab = SHAPES[model][-1][2]
        g = torch.Generator(device=device).manual_seed(2)
        logits0 = torch.randn(1, vocab, generator=g, device=device)

        def sample(logits):
            return torch.stack([t.float() for t in greedy_logprobs(logits)], -1) if device.type == "cuda" \
                else torch.stack([logits.argmax(-1).float(), logits.log_softmax(-1).amax(-1)], -1)

        ref, differ = sample(logits0)[0], []
        for M in rows[1:]:
            batch = torch.cat([logits0, torch.randn(M - 1, vocab, generator=g, device=device)])
            if not torch.equal(sample(batch)[0], ref):
                differ.append(M)
        table.append((model, "sampling", f"vocab {vocab}", "greedy argmax + log-prob", ",".join(map(str, differ))
                      or "none", 0.0))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}; row 0 of M rows against one row, M in {args.rows}\n")
    print("| model | linear | K x N | path | M where row 0 differs | largest difference / max |row| |")
    print("|---|---|---|---|---|---:|")
    for model, name, shape, path, differ, worst in table:
        print(f"| {model} | {name} | {shape} | {path} | {differ} | {worst:.2e} |")


if __name__ == "__main__":
    main()
