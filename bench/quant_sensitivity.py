"""Where the FP8 (or any format's) perplexity cost comes from on a real model, and the auto plan within a budget.

    python3 bench/quant_sensitivity.py                       # SmolLM2-135M-Instruct, FP8, +1.5% budget (~30 min, 2 cores)
    python3 bench/quant_sensitivity.py --formats fp8,int8_sq --budget 1.0 --out /tmp/sens

1. Calibrate as bench/quant_accuracy.py does (datasets/calibration.txt).
2. Sensitivity: quantize ONE linear group at a time (every qkv/o/gate_up/down and lm_head) and measure the
   perplexity change and KL on a probe: the first ``--probe-tokens`` tokens of datasets/evaluation.txt
   (windows of 256, stride 128). Printed: the most sensitive groups, and the sum of single-group changes
   per kind of group and per block of layers - the answer to "which layers make the uniform plan miss?".
3. On the whole evaluation set (window 512, stride 256, as bench/quant_accuracy.py): the uniform plan, the
   uniform plan with the k most sensitive groups kept in bf16 for a few k, and ``auto_plan`` at
   ``--budget`` % (its rounds are verified on the whole set, not on the probe).

With ``--out DIR`` the report (sensitivity.json, loadable with SensitivityReport.load), the plans and a
results.json are written there; ``--report`` reuses a saved report instead of measuring again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant_accuracy import calibrated_model  # noqa: E402  (bench/, the script's directory)
from workbench.quant import PrecisionPlan  # noqa: E402
from workbench.quant.auto_plan import auto_plan  # noqa: E402
from workbench.quant.probe import evaluate_plan, reference_logits  # noqa: E402
from workbench.quant.sensitivity import SensitivityReport, sensitivity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", default="fp8", help="comma-separated formats for the sensitivity sweep")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--observer", default="max")
    ap.add_argument("--probe-tokens", type=int, default=1280)
    ap.add_argument("--budget", type=float, default=1.5, help="auto plan's perplexity budget in %%")
    ap.add_argument("--keep", default="5,10,20", help="k values: uniform plan with the k worst groups in bf16")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--report", type=Path, help="a saved sensitivity.json to reuse")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    formats = args.formats.split(",")
    start = time.perf_counter()
    graph, program, stats, ids = calibrated_model(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    if args.report:
        report = SensitivityReport.load(args.report)
        report.check_model(graph)
        print(f"sensitivity: reusing {args.report}")
    else:
        t = time.perf_counter()
        report = sensitivity(program, stats, ids[:args.probe_tokens], formats=formats)
        print(f"sensitivity: {len(report.groups)} groups x {len(formats)} formats on {args.probe_tokens} tokens "
              f"in {time.perf_counter() - t:.0f} s (probe perplexity {report.base_ppl:.4f})")
        if args.out:
            report.save(args.out / "sensitivity.json")
    frame = report.frame
    results: dict = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, "formats": {}}

    base = reference_logits(program, ids, window=args.window, stride=args.stride)
    print(f"unquantized: perplexity {base.ppl:.4f} over {ids.numel()} tokens")
    for fmt in formats:
        rows = frame[frame["format"] == fmt].sort_values("ppl_delta_pct", ascending=False)
        print(f"\n== {fmt}: single-group perplexity change on the probe (sum over all groups "
              f"{rows['ppl_delta_pct'].sum():+.2f}%, positive only {rows['ppl_delta_pct'].clip(lower=0).sum():+.2f}%)")
        print(f"{'group':<22} {'ppl change':>11} {'KL':>10}")
        for r in rows.head(12).to_dict("records"):
            print(f"{r['group']:<22} {r['ppl_delta_pct']:>+10.3f}% {r['kl']:>10.5f}")
        by_kind = rows.groupby("kind")["ppl_delta_pct"].agg(["sum", "max"]).sort_values("sum", ascending=False)
        print("by kind (sum / max of single-group changes, %): "
              + ", ".join(f"{k} {v['sum']:+.2f}/{v['max']:+.2f}" for k, v in by_kind.iterrows()))
        layered = rows[rows["layer"].notna()]
        layer = layered["layer"].astype(int)
        block = max(1, (int(layer.max()) + 1) // 6)
        by_block = layered.groupby(layer // block)["ppl_delta_pct"].sum()
        print("by layers (sum, %): " + ", ".join(f"{int(b) * block}-{int(b) * block + block - 1} {v:+.2f}"
                                                for b, v in by_block.items()))

        whole = []
        uniform = PrecisionPlan.uniform(graph, fmt)
        worst = [g for g in rows["group"] if uniform.format_of(g) == fmt]
        for k in [0] + [int(k) for k in args.keep.split(",") if k]:
            plan = uniform
            for g in worst[:k]:
                plan = plan.with_format(g, "bf16")
            r = evaluate_plan(program, plan, stats, ids, window=args.window, stride=args.stride, base_logits=base)
            whole.append({"plan": f"uniform {fmt}" + (f", {k} worst groups bf16" if k else ""), "kept": worst[:k],
                          **r})
            print(f"{whole[-1]['plan']}: {r['ppl']:.4f} ({r['ppl_delta_pct']:+.2f}%, KL {r['kl']:.5f})", flush=True)
        sub = SensitivityReport(frame[frame["format"].isin([fmt, "bf16"])].reset_index(drop=True), report.base_ppl,
                                [fmt], report.model, report.window, report.stride, report.tokens)
        t = time.perf_counter()
        plan, info = auto_plan(sub, program, stats, ids, budget_pct=args.budget, window=args.window,
                               stride=args.stride)
        bf16 = [g for g, v in plan.groups.items() if v["format"] == "bf16" and g != "lm_head"]
        whole.append({"plan": f"auto +{args.budget:g}%", "bf16_groups": bf16, "rounds": info["rounds"],
                      "ppl": info["ppl"], "ppl_delta_pct": info["ppl_delta_pct"], "kl": info["kl"],
                      "history": [{k: v for k, v in h.items() if k != "quantized"} for h in info["history"]]})
        print(f"auto plan +{args.budget:g}%: {info['ppl']:.4f} ({info['ppl_delta_pct']:+.2f}%) after {info['rounds']} "
              f"verified rounds, {time.perf_counter() - t:.0f} s; {len(bf16)} groups kept in bf16: {', '.join(bf16)}")
        if args.out:
            (args.out / f"auto_{fmt}.json").write_text(plan.dumps())
        results["formats"][fmt] = whole
    results["base_ppl"] = base.ppl
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    print(f"\n{args.model} on {args.device}; calibration {args.samples} x {args.seq_len}, observer {args.observer}; "
          f"evaluation {ids.numel()} tokens, window {args.window}, stride {args.stride}; lm_head bf16 except where "
          f"the auto plan chose; {time.perf_counter() - start:.0f} s")
    print(f"{'plan':<44} {'perplexity':>10} {'vs unquantized':>15} {'KL':>9}")
    print(f"{'unquantized':<44} {base.ppl:>10.4f} {0:>+14.2f}% {0:>9.5f}")
    for fmt, whole in results["formats"].items():
        for r in whole:
            print(f"{r['plan']:<44} {r['ppl']:>10.4f} {r['ppl_delta_pct']:>+14.2f}% {r['kl']:>9.5f}")


if __name__ == "__main__":
    main()
