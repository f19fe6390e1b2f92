"""The GPU runs still owed, in priority order, run within one device call's budget and resumed by the next call.

    python3 bench/gpu_queue.py --budget 540 --out $OUT          # in each call on a warm machine, until all are done
    python3 bench/gpu_queue.py --list                            # the jobs, what each needs and whether it is done

Device time is scarce and a machine stays warm only briefly between calls, so each call should do as much owed
work as fits. Each job is one command of the product or of ``bench/`` (what BENCHMARKS.md records), with what it
needs (files an earlier job or call made) and an estimate of its seconds on a fresh H100/H200. A call runs, in
order, every job not done whose needs are met and whose estimate fits what is left of ``--budget`` (a resumable
job, which picks up where it stopped, starts whenever at least ``--min-start`` seconds are left, under a timeout
of what is left). A job that exits 0 is marked done under ``--state`` (default /tmp/gpu_queue: the machine's own
disk, so a fresh machine starts over); the logs of the jobs run in this call, and their JSON results, go to ``--out``
(``$OUT``, which comes back with the call: at most 8 files, so a call's few jobs write a log and a JSON each). The
table at the end says what ran, how long, and what is left.

SmolLM2's GGUF (98 MB) travels in two carried parts of under 64 MiB (ENVIRONMENT.md): carry ``.carry/smol.gguf.aa``
in one call and ``.carry/smol.gguf.ab`` in the next; the queue copies the first part to /tmp and joins the file
once both have come (``/tmp/SmolLM2-135M-Instruct.Q4_1.gguf``). Jobs that need it wait until then. The notebooks
job also needs ipython, ipywidgets and plotly as wheels in ``.nbwhl`` (19 MB: carry it in a call without a GGUF
part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path("/tmp/SmolLM2-135M-Instruct.Q4_1.gguf")
E8B = Path("/tmp/e8b")


@dataclass
class Job:
    name: str
    command: str
    estimate_s: int            # on a fresh machine, from earlier runs (BENCHMARKS.md)
    needs: list[Path] = field(default_factory=list)
    resumable: bool = False    # picks up where a stopped run left off: start it whenever time is left
    what: str = ""


JOBS = [
    Job("build8b", f"python3 -m workbench build llama-3-8b --precision fp8 --kv-cache fp8 --kv-block-size 64 "
        f"--out {E8B}", 480, resumable=True,
        what="issue 22 item 9: the 8B FP8 user build (tune is its long stage; a re-run resumes)"),
    Job("serve8b", f"python3 bench/serve_load.py --engine {E8B} --requests 200 --len 1000 --rates inf "
        "--out $OUT/serve8b.json", 200, needs=[E8B / "engine.json"],
        what="issue 22 item 9: workbench serve under 200 streaming requests against offline (goal >= 0.9x)"),
    Job("acceptance", f"python3 bench/gpu_acceptance.py --models {GGUF} --precisions bf16,fp8,int8,auto "
        "--out /tmp/acceptance_out --resume; rc=$?; cp /tmp/acceptance_out/acceptance.json $OUT/; exit $rc", 700,
        needs=[GGUF], resumable=True,
        what="issues 22 (item 8) and 28: SmolLM2 at every precision through build, LLM, diff (prefill + 4 decode "
        "steps against transformers fp32) and serve (rows done are kept, builds resume)"),
    Job("batch_invariance", "python3 bench/batch_invariance.py", 120,
        what="issue 25: which GEMM paths give a row the same bits whatever the batch"),
    Job("families", "python3 bench/families.py --out /tmp/families.json && cp /tmp/families.json $OUT/", 900,
        resumable=True, what="issue 26: every family's batch-1 share and FP8 throughput against Llama-3-8B"),
    Job("tp_floor", "python3 bench/tp_rank_floor.py --preset llama-3-8b --tp 1,2,4 --out $OUT/tp_rank_floor.json",
        240, what="issue 27: one rank's decode and prefill at TP-1/2/4 on one GPU (the per-rank floor)"),
    Job("compile_threads", "python3 bench/compile_threads.py", 120,
        what="the tune stage's parallel compile: the GEMM space compiled for sm_90 on 1-16 threads (Triton 3.6)"),
    Job("tune_threads", f"python3 bench/tune_threads.py --preset {GGUF} --threads 1,16 --out $OUT/tune_threads.json",
        480, needs=[GGUF], what="SmolLM2's `workbench tune` and LLM(engine) start into an empty Triton cache, "
        "compiling on 1 and 16 threads"),
    Job("notebooks", "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
        f"/tmp/site .nbwhl/*.whl && python3 bench/notebook_times.py --model {GGUF} --out $OUT/notebook_times.json",
        420, needs=[GGUF, ROOT / ".nbwhl"],
        what="issue 24: each notebook's time on the GPU with SmolLM2, for its first cell (carry .nbwhl: ipython, "
        "ipywidgets, plotly)"),
]


def prepare_gguf(move: bool = True) -> str:
    """Copy a carried first part to /tmp, join the file once both parts are here (``move=False``: only say); a line
    saying where it stands."""
    if GGUF.exists():
        return f"{GGUF.name}: here"
    aa, ab = ROOT / ".carry" / "smol.gguf.aa", ROOT / ".carry" / "smol.gguf.ab"
    first = Path("/tmp/smol.gguf.aa")
    if not move:
        return f"{GGUF.name}: not joined yet"
    if aa.exists() and not first.exists():
        shutil.copyfile(aa, first)
    if first.exists() and ab.exists():
        with open(GGUF, "wb") as out:
            for part in (first, ab):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        first.unlink()
        return f"{GGUF.name}: joined ({GGUF.stat().st_size} bytes)"
    wanted = "first part here, carry .carry/smol.gguf.ab next" if first.exists() else \
        "carry .carry/smol.gguf.aa, then .ab"
    return f"{GGUF.name}: {wanted}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=540, help="seconds this call may spend (under run's limit)")
    ap.add_argument("--min-start", type=float, default=90, help="start a resumable job only with this much left")
    ap.add_argument("--only", help="comma-separated job names to consider (default: all, in order)")
    ap.add_argument("--state", type=Path, default=Path("/tmp/gpu_queue"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_queue_out")))
    ap.add_argument("--list", action="store_true", help="print the jobs and their state, run nothing")
    args = ap.parse_args()
    t0 = time.monotonic()
    args.state.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [j.name for j in JOBS]
    only = args.only.split(",") if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        sys.exit(f"gpu_queue: unknown job(s) {', '.join(unknown)}; the jobs are {', '.join(names)}")
    print(prepare_gguf(move=not args.list), flush=True)
    rows = []
    for job in JOBS:
        done = (args.state / f"{job.name}.done").exists()
        missing = [str(p) for p in job.needs if not p.exists()]
        left = args.budget - (time.monotonic() - t0)
        if args.list or job.name not in only or done or missing:
            rows.append((job.name, "done" if done else f"needs {missing[0]}" if missing else "-", "", job.what))
            continue
        if left < (args.min_start if job.resumable else job.estimate_s):
            rows.append((job.name, f"not started ({left:.0f} s left, needs ~{job.estimate_s} s)", "", job.what))
            continue
        log = args.out / f"{job.name}.log"
        print(f"\n== {job.name} ({job.what}); {left:.0f} s left: {job.command}", flush=True)
        start = time.monotonic()
        env = {**os.environ, "OUT": str(args.out), "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as f:
            proc = subprocess.Popen(["bash", "-c", job.command], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, left - 5))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)
                try:
                    rc = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    rc = proc.wait()
                rc = f"stopped at the budget (rc {rc})"
        seconds = time.monotonic() - start
        if rc == 0:
            (args.state / f"{job.name}.done").write_text(json.dumps({"seconds": seconds}))
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
        print("\n".join(tail), flush=True)
        rows.append((job.name, "done" if rc == 0 else f"failed ({rc})" if isinstance(rc, int) else rc,
                     f"{seconds:.0f}", job.what))
    print(f"\ngpu_queue: {time.monotonic() - t0:.0f} s of a {args.budget:.0f} s budget; logs in {args.out}")
    print(f"{'job':<17} {'state':<44} {'s':>5}  what")
    for name, state, seconds, what in rows:
        print(f"{name:<17} {state[:44]:<44} {seconds:>5}  {what}")


if __name__ == "__main__":
    main()
