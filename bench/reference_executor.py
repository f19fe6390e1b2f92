"""Baseline: the reference executor running a captured graph vs transformers eager, same process.

    python bench/reference_executor.py --preset llama-3-8b --batch 4 --tokens 512

Captures the preset on the meta device (no weights), builds one set of random
bf16 weights on the GPU that both the transformers model and the workbench
program read, checks the program's logits against transformers, then times a
prefill of batch × tokens for each with CUDA events (warm-up, median of
repeats). The roofline column is the cost model's FLOPs over the bf16 matmul
rate measured in this process on an 8192³ product.

Prints a table last; with --out, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.graph.capture import capture  # noqa: E402
from workbench.graph.executor import Program  # noqa: E402
from workbench.graph.views import node_table  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.profiling.ceilings import matmul_tflops  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fp32-check", action="store_true", help="also compare both bf16 results with fp32 on the same weights")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device

    t0 = time.perf_counter()
    captured = capture(load_model(args.preset, dtype=dtype, materialize=False).model)
    capture_s = time.perf_counter() - t0
    graph = captured.graph

    t0 = time.perf_counter()
    model = load_model(args.preset, dtype=dtype, device=device).model
    init_s = time.perf_counter() - t0
    weights = dict(model.named_parameters(remove_duplicate=False))
    program = Program(graph, {n: weights[n] for n, p in graph.params.items() if p.kind == "parameter"}
                      | {k: v.to(device) for k, v in captured.constants.items()}, device=device)

    vocab = graph.meta["config"]["vocab_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.tokens), device=device, generator=gen)
    pos = torch.arange(args.tokens, device=device).expand(args.batch, -1).contiguous()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        out = program(ids, pos)
    rel_err = rel(out, ref)

    def hf():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    timings = {"transformers eager": time_fn(hf, repeats=args.repeats, device=device),
               "workbench reference executor": time_fn(lambda: program(ids, pos), repeats=args.repeats, device=device)}
    # Both bf16 results against fp32 on the same weights: tells rounding apart from a wrong graph.
    # model.float() converts the weights in place, so the program (which shares them) goes first.
    err32 = {}
    if args.dtype != "float32" and args.fp32_check:
        del program
        model.float()
        with torch.no_grad():
            ref32 = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        err32 = {"transformers_vs_fp32": rel(ref, ref32), "workbench_vs_fp32": rel(out, ref32)}
        del ref32
    del ref, out
    flops = int(node_table(graph, batch=args.batch, tokens=args.tokens)["flops"].sum())
    peak = matmul_tflops(device) if device.startswith("cuda") else float("nan")
    floor_ms = flops / (peak * 1e12) * 1e3

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    base = timings["transformers eager"].median_ms
    rows = [{"impl": k, "median_ms": t.median_ms, "spread": t.spread(), "tokens_per_s": args.batch * args.tokens / (t.median_ms * 1e-3),
             "vs_transformers": base / t.median_ms, "tflops": flops / (t.median_ms * 1e-3) / 1e12,
             "of_roofline": floor_ms / t.median_ms} for k, t in timings.items()]
    result = {"gpu": gpu, "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype,
              "batch": args.batch, "tokens": args.tokens, "nodes": len(graph.nodes), "capture_s": capture_s,
              "init_s": init_s, "logits_rel_err": rel_err, **err32, "flops": flops, "matmul_peak_tflops": peak,
              "roofline_ms": floor_ms, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, torch {torch.__version__}: {args.preset} {args.dtype}, prefill {args.batch}x{args.tokens}, "
          f"graph {len(graph.nodes)} nodes captured in {capture_s:.1f}s; logits rel. error vs transformers {rel_err:.2e}")
    if err32:
        print(f"vs fp32 on the same weights: transformers {err32['transformers_vs_fp32']:.2e}, "
              f"workbench {err32['workbench_vs_fp32']:.2e}")
    print(f"cost model: {flops / 1e12:.2f} TFLOP; bf16 matmul peak measured here {peak:.0f} TFLOP/s -> floor {floor_ms:.1f} ms")
    print(f"{'impl':<30} {'median ms':>10} {'spread':>7} {'tok/s':>10} {'TFLOP/s':>8} {'of roofline':>12} {'vs transformers':>16}")
    for r in rows:
        print(f"{r['impl']:<30} {r['median_ms']:>10.2f} {r['spread']:>7.1%} {r['tokens_per_s']:>10.0f} {r['tflops']:>8.1f} "
              f"{r['of_roofline']:>12.1%} {r['vs_transformers']:>15.3f}x")


if __name__ == "__main__":
    main()
