"""Compile kernels on every CPU core before they are needed: a tuning's candidates before they are timed
(``autotune._time_steps``), an engine's small step graphs before they are captured (``Executor.warm_up``).

    stats = precompile(calls, device=program.device)   # calls: (fn, args, kwargs, config), each run once
    stats.line()                                       # "compiled 412 calls on 16 threads in 21.4 s (3 failed ...)"

A Triton kernel compiles the first time it is launched with a new specialization (its constexprs: a config's tile
sizes, stages and warps; its argument dtypes and alignments), about 0.5-2 s each for sm_90 on one core. The autotuner
times a few hundred such candidates per model, one after the other, so a fresh machine's tune stage spends most of
its time compiling on one core while the others idle. Triton releases the GIL while it compiles (its MLIR passes and
``ptxas``), so candidates called from a pool of threads compile side by side; each is then timed as before, one at a
time, and finds its kernel compiled (Triton's in-memory cache; its on-disk cache for a later process).

Each call runs the candidate once on the arguments it will be timed on, on ``device``: the same specialization the
timing launches, and a real launch (a result that is thrown away). A candidate that fails here (resources, an
unsupported shape) is counted and left to the timing, which records its error as it always did, so this changes
what is compiled when, never what is timed or chosen. Threads: ``WORKBENCH_COMPILE_THREADS``, default the machine's
cores up to 16 (``compile_threads``); 1 or 0 turns it off. ``bench/compile_threads.py`` measures the
speed-up on any machine (the compiler needs no GPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar

Candidate = tuple[Callable, tuple, Mapping[str, Any], "dict | None"]


def compile_threads() -> int:
    """Threads that compile side by side: ``WORKBENCH_COMPILE_THREADS``, else the machine's cores up to 16."""
    raw = os.environ.get("WORKBENCH_COMPILE_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise WorkbenchError(f"WORKBENCH_COMPILE_THREADS={raw!r} is not a whole number: set it to the number of "
                                 "threads that compile kernels side by side (1 turns it off), or unset it") from None
        return max(n, 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, cores)


@dataclass
class Precompiled:
    calls: int
    failed: int
    threads: int
    seconds: float

    def line(self) -> str:
        failed = (f" ({self.failed} failed here: each runs again, alone, when it is timed or captured, which records "
                  "or raises its error)") if self.failed else ""
        return f"compiled {self.calls} calls on {self.threads} threads in {self.seconds:.1f} s{failed}"


def precompile(calls: Sequence[Candidate], *, device: torch.device | str, threads: int | None = None,
               progress: Any = True) -> Precompiled | None:
    """Call each ``(fn, args, kwargs, config)`` once from a pool of ``threads`` (default ``compile_threads()``), so
    their kernels compile in parallel; wait for the device. None when there is nothing to do or one thread.

    Each call runs as the caller would run it: on the caller's GPU, with its grad and inference modes and a copy of
    its context variables (a pool thread starts with none of them). A failure is counted, not raised: the call runs
    again when it is timed or captured. A fault the device reports only at the end (an illegal address) cannot
    be pinned to one call; it is raised in one line that says how to find it."""
    threads = compile_threads() if threads is None else threads
    if threads <= 1 or not calls:
        return None
    device = torch.device(device)
    # a new thread starts on device 0: each takes the caller's device ("cuda" alone: the caller's current one)
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    contexts = [contextvars.copy_context() for _ in calls]  # a context is entered by one thread at a time
    t0 = time.perf_counter()

    def run(call: Candidate) -> None:
        fn, args, kwargs, config = call
        if index is not None:
            torch.cuda.set_device(index)
        with torch.inference_mode() if inference else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            fn(*args, **kwargs, config=config) if config is not None else fn(*args, **kwargs)

    def one(i: int) -> bool:
        try:
            contexts[i].run(run, calls[i])
            return True
        except Exception:
            return False

    failed = 0
    with progress_bar(len(calls), f"compile ({threads} threads)", "call", enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=min(threads, len(calls)), thread_name_prefix="wb-compile") as pool:
        for ok in pool.map(one, range(len(calls))):
            failed += not ok
            bar.update(1)
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError as e:
            raise WorkbenchError(f"a kernel called while compiling on {threads} threads failed on the GPU ({e}); "
                                 "set WORKBENCH_COMPILE_THREADS=1 to run each call alone and see which") from None
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:  # each pool thread's cuBLAS handle kept a workspace that empty_cache cannot free
            clear()
    return Precompiled(len(calls), failed, min(threads, len(calls)), time.perf_counter() - t0)
