"""One rank of a tensor-parallel engine on one GPU: the per-rank floor that multi-GPU runs are measured against.

    python3 bench/tp_rank_floor.py --preset llama-3-8b --tp 1,2,4 --out $OUT/tp_rank_floor.json
    python3 bench/tp_rank_floor.py --preset tiny-llama --tp 1,2 --device cpu --decode 4x16x8 --prefill 2x64   # a check

The preset is built with random weights through the product (``pipeline.optimize``: capture, every pass). For
each tensor-parallel size N, rank 0's shard is cut as ``LLM(model, tensor_parallel_size=N)`` cuts it
(``graph.sharding.rank0_program``: the sharding pass, the fusions across the all-reduce, rank 0's slices of the
weights) and run alone through ``LLM``. In one process its collectives are the identity, so a step costs the
rank's compute and memory traffic without the link: a TP-N run on N GPUs cannot be faster than this floor, and its
distance from it is what the collectives cost.

Cases, each a fresh ``LLM`` of the rank's program (CUDA graphs captured, KV cache sized by the capacity planner):

  decode    ``--decode BxPxO``: B requests of P prompt tokens and O output tokens, at once; decode tokens/s (the
            output tokens after each request's first, over the time after the first step)
  prefill   ``--prefill BxP``: B prompts of P tokens, one output token each; prompt tokens/s

The table's key column is ``vs TP-1``: the rank's throughput over the unsharded graph's (TP-1), run in the same
process; N would be perfect scaling of compute and weight traffic (the replicated embeddings and norms, and
KV-head replication where there are fewer KV heads than ranks, keep it below N). The per-rank weight bytes are
``runtime.capacity.rank_weights_bytes``. Kernels are the product's GPU defaults: the program is not tuned
(``workbench tune --tp N`` tunes an engine's rank graph). A 70B-shaped preset does not fit one GPU whole, so
this bench covers models whose TP-1 graph fits.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import LLM, SamplingParams  # noqa: E402
from workbench.graph.sharding import rank0_program  # noqa: E402
from workbench.pipeline import optimize  # noqa: E402
from workbench.runtime.capacity import rank_weights_bytes  # noqa: E402


def _shape(text: str, parts: int) -> list[int]:
    values = [int(v) for v in text.lower().split("x")]
    if len(values) != parts or min(values) < 1:
        raise SystemExit(f"tp_rank_floor: expected {parts} positive numbers joined by 'x', got {text!r}")
    return values


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(program, device: str, requests: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict:
    """``requests`` random prompts of ``prompt_len`` tokens, ``output_len`` tokens each, through a fresh ``LLM``
    of ``program``: wall seconds, the time of the first step's tokens, token counts."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with LLM(program, device=device) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        _sync(device)
        seconds = time.perf_counter() - t0
    first = max(o.metrics["first_token_time"] for o in outs) - t0  # every prompt has run by then
    generated = sum(len(o.token_ids) for o in outs)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": seconds, "prefill_s": first, "generated": generated, "prompt_tokens": requests * prompt_len,
            "decode_tokens": generated - requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3-8b", help="a preset with random weights (default llama-3-8b)")
    ap.add_argument("--tp", default="1,2,4", help="tensor-parallel sizes, comma-separated (1 is the baseline)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode", default="64x128x256", help="BxPxO: requests x prompt x output tokens")
    ap.add_argument("--prefill", default="8x2048", help="BxP: requests x prompt tokens (one output token)")
    ap.add_argument("--cases", default="decode,prefill")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    sizes = [int(s) for s in args.tp.split(",")]
    if 1 not in sizes:
        sizes = [1, *sizes]
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= {"decode", "prefill"}:
        raise SystemExit(f"tp_rank_floor: --cases takes decode and prefill, got {args.cases!r}")
    B, P, O = _shape(args.decode, 3)
    PB, PP = _shape(args.prefill, 2)

    whole = optimize(args.preset, device=args.device, dtype=args.dtype).program
    vocab = int(whole.graph.meta["config"]["vocab_size"])
    rows = []
    for n in sizes:
        program = whole if n == 1 else rank0_program(whole, n)[0]
        row = {"tp": n, "weights_gb": rank_weights_bytes(program.graph) / 1e9}
        if "decode" in cases:
            r = run_case(program, args.device, B, P, O, vocab, seed=1)
            row["decode_tok_s"] = r["decode_tokens"] / max(r["seconds"] - r["prefill_s"], 1e-9)
            row["decode_ms_step"] = 1e3 * (r["seconds"] - r["prefill_s"]) / max(O - 1, 1)
        if "prefill" in cases:
            r = run_case(program, args.device, PB, PP, 1, vocab, seed=2)
            row["prefill_tok_s"] = r["prompt_tokens"] / r["seconds"]
        rows.append(row)
        del program
        gc.collect()

    base = rows[0]
    for row in rows:
        for key in ("decode_tok_s", "prefill_tok_s"):
            if key in row:
                row[key.replace("_tok_s", "_vs_tp1")] = row[key] / base[key]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.preset} {args.dtype}, one rank alone on {name} (collectives the identity; untuned); "
          f"decode {B} requests x {P}+{O} tokens, prefill {PB} x {PP} tokens")
    # (key, header, format) per column, the cases' columns where they ran
    columns = [("tp", "TP", "{:>3}"), ("weights_gb", "rank weights GB", "{:>15.2f}")]
    if "decode" in cases:
        columns += [("decode_tok_s", "decode tok/s", "{:>13.0f}"), ("decode_ms_step", "ms/step", "{:>8.2f}"),
                    ("decode_vs_tp1", "vs TP-1", "{:>7.2f}x")]
    if "prefill" in cases:
        columns += [("prefill_tok_s", "prefill tok/s", "{:>14.0f}"), ("prefill_vs_tp1", "vs TP-1", "{:>7.2f}x")]
    widths = [len(fmt.format(0)) for _, _, fmt in columns]
    print(" ".join(f"{head:>{w}}" for (_, head, _), w in zip(columns, widths)))
    for row in rows:
        print(" ".join(fmt.format(row[key]) for key, _, fmt in columns))
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
