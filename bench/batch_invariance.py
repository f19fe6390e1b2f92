"""Which GPU kernels give a row the same result whatever other rows share the call (issue 25: batch invariance), and
what the batch-invariant mode does to a whole engine.

    python3 bench/batch_invariance.py                # the kernel table; logs nothing else
    python3 bench/batch_invariance.py --rows 1,2,8,64,256 --shapes smollm2
    TRITON_INTERPRET=1 python3 bench/batch_invariance.py --rows 1,2,5 --shapes tiny     # on the CPU
    python3 bench/batch_invariance.py --engine /tmp/e8b --prompts 8 --requests 512 --len 1000x1000
    python3 bench/batch_invariance.py --engine /tmp/smol --invariant-engine /tmp/smol-bi   # + an engine tuned in the mode
    TRITON_INTERPRET=1 python3 bench/batch_invariance.py --engine tiny-llama --prompts 3 --requests 4 --len 8x4 \
        --max-tokens 4                               # the engine table on the CPU (a smoke run: no speed in it)

``--engine TARGET`` (an engine directory, a workspace or a model source) measures the engine through ``LLM``,
opened once, with the batch-invariant mode off and on in the same process (``LLM(runnable, batch_invariant=...)``;
one engine at a time, the first freed before the next is made; "on" then runs each node's largest-bucket choice
where it is invariant, else the op's invariant default), and ``--invariant-engine DIR`` adds the same model built
with ``workbench build ... --batch-invariant`` (tuned in the mode) as a third row: ``--prompts`` prompts of random
token ids of
different lengths, greedy, ``--max-tokens`` tokens each, decoded alone and all together in one batch (how many keep
every token, how many every log-prob bitwise, and the first token where any diverged), then ``--requests`` requests
of ``--len`` (input x output tokens, EOS ignored) submitted at once for the output tokens/s. The table's key column
is the mode's throughput over the mode off's. The mode's notes (which ops lost which tuned choice) follow it.

A request's logits depend on the rows that share its step only if some kernel's result for one row changes with
the number of rows (M) it is called with. For each linear path the runtime can run (cuBLAS through torch's
``linear``, the Triton tile at its per-M default config, the Triton tile with one config held for every M, the
M = 1 GEMV, split-K, ``torch._scaled_mm`` and the Triton FP8 / INT8 tiles) and for greedy sampling, row 0 of a
call with M rows (row 0 the same input every time, the others random) is compared with the call of one row:
bitwise equal, or the largest difference relative to the output's scale. Inputs are random, never zeros.

The table's last column names the M values whose row 0 differed from M = 1. A path whose config or kernel changes
with M (the defaults pick tiles by M; tuned engines pick configs per token bucket) is not invariant even where
each config is; the "held" rows show whether a fixed config is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels import gemm as G  # noqa: E402
from workbench.kernels.triton_sampling import greedy_logprobs  # noqa: E402

#: (name, K, N): one model's linears (qkv, o, gate/up, down) and its lm_head
SHAPES = {
    "tiny": [("qkv", 128, 96), ("lm_head", 128, 512)],  # a smoke test under TRITON_INTERPRET=1 on the CPU
    "smollm2": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
                ("lm_head", 576, 49152)],
    "llama8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                ("lm_head", 4096, 128256)],
}


def paths(K: int, N: int, device):
    """name -> fn(x [M, K]) -> [M, N] for each linear path at this shape (weights made once)."""
    g = torch.Generator(device=device).manual_seed(K * 7 + N)
    w = (torch.randn(N, K, generator=g, device=device) / K ** 0.5).to(torch.bfloat16)
    w_scale = (w.float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    w8 = (w.float() / w_scale).to(torch.float8_e4m3fn)
    i_scale = (w.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    wi = (w.float() / i_scale).round().clamp(-127, 127).to(torch.int8)
    held16 = G.CONFIGS["16bit"][5]  # 64x128x64: fits every M
    held8 = G.CONFIGS["8bit"][5]
    split16 = next((c for c in G.CONFIGS["16bit"] if c.get("SPLIT_K", 1) > 1 and K >= c["SPLIT_K"] * c["BLOCK_K"]),
                   {**held16, "SPLIT_K": 2})
    out = {
        "cuBLAS (torch linear)": lambda x: torch.nn.functional.linear(x, w),
        "triton tile, default per M": lambda x: G.linear(x, w),
        "triton tile, one config": lambda x: G.linear(x, w, config=held16),
        "triton split-K, one config": lambda x: G.linear(x, w, config=split16),
        "fp8 scaled_mm (per-token x)": lambda x: G.fp8_linear_scaled_mm(x, w8, w_scale.reshape(N)),
        "fp8 triton, default per M": lambda x: G.fp8_linear_triton(x, w8, w_scale.reshape(N)),
        "fp8 triton, one config": lambda x: G.fp8_linear_triton(x, w8, w_scale.reshape(N), config=held8),
        "int8 triton, default per M": lambda x: G.int8_linear_triton(x, wi, i_scale.reshape(N)),
    }
    gemv = G.GEMV_CONFIGS["16bit"][0]
    out["M=1 GEMV vs tile (row 0 only)"] = lambda x: (G.linear(x, w, config=gemv) if x.shape[0] == 1
                                                      else G.linear(x, w, config=held16))
    return out


def compare(fn, K: int, rows: list[int], device) -> tuple[str, float]:
    """M values whose row 0 differs from the call of one row; the largest difference / max |row 0|."""
    g = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(1, K, generator=g, device=device).to(torch.bfloat16)
    ref = fn(x0)[0].float()
    differ, worst = [], 0.0
    for M in rows:
        if M == 1:
            continue
        x = torch.cat([x0, torch.randn(M - 1, K, generator=g, device=device).to(torch.bfloat16)])
        row = fn(x)[0].float()
        if not torch.equal(row, ref):
            differ.append(M)
            worst = max(worst, ((row - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item())
    return (",".join(map(str, differ)) or "none"), worst


def engine_rows(args) -> None:
    """``--engine``: the engine with the batch-invariant mode off and on, through ``LLM`` in this process."""
    import gc
    import time

    from workbench import LLM
    from workbench.runnable import open_runnable
    from workbench.runtime.sampling import SamplingParams

    opened = open_runnable(args.engine, batch_invariant=False)
    runs = [("off", opened, False), ("on", opened, True)]
    if args.invariant_engine:
        runs.append(("on, tuned in the mode", open_runnable(args.invariant_engine, batch_invariant=True), True))
    vocab = int(opened.program.graph.meta.get("config", {}).get("vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    lengths = [args.prompt_len + 7 * i for i in range(args.prompts)]  # different lengths: mixed, chunked steps
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    n_in, n_out = (int(x) for x in args.len.split("x"))
    load = [torch.randint(1, vocab, (n_in,), generator=g).tolist() for _ in range(args.requests)]
    llm_args = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("memory_fraction", args.memory_fraction),
                                  ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    rows, notes = [], []
    for label, target, mode in runs:
        llm = LLM(target, batch_invariant=mode, **llm_args)
        batch = llm.generate(prompts, greedy)
        alone = [llm.generate([p], greedy)[0] for p in prompts]
        same_tokens = sum(a.token_ids == b.token_ids for a, b in zip(alone, batch))
        same_logprobs = sum(a.logprobs == b.logprobs for a, b in zip(alone, batch))  # floats, compared exactly
        diverged = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
                    for a, b in zip(alone, batch)]
        first = min((d for d in diverged if d is not None), default=None)
        llm.generate(load[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm
        if opened.device.type == "cuda":
            torch.cuda.synchronize()
        steps_before = llm.engine.num_steps
        t0 = time.perf_counter()
        outs = llm.generate(load, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
        if opened.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append({"mode": label, "tok_s": tokens / seconds, "seconds": seconds,
                     "steps": llm.engine.num_steps - steps_before, "same_tokens": same_tokens,
                     "same_logprobs": same_logprobs, "first": first})
        if mode:  # the last row's: the invariant engine's when given
            from workbench.kernels.invariant import choice_lines

            program = llm.engine.executor.program
            configs, names = program.configs(), program.implementations()
            notes = [n for n in llm.notes if "batch-invariant" in n] + choice_lines(
                program.graph, {n: (names[n], c) for n, c in configs.items() if names[n] != "reference"})
        del llm, batch, alone, outs
        gc.collect()
        if opened.device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if opened.device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}; {opened.kind} {opened.name} ({opened.stage}); {args.prompts} prompts "
          f"of {lengths[0]}-{lengths[-1]} tokens greedy for {args.max_tokens} tokens alone vs in one batch; "
          f"{args.requests} requests of {args.len} for throughput; LLM({', '.join(f'{k}={v}' for k, v in llm_args.items())})\n")
    print("| batch-invariant mode | output tok/s | on / off | alone = batch: tokens | alone = batch: log-probs "
          "| first diverging token | steps | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tok_s"]
    for r in rows:
        print(f"| {r['mode']} | {r['tok_s']:,.0f} | **{r['tok_s'] / base:.3f}x** | {r['same_tokens']}/{args.prompts} | "
              f"{r['same_logprobs']}/{args.prompts} | {'-' if r['first'] is None else r['first']} | {r['steps']} | "
              f"{r['seconds']:.1f} |")
    for line in notes:
        print(f"- {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,8,16,33,64,256,512")
    ap.add_argument("--shapes", default="smollm2,llama8b")
    ap.add_argument("--engine", help="measure this engine (directory, workspace or model source) through LLM with "
                                     "the batch-invariant mode off and on, instead of the kernel table")
    ap.add_argument("--invariant-engine", help="--engine: also this engine, the same model built with `workbench "
                                               "build ... --batch-invariant`, as a third row")
    ap.add_argument("--prompts", type=int, default=8, help="--engine: prompts decoded alone and in one batch")
    ap.add_argument("--prompt-len", type=int, default=24, help="--engine: the shortest prompt (each next +7 tokens)")
    ap.add_argument("--max-tokens", type=int, default=32, help="--engine: greedy tokens per prompt")
    ap.add_argument("--requests", type=int, default=256, help="--engine: requests of the throughput run")
    ap.add_argument("--len", default="128x128", help="--engine: the throughput run's input x output tokens")
    ap.add_argument("--max-num-seqs", type=int, help="--engine: LLM's max_num_seqs (default: the engine's)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="--engine: LLM's (default: the engine's)")
    ap.add_argument("--memory-fraction", type=float, help="--engine: LLM's memory_fraction (default: LLM's)")
    args = ap.parse_args()
    if args.engine:
        engine_rows(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [int(r) for r in args.rows.split(",")]
    table = []
    for model in args.shapes.split(","):
        for name, K, N in SHAPES[model]:
            for path, fn in paths(K, N, device).items():
                try:
                    differ, worst = compare(fn, K, rows, device)
                except Exception as e:  # a path that refuses the shape: its first line
                    differ, worst = f"error: {str(e).splitlines()[0][:80]}", float("nan")
                table.append((model, name, f"{K}x{N}", path, differ, worst))
        vocab = SHAPES[model][-1][2]
        g = torch.Generator(device=device).manual_seed(2)
        logits0 = torch.randn(1, vocab, generator=g, device=device)

        def sample(logits):
            return torch.stack([t.float() for t in greedy_logprobs(logits)], -1) if device.type == "cuda" \
                else torch.stack([logits.argmax(-1).float(), logits.log_softmax(-1).amax(-1)], -1)

        ref, differ = sample(logits0)[0], []
        for M in rows[1:]:
            batch = torch.cat([logits0, torch.randn(M - 1, vocab, generator=g, device=device)])
            if not torch.equal(sample(batch)[0], ref):
                differ.append(M)
        table.append((model, "sampling", f"vocab {vocab}", "greedy argmax + log-prob", ",".join(map(str, differ))
                      or "none", 0.0))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}; row 0 of M rows against one row, M in {args.rows}\n")
    print("| model | linear | K x N | path | M where row 0 differs | largest difference / max |row| |")
    print("|---|---|---|---|---|---:|")
    for model, name, shape, path, differ, worst in table:
        print(f"| {model} | {name} | {shape} | {path} | {differ} | {worst:.2e} |")


if __name__ == "__main__":
    main()
