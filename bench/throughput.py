"""The runtime end to end against transformers, same process: batch-1 decode, offline throughput, latency
under load.

    python3 bench/throughput.py --preset llama-3-8b --cases batch1,offline --requests 1000 \
        --shapes 1000x1000,128x128 --autotune --cache $OUT/timings.json --out $OUT/throughput.json

The engine replays every step as a CUDA graph: decode steps in one per batch-size bucket, steps with prompt
chunks in one per token-count bucket (``--compare-eager-steps`` also runs the offline and load cases with
those steps eager, node by node, as the baseline of their ratio column); with asynchronous scheduling (the
default on a GPU) the host prepares step N+1 while the GPU runs step N. Kernels: ``--autotune`` tunes the
graph for decode buckets 1..``--max-num-seqs`` and the full prefill step first (``--cache``: a timing cache
to reuse and extend; the autotuner re-times a cached entry only if its tuning space grew since), otherwise fixed tactics (Triton for the
fused ops and attention, cuBLAS / ``_scaled_mm``). ``--precision fp8``: the graph calibrated on random tokens
and quantized to FP8 W8A8 (``--kv-cache fp8`` adds the FP8 KV cache). Cases (``--cases``):

  batch1    one request, ``--batch1-len`` prompt and output tokens: decode tokens/s (first token
            excluded) and the share of the HBM roofline (weight bytes per token / copy bandwidth measured
            here); the replayed graph alone; the synchronous engine and the eager executor (their tokens
            compared); transformers' ``generate`` on the same prompt
  offline   ``--requests`` requests of each of ``--shapes`` (input x output tokens; ``128x128:5000`` gives
            a shape its own request count) submitted at once:
            output tokens/s; transformers' ``generate`` on the first ``--hf-requests`` prompts as one static
            batch (tuning, ``--autotune``, is for the first shape's mean context)
  check     the step graphs against eager steps on the GPU: 32 prompts of 300 tokens (prompt chunks beside
            decodes), greedy; the first tokens (from steps with prompt chunks) must agree, and their
            log-probabilities' largest difference is printed
  load      ``--load-requests`` requests of ``--load-len`` tokens arriving as a Poisson process at each of
            ``--rates`` requests/s: TTFT and time per output token (p50/p90/p99), output tokens/s

Random token ids and random weights (speed does not depend on their values); every request runs to its
output length (EOS ignored). Each offline run's step timeline is written next to ``--out`` (CSV).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.graph.executor import Program, resolve_params  # noqa: E402
from workbench.graph.passes import run_passes  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.models.intake import ModelSource, resolve_source  # noqa: E402
from workbench.pipeline import CaptureOptions, capture_source  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402
from workbench.runtime.capacity import KVLayout, device_memory, plan_capacity  # noqa: E402
from workbench.runtime.engine import LLMEngine  # noqa: E402
from workbench.runtime.sampling import SamplingParams  # noqa: E402
from workbench.runtime.scheduler import SchedulerConfig  # noqa: E402

TACTICS = {op: "triton" for op in ("workbench.rms_norm", "workbench.add_rms_norm", "workbench.silu_mul",
                                   "workbench.rope", "workbench.paged_attention", "workbench.rms_norm_fp8",
                                   "workbench.add_rms_norm_fp8", "workbench.silu_mul_fp8")}
TACTICS["workbench.fp8_linear"] = "scaled_mm"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


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


def run_engine(program, prompts, output_len, *, num_blocks, config, device, timeline=None, keep=False,
               **engine_options):
    """All prompts submitted at once, run to completion: times, tokens, steps, the engine's graph."""
    engine = LLMEngine(program, num_blocks=num_blocks, config=config, **engine_options)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    while engine.has_unfinished:
        engine.step(finished_only=True)  # as LLM.generate: no output copies for requests still running
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
              "max_running": int(steps["running"].max()), "tokens": [o.token_ids for o in outs],
              "logprobs": [o.logprobs for o in outs]}
    if not keep:
        del engine
        gc.collect()
        return result, None
    return result, engine


def run_load(program, prompts, output_len, rate, *, num_blocks, config, device, seed=0, **engine_options):
    """Requests arriving as a Poisson process at ``rate`` per second; per-request TTFT and time per output
    token (from the arrival time each request was due, so queueing counts)."""
    engine = LLMEngine(program, num_blocks=num_blocks, config=config, **engine_options)
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


def build_program(args, device):
    """The optimized graph of the preset (random bf16 weights), quantized when asked: (source, program,
    calibration seconds). The transformers model it was captured from is dropped, so that only the weights the
    program runs stay on the GPU (with it, an FP8 program's KV cache would lose 13 GiB to the unused bf16
    weights); ``run_hf_fresh`` builds it again for the baselines."""
    source = resolve_source(args.preset)
    if args.layers:
        source = ModelSource("random", f"{args.preset}, {args.layers} layers", None,
                             {**source.config, "num_hidden_layers": args.layers}, source.seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lm = load_model(source, dtype=dtype, device=device)
    captured = capture_source(lm.source, CaptureOptions(dtype=str(dtype).removeprefix("torch.")))
    if getattr(args, "block_size", None):
        captured.graph.meta["kv_block_size"] = args.block_size  # tokens per KV block (the paged pass's default: 16)
    weights = {**dict(lm.model.named_parameters(remove_duplicate=False)),
               **{k: v.to(device) for k, v in captured.constants.items()}}
    graph, _ = run_passes(captured.graph, weights, check=False)
    program = Program(graph, resolve_params(graph, weights), device=device)
    del weights
    calib_s = None
    if args.precision != "bf16":
        from workbench.quant import PrecisionPlan, calibrate, quantized_program

        vocab = graph.meta["config"]["vocab_size"]
        ids = torch.randint(0, vocab, (8 * 512,), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        stats = calibrate(program, ids, samples=8, seq_len=512, progress=False)
        plan = PrecisionPlan.uniform(graph, args.precision, kv_cache=args.kv_cache)
        program = quantized_program(program, plan, stats)
        calib_s = time.perf_counter() - t0
    del lm  # its parameters that the program uses (unfused bf16 weights) live on in program.params
    gc.collect()
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return source, program, calib_s


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


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The arguments ``build_program`` reads: the preset, its layer count, the precision and the KV cache's."""
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--kv-cache", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--block-size", type=int, help="tokens per KV-cache block (default: the paged pass's, 16)")


def tune_for_shape(program, args, n_in: int, n_out: int, seqs: int, default_cache: str):
    """``program`` with the choices tuned for offline requests of ``n_in`` prompt and ``n_out`` output tokens at
    ``seqs`` sequences and ``args.max_num_batched_tokens`` tokens a step (decode buckets up to ``seqs``, tuned at
    the requests' mean context), timings kept in ``args.cache`` (else ``default_cache``, afresh); and the
    profile. Any bench that tunes so shares ``bench/throughput.py``'s timing cache."""
    from workbench.kernels.autotune import TimingCache, autotune_profile
    from workbench.kernels.profiles import OptimizationProfile

    total = args.max_num_batched_tokens
    edges = tuple(e for e in (1, 2, 4, 8, 16, 32, 64, 128) if e < seqs) + (seqs, total)
    profile = OptimizationProfile(max_tokens=total, max_seqs=seqs, context=n_in + n_out // 2, max_context=n_in + n_out,
                                  prefill_len=min(n_in, total), edges=tuple(sorted(set(edges))))
    cache = TimingCache.open(args.cache or Path(default_cache), reset=args.cache is None)
    return program.with_choices(autotune_profile(program, profile, cache, progress=False, top_k=args.top_k)), profile


def refuse_cache_without_autotune(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--cache`` is only read when tuning: alone it would be silently ignored and default tactics run."""
    if args.cache and not args.autotune:
        ap.error("--cache is the autotuner's timing cache: pass --autotune too (what the cache holds is not timed again)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
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
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--policy", default="max_utilization", choices=("max_utilization", "guaranteed_no_evict"),
                    help="the scheduler's admission policy")
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--cache", type=Path, help="timing cache to reuse and extend (default: a fresh one)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--compare-eager-steps", action="store_true",
                    help="offline and load: also run steps with prompt chunks eagerly (the ratio's baseline)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    refuse_cache_without_autotune(ap, args)
    cases = set(args.cases.split(","))
    device = args.device
    cuda = device.startswith("cuda")
    t_start = time.perf_counter()
    source, program, calib_s = build_program(args, device)
    graph = program.graph
    tune_s = None
    if args.autotune and cuda:
        n_in, n_out, _ = parse_shape(args.shapes.split(",")[0], args.requests)
        t0 = time.perf_counter()
        program, profile = tune_for_shape(program, args, n_in, n_out, args.max_num_seqs, "/tmp/throughput_timings.json")
        tune_s = time.perf_counter() - t0
        gc.collect()  # the timing runs' inputs and their copies, before the engine sizes its KV cache
        torch.cuda.empty_cache()
        print(f"autotuned {len(profile.edges)} buckets {profile.edges} at context {profile.context} in {tune_s:.0f} s",
              flush=True)
    elif cuda:
        program = Program(graph, program.params, device=device, tactics=TACTICS)
    # the bytes a decode step must read: every parameter but the embedding table (one row of it); a table
    # that lm_head also reads (tied) counts
    read = {r for node in graph.nodes if node.op not in ("aten.embedding.default", "embedding") for r in node.refs()}
    weight_bytes = sum(p.numel() * p.element_size() for name, p in program.params.items() if name in read)
    layout = KVLayout.from_graph(graph)
    vocab = graph.meta["config"]["vocab_size"]
    config = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                             policy=args.policy)
    g = torch.Generator().manual_seed(0)

    def blocks_for(prompt_len, output_len, requests):
        """KV blocks for a case: what its requests can ever hold, at most what the free memory allows."""
        need = requests * -(-(prompt_len + output_len) // layout.block_size)
        if not cuda:
            return need
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = device_memory(device)
        plan = plan_capacity(layout, memory_bytes=free, fraction=args.memory_fraction, prompt_len=prompt_len,
                             output_len=output_len)
        print(plan.summary(), flush=True)
        return min(plan.num_blocks, need)

    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "preset": source.spec, "args": {k: str(v) for k, v in vars(args).items()},
              "weight_bytes": weight_bytes, "tune_s": tune_s, "calibration_s": calib_s}
    rows = []  # (case, workbench, transformers, note)
    ceiling = copy_gbps(device) if cuda else None
    roofline_tps = ceiling * 1e9 / weight_bytes if ceiling else None
    result["copy_gbps"] = ceiling

    if "batch1" in cases:
        n = args.batch1_len
        prompt = torch.randint(0, vocab, (1, n), generator=g).tolist()
        blocks = blocks_for(n, n, 4)
        run_engine(program, prompt, 4, num_blocks=blocks, config=config, device=device)  # warm up
        one, engine = run_engine(program, prompt, n, num_blocks=blocks, config=config, device=device, keep=True)
        replay_ms = None
        if engine.executor._graphs.get((1, 1)):  # the batch-1 decode graph alone: GPU time per step
            from workbench.profiling import time_fn

            replay_ms = time_fn(engine.executor._graphs[(1, 1)][0].replay, repeats=50, device=device).median_ms
        del engine
        one_sync, _ = run_engine(program, prompt, n, num_blocks=blocks, config=config, device=device,
                                 async_scheduling=False)
        one_eager, _ = run_engine(program, prompt, n, num_blocks=blocks, config=config, device=device,
                                  cuda_graphs=False, async_scheduling=False)
        same = one["tokens"] == one_sync["tokens"] == one_eager["tokens"]

        def tps(r):
            return (r["generated"] - 1) / (r["seconds"] - r["first_token_s"])

        hf = None if args.no_hf else run_hf_fresh(source, prompt, n, device)
        hf_tps = hf["generated"] / hf["seconds"] if hf else None
        result["batch1"] = {"engine_tps": tps(one), "sync_tps": tps(one_sync), "eager_tps": tps(one_eager),
                            "graph_replay_ms": replay_ms, "roofline_tps": roofline_tps, "hf_tps": hf_tps,
                            "tokens_equal": same}
        roof = f"{tps(one) / roofline_tps:.1%} of the HBM roofline ({roofline_tps:.0f} tok/s)" if roofline_tps else ""
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
        check_config = SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=args.max_num_seqs)
        blocks = blocks_for(300, 16, 32)
        graphs, _ = run_engine(program, prompts, 16, num_blocks=blocks, config=check_config, device=device)
        eager, _ = run_engine(program, prompts, 16, num_blocks=blocks, config=check_config, device=device,
                              graph_token_sizes=())
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
            blocks = blocks_for(n_in, n_out, requests)
            timeline = args.out.with_name(f"timeline_{args.precision}_{n_in}_{n_out}.csv") if args.out else None
            run_engine(program, prompts[:args.max_num_seqs], 2, num_blocks=blocks, config=config, device=device)
            run_load(program, prompts[:32], 8, 200.0, num_blocks=blocks, config=config, device=device)  # odd shapes
            many, _ = run_engine(program, prompts, n_out, num_blocks=blocks, config=config, device=device,
                                 timeline=timeline)
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
                                                      "hf_tps": hf_tps, "num_blocks": blocks}
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
            if args.compare_eager_steps:
                slow, _ = run_engine(program, prompts, n_out, num_blocks=blocks, config=config, device=device,
                                     graph_token_sizes=())
                slow.pop("tokens")
                slow_tps = slow["generated"] / slow["seconds"]
                result["offline"][shape]["eager_steps_engine"] = {k: v for k, v in slow.items() if k != "logprobs"}
                rows.append(("  vs prompt-chunk steps eager, output tok/s", many_tps, slow_tps,
                             f"{slow['seconds']:.1f} s, {slow['eager_steps']} of {slow['steps']} steps eager"))
            many.pop("logprobs")

    if "load" in cases:
        n = args.load_len
        prompts = torch.randint(0, vocab, (args.load_requests, n), generator=g).tolist()
        blocks = blocks_for(n, n, args.load_requests)
        run_load(program, prompts[:32], 8, 200.0, num_blocks=blocks, config=config, device=device)  # warm up
        result["load"] = []
        modes = [("", {})] + ([("  prompt-chunk steps eager: ", {"graph_token_sizes": ()})]
                              if args.compare_eager_steps else [])
        for rate in (float(r) for r in args.rates.split(",")):
            base = None
            for label, options in modes:
                r = run_load(program, prompts, n, rate, num_blocks=blocks, config=config, device=device, **options)
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
    print(f"\n{result['gpu']}, torch {torch.__version__}: {source.spec}, {args.precision} "
          f"{'+ fp8 KV cache ' if args.kv_cache == 'fp8' else ''}({weight_bytes / 2**30:.2f} GiB of weights read "
          f"per step); {'autotuned' if tune_s is not None else 'fixed tactics'}; "
          f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, "
          f"policy {args.policy}")
    print(f"{'case':<58} {'workbench':>10} {'baseline':>13} {'ratio':>7}  notes (baseline: transformers "
          "unless the case says)")
    for case, ours, theirs, note in rows:
        ratio = f"{ours / theirs:>6.2f}x" if theirs else f"{'':>7}"
        theirs = f"{theirs:>13.1f}" if theirs else f"{'':>13}"
        ours = f"{ours:>10.1f}" if ours is not None else f"{'':>10}"
        print(f"{case:<58} {ours} {theirs} {ratio}  {note}")


if __name__ == "__main__":
    main()
