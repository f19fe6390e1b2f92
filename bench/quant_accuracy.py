"""Perplexity of each quantization format on a real model, against the unquantized graph (issue 5's accuracy goals).

    python3 bench/quant_accuracy.py                        # SmolLM2-135M-Instruct, CPU defaults (~15 min on 2 cores)
    python3 bench/quant_accuracy.py --device cuda --samples 512 --seq-len 512

The model is captured, optimized (every pass, paged attention) and calibrated on datasets/calibration.txt;
each plan quantizes every linear group except lm_head (which stays in the model's precision), and the
perplexity is measured on datasets/evaluation.txt with sliding windows. Rows: FP8 W8A8 (per-channel and
per-tensor weights, static activation scales), INT8 weight-only, INT8 SmoothQuant W8A8 at several
alphas (dynamic per-token and static per-tensor activations), the FP8 KV cache. Goals: FP8 per-channel
within +1.5%, INT8 weight-only within +0.5%, SmoothQuant within +5% at its best alpha.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.evaluate import dataset_text, logits_fn, perplexity  # noqa: E402
from workbench.graph.executor import Program  # noqa: E402
from workbench.models.intake import load_tokenizer  # noqa: E402
from workbench.pipeline import optimize  # noqa: E402
from workbench.quant import PrecisionPlan, calibrate, calibration_ids, quantized_program  # noqa: E402


def plans(graph, alphas):
    yield "fp8, per-channel weights", PrecisionPlan.uniform(graph, "fp8")
    yield "fp8, per-tensor weights", PrecisionPlan.uniform(graph, "fp8", weights="tensor")
    yield "fp8, dynamic per-token x", PrecisionPlan.uniform(graph, "fp8", activations="dynamic")
    yield "int8 weight-only", PrecisionPlan.uniform(graph, "int8_wo")
    for a in alphas:
        yield f"int8 SmoothQuant a={a}, per-token x", PrecisionPlan.uniform(graph, "int8_sq", alpha=a)
    for a in alphas:
        yield f"int8 SmoothQuant a={a}, static x", PrecisionPlan.uniform(graph, "int8_sq", alpha=a, activations="static")
    yield "fp8 KV cache only", PrecisionPlan.uniform(graph, "bf16", kv_cache="fp8")
    yield "fp8 + fp8 KV cache", PrecisionPlan.uniform(graph, "fp8", kv_cache="fp8")


def calibrated_model(args):
    """(optimized graph, its program, calibration statistics, evaluation token ids) for ``args.model``
    on ``args.device``, calibrated with ``args.samples`` x ``args.seq_len`` tokens and ``args.observer``."""
    optimized = optimize(args.model, dtype="float32", device="cpu")  # weights made or read on the CPU, then moved
    tokenizer = load_tokenizer(optimized.source)
    graph = optimized.graph
    program = Program(graph, optimized.program.params, device=args.device)
    stats = calibrate(program, calibration_ids(tokenizer), samples=args.samples, seq_len=args.seq_len,
                      observer=args.observer)
    return graph, program, stats, torch.tensor(tokenizer(dataset_text("evaluation")).input_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--observer", default="max")
    ap.add_argument("--alphas", default="0.3,0.5,0.7,0.85")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--only", help="run only the plans whose label contains this text (e.g. 'KV')")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    start = time.perf_counter()
    graph, program, stats, ids = calibrated_model(args)
    base_ppl = perplexity(logits_fn(program), ids, window=args.window, stride=args.stride).perplexity
    rows = [{"plan": "unquantized", "ppl": base_ppl, "delta_pct": 0.0}]
    print(f"unquantized: perplexity {base_ppl:.4f} over {ids.numel()} tokens", flush=True)
    for label, plan in plans(graph, [float(a) for a in args.alphas.split(",")]):
        if args.only and args.only not in label:
            continue
        q = quantized_program(program, plan, stats)
        ppl = perplexity(logits_fn(q), ids, window=args.window, stride=args.stride).perplexity
        rows.append({"plan": label, "ppl": ppl, "delta_pct": 100 * (ppl / base_ppl - 1), "plan_json": plan.to_json()})
        print(f"{label}: {ppl:.4f} ({rows[-1]['delta_pct']:+.2f}%)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "args": vars(args) | {"out": str(args.out)},
                                        "rows": rows}, indent=1, default=str))
    print(f"\n{args.model}, {graph.meta.get('dtype')} on {args.device}; calibration {args.samples} x {args.seq_len} "
          f"tokens, observer {args.observer}; evaluation {ids.numel()} tokens, window {args.window}, stride "
          f"{args.stride}; lm_head unquantized; {time.perf_counter() - start:.0f} s")
    print(f"{'plan':<40} {'perplexity':>10} {'vs unquantized':>15}")
    for r in rows:
        print(f"{r['plan']:<40} {r['ppl']:>10.4f} {r['delta_pct']:>+14.2f}%")


if __name__ == "__main__":
    main()
