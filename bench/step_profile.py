"""Where a step's GPU time goes: per op kind, against the HBM roofline, same process.

    python3 bench/step_profile.py --preset llama-3-8b --steps 1x1024,256x1500 --autotune --cache timings.json \
        --out $OUT/step_profile.json
    python3 bench/step_profile.py --precision fp8 --kv-cache fp8 --steps 256x1500 ...

For each decode step ``SEQSxCONTEXT`` (SEQS sequences, one new token each, CONTEXT tokens cached): the whole
step as a CUDA-graph replay (what the runtime runs), then its kernels traced one by one under the profiler
(``profiling.trace_program``) and summed per op kind. For each kind the bytes it must move (weights of the
linear layers, the KV cache read by attention, activations otherwise) over its kernel time is its bandwidth,
shown as a share of the copy bandwidth measured here. The replay's time minus the kernels' sum is what the
graph spends between kernels (launch gaps, tails). Random weights (speed does not depend on their values).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import TACTICS, add_model_args, build_program, refuse_cache_without_autotune  # noqa: E402
from workbench.graph.executor import Program  # noqa: E402
from workbench.kernels.autotune import step_inputs  # noqa: E402
from workbench.kernels.profiles import Step  # noqa: E402
from workbench.profiling import time_fn, trace_program, trace_summary  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402

def kind(op: str) -> str:
    """A short name for a node's op: ``aten.add.Tensor`` -> add, ``workbench.paged_attention`` -> paged_attention."""
    if not op:
        return "(outside nodes)"
    parts = op.split(".")
    return parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[-1]


def node_bytes(program, step: Step) -> dict[str, int]:
    """Bytes each node must move at ``step``: the op cost models' (weights, activations), except attention,
    which reads each sequence's whole KV cache (context + new tokens), and the embedding, one row per token."""
    from workbench.graph.views import node_table

    graph = program.graph
    tokens = step.seqs * step.new
    table = node_table(graph, batch=1, tokens=tokens)
    paged = graph.meta.get("paged") or {}
    per_token = 2 * paged.get("kv_heads", 0) * paged.get("head_dim", 0) * \
        (1 if "float8" in str(paged.get("dtype")) else 2)
    hidden = graph.meta.get("config", {}).get("hidden_size", 0)
    out = {}
    for name, op, nbytes in zip(table["name"], table["op"], table["bytes"]):
        if kind(op) == "paged_attention":
            nbytes = step.seqs * (step.context + step.new) * per_token
        elif kind(op) == "embedding":
            nbytes = tokens * hidden * 2
        out[name] = int(nbytes)
    return out


def profile_step(program, step: Step, device: str, gbps: float) -> dict:
    inputs = step_inputs(program, step)
    replay = time_fn(lambda: program.run(**inputs), repeats=20, device=device, graph_calls=1)
    df = trace_program(program, [inputs], warmup=1)
    gpu = df[df["device"] == program.device.type]  # kernels on a GPU; top-level ATen ops on the CPU
    per_node = trace_summary(gpu, by="node")
    nbytes = node_bytes(program, step)
    per_node["kind"] = per_node["op"].map(kind)
    per_node["bytes"] = per_node["node"].map(lambda n: nbytes.get(n, 0))
    kinds = per_node.groupby("kind").agg(nodes=("node", "size"), kernels=("kernels", "sum"),
                                         us=("total_us", "sum"), bytes=("bytes", "sum"))
    kinds = kinds.sort_values("us", ascending=False)
    kinds["share"] = kinds["us"] / kinds["us"].sum()
    kinds["gbps"] = kinds["bytes"] / (kinds["us"] * 1e3)
    kinds["of_copy"] = kinds["gbps"] / gbps
    kernels_us = float(gpu["dur_us"].sum())
    return {"step": f"{step.seqs}x{step.context}", "replay_us": replay.median_ms * 1e3, "method": replay.method,
            "kernels_us": kernels_us, "kernels": int(len(gpu)),
            "bytes": int(sum(nbytes.values())), "kinds": kinds.reset_index().to_dict(orient="records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--steps", default="1x1024,256x1500", help="decode steps SEQSxCONTEXT, comma-separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune", action="store_true", help="tune each step's bucket (with --cache) first")
    ap.add_argument("--cache", type=Path, help="timing cache to reuse and extend")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    refuse_cache_without_autotune(ap, args)
    device = args.device
    cuda = device.startswith("cuda")
    steps = [Step(int(s), 1, int(c)) for s, c in (x.split("x") for x in args.steps.split(","))]
    t0 = time.perf_counter()
    _, source, program, _ = build_program(args, device)
    gc.collect()
    if args.autotune and cuda:
        from workbench.kernels.autotune import TimingCache, TunedChoices, autotune

        cache = TimingCache.open(args.cache or Path("/tmp/step_profile_timings.json"), reset=args.cache is None)
        chosen = [autotune(program, [step_inputs(program, s)], cache, progress=False, top_k=args.top_k) for s in steps]
        # one bucket per step (edges: the steps' token counts; a step runs the choices tuned on it)
        order = sorted(range(len(steps)), key=lambda i: steps[i].tokens)
        edges, picks = [], []
        for i in order:
            if not edges or steps[i].tokens > edges[-1]:
                edges.append(steps[i].tokens)
                picks.append(chosen[i])
        program = program.with_choices(TunedChoices(edges, picks))
    elif cuda:
        program = Program(program.graph, program.params, device=device, tactics=TACTICS)
    gbps = copy_gbps(device) if cuda else float("nan")
    results = [profile_step(program, s, device, gbps) for s in steps]
    out = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "preset": source.spec,
           "precision": args.precision, "kv_cache": args.kv_cache, "copy_gbps": gbps, "steps": results,
           "wall_s": time.perf_counter() - t0}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{out['gpu']}, torch {torch.__version__}: {source.spec}, {args.precision}"
          f"{' + fp8 KV cache' if args.kv_cache == 'fp8' else ''}; copy bandwidth {gbps:.0f} GB/s")
    for r in results:
        gap = r["replay_us"] - r["kernels_us"]
        print(f"\ndecode step {r['step']} (sequences x context): replay {r['replay_us']:.0f} us ({r['method']}), "
              f"kernels {r['kernels_us']:.0f} us in {r['kernels']} kernels, between kernels {gap:.0f} us; "
              f"{r['bytes'] / 1e9:.2f} GB to move: {r['bytes'] / (r['replay_us'] * 1e3) / gbps:.1%} of copy "
              "bandwidth over the replay")
        print(f"  {'op kind':<22} {'nodes':>5} {'kernels':>7} {'us':>9} {'share':>6} {'GB/s':>7} {'of copy bw':>10}")
        for k in r["kinds"]:
            print(f"  {k['kind']:<22} {k['nodes']:>5} {k['kernels']:>7} {k['us']:>9.1f} {k['share']:>6.1%} "
                  f"{k['gbps']:>7.0f} {k['of_copy']:>10.1%}")


if __name__ == "__main__":
    main()
