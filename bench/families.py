"""The model families against the Llama preset, as a user runs each: batch-1 bf16 decode and FP8 offline throughput.

    python3 bench/families.py --out /tmp/families.json                  # every full-size family, Llama first
    python3 bench/families.py --presets llama-3-8b,qwen3-8b,gemma-2-9b --out /tmp/families.json
    python3 bench/families.py --presets tiny-llama,tiny-gpt2 --device cpu --batch1-len 8 --shape 16x8 --requests 4

For each preset (random weights), in one workspace, the stage commands a user runs (``workbench capture``,
``workbench optimize --kv-block-size 64``, ``workbench quantize --format fp8 --kv-cache fp8``), each stage then
run through ``LLM(workspace)``:

  batch-1     the optimized bf16 graph, one request of ``--batch1-len`` prompt and output tokens: decode tokens/s
              (first token excluded) and its share of the copy ceiling measured here (weight bytes a step reads x
              tokens/s over the best device-to-device copy rate)
  fp8         the FP8 W8A8 graph with an FP8 KV cache, ``--requests`` requests of ``--shape`` at once: output
              tokens/s, and tokens/s x the parameters a decode step reads (so models of other sizes compare)

The key columns are ratios against the baseline preset (``--baseline``, default the first of ``--presets``) run in
the same process: a family's bandwidth share over the baseline's (issue 26's goal: within 5%), and its tokens/s x
parameters over the baseline's (goal: within 10%). Kernels are the product's GPU defaults for every preset (no
``workbench tune``: tuning an 8B graph takes minutes per model), so the comparison is between families, not the
tuned numbers of BENCHMARKS.md. Calibration uses ``--samples`` x ``--seq-len`` tokens of the default calibration
text: the speed of an FP8 graph does not depend on its scales' values.

Each preset's row is written to ``--out`` as soon as it is measured, and a re-run skips the presets already there
(so a sweep can span two device calls); ``--fresh`` starts over. The workspaces are deleted after each preset
(``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import free, read_weights, run_engine, sync  # noqa: E402

from workbench.cli import main as workbench_main  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402
from workbench.runnable import open_runnable  # noqa: E402

FAMILIES = "llama-3-8b,qwen3-8b,gemma-2-9b,phi-3-mini,falcon-7b,gpt-neox-6.9b,gpt2-xl"


def stage(argv: list[str]) -> float:
    """One ``workbench`` command, as a user types it; its seconds (a failure stops the bench with its error)."""
    print("workbench " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    if workbench_main(argv) != 0:
        raise RuntimeError(f"`workbench {' '.join(argv)}` failed (its error is above)")
    return time.perf_counter() - t0


def measure(preset: str, args, ceiling: float | None) -> dict:
    """One preset: capture, optimize, the batch-1 bf16 decode, quantize, the FP8 offline run."""
    device = args.device
    ws = args.work / preset
    shutil.rmtree(ws, ignore_errors=True)
    row: dict = {"preset": preset, "stage_s": {}}
    row["stage_s"]["capture"] = stage(["capture", preset, str(ws)])
    row["stage_s"]["optimize"] = stage(["optimize", str(ws), "--kv-block-size", str(args.kv_block_size),
                                        "--device", device])
    g = torch.Generator().manual_seed(0)

    opened = open_runnable(ws, device=device)
    row["weight_bytes"], row["params"] = read_weights(opened.program)
    vocab = opened.program.graph.meta["config"]["vocab_size"]
    n = args.batch1_len
    prompt = torch.randint(0, vocab, (1, n), generator=g).tolist()
    run_engine(opened, prompt, 4, llm={}, device=device)  # warm up: compiles, graph capture
    one, _ = run_engine(opened, prompt, n, llm={}, device=device)
    tps = (one["generated"] - 1) / (one["seconds"] - one["first_token_s"])
    row["batch1_tps"] = tps
    row["batch1_gbps"] = tps * row["weight_bytes"] / 1e9
    row["batch1_share"] = row["batch1_gbps"] / ceiling if ceiling else None
    del opened
    free(device)

    row["stage_s"]["quantize"] = stage(["quantize", str(ws), "--format", "fp8", "--kv-cache", "fp8",
                                        "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                                        "--device", device])
    opened = open_runnable(ws, device=device)
    n_in, n_out = (int(v) for v in args.shape.lower().split("x"))
    prompts = torch.randint(0, vocab, (args.requests, n_in), generator=g).tolist()
    run_engine(opened, prompts[:64], 2, llm={}, device=device)  # warm up
    many, _ = run_engine(opened, prompts, n_out, llm={}, device=device)
    row["fp8_tps"] = many["generated"] / many["seconds"]
    row["fp8_tps_params"] = row["fp8_tps"] * row["params"]
    row["fp8_run"] = {k: many[k] for k in ("seconds", "steps", "eager_steps", "max_running", "preempted",
                                           "num_blocks", "step_kinds")}
    row["notes"] = opened.notes
    del opened
    free(device)
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=FAMILIES, help="comma-separated presets; the first is the baseline")
    ap.add_argument("--baseline", help="the preset the ratios are against (default: the first of --presets)")
    ap.add_argument("--batch1-len", type=int, default=128)
    ap.add_argument("--shape", default="128x128", help="FP8 offline requests: input x output tokens")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--kv-block-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/families_work"), help="where the workspaces go")
    ap.add_argument("--keep", action="store_true", help="keep each preset's workspace")
    ap.add_argument("--fresh", action="store_true", help="measure every preset again (default: skip those in --out)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/families.json"))
    args = ap.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    baseline = args.baseline or presets[0]
    cuda = args.device.startswith("cuda")
    done = {} if args.fresh or not args.out.exists() else json.loads(args.out.read_text())
    rows = done.setdefault("rows", {})
    done["gpu"] = torch.cuda.get_device_name() if cuda else "cpu"
    done["torch"] = torch.__version__
    if cuda and "copy_gbps" not in done:
        done["copy_gbps"] = copy_gbps(args.device)
    ceiling = done.get("copy_gbps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for preset in [baseline] + [p for p in presets if p != baseline]:
        if preset in rows and "error" not in rows[preset]:
            print(f"families: {preset} measured already ({args.out}); --fresh measures it again", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            rows[preset] = measure(preset, args, ceiling)
        except Exception as e:  # noqa: BLE001 - the table says which preset failed and how
            import traceback

            traceback.print_exc()
            rows[preset] = {"preset": preset, "error": f"{type(e).__name__}: {e}"[:400]}
            free(args.device)
        rows[preset]["wall_s"] = time.perf_counter() - t0
        sync(args.device)
        args.out.write_text(json.dumps(done, indent=1, default=str))
        print(json.dumps({k: v for k, v in rows[preset].items() if k not in ("notes", "fp8_run")}, default=str),
              flush=True)

    base = rows.get(baseline, {})
    print(f"\n{done['gpu']}, torch {torch.__version__}; copy ceiling "
          f"{f'{ceiling:.0f} GB/s' if ceiling else '-'}; kernels: the product's GPU defaults (untuned); batch-1 "
          f"{args.batch1_len}/{args.batch1_len} bf16; FP8 {args.requests} x {args.shape}, FP8 KV cache in blocks of "
          f"{args.kv_block_size}; baseline {baseline}")
    print(f"{'preset':<16} {'params B':>8} {'b1 tok/s':>9} {'GB/s':>7} {'share':>6} {'vs base':>8} "
          f"{'fp8 tok/s':>10} {'tok/s x B':>10} {'vs base':>8}  stages s (capture/optimize/quantize)")
    for preset in [baseline] + [p for p in presets if p != baseline]:
        r = rows.get(preset, {})
        if "error" in r or not r:
            print(f"{preset:<16} {r.get('error', 'not measured')}")
            continue
        share_ratio = (r["batch1_share"] / base["batch1_share"]
                       if r.get("batch1_share") and base.get("batch1_share") else None)
        param_ratio = r["fp8_tps_params"] / base["fp8_tps_params"] if base.get("fp8_tps_params") else None
        stages = "/".join(f"{r['stage_s'][s]:.0f}" for s in ("capture", "optimize", "quantize"))
        share = f"{r['batch1_share']:.1%}" if r.get("batch1_share") else "-"
        print(f"{preset:<16} {r['params'] / 1e9:>8.2f} {r['batch1_tps']:>9.1f} {r['batch1_gbps']:>7.0f} {share:>6} "
              f"{f'{share_ratio:.2f}x' if share_ratio else '-':>8} {r['fp8_tps']:>10.0f} "
              f"{r['fp8_tps_params'] / 1e9:>10.0f} {f'{param_ratio:.2f}x' if param_ratio else '-':>8}  {stages}")


if __name__ == "__main__":
    main()
