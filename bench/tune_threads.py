"""A fresh machine's two long compiles, on one thread and on a pool (``kernels/precompile.py``): `workbench tune` as
a user runs it, on the same optimized workspace, and the start of `LLM(engine)` on the engine exported from it (its
CUDA graphs' kernels), each run into an empty Triton cache.

    python3 bench/tune_threads.py --preset llama-3.2-1b --threads 1,16         # a preset, a GGUF or HF directory
    python3 bench/tune_threads.py --preset llama-3-8b --precision fp8 --threads 1,16 --out $OUT/tune_threads.json

One `workbench capture` and `workbench optimize` (and `workbench quantize --format fp8 --kv-cache fp8` with
``--precision fp8``) make the workspace; each thread count then tunes a copy of it with ``WORKBENCH_COMPILE_THREADS``
set, in a new process with ``TRITON_CACHE_DIR`` empty (what a fresh machine has). The table gives each run's
seconds and its speed-up over the first thread count (the baseline, measured in the same call), and how many of the
nodes' chosen (tactic, config) per bucket equal the baseline's: near-equal candidates may swap on timing noise.
Then the first run's workspace is exported (`workbench export`), and for each thread count a new process times
`LLM(engine)` (the KV cache planned, every CUDA graph warmed up and captured) and one short generation, again into an
empty Triton cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def workbench(*args: str, env: dict | None = None) -> float:
    """Run ``python -m workbench ARGS``; its seconds. Exits with its output on a failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "workbench", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"workbench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def choices(workspace: Path) -> list[dict]:
    """The tune stage's choices per bucket: node -> [tactic, config]."""
    from workbench.workspace import Workspace

    return Workspace(workspace).read_json("tune", "choices.json")["choices"]


START = """
import sys, time
t0 = time.perf_counter()
from workbench import LLM, SamplingParams
llm = LLM(sys.argv[1])
started = time.perf_counter() - t0
llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
print("START_SECONDS", started, time.perf_counter() - t0)
"""


def start_seconds(engine: Path, env: dict) -> tuple[float, float]:
    """(seconds until ``LLM(engine)`` returned, seconds until its first generation returned), in a new process."""
    proc = subprocess.run([sys.executable, "-c", START, str(engine)], env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("START_SECONDS")]
    if proc.returncode or not line:
        sys.exit(f"LLM({engine}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    _, started, generated = line[-1].split()
    return float(started), float(generated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--threads", default="1,16", help="comma-separated WORKBENCH_COMPILE_THREADS values; the first "
                                                     "is the baseline")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "tune_threads")
    ap.add_argument("--out", type=Path, help="JSON of the rows")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    shutil.rmtree(args.dir, ignore_errors=True)
    base = args.dir / "base"
    workbench("capture", args.preset, str(base))
    workbench("optimize", str(base), "--kv-block-size", "64")
    if args.precision == "fp8":
        workbench("quantize", str(base), "--format", "fp8", "--kv-cache", "fp8")
    rows = []
    for t in threads:
        ws = args.dir / f"threads-{t}"
        shutil.copytree(base, ws)
        cache = args.dir / f"triton-cache-{t}"
        env = {**os.environ, "WORKBENCH_COMPILE_THREADS": str(t), "TRITON_CACHE_DIR": str(cache)}
        seconds = workbench("tune", str(ws), env=env)
        rows.append({"threads": t, "seconds": round(seconds, 1), "choices": choices(ws)})
        print(f"threads {t}: tune {seconds:.1f} s", flush=True)
    engine = args.dir / "engine"
    workbench("export", str(args.dir / f"threads-{threads[0]}"), "--out", str(engine))
    for row in rows:
        t = row["threads"]
        env = {**os.environ, "WORKBENCH_COMPILE_THREADS": str(t), "TRITON_CACHE_DIR": str(args.dir / f"start-{t}")}
        row["start_s"], row["first_generation_s"] = (round(x, 1) for x in start_seconds(engine, env))
        print(f"threads {t}: LLM(engine) {row['start_s']:.1f} s", flush=True)
    first = rows[0]
    for row in rows:
        pairs = [(node, bucket) for bucket, chosen in enumerate(first["choices"]) for node in chosen]
        row["same_choices"] = sum(row["choices"][b].get(n) == first["choices"][b][n] for n, b in pairs)
        row["choices_total"] = len(pairs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"preset": args.preset, "precision": args.precision,
                                        "rows": [{k: v for k, v in r.items() if k != "choices"} for r in rows]},
                                       indent=1))
    print(f"\n{args.preset} ({args.precision}) into an empty Triton cache: `workbench tune`, then LLM(engine)'s start")
    print(f"{'threads':>7} {'tune s':>7} {'speed-up':>9} {'same choices':>14} {'start s':>8} {'speed-up':>9}")
    for row in rows:
        print(f"{row['threads']:>7} {row['seconds']:>7.1f} {first['seconds'] / row['seconds']:>8.2f}x "
              f"{row['same_choices']:>7}/{row['choices_total']:<6} {row['start_s']:>8.1f} "
              f"{first['start_s'] / row['start_s']:>8.2f}x")


if __name__ == "__main__":
    main()
