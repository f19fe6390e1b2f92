"""Where a step's GPU time goes: per op kind, against the HBM roofline, same process.

    python3 bench/step_profile.py --preset llama-3-8b --steps 1x1024,256x1500 --autotune --cache timings.json \
        --out $OUT/step_profile.json
    python3 bench/step_profile.py --precision fp8 --kv-cache fp8 --steps 256x1500 ...

For each step ``SEQSxCONTEXT`` (a decode step: SEQS sequences, one new token each, CONTEXT tokens cached) or
``SEQSxNEWxCONTEXT`` (NEW tokens each: ``8x1024x0`` is a step of eight 1024-token prompts): the whole
step as a CUDA-graph replay of the graph the runtime runs (its lm_head over the last new token of each
sequence only), then its kernels traced one by one under the profiler (``profiling.trace_program``) and
summed per op kind. For each kind the bytes it must move (weights of the linear layers, the KV cache read
by attention, activations otherwise) over its kernel time is its bandwidth, shown as a share of the copy
bandwidth measured here, and its FLOPs over that time its TFLOP/s (what bounds a prompt step). The
replay's time minus the kernels' sum is what the graph spends between kernels (launch gaps, tails).
Random weights (speed does not depend on their values).
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

from bench_program import add_model_args, build_program, refuse_cache_without_autotune  # noqa: E402
from workbench.graph.paged import PagedLayout, is_paged  # noqa: E402
from workbench.kernels.autotune import step_inputs  # noqa: E402
from workbench.kernels.profiles import Step  # noqa: E402
from workbench.profiling import time_fn, trace_program, trace_summary  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402
from workbench.graph.passes.rows import lm_head  # noqa: E402
from workbench.runtime.executor import sampled_rows_program  # noqa: E402

def kind(op: str) -> str:
    """A short name for a node's op: ``aten.add.Tensor`` -> add, ``workbench.paged_attention`` -> paged_attention."""
    if not op:
        return "(outside nodes)"
    parts = op.split(".")
    return parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[-1]


def node_costs(program, step: Step, sampled_rows: int) -> dict[str, tuple[int, int]]:
    """(bytes, FLOPs) each node must move and compute at ``step``: the op cost models', except attention, which
    reads each sequence's whole KV cache (context + new tokens) and attends each new token to the tokens before
    it, the embedding, one row per token, and the lm_head, over the ``sampled_rows`` rows that sample."""
    from workbench.graph.views import node_table

    graph = program.graph
    tokens = step.seqs * step.new
    table = node_table(graph, batch=1, tokens=tokens)
    layout = PagedLayout.from_graph(graph) if is_paged(graph) else None
    config = graph.meta.get("config", {})
    kv_heads, head_dim = (layout.kv_heads, layout.head_dim) if layout else (0, 0)
    per_token = 2 * kv_heads * head_dim * (1 if layout and "float8" in layout.dtype else 2)
    hidden = config.get("hidden_size", 0)
    q_width = config.get("num_attention_heads", 0) * head_dim
    head = getattr(lm_head(graph), "name", None)
    out = {}
    for name, op, nbytes, flops in zip(table["name"], table["op"], table["bytes"], table["flops"]):
        if kind(op) == "paged_attention":
            nbytes = step.seqs * (step.context + step.new) * per_token
            # q·k and p·v for each new token over the context and the new tokens up to it (causal)
            flops = 4 * q_width * step.seqs * step.new * (step.context + (step.new + 1) / 2)
        elif kind(op) == "embedding":
            nbytes = tokens * hidden * 2
        elif name == head:
            flops = flops * sampled_rows / max(tokens, 1)
        out[name] = (int(nbytes), int(flops))
    return out


def parse_step(text: str) -> Step:
    """``SEQSxCONTEXT`` (one new token per sequence) or ``SEQSxNEWxCONTEXT`` as a Step."""
    parts = text.split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[-2]) < 1:
        raise SystemExit(f"--steps: {text!r} is not SEQSxCONTEXT or SEQSxNEWxCONTEXT (e.g. 256x1500, 8x1024x0)")
    seqs, new, context = (int(parts[0]), 1, int(parts[1])) if len(parts) == 2 else map(int, parts)
    return Step(seqs, new, context)


def profile_step(program, step: Step, device: str, gbps: float) -> dict:
    """The step as the executor runs it: its lm_head over the last new token of each sequence only."""
    inputs = step_inputs(program, step)
    run = sampled_rows_program(program)
    if run is not program:
        inputs["logits_indices"] = torch.arange(1, step.seqs + 1, device=program.device) * step.new - 1
    replay = time_fn(lambda: run.run(**inputs), repeats=20, device=device, graph_calls=1)
    df = trace_program(run, [inputs], warmup=1)
    gpu = df[df["device"] == program.device.type]  # kernels on a GPU; top-level ATen ops on the CPU
    per_node = trace_summary(gpu, by="node")
    costs = node_costs(program, step, sampled_rows=step.seqs)
    per_node["kind"] = per_node["op"].map(kind)
    per_node["bytes"] = per_node["node"].map(lambda n: costs.get(n, (0, 0))[0])
    per_node["flops"] = per_node["node"].map(lambda n: costs.get(n, (0, 0))[1])
    kinds = per_node.groupby("kind").agg(nodes=("node", "size"), kernels=("kernels", "sum"),
                                         us=("total_us", "sum"), bytes=("bytes", "sum"), flops=("flops", "sum"))
    kinds = kinds.sort_values("us", ascending=False)
    kinds["share"] = kinds["us"] / kinds["us"].sum()
    kinds["gbps"] = kinds["bytes"] / (kinds["us"] * 1e3)
    kinds["of_copy"] = kinds["gbps"] / gbps
    kinds["tflops"] = kinds["flops"] / (kinds["us"] * 1e6)
    kernels_us = float(gpu["dur_us"].sum())
    name = f"{step.seqs}x{step.context}" if step.new == 1 else f"{step.seqs}x{step.new}x{step.context}"
    return {"step": name, "replay_us": replay.median_ms * 1e3, "method": replay.method,
            "kernels_us": kernels_us, "kernels": int(len(gpu)),
            "bytes": int(sum(b for b, _ in costs.values())), "kinds": kinds.reset_index().to_dict(orient="records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--steps", default="1x1024,256x1500",
                    help="steps SEQSxCONTEXT (decode) or SEQSxNEWxCONTEXT, comma-separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune", action="store_true", help="tune each step's bucket (with --cache) first")
    ap.add_argument("--cache", type=Path, help="timing cache to reuse and extend")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    refuse_cache_without_autotune(ap, args)
    device = args.device
    cuda = device.startswith("cuda")
    steps = [parse_step(x) for x in args.steps.split(",")]
    t0 = time.perf_counter()
    source, program, _ = build_program(args, device)
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
        what = "decode step SEQSxCONTEXT" if r["step"].count("x") == 1 else "step SEQSxNEWxCONTEXT"
        print(f"\n{what} {r['step']}: replay {r['replay_us']:.0f} us ({r['method']}), "
              f"kernels {r['kernels_us']:.0f} us in {r['kernels']} kernels, between kernels {gap:.0f} us; "
              f"{r['bytes'] / 1e9:.2f} GB to move: {r['bytes'] / (r['replay_us'] * 1e3) / gbps:.1%} of copy "
              "bandwidth over the replay")
        print(f"  {'op kind':<22} {'nodes':>5} {'kernels':>7} {'us':>9} {'share':>6} {'GB/s':>7} {'of copy bw':>10} "
              f"{'TFLOP/s':>8}")
        for k in r["kinds"]:
            print(f"  {k['kind']:<22} {k['nodes']:>5} {k['kernels']:>7} {k['us']:>9.1f} {k['share']:>6.1%} "
                  f"{k['gbps']:>7.0f} {k['of_copy']:>10.1%} {k['tflops']:>8.1f}")


if __name__ == "__main__":
    main()
