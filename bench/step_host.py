"""Where the host's time goes in an eagerly run step (no CUDA graph): per function, by cProfile.

    python3 bench/step_host.py --preset llama-3-8b --layers 4 --cache timings.json

Steps with prompt chunks run eagerly, one Python call per graph node. This runs decode steps of ``--seqs``
sequences and mixed steps (a ``--chunk``-token prompt chunk beside them) eagerly, times each with and
without waiting for the GPU (host time vs. step time), and prints the functions with the most own time
under cProfile. Random bf16 weights; ``--cache`` autotunes from a timing cache (else the product's GPU defaults).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_program import build_program  # noqa: E402
from workbench.runtime.engine import LLMEngine  # noqa: E402
from workbench.runtime.sampling import SamplingParams  # noqa: E402
from workbench.runtime.scheduler import SchedulerConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.precision, args.kv_cache = "bf16", "bf16"
    source, program, _ = build_program(args, args.device)
    graph = program.graph
    if args.cache:
        from workbench.kernels.autotune import TimingCache, autotune_profile
        from workbench.kernels.profiles import OptimizationProfile

        edges = tuple(sorted({args.seqs, args.seqs + args.chunk, 8192}))
        profile = OptimizationProfile(max_tokens=8192, max_seqs=args.seqs, context=256, max_context=2048,
                                      prefill_len=args.chunk, edges=edges)
        program = program.with_choices(autotune_profile(program, profile, TimingCache.open(args.cache),
                                                        progress=False))
    vocab = graph.meta["config"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for case in ("decode", "mixed"):
        engine = LLMEngine(program, num_blocks=2048, cuda_graphs=False, async_scheduling=False,
                           config=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=256))
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        for i in range(args.seqs):
            engine.add_request(f"d{i}", torch.randint(0, vocab, (200,), generator=g).tolist(), params)
        for _ in range(3):
            engine.step()

        def one():
            if case == "mixed":
                engine.add_request(None, torch.randint(0, vocab, (args.chunk,), generator=g).tolist(),
                                   SamplingParams(max_tokens=1, temperature=0))
            t0 = time.perf_counter()
            engine.step()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            return host, time.perf_counter() - t0

        for _ in range(args.steps + 16):  # every specialisation the timed steps meet (contexts cross 16s)
            one()
        times = [one() for _ in range(args.steps)]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            one()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        print(f"\n==== {case}: top functions by own time over {args.steps} steps ====")
        print(s.getvalue())
        host = sorted(t[0] for t in times)[len(times) // 2] * 1e3
        step = sorted(t[1] for t in times)[len(times) // 2] * 1e3
        rows.append((case, host, step))
    print(f"\n{torch.cuda.get_device_name()}: {source.spec}, {args.layers} layers, {len(graph.nodes)} nodes, "
          f"{'autotuned' if args.cache else 'fixed tactics'}")
    print(f"{'step':<10} {'host ms':>9} {'step ms':>9} {'host us/node':>13}")
    for case, host, step in rows:
        print(f"{case:<10} {host:>9.2f} {step:>9.2f} {host * 1e3 / len(graph.nodes):>13.1f}")


if __name__ == "__main__":
    main()
