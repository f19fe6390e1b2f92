"""Where an engine step's time goes besides its graph replay: the GPU timeline of steady decode steps.

    python3 bench/engine_trace.py --precision fp8 --kv-cache fp8 --block-size 64 --seqs 512 --context 1500 \
        --autotune --cache timings_fp8.json

SEQS requests of CONTEXT prompt tokens are prefilled, then STEPS decode steps run under torch.profiler (CPU
and CUDA activities). Printed per decode step: the engine's step time (host wall clock, as its timeline
records it), the replay of the same decode graph alone (CUDA-graph timing), the GPU's busy time (the union
of kernel intervals) and idle time, and the kernels that ran a few times per step (outside the graph's 32
layers: input copies, sampling), by name. Random weights; the tuning profile is ``bench/throughput.py``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_program import add_model_args, build_program, refuse_cache_without_autotune, tune_for_shape  # noqa: E402
from workbench.graph.paged import PagedLayout  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.runtime.engine import LLMEngine  # noqa: E402
from workbench.runtime.sampling import SamplingParams  # noqa: E402
from workbench.runtime.scheduler import SchedulerConfig  # noqa: E402


def busy_and_idle(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, idle) microseconds over the span of ``intervals`` (start, end): their union and the gaps."""
    busy, idle, end = 0.0, 0.0, None
    for s, e in sorted(intervals):
        if end is None:
            busy, end = e - s, e
        elif s >= end:
            idle += s - end
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--cache", type=Path, help="timing cache to reuse and extend (with --autotune)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tune-shape", default="1000x1000",
                    help="INxOUT the tuning profile is made for, as bench/throughput.py makes it for its first shape "
                         "(so that its timing cache applies)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="write the profiler's Chrome trace here")
    args = ap.parse_args()
    refuse_cache_without_autotune(ap, args)
    device = args.device
    cuda = device.startswith("cuda")
    _, program, _ = build_program(args, device)
    if args.autotune and cuda:
        n_in, n_out = map(int, args.tune_shape.split("x"))
        program, _ = tune_for_shape(program, args, n_in, n_out, args.seqs, "/tmp/engine_trace_timings.json")
    vocab = program.graph.meta["config"]["vocab_size"]
    block = PagedLayout.from_graph(program.graph).block_size
    # the first requests decode while the last are prefilled (SEQS × CONTEXT / max_num_batched_tokens steps): none
    # may finish before the profiled steps are over
    max_tokens = args.seqs * args.context // args.max_num_batched_tokens + args.steps + 16
    num_blocks = args.seqs * -(-(args.context + max_tokens) // block) + 8
    engine = LLMEngine(program, num_blocks=num_blocks, max_model_len=args.context + max_tokens,
                       config=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.seqs))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.seqs):
        engine.add_request(str(i), torch.randint(0, vocab, (args.context,), generator=g).tolist(), params)

    def all_decoding():  # the last step's record (engine.timeline() would build a DataFrame of every step)
        return bool(engine.steps) and engine.steps[-1]["prefill_tokens"] == 0 and \
            engine.steps[-1]["decode_tokens"] == args.seqs

    while not all_decoding():
        engine.step(finished_only=True)
    for _ in range(3):
        engine.step(finished_only=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    before = len(engine.steps)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step(finished_only=True)
        sync()
        wall = time.perf_counter() - t0
    steps = engine.timeline().iloc[before:]
    key = engine.executor.last_graph
    graph = engine.executor._graphs.get(key, (None,))[0]
    replay = time_fn(graph.replay, repeats=20, device=device).median_ms if graph is not None else float("nan")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, idle = busy_and_idle([(e.time_range.start, e.time_range.end) for e in kernels])
    per_name = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        per_name[e.name][0] += 1
        per_name[e.name][1] += e.time_range.end - e.time_range.start
    n = args.steps
    print(f"\n{torch.cuda.get_device_name() if cuda else 'cpu'}: {args.preset}, {args.precision}, KV {args.kv_cache} in blocks of {block}; "
          f"{args.seqs} sequences decoding after {args.context} tokens; graph {key}")
    print(f"engine step (wall, {n} steps): {wall / n * 1e3:.3f} ms; timeline step_ms {steps['step_ms'].mean():.3f}; "
          f"graph replay alone {replay:.3f} ms")
    print(f"GPU per step: busy {busy / n / 1e3:.3f} ms, idle {idle / n / 1e3:.3f} ms, {len(kernels) / n:.0f} kernels")
    print("kernels run at most 3 times per step (outside the layers), per step:")
    print(f"  {'count':>6} {'us':>9}  name")
    for name, (count, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1]):
        if count <= 3 * n:
            print(f"  {count / n:>6.1f} {us / n:>9.1f}  {name[:110]}")
    print("largest idle gaps between kernels, summed per step by the kernels on either side:")
    print(f"  {'count':>6} {'us':>9}  before -> after")
    for (before_k, after_k), (count, us) in largest_gaps(kernels)[:12]:
        print(f"  {count / n:>6.1f} {us / n:>9.1f}  {before_k[:60]} -> {after_k[:60]}")
    if args.out:
        prof.export_chrome_trace(str(args.out))


def largest_gaps(kernels) -> list[tuple[tuple[str, str], list]]:
    """Idle GPU time between consecutive kernels (by start), summed per (kernel before, kernel after) names,
    largest first: where the GPU waits between a step's graph and the work around it."""
    gaps = defaultdict(lambda: [0, 0.0])
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    end, last = None, None
    for e in ordered:
        if end is not None and e.time_range.start > end:
            entry = gaps[(last, e.name)]
            entry[0] += 1
            entry[1] += e.time_range.start - end
        if end is None or e.time_range.end >= end:
            end, last = e.time_range.end, e.name
    return sorted(gaps.items(), key=lambda kv: -kv[1][1])


if __name__ == "__main__":
    main()
