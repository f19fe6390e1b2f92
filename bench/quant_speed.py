"""Quantized graphs against the bf16 graph, same process: prefill and decode-step time of each precision plan.

    python3 bench/quant_speed.py --preset llama-3-8b --seqs 8 --tokens 512 --out $OUT/quant_speed.json

The preset is built with random weights in bf16 (speed does not depend on their values), captured and
optimized (every pass, paged attention), calibrated on random token ids (``--calib-samples`` x
``--tokens``), then each plan is applied to every linear group except lm_head:

  bf16            the baseline (cuBLAS through torch or Triton, as the autotuner picks)
  fp8             FP8 W8A8, per-channel weights, static per-tensor x scales; the norms and SwiGLU that
                  write a group's x write it in fp8 (``quant/apply.py``: FP8 producers)
  fp8-unfused     the same, each linear quantizing its own x (shows what the producers save)
  fp8-dynamic     per-token x scales computed at run time
  fp8+kv          fp8 with the FP8 KV cache
  int8_wo         INT8 weight-only
  int8_sq         SmoothQuant INT8 W8A8 (alpha 0.5, per-token x)

Each plan's program is autotuned (``autotune_profile``, two buckets: the decode step of ``seqs``
sequences at context ``tokens``, and the prefill of ``seqs`` x ``tokens`` tokens; one timing cache,
so ops that plans share are timed once) and both steps are timed as CUDA-graph replays (kernel time:
the runtime replays graphs; eager launches of ~1000 nodes would hide the difference). The logits of
the prefill are compared with the bf16 graph run with every op's reference (relative error); the bf16
row's own error (autotuned kernels against reference ops) is the floor that rounding alone gives, which
a random-weight 32-layer model amplifies far more than a trained one (accuracy is measured on a real
model by bench/quant_accuracy.py). "vs own ref" compares each plan's kernels with the same plan run
with every op's reference: that the GPU tactics compute what the plan says.
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

from workbench.graph.executor import Program  # noqa: E402
from workbench.kernels.autotune import TimingCache, autotune_profile, step_inputs  # noqa: E402
from workbench.kernels.profiles import OptimizationProfile  # noqa: E402
from workbench.models.intake import ModelSource, resolve_source  # noqa: E402
from workbench.pipeline import optimize  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.quant import PrecisionPlan, calibrate, quantized_program  # noqa: E402

PLANS = {
    "bf16": ("bf16", {}, {}),
    "fp8": ("fp8", {}, {}),
    "fp8-unfused": ("fp8", {}, {"fuse_producers": False}),
    "fp8-dynamic": ("fp8", {"activations": "dynamic"}, {}),
    "fp8+kv": ("fp8", {"kv_cache": "fp8"}, {}),
    "int8_wo": ("int8_wo", {}, {}),
    "int8_sq": ("int8_sq", {"alpha": 0.5}, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, help="the preset with this many layers: a quick check of the kernels "
                    "(vs own ref) where a random-weight model amplifies rounding far less than at 32 layers")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=None, help="autotune only the cost model's best k configs per tactic")
    ap.add_argument("--no-autotune", action="store_true", help="Triton tactics for fused ops and attention, "
                    "_scaled_mm / _int_mm for the quantized GEMMs, cuBLAS for bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", type=Path, help="timing cache file (default: a fresh one next to --out or in /tmp)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    plans = args.plans.split(",")
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        ap.error(f"unknown plan {unknown[0]!r}; plans are {', '.join(PLANS)}")
    device, start = args.device, time.perf_counter()
    cuda = device.startswith("cuda")

    source = resolve_source(args.preset)
    if args.layers:
        source = ModelSource("random", f"{args.preset}, {args.layers} layers", None,
                             {**source.config, "num_hidden_layers": args.layers}, source.seed)
    program = optimize(source, dtype="bfloat16", device=device).program  # the weights read straight onto device
    graph = program.graph
    vocab = graph.meta["config"]["vocab_size"]
    calib_ids = torch.randint(0, vocab, (args.calib_samples * args.tokens,), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    stats = calibrate(program, calib_ids, samples=args.calib_samples, seq_len=args.tokens, progress=False)
    calib_s = time.perf_counter() - t0

    total = args.seqs * args.tokens
    profile = OptimizationProfile(max_tokens=total, max_seqs=args.seqs, context=args.tokens,
                                  max_context=args.tokens + 1, prefill_len=args.tokens, edges=(args.seqs, total))
    decode_in = step_inputs(program, profile.step(args.seqs))
    prefill_in = step_inputs(program, profile.step(total))
    cache_path = args.cache or ((args.out.parent if args.out else Path("/tmp")) / "quant_speed_timings.json")
    cache = TimingCache.open(cache_path, reset=args.cache is None) if cuda and not args.no_autotune else None
    fixed = {"workbench.fp8_linear": "scaled_mm", "workbench.int8_linear": "int_mm", "workbench.w8_linear": "triton",
             **{op: "triton" for op in ("workbench.rms_norm", "workbench.add_rms_norm", "workbench.silu_mul",
                                        "workbench.rope", "workbench.paged_attention", "workbench.rms_norm_fp8",
                                        "workbench.add_rms_norm_fp8", "workbench.silu_mul_fp8")}}

    with torch.no_grad():  # the bf16 graph with every op's reference: what each plan's logits are compared with
        (ref_logits,) = program.run(**prefill_in)
    ref_logits = ref_logits.float()
    rows = []
    for name in plans:
        fmt, plan_opts, apply_opts = PLANS[name]
        plan = PrecisionPlan.uniform(graph, fmt, **plan_opts)
        kv = plan.kv_cache
        q = program if name == "bf16" else quantized_program(program, plan, stats, **apply_opts)
        t0 = time.perf_counter()
        if cache is not None:
            run = q.with_choices(autotune_profile(q, profile, cache, progress=False, top_k=args.top_k))
        elif cuda:
            run = Program(q.graph, q.params, device=device, tactics=fixed)
        else:
            run = q
        tune_s = time.perf_counter() - t0
        # inputs on this plan's cache dtype (an FP8 KV cache is float8)
        d_in = decode_in if kv == "bf16" else step_inputs(q, profile.step(args.seqs))
        p_in = prefill_in if kv == "bf16" else step_inputs(q, profile.step(total))
        with torch.no_grad():
            (logits,) = run.run(**p_in)
            (own,) = q.run(**p_in)  # this plan with every op's reference: do the kernels compute the plan?
        logits, own = logits.float(), own.float()
        err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        kernel_err = ((logits - own).norm() / own.norm()).item()
        calls = 1 if cuda else 0
        prefill = time_fn(lambda: run.run(**p_in), repeats=args.repeats, device=device, graph_calls=calls)
        decode = time_fn(lambda: run.run(**d_in), repeats=args.repeats, device=device, graph_calls=calls)
        rows.append({"plan": name, "prefill_ms": prefill.median_ms, "decode_ms": decode.median_ms,
                     "prefill_method": prefill.method, "decode_method": decode.method,
                     "prefill_spread": prefill.spread(), "decode_spread": decode.spread(), "rel_err": err,
                     "kernels_vs_reference": kernel_err,
                     "tune_s": tune_s, "ops": sorted({n.op for n in q.graph.nodes if n.op.startswith("workbench.")})})
        print(f"{name}: prefill {prefill.median_ms:.3f} ms ({prefill.method}), decode {decode.median_ms:.3f} ms "
              f"({decode.method}), logits rel err vs bf16 reference ops {err:.3e}, vs this plan's reference ops "
              f"{kernel_err:.3e}, tuned in {tune_s:.0f} s", flush=True)
        del run, q, logits, own
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    base = next((r for r in rows if r["plan"] == "bf16"), rows[0])
    result = {"gpu": gpu, "torch": torch.__version__, "preset": source.spec, "seqs": args.seqs, "tokens": args.tokens,
              "calibration_s": calib_s, "autotuned": cache is not None, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{gpu}, torch {torch.__version__}: {source.spec} graph, random bf16 weights; prefill {args.seqs} x "
          f"{args.tokens} tokens, decode step of {args.seqs} sequences at context {args.tokens}; "
          f"{'autotuned' if cache is not None else 'fixed tactics' if cuda else 'reference ops'}; {time.perf_counter() - start:.0f} s")
    print(f"{'plan':<14} {'prefill ms':>11} {'vs ' + base['plan']:>9} {'decode ms':>10} {'vs ' + base['plan']:>9} "
          f"{'rel err vs bf16 ref':>20} {'vs own ref':>11}")
    for r in rows:
        print(f"{r['plan']:<14} {r['prefill_ms']:>11.3f} {base['prefill_ms'] / r['prefill_ms']:>8.3f}x "
              f"{r['decode_ms']:>10.3f} {base['decode_ms'] / r['decode_ms']:>8.3f}x {r['rel_err']:>20.2e} {r['kernels_vs_reference']:>11.2e}")


if __name__ == "__main__":
    main()
