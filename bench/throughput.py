"""The runtime end to end, as a user runs it: an engine that ``workbench build`` made, through ``LLM``, against
transformers in the same process: batch-1 decode, offline throughput, latency under load.

    python3 bench/throughput.py --engine engine/ --cases batch1,offline --requests 1000 --shapes 1000x1000,128x128 \
        --out $OUT/throughput.json
    python3 bench/throughput.py --preset llama-3-8b --precision fp8 --kv-cache fp8 --build-args "--kv-block-size 64" \
        --cases offline --shapes 1000x1000 --requests 1000           # builds the engine first with `workbench build`

Nothing here picks kernels or tactics: the engine runs its build's tuned choices (the product's GPU defaults where
they do not apply), as ``LLM(engine)`` does. ``--max-num-seqs``, ``--max-num-batched-tokens`` and
``--memory-fraction`` are ``LLM``'s own arguments (default: the engine's limits and ``LLM``'s fraction); each
offline shape also runs ``LLM(engine)`` with no arguments at all ("user path", same prompts) and prints its ratio
to the row above. Without ``--engine``, ``workbench build PRESET --precision P --kv-cache K BUILD_ARGS`` makes one
(``--layers`` keeps that many decoder layers through a config.json). Cases (``--cases``):

  batch1    one request, ``--batch1-len`` prompt and output tokens: decode tokens/s (first token excluded), its
            share of the HBM roofline (weight bytes per token / the copy ceiling measured here, the best of several
            sizes) and of the spec sheet's bandwidth; the replayed graph alone; the synchronous engine and the eager
            executor (their tokens compared); transformers' ``generate`` on the same prompt
  offline   ``--requests`` requests of each of ``--shapes`` (input x output tokens; ``128x128:5000`` gives a shape
            its own request count) submitted at once to ``LLM.generate``: output tokens/s; transformers' ``generate``
            on the first ``--hf-requests`` prompts as one static batch
  check     the step graphs against eager steps on the GPU: 32 prompts of 300 tokens (prompt chunks beside
            decodes), greedy; the first tokens (from steps with prompt chunks) must agree, and their
            log-probabilities' largest difference is printed
  load      ``--load-requests`` requests of ``--load-len`` tokens arriving as a Poisson process at each of
            ``--rates`` requests/s: TTFT and time per output token (p50/p90/p99), output tokens/s

Random token ids (speed does not depend on their values); every request runs to its output length (EOS ignored).
Each offline run's step timeline is written next to ``--out`` (CSV).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench import LLM  # noqa: E402
from workbench.cli import main as workbench_main  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.profiling.ceilings import copy_gbps, spec_sheet_gbps  # noqa: E402
from workbench.runnable import open_runnable  # noqa: E402
from workbench.runtime.engine import LLMEngine  # noqa: E402
from workbench.runtime.sampling import SamplingParams  # noqa: E402


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def free(device) -> None:
    """Give back what dropped engines held: Python's garbage, then the CUDA allocator's cache."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def percentiles(values, qs=(50, 90, 99)):
    if not values:
        return {f"p{q}": None for q in qs}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(t, q / 100)) for q in qs}


def parse_shape(spec: str, requests: int) -> tuple[int, int, int]:
    """``INxOUT`` or ``INxOUT:REQUESTS`` (an offline shape with its own request count) -> (in, out, requests)."""
    lengths, _, count = spec.partition(":")
    n_in, n_out = (int(x) for x in lengths.split("x"))
    return n_in, n_out, int(count) if count else requests


def read_weights(program) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: every parameter but the embedding table (one row of it is read);
    a table that lm_head also reads (tied) counts, once."""
    read = {r for node in program.graph.nodes if node.op not in ("aten.embedding.default", "embedding")
            for r in node.refs()}
    params = [p for name, p in program.params.items() if name in read]
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def eager_steps(steps) -> int:
    """Steps of a timeline that ran node by node rather than in a CUDA graph."""
    return int(((steps["graph_tokens"] == 0) & (steps["scheduled"] > 0)).sum())


def step_kinds(steps) -> dict[str, dict[str, float]]:
    """Where a run's time went, from its timeline: decode-only steps and steps with prompt tokens, each as
    count, mean and total milliseconds, and mean decode (and prompt) tokens per step."""
    out = {}
    for kind, rows in (("decode", steps[steps["prefill_tokens"] == 0]), ("prompt", steps[steps["prefill_tokens"] > 0])):
        some = len(rows) > 0
        out[kind] = {"steps": int(len(rows)), "mean_ms": float(rows["step_ms"].mean()) if some else 0.0,
                     "total_s": float(rows["step_ms"].sum() / 1e3),
                     "decode_tokens": float(rows["decode_tokens"].mean()) if some else 0.0,
                     "prefill_tokens": float(rows["prefill_tokens"].mean()) if some else 0.0}
    return out


def make_engine(opened, *, llm: dict, engine_options: dict):
    """The runtime of ``LLM(opened, **llm)`` (when ``engine_options`` is empty: the user's path itself), or an
    ``LLMEngine`` with the same program, limits and cache sizing plus ``engine_options`` (diagnostic variants:
    synchronous scheduling, no CUDA graphs, eager prompt-chunk steps)."""
    if not engine_options:
        return LLM(opened, **llm).engine
    limits = opened.limits.narrowed(fixed=True, **{k: llm[k] for k in ("max_num_seqs", "max_num_batched_tokens")
                                                   if k in llm})
    return LLMEngine(opened.program, opened.tokenizer, limits=limits,
                     **{k: v for k, v in llm.items() if k == "memory_fraction"}, **engine_options)


def run_engine(opened, prompts, output_len, *, llm, device, timeline=None, keep=False, **engine_options):
    """All prompts submitted at once, run to completion as ``LLM.generate`` does: times, tokens, steps, the engine."""
    engine = make_engine(opened, llm=llm, engine_options=engine_options)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished:
        engine.step(finished_only=True)  # LLM.generate's loop: no output copies for requests still running
    sync(device)
    end = time.perf_counter()
    outs = [engine.output(str(i)) for i in range(len(prompts))]
    first = min(o.metrics["first_token_time"] for o in outs)
    steps = engine.timeline()
    if timeline is not None:
        steps.to_csv(timeline, index=False)
    result = {"seconds": end - t0, "first_token_s": first - t0, "generated": sum(len(o.token_ids) for o in outs),
              "steps": len(steps), "preempted": int(steps["preempted"].sum()), "replays": engine.executor.replays,
              "eager_steps": eager_steps(steps), "step_kinds": step_kinds(steps),
              "max_running": int(steps["running"].max()), "num_blocks": engine.scheduler.bm.num_blocks,
              "tokens": [o.token_ids for o in outs], "logprobs": [o.logprobs for o in outs]}
    if not keep:
        del engine
        free(device)
        return result, None
    return result, engine


def run_load(opened, prompts, output_len, rate, *, llm, device, seed=0, **engine_options):
    """Requests arriving as a Poisson process at ``rate`` per second; per-request TTFT and time per output
    token (from the arrival time each request was due, so queueing counts)."""
    engine = make_engine(opened, llm=llm, engine_options=engine_options)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in prompts]
    sync(device)
    t0 = time.perf_counter()
    due, t = [], t0
    for g in gaps:
        t += g
        due.append(t)
    added = 0
    while added < len(prompts) or engine.has_unfinished:
        now = time.perf_counter()
        while added < len(prompts) and due[added] <= now:
            engine.add_request(str(added), prompts[added], params, arrival=due[added])
            added += 1
        if engine.has_unfinished:
            engine.step()
        elif added < len(prompts):
            time.sleep(max(0.0, due[added] - time.perf_counter()))
    sync(device)
    end = time.perf_counter()
    outs = [engine.output(str(i)) for i in range(len(prompts))]
    ttft = [(o.metrics["first_token_time"] - o.metrics["arrival"]) * 1e3 for o in outs]
    tpot = [(o.metrics["finished_time"] - o.metrics["first_token_time"]) * 1e3 / (len(o.token_ids) - 1)
            for o in outs if len(o.token_ids) > 1]
    generated = sum(len(o.token_ids) for o in outs)
    steps = engine.timeline()
    return {"rate": rate, "seconds": end - t0, "generated": generated, "tps": generated / (end - t0),
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot),
            "preempted": int(steps["preempted"].sum()), "max_running": int(steps["running"].max()),
            "eager_steps": eager_steps(steps)}


def run_hf(model, prompts, output_len, device):
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False,  # warm up
                       attention_mask=torch.ones_like(ids[:, :8]))
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        sync(device)
    return {"seconds": time.perf_counter() - t0, "generated": (out.shape[1] - ids.shape[1]) * ids.shape[0],
            "requests": len(prompts)}


def run_hf_fresh(source, prompts, output_len, device):
    """``run_hf`` on the transformers model of ``source`` built again (same seed, same weights), freed
    afterwards: the engine's KV cache needs the memory."""
    model = load_model(source, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       device=device).model
    try:
        return run_hf(model, prompts, output_len, device)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache() if device.startswith("cuda") else None


def engine_for(args, device) -> tuple[Path, float | None]:
    """``--engine``, or the engine ``workbench build`` makes of ``--preset`` (its seconds)."""
    if args.engine:
        return args.engine, None
    spec = args.preset
    out = Path(args.engine_dir or f"/tmp/throughput_{args.preset}_{args.precision}_{args.kv_cache}")
    if args.layers:  # the preset with fewer decoder layers, as a config.json the build takes
        from workbench.models.presets import PRESETS

        spec = str(out.with_name(out.name + "_config.json"))
        Path(spec).write_text(json.dumps({**PRESETS[args.preset], "num_hidden_layers": args.layers}))
    t0 = time.perf_counter()
    argv = ["build", spec, "--precision", args.precision, "--kv-cache", args.kv_cache, "--out", str(out),
            "--device", device, *shlex.split(args.build_args)]
    print("workbench " + " ".join(argv), flush=True)
    if workbench_main(argv) != 0:
        sys.exit("throughput: workbench build failed (its error is above)")
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, help="the engine directory to run (default: build one of --preset)")
    ap.add_argument("--preset", default="llama-3-8b", help="without --engine: the model `workbench build` takes")
    ap.add_argument("--layers", type=int, help="without --engine: keep only this many decoder layers")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "int8", "auto"))
    ap.add_argument("--kv-cache", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--build-args", default="", help="more `workbench build` arguments, e.g. \"--kv-block-size 64\"")
    ap.add_argument("--engine-dir", help="where the built engine goes (default: /tmp/throughput_PRESET_...)")
    ap.add_argument("--cases", default="batch1,offline")
    ap.add_argument("--batch1-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--shapes", default="128x128",
                    help="offline: input x output lengths, comma-separated; INxOUT:N runs N requests of that shape")
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--hf-max-len", type=int, default=10_000, help="skip transformers for longer outputs")
    ap.add_argument("--rates", default="4,16,64")
    ap.add_argument("--load-requests", type=int, default=200)
    ap.add_argument("--load-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, help="LLM's max_num_seqs (default: the engine's)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="LLM's max_num_batched_tokens (default: the engine's)")
    ap.add_argument("--memory-fraction", type=float, help="LLM's memory_fraction (default: LLM's)")
    ap.add_argument("--no-user-path", action="store_true", help="offline: skip the LLM(engine) row with no arguments")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--compare-eager-steps", action="store_true",
                    help="offline and load: also run steps with prompt chunks eagerly (the ratio's baseline)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    device = args.device
    cuda = device.startswith("cuda")
    t_start = time.perf_counter()
    engine_dir, build_s = engine_for(args, device)
    opened = open_runnable(engine_dir, device=device)
    program, source = opened.program, opened.source
    graph = program.graph
    llm = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("max_num_batched_tokens",
                                                                     args.max_num_batched_tokens),
                             ("memory_fraction", args.memory_fraction)) if v is not None}
    limits = opened.limits.narrowed(fixed=True, **{k: llm[k] for k in ("max_num_seqs", "max_num_batched_tokens")
                                                   if k in llm})
    weight_bytes, _ = read_weights(program)
    vocab = graph.meta["config"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    tuning = opened.engine.tuning if opened.engine is not None else None
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "engine": str(engine_dir), "model": source.spec if source else None, "build_s": build_s,
              "tuning": tuning, "limits": limits.to_json(), "args": {k: str(v) for k, v in vars(args).items()},
              "weight_bytes": weight_bytes, "notes": opened.notes}
    rows = []  # (case, workbench, transformers, note)
    ceiling = copy_gbps(device) if cuda else None
    spec = spec_sheet_gbps(device) if cuda else None
    roofline_tps = ceiling * 1e9 / weight_bytes if ceiling else None
    result["copy_gbps"], result["spec_sheet_gbps"] = ceiling, spec

    if "batch1" in cases:
        n = args.batch1_len
        prompt = torch.randint(0, vocab, (1, n), generator=g).tolist()
        run_engine(opened, prompt, 4, llm=llm, device=device)  # warm up
        one, engine = run_engine(opened, prompt, n, llm=llm, device=device, keep=True)
        replay_ms = None
        if engine.executor._graphs.get((1, 1)):  # the batch-1 decode graph alone: GPU time per step
            from workbench.profiling import time_fn

            replay_ms = time_fn(engine.executor._graphs[(1, 1)][0].replay, repeats=50, device=device).median_ms
        del engine
        one_sync, _ = run_engine(opened, prompt, n, llm=llm, device=device, async_scheduling=False)
        one_eager, _ = run_engine(opened, prompt, n, llm=llm, device=device, cuda_graphs=False,
                                  async_scheduling=False)
        same = one["tokens"] == one_sync["tokens"] == one_eager["tokens"]

        def tps(r):
            return (r["generated"] - 1) / (r["seconds"] - r["first_token_s"])

        hf = None if args.no_hf else run_hf_fresh(source, prompt, n, device)
        hf_tps = hf["generated"] / hf["seconds"] if hf else None
        result["batch1"] = {"engine_tps": tps(one), "sync_tps": tps(one_sync), "eager_tps": tps(one_eager),
                            "graph_replay_ms": replay_ms, "roofline_tps": roofline_tps, "hf_tps": hf_tps,
                            "tokens_equal": same}
        roof = f"{tps(one) / roofline_tps:.1%} of the HBM roofline ({roofline_tps:.0f} tok/s)" if roofline_tps else ""
        if roofline_tps and spec:  # the spec sheet's bandwidth, which no copy reaches: for comparison only
            roof += f"; {tps(one) * weight_bytes / 1e9 / spec:.1%} of the spec sheet's {spec / 1e3:.2f} TB/s"
        rows.append(("batch-1 decode, tok/s", tps(one), hf_tps, roof))
        if replay_ms:
            rows.append(("  the decode graph replayed alone, tok/s", 1e3 / replay_ms, None,
                         f"{1e3 / replay_ms / roofline_tps:.1%} of the roofline; step {1e3 / tps(one):.2f} ms, "
                         f"replay {replay_ms:.2f} ms"))
        rows.append(("  synchronous scheduling, tok/s", tps(one_sync), hf_tps,
                     f"host adds {1e3 / tps(one_sync) - (replay_ms or 0):.2f} ms a step" if replay_ms else ""))
        rows.append(("  eager executor (no CUDA graphs), tok/s", tps(one_eager), hf_tps,
                     f"tokens equal across the three: {same}"))

    if "check" in cases:  # step graphs against eager steps, on this GPU's kernels
        prompts = torch.randint(0, vocab, (32, 300), generator=g).tolist()
        check = {**llm, "max_num_batched_tokens": min(1024, limits.max_num_batched_tokens)}
        graphs, _ = run_engine(opened, prompts, 16, llm=check, device=device)
        eager, _ = run_engine(opened, prompts, 16, llm=check, device=device, graph_token_sizes=())
        first_same = sum(a[0] == b[0] for a, b in zip(graphs["tokens"], eager["tokens"]))
        all_same = sum(a == b for a, b in zip(graphs["tokens"], eager["tokens"]))
        dlp = max(abs(a[0] - b[0]) for a, b in zip(graphs["logprobs"], eager["logprobs"]))
        result["check"] = {"first_tokens_equal": first_same, "requests_equal": all_same, "max_first_logprob_diff": dlp,
                           "graph_eager_steps": graphs["eager_steps"], "eager_eager_steps": eager["eager_steps"]}
        rows.append(("check: step graphs vs eager steps, first tokens equal", first_same, 32,
                     f"of 32; whole outputs equal {all_same}/32; first log-prob max diff {dlp:.2e}; eager steps "
                     f"{graphs['eager_steps']} (graphs) vs {eager['eager_steps']} (eager)"))

    if "offline" in cases:
        for shape in args.shapes.split(","):
            n_in, n_out, requests = parse_shape(shape, args.requests)
            prompts = torch.randint(0, vocab, (requests, n_in), generator=g).tolist()
            timeline = args.out.with_name(f"timeline_{n_in}_{n_out}.csv") if args.out else None
            run_engine(opened, prompts[:limits.max_num_seqs], 2, llm=llm, device=device)  # warm up
            run_load(opened, prompts[:32], 8, 200.0, llm=llm, device=device)  # odd shapes
            many, _ = run_engine(opened, prompts, n_out, llm=llm, device=device, timeline=timeline)
            many.pop("tokens")
            many_tps = many["generated"] / many["seconds"]
            gc.collect()
            hf = None
            if not args.no_hf and n_out <= args.hf_max_len:
                if cuda:
                    torch.cuda.empty_cache()
                hf = run_hf_fresh(source, prompts[:args.hf_requests], n_out, device)
            hf_tps = hf["generated"] / hf["seconds"] if hf else None
            result.setdefault("offline", {})[shape] = {"engine": many, "engine_tps": many_tps, "hf": hf,
                                                      "hf_tps": hf_tps}
            rows.append((f"offline {requests} x {n_in}/{n_out}, output tok/s", many_tps, hf_tps,
                         f"{many['seconds']:.1f} s, {many['steps']} steps ({many['eager_steps']} eager), up to "
                         f"{many['max_running']} running, {many['preempted']} preemptions"
                         + (f"; transformers: one static batch of {args.hf_requests}" if hf else "")))
            dec, pro = many["step_kinds"]["decode"], many["step_kinds"]["prompt"]
            rows.append(("  where the time went", None, None,
                         f"{dec['steps']} decode-only steps of {dec['decode_tokens']:.0f} tokens, "
                         f"{dec['mean_ms']:.2f} ms each ({dec['total_s']:.1f} s); {pro['steps']} with prompt tokens "
                         f"({pro['prefill_tokens']:.0f} + {pro['decode_tokens']:.0f} decodes), {pro['mean_ms']:.1f} ms "
                         f"each ({pro['total_s']:.1f} s)"))
            if llm and not args.no_user_path:  # LLM(engine) with no arguments: what a user gets
                user, _ = run_engine(opened, prompts, n_out, llm={}, device=device)
                user.pop("tokens"), user.pop("logprobs")
                user_tps = user["generated"] / user["seconds"]
                result["offline"][shape]["user_path"] = user
                rows.append(("  user path: LLM(engine) with no arguments, tok/s", user_tps, many_tps,
                             f"{user['seconds']:.1f} s, up to {user['max_running']} running, {user['preempted']} "
                             f"preemptions, {user['num_blocks']} KV blocks (baseline: the row above)"))
            if args.compare_eager_steps:
                slow, _ = run_engine(opened, prompts, n_out, llm=llm, device=device, graph_token_sizes=())
                slow.pop("tokens")
                slow_tps = slow["generated"] / slow["seconds"]
                result["offline"][shape]["eager_steps_engine"] = {k: v for k, v in slow.items() if k != "logprobs"}
                rows.append(("  vs prompt-chunk steps eager, output tok/s", many_tps, slow_tps,
                             f"{slow['seconds']:.1f} s, {slow['eager_steps']} of {slow['steps']} steps eager"))
            many.pop("logprobs")

    if "load" in cases:
        n = args.load_len
        prompts = torch.randint(0, vocab, (args.load_requests, n), generator=g).tolist()
        run_load(opened, prompts[:32], 8, 200.0, llm=llm, device=device)  # warm up
        result["load"] = []
        modes = [("", {})] + ([("  prompt-chunk steps eager: ", {"graph_token_sizes": ()})]
                              if args.compare_eager_steps else [])
        for rate in (float(r) for r in args.rates.split(",")):
            base = None
            for label, options in modes:
                r = run_load(opened, prompts, n, rate, llm=llm, device=device, **options)
                r["step_graphs"] = not options
                result["load"].append(r)
                t, p = r["ttft_ms"], r["tpot_ms"]
                rows.append((f"{label}load {rate:g} req/s, {args.load_requests} x {n}/{n}: TTFT ms p50",
                             t["p50"], None, f"p90/p99 {t['p90']:.1f} / {t['p99']:.1f}; TPOT ms p50/p90/p99 "
                             f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}; {r['tps']:.0f} output tok/s, up to "
                             f"{r['max_running']} running, {r['eager_steps']} eager steps"))
                base = base or r
            if len(modes) > 1:  # TTFT p99 with step graphs over it with eager prompt-chunk steps
                rows.append((f"  TTFT p99 at {rate:g} req/s, step graphs (ms) vs eager", base["ttft_ms"]["p99"],
                             r["ttft_ms"]["p99"], "ratio < 1: the step graphs cut the tail"))

    result["wall_s"] = time.perf_counter() - t_start
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    precision = (opened.engine.precision or {}) if opened.engine is not None else {}
    formats = sorted({g.get("format") for g in precision.get("groups", {}).values()}) or ["bf16"]
    print(f"\n{result['gpu']}, torch {torch.__version__}: engine {engine_dir} ({source.spec if source else '?'}; "
          f"linears {'/'.join(formats)}, KV cache {limits.kv_cache_dtype} in blocks of {limits.block_size}; "
          f"{weight_bytes / 2**30:.2f} GiB of weights read per step); kernels: "
          f"{'tuned on this GPU' if tuning else 'GPU defaults (not tuned here)'}; LLM({', '.join(f'{k}={v}' for k, v in llm.items()) or 'engine'}): "
          f"max_num_seqs {limits.max_num_seqs}, max_num_batched_tokens {limits.max_num_batched_tokens}")
    print(f"{'case':<58} {'workbench':>10} {'baseline':>13} {'ratio':>7}  notes (baseline: transformers "
          "unless the case says)")
    for case, ours, theirs, note in rows:
        ratio = f"{ours / theirs:>6.2f}x" if theirs else f"{'':>7}"
        theirs = f"{theirs:>13.1f}" if theirs else f"{'':>13}"
        ours = f"{ours:>10.1f}" if ours is not None else f"{'':>10}"
        print(f"{case:<58} {ours} {theirs} {ratio}  {note}")


if __name__ == "__main__":
    main()
