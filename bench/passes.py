"""The optimized graph (all passes, reference ops) against the captured graph and transformers, same process.

    python bench/passes.py --preset llama-3-8b --seqs 4 --tokens 512

Captures the preset on the meta device, runs the whole pass pipeline with its
numeric checks on the GPU, then times, with CUDA events (median of repeats):

  prefill  ``seqs`` prompts of ``tokens`` tokens: transformers eager on [seqs, tokens], the
           captured graph on the same, and the optimized graph on one flat batch of
           seqs × tokens tokens through the paged KV cache;
  decode   one new token for each of the ``seqs`` sequences after that prefill: transformers
           with its KV cache (cropped back after each call), and the optimized graph with
           the paged cache.

The optimized graph runs twice: with every fused op's PyTorch reference, and with
the Triton tactics where an op has one (RMSNorm, add+RMSNorm, SwiGLU, RoPE, paged
attention; the GEMMs are cuBLAS through torch either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.graph.executor import Program, resolve_params  # noqa: E402
from workbench.graph.paged import PagedLayout, cache_for, is_paged  # noqa: E402
from workbench.graph.passes import run_passes, summary_table  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.pipeline import CaptureOptions, capture_source  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune", type=Path, metavar="CACHE.json",
                    help="also autotune the optimized graph for a profile whose buckets hold the prefill and decode "
                         "steps (timing cache written here)")
    ap.add_argument("--fp32-check", action="store_true",
                    help="after timing, compare both bf16 optimized runs with an fp32 run of the same weights")
    args = ap.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)

    lm = load_model(args.preset, dtype=dtype, device=device)
    model = lm.model
    captured = capture_source(lm.source, CaptureOptions(dtype=args.dtype))
    base = {**dict(model.named_parameters(remove_duplicate=False)),
            **{k: v.to(device) for k, v in captured.constants.items()}}
    t0 = time.perf_counter()
    graph, reports = run_passes(captured.graph, base, device=device)
    passes_s = time.perf_counter() - t0
    table = summary_table(reports)
    before = Program(captured.graph, resolve_params(captured.graph, base), device=device)
    optimized_params = resolve_params(graph, base)
    after = Program(graph, optimized_params, device=device)
    after_triton = Program(graph, optimized_params, device=device, tactics="triton")

    vocab = graph.meta["config"]["vocab_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (args.seqs, args.tokens), device=device, generator=gen)
    pos = torch.arange(args.tokens, device=device).expand(args.seqs, -1).contiguous()
    prompts = [(i, ids[i].tolist()) for i in range(args.seqs)]
    paged = is_paged(graph)
    blocks = args.seqs * PagedLayout.from_graph(graph).blocks_for(args.tokens + 1) if paged else 0

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        cap = before(ids, pos)
        if paged:
            cache = cache_for(graph, num_blocks=blocks, device=device)
            prefill_inputs = cache.step_inputs(prompts)
            (opt,) = after.run(**prefill_inputs)
            opt = opt.reshape(args.seqs, args.tokens, -1)
            (opt_triton,) = after_triton.run(**prefill_inputs)
            opt_triton = opt_triton.reshape(args.seqs, args.tokens, -1)
            decode_inputs = cache.step_inputs([(i, [int(ids[i, -1])]) for i in range(args.seqs)])
        else:
            opt = after(ids, pos)
    errors = {"captured_vs_transformers": rel(cap, ref), "optimized_vs_captured": rel(opt, cap),
              "optimized_vs_transformers": rel(opt, ref)}
    if paged:
        errors["triton_tactics_vs_optimized"] = rel(opt_triton, opt)
    del ref, cap

    def hf_prefill():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    prefill = {"transformers eager": time_fn(hf_prefill, repeats=args.repeats, device=device),
               "captured graph": time_fn(lambda: before(ids, pos), repeats=args.repeats, device=device)}
    decode = {}
    if paged:
        prefill["optimized graph (paged)"] = time_fn(lambda: after.run(**prefill_inputs), repeats=args.repeats,
                                                     device=device)
        prefill["optimized + Triton tactics"] = time_fn(lambda: after_triton.run(**prefill_inputs),
                                                          repeats=args.repeats, device=device)
        tuned = None
        if args.autotune:
            from workbench.kernels.autotune import TimingCache, autotune_profile
            from workbench.kernels.profiles import OptimizationProfile

            # buckets whose representative steps are this benchmark's decode step (seqs x 1 token at
            # context `tokens`) and prefill (seqs x `tokens` new tokens), with two buckets between
            total = args.seqs * args.tokens
            edges = tuple(sorted({args.seqs, *(e for e in (64, 512) if args.seqs < e < total), total}))
            profile = OptimizationProfile(max_tokens=total, max_seqs=max(args.seqs, 64), context=args.tokens,
                                          max_context=args.tokens + 1, prefill_len=args.tokens, edges=edges)
            t0 = time.perf_counter()
            tuned_choices = autotune_profile(after, profile, TimingCache.open(args.autotune, reset=True),
                                             progress=False)
            tune_s = time.perf_counter() - t0
            tuned = after.with_choices(tuned_choices)
            picked = {}
            for node, (tactic, config) in tuned_choices.choices[-1].items():
                op = graph.node(node).op.removeprefix("workbench.")
                picked.setdefault(f"{op}: {tactic} {config or ''}", 0)
                picked[f"{op}: {tactic} {config or ''}"] += 1
            print(f"autotuned {len(edges)} buckets {edges} in {tune_s:.1f}s; prefill bucket's choices (nodes): "
                  + "; ".join(f"{k} x{v}" for k, v in picked.items()))
            prefill["optimized + autotuned"] = time_fn(lambda: tuned.run(**prefill_inputs), repeats=args.repeats,
                                                       device=device)
        with torch.no_grad():
            kv = model(input_ids=ids, position_ids=pos, use_cache=True).past_key_values
        nxt, npos = ids[:, -1:], torch.full((args.seqs, 1), args.tokens, device=device)

        def hf_decode():
            with torch.no_grad():
                out = model(input_ids=nxt, position_ids=npos, past_key_values=kv, use_cache=True).logits
            kv.crop(-1)  # drop the token just appended, so every call decodes at the same length
            return out

        decode = {"transformers eager (KV cache)": time_fn(hf_decode, repeats=args.repeats, device=device),
                  "optimized graph (paged)": time_fn(lambda: after.run(**decode_inputs), repeats=args.repeats,
                                                     device=device),
                  "optimized + Triton tactics": time_fn(lambda: after_triton.run(**decode_inputs),
                                                          repeats=args.repeats, device=device)}
        if tuned is not None:
            decode["optimized + autotuned"] = time_fn(lambda: tuned.run(**decode_inputs), repeats=args.repeats,
                                                      device=device)
        # the whole step captured in one CUDA graph and replayed: what the runtime's CUDA graphs will give
        # (the runtime issue), shown here so the launch overhead above is seen for what it is
        for label, prog in (("Triton tactics", after_triton), ("autotuned", tuned)):
            if prog is not None:
                t = time_fn(lambda prog=prog: prog.run(**decode_inputs), repeats=args.repeats, device=device,
                            graph_calls=1)
                decode[f"optimized + {label}, CUDA graph" + ("" if t.method == "cuda_graph" else " (not captured)")] = t

    if args.fp32_check and paged and args.dtype != "float32":
        # Both bf16 optimized runs (reference ops, Triton tactics) against fp32 on the same weights, and the
        # Triton tactics in fp32 too: tells bf16 rounding apart from a wrong kernel at full size.
        # Memory: free the bf16 programs and the model first; the fp32 graph holds 4 bytes per weight.
        del before, after, after_triton, optimized_params, model, lm, tuned
        base32 = {k: v.float() for k, v in base.items()}
        del base
        torch.cuda.empty_cache()
        graph32, _ = run_passes(capture_source(load_model(args.preset, materialize=False).source).graph, {},
                                check=False)
        params32 = resolve_params(graph32, base32)
        del base32
        inputs32 = cache_for(graph32, num_blocks=blocks, device=device).step_inputs(prompts)
        with torch.no_grad():
            (out32,) = Program(graph32, params32, device=device).run(**inputs32)
            out32 = out32.reshape(args.seqs, args.tokens, -1)
            inputs32 = cache_for(graph32, num_blocks=blocks, device=device).step_inputs(prompts)
            (tri32,) = Program(graph32, params32, device=device, tactics="triton").run(**inputs32)
            tri32 = tri32.reshape(args.seqs, args.tokens, -1)
        errors.update({"bf16_reference_ops_vs_fp32": rel(opt, out32), "bf16_triton_vs_fp32": rel(opt_triton, out32),
                       "fp32_triton_vs_fp32_reference_ops": rel(tri32, out32)})
        del out32, tri32, params32
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype,
              "seqs": args.seqs, "tokens": args.tokens, "nodes_captured": len(captured.graph.nodes),
              "nodes_optimized": len(graph.nodes), "passes_s": passes_s, "errors": errors,
              "passes": table.to_dict(orient="records"),
              "prefill_ms": {k: t.median_ms for k, t in prefill.items()},
              "decode_ms": {k: t.median_ms for k, t in decode.items()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(table.drop(columns=["first_diverging"]).to_string(index=False))
    print(f"\n{gpu}, torch {torch.__version__}: {args.preset} {args.dtype}; graph {len(captured.graph.nodes)} -> "
          f"{len(graph.nodes)} nodes, passes with checks {passes_s:.1f}s")
    print("logits rel. error: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for title, timings, baseline in (("prefill", prefill, "transformers eager"),
                                     ("decode step", decode, "transformers eager (KV cache)")):
        if not timings:
            continue
        base_ms = timings[baseline].median_ms
        print(f"\n{title} ({args.seqs} x {args.tokens if title == 'prefill' else 1} tokens)")
        print(f"{'impl':<44} {'median ms':>10} {'spread':>7} {'vs transformers':>16}")
        for k, t in timings.items():
            print(f"{k:<44} {t.median_ms:>10.2f} {t.spread():>7.1%} {base_ms / t.median_ms:>15.3f}x")


if __name__ == "__main__":
    main()
