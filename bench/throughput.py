"""The runtime end to end against transformers, same process: batch-1 decode and offline throughput.

    python3 bench/throughput.py --preset llama-3-8b --requests 64 --input-len 128 --output-len 128

The engine's executor replays decode steps as CUDA graphs (one per batch-size bucket) and runs prefill
steps eagerly, with the Triton tactics for the fused ops and paged attention and cuBLAS for the bf16
linears; batch-1 decode is also run with the eager executor (and its tokens compared). Rows:

  batch-1 decode   one request, ``--output-len`` tokens after a ``--input-len`` prompt: decode tokens/s
                   (first token excluded) and the share of the HBM roofline (weight bytes per token /
                   copy bandwidth measured here); transformers' ``generate`` on the same prompt
  offline          ``--requests`` requests of ``--input-len`` / ``--output-len`` tokens submitted at once:
                   output tokens/s through the engine (in-flight batching, ``--max-num-seqs``), and
                   transformers' ``generate`` on the same prompts as one static batch

Random token ids and random bf16 weights (speed does not depend on their values); every request runs
to ``--output-len`` (EOS ignored).
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
                                   "workbench.rope", "workbench.paged_attention")}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(program, prompts, output_len, *, num_blocks, config, device, cuda_graphs=None, tokens=None):
    engine = LLMEngine(program, num_blocks=num_blocks, config=config, cuda_graphs=cuda_graphs)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    first = None
    while engine.has_unfinished:
        outs = engine.step()
        if first is None and outs:
            sync(device)
            first = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    generated = sum(len(engine.output(str(i)).token_ids) for i in range(len(prompts)))
    replay_ms = None
    if engine.executor._graphs.get(1) and len(prompts) == 1:  # the batch-1 decode graph alone: GPU time per step
        from workbench.profiling import time_fn

        replay_ms = time_fn(engine.executor._graphs[1][0].replay, repeats=50, device=device).median_ms
    if tokens is not None:
        tokens.extend(engine.output(str(i)).token_ids for i in range(len(prompts)))
    return {"seconds": end - t0, "first_token_s": first - t0, "generated": generated,
            "steps": len(engine.steps), "preempted": int(engine.timeline()["preempted"].sum()),
            "graph_replay_ms": replay_ms}


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
    return {"seconds": time.perf_counter() - t0, "generated": (out.shape[1] - ids.shape[1]) * ids.shape[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune", action="store_true",
                    help="autotune the graph for decode buckets 1..max-num-seqs and the prefill step first, and run "
                         "the tuned choices (otherwise fixed tactics: Triton for fused ops and attention, cuBLAS)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    source = resolve_source(args.preset)
    if args.layers:
        source = ModelSource("random", f"{args.preset}, {args.layers} layers", None,
                             {**source.config, "num_hidden_layers": args.layers}, source.seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    lm = load_model(source, dtype=dtype, device=device)
    captured = capture_source(lm.source, CaptureOptions(dtype=str(dtype).removeprefix("torch.")))
    weights = {**dict(lm.model.named_parameters(remove_duplicate=False)),
               **{k: v.to(device) for k, v in captured.constants.items()}}
    graph, _ = run_passes(captured.graph, weights, check=False)
    program = Program(graph, resolve_params(graph, weights), device=device, tactics=TACTICS if cuda else None)
    tune_s = None
    if args.autotune and cuda:
        from workbench.kernels.autotune import TimingCache, autotune_profile
        from workbench.kernels.profiles import OptimizationProfile

        total = args.max_num_batched_tokens
        edges = tuple(e for e in (1, 2, 4, 8, 16, 32, 64) if e < args.max_num_seqs) + (args.max_num_seqs, total)
        profile = OptimizationProfile(max_tokens=total, max_seqs=args.max_num_seqs, context=args.input_len,
                                      max_context=args.input_len + args.output_len, prefill_len=args.input_len,
                                      edges=tuple(sorted(set(edges))))
        t0 = time.perf_counter()
        plain = Program(graph, program.params, device=device)
        tuned = autotune_profile(plain, profile, TimingCache.open(Path("/tmp/throughput_timings.json"), reset=True),
                                 progress=False, top_k=args.top_k)
        program = plain.with_choices(tuned)
        tune_s = time.perf_counter() - t0
        print(f"autotuned {len(profile.edges)} buckets {profile.edges} in {tune_s:.0f} s", flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    layout = KVLayout.from_graph(graph)
    if cuda:
        free, _ = device_memory(device)
        plan = plan_capacity(layout, memory_bytes=free, fraction=args.memory_fraction,
                             prompt_len=args.input_len, output_len=args.output_len)
        num_blocks = plan.num_blocks
        print(plan.summary(), flush=True)
    else:
        num_blocks = args.requests * -(-(args.input_len + args.output_len) // layout.block_size)
    vocab = graph.meta["config"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.requests, args.input_len), generator=g).tolist()
    config = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)

    # warm up: Triton compiles for the prefill and decode shapes the timed runs will see, CUDA graphs captured
    run_engine(program, prompts, 2, num_blocks=num_blocks, config=config, device=device)
    run_engine(program, prompts[:1], 4, num_blocks=num_blocks, config=config, device=device)
    graphed, eager = [], []
    one = run_engine(program, prompts[:1], args.output_len, num_blocks=num_blocks, config=config, device=device,
                     tokens=graphed)
    one_eager = run_engine(program, prompts[:1], args.output_len, num_blocks=num_blocks, config=config,
                           device=device, cuda_graphs=False, tokens=eager)
    same = graphed == eager  # replayed decode steps give the eager steps' tokens
    eager_tps = (one_eager["generated"] - 1) / (one_eager["seconds"] - one_eager["first_token_s"])
    one_tps = (one["generated"] - 1) / (one["seconds"] - one["first_token_s"])
    hf_one = run_hf(lm.model, prompts[:1], args.output_len, device)
    hf_one_tps = hf_one["generated"] / hf_one["seconds"]
    ceiling = copy_gbps(device) if cuda else None
    roofline_tps = ceiling * 1e9 / weight_bytes if ceiling else None
    many = run_engine(program, prompts, args.output_len, num_blocks=num_blocks, config=config, device=device)
    many_tps = many["generated"] / many["seconds"]
    hf_many = run_hf(lm.model, prompts, args.output_len, device)
    hf_many_tps = hf_many["generated"] / hf_many["seconds"]

    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "preset": source.spec, "args": vars(args) | {"out": str(args.out)},
              "num_blocks": num_blocks, "weight_bytes": weight_bytes, "copy_gbps": ceiling, "tune_s": tune_s,
              "batch1": {"engine": one, "engine_tps": one_tps, "hf": hf_one, "hf_tps": hf_one_tps,
                         "roofline_tps": roofline_tps, "eager_tps": eager_tps, "graph_tokens_equal_eager": same},
              "offline": {"engine": many, "engine_tps": many_tps, "hf": hf_many, "hf_tps": hf_many_tps}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{gpu}, torch {torch.__version__}: {source.spec}, {str(dtype).removeprefix('torch.')} random weights "
          f"({weight_bytes / 2**30:.2f} GiB); KV cache {num_blocks} blocks of {layout.block_size}; "
          f"{'autotuned' if tune_s is not None else 'fixed tactics'}")
    print(f"{'case':<44} {'workbench':>11} {'transformers':>13} {'ratio':>7}  notes")
    roof = f"{one_tps / roofline_tps:.1%} of the HBM roofline ({roofline_tps:.0f} tok/s)" if roofline_tps else ""
    print(f"{'batch-1 decode, tok/s':<44} {one_tps:>11.1f} {hf_one_tps:>13.1f} {one_tps / hf_one_tps:>6.2f}x  {roof}")
    if one["graph_replay_ms"]:
        step_ms = 1e3 / one_tps
        print(f"{'  per step: ms, of which the graph replay':<44} {step_ms:>11.2f} {'':>13} {'':>7}  replay "
              f"{one['graph_replay_ms']:.2f} ms = {1e3 / one['graph_replay_ms'] / roofline_tps:.1%} of the roofline; "
              f"host {step_ms - one['graph_replay_ms']:.2f} ms")
    print(f"{'batch-1 decode, eager executor, tok/s':<44} {eager_tps:>11.1f} {hf_one_tps:>13.1f} "
          f"{eager_tps / hf_one_tps:>6.2f}x  CUDA-graph tokens equal the eager ones: {same}")
    print(f"{f'offline {args.requests} x {args.input_len}/{args.output_len}, output tok/s':<44} {many_tps:>11.1f} "
          f"{hf_many_tps:>13.1f} {many_tps / hf_many_tps:>6.2f}x  {many['steps']} steps, "
          f"{many['preempted']} preemptions")


if __name__ == "__main__":
    main()
