"""The runtime over several ranks: one scheduler (rank 0), the same step on every rank.

``LLM(model, tensor_parallel_size=N)`` and ``workbench serve MODEL --tp N`` run rank 0 in their own process and
start ranks 1..N-1 as worker processes (``TPWorkers``); under ``torchrun --nproc-per-node N`` the ranks exist
already: rank 0 serves (or runs the script) and ranks 1.. become its workers (``run_torchrun_worker``) instead of
being spawned. Each step, rank 0 broadcasts the step's inputs (token ids, positions, slot mapping, block tables,
sequence lengths, the sampled rows: a few KB) and every rank runs its shard of the graph against its own KV cache
(its KV heads only); the graph's all-reduces and the logits' all-gather run inside. Rank 0 samples; the
scheduler, abort, preemption and prefix caching are the one-rank runtime's, unchanged.

Where the weights come from (``Sharding``): from an engine directory each rank reads only its own slices from
the engine's safetensors file (``engine.weights``), rank 0 included, and nothing else crosses between processes
but the sharded graph and a file name; from a workspace, a model source or a ``Program`` (weights in memory) rank
0 holds the whole model and hands each worker its slices (``rank_params``).

Start-up: rank 0 sends each worker a ``RankSpec`` (as process arguments when it spawns them, over the group's
control channel under torchrun), every worker builds its program and KV cache and reports ready or why not, and
rank 0 raises that one line if any failed. A worker ignores SIGINT and SIGTERM: it lives and stops with rank 0
(``close`` tells it to), so a server's graceful shutdown can still finish its requests on every rank; one whose
rank 0 went away stops with a line saying so. A worker that dies ends the engine with a message naming it.

**Step graphs on every rank.** Rank 0's executor sends each rank its step-graph settings (``graph_settings``), so
every rank has an ``Executor`` of its own with the same (tokens, sequences) graphs. Capturing one, rank 0 tells
the ranks first and all capture it at once: the graph's collectives are recorded on every rank (NCCL captures
collectives; on the CPU, ``emulate_graphs`` runs the same padded steps node by node). Each step that replays a
graph, rank 0 sends the graph's key and the step's padded inputs (``executor.StaticStep``: a few KB of integers)
and every rank replays its graph on them; a step that fits no graph runs eagerly on every rank. Steps are
synchronous (rank 0 samples from logits the step's all-gather brought, then schedules the next).
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import (broadcast_object, free_port, gather_objects, join, leave, local_rank,
                           recv_object, send_object)
from ..errors import WorkbenchError
from ..graph.ir import Graph
from ..graph.sharding import RankSpec, Sharding, check_size, torchrun_launch

#: seconds a spawned rank and rank 0 wait for each other to join
JOIN_TIMEOUT_S = 120.0
#: seconds torchrun's ranks 1.. wait for rank 0 to join: it loads its shard (or captures a model) first
TORCHRUN_JOIN_TIMEOUT_S = 1800.0


# ---- sizes ------------------------------------------------------------------------------------------------------

def launched_size(size: int | None, device) -> int | None:
    """The tensor-parallel size to run at: under torchrun its number of processes (``size``, if given, must be it),
    else ``size`` (None: an engine's own size, else 1), checked: a whole number >= 1, on GPUs no more than there
    are."""
    from ..device import resolve_device

    launch = torchrun_launch()
    if launch is not None:
        if size is not None and size != launch[1]:
            raise WorkbenchError(f"torchrun launched {launch[1]} processes, and the tensor-parallel size is {size}; "
                                 f"leave --tp out (or give --tp {launch[1]}), or launch --nproc-per-node {size}")
        return launch[1]
    if size is None:
        return None
    if size > 1:
        check_spawnable_main()
    return check_size(size, resolve_device(device))


def check_spawnable_main() -> None:
    """Refuse, in one line naming the file and the fix, to spawn ranks from a script's unguarded top level: a
    spawned process imports the main script again (multiprocessing's ``spawn``, the one start method CUDA allows),
    so an ``LLM(..., tensor_parallel_size=N)`` at its top level would start ranks of its own in every rank and fail
    in a traceback of multiprocessing's. Code under ``if __name__ == "__main__":`` is not run again (nor is a
    package's ``__main__.py``: ``python -m``, nor a notebook's or ``python -c``'s code)."""
    import ast
    import inspect

    frame = inspect.currentframe()
    while frame is not None and not (frame.f_code.co_name == "<module>" and
                                     frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    path = frame.f_globals.get("__file__") if frame is not None else None
    if not path or not str(path).endswith(".py") or Path(path).name == "__main__.py" or not Path(path).is_file():
        return
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test) \
                and node.body and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
            return
    raise WorkbenchError(f"tensor parallelism starts its ranks as new Python processes, which import {path} again "
                         f"and would run its line {line} again: put the code that makes the LLM under "
                         "`if __name__ == \"__main__\":` (as vLLM asks), or launch the script with torchrun")


# ---- rank 0 -----------------------------------------------------------------------------------------------------

def graph_settings(executor) -> dict | None:
    """What a rank needs to build an ``Executor`` with ``executor``'s step graphs (None when it runs none)."""
    if not executor.graphs_enabled:
        return None
    return {"cuda_graphs": executor.cuda_graphs, "emulate_graphs": executor.emulate_graphs,
            "graph_batch_sizes": list(executor.graph_batch_sizes),
            "graph_token_sizes": list(executor.graph_token_sizes),
            "max_seqs": executor.max_seqs, "max_model_len": executor.table_width * executor.block_size}


def start_workers(executor, sharding: Sharding) -> None:
    """Ranks 1..size-1 of ``executor``'s sharded program (torchrun's, or spawned), fed by it, with its step
    graphs."""
    executor.tensor_parallel = TPWorkers(sharding, executor.program, executor.num_blocks,
                                         torchrun=torchrun_launch() is not None, graphs=graph_settings(executor))


class TPWorkers:
    """Ranks 1..size-1 of a sharded program, fed each step by rank 0 (this process): worker processes it spawns,
    or with ``torchrun`` the processes torchrun started (``run_torchrun_worker``)."""

    def __init__(self, sharding: Sharding, program, num_blocks: int, *, torchrun: bool = False,
                 graphs: dict | None = None) -> None:
        """``program``: rank 0's, as its executor runs it; ``num_blocks``: its KV cache's blocks; ``graphs``: its
        step-graph settings (``graph_settings``)."""
        import torch.multiprocessing as mp

        device = program.device
        self.size, self.torchrun, self.procs, self.errors = sharding.size, torchrun, [], None
        self.closed = True
        if torchrun:
            self.group = join(0, self.size, device=device, timeout_s=TORCHRUN_JOIN_TIMEOUT_S)
            self.closed = False
            try:
                for rank in range(1, self.size):
                    send_object(sharding.spec(rank, program, num_blocks, graphs), rank)
            except Exception as e:  # noqa: BLE001
                self.close(force=True)
                raise WorkbenchError(f"tensor parallelism: cannot reach torchrun's ranks ({_line(e)})") from None
        else:
            check_spawnable_main()
            ctx = mp.get_context("spawn")
            self.errors = ctx.Queue()
            init = f"tcp://127.0.0.1:{free_port()}"
            for rank in range(1, self.size):
                p = ctx.Process(target=_spawned_worker, args=(sharding.spec(rank, program, num_blocks, graphs), init,
                                                              self.errors), daemon=True,
                                name=f"workbench-tp-rank{rank}")
                p.start()
                self.procs.append(p)
            try:
                self.group = join(0, self.size, init_method=init, device=device, timeout_s=JOIN_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the worker's own reason is the useful one
                self.close(force=True)
                raise WorkbenchError(f"the tensor-parallel ranks did not start: {self.failure() or e}") from None
            self.closed = False
        try:  # every rank says whether it built its shard; then all go on, or all stop
            ready = gather_objects(None)
            failed = [(rank, status["error"]) for rank, status in enumerate(ready) if status and status.get("error")]
            broadcast_object(not failed)
        except Exception as e:  # noqa: BLE001
            self.close(force=True)
            raise WorkbenchError(f"the tensor-parallel ranks did not start: {self.failure() or _line(e)}") from None
        if failed:
            self._end(wait_s=10)  # the ranks stop by themselves
            raise WorkbenchError(f"tensor-parallel rank {failed[0][0]} failed to start: {failed[0][1]}")
        #: per rank, what it read from the engine's weights (``WeightsRead``; None: handed over by rank 0)
        self.weights_read = [sharding.weights_read] + [status.get("weights_read") for status in ready[1:]]
        atexit.register(self.close)  # a script that never closes its LLM still stops the ranks (torchrun's too)

    def failure(self) -> str | None:
        """The first spawned worker's error or death, in one line; None while all are alive (or under torchrun,
        whose ranks torchrun watches)."""
        if self.errors is not None:
            with contextlib.suppress(Exception):
                rank, message = self.errors.get_nowait()
                return f"rank {rank} failed: {message}"
        for rank, p in enumerate(self.procs, 1):
            if p.exitcode not in (None, 0):
                return f"rank {rank} died (exit code {p.exitcode})"
        return None

    def broadcast(self, inputs: dict[str, Any]) -> None:
        """Send one eager step's inputs from rank 0 to every rank, which runs the step node by node."""
        self._send(("eager", {k: v.cpu() for k, v in inputs.items()}))

    def capture(self, key: tuple[int, int]) -> None:
        """Have every rank capture step graph ``key`` now, as rank 0 does (their collectives pair up)."""
        self._send(("capture", tuple(key)))

    def replay(self, key: tuple[int, int], host) -> None:
        """Have every rank replay step graph ``key`` on ``host`` (``executor.StaticStep``), as rank 0 does."""
        self._send(("replay", tuple(key), host))

    def _send(self, message) -> None:
        dead = self.failure()
        if dead:
            raise WorkbenchError(f"tensor parallelism: {dead}; the engine stopped (restart it)")
        try:
            broadcast_object(message)
        except Exception as e:  # noqa: BLE001
            raise WorkbenchError(f"tensor parallelism: {self.failure() or _line(e)}; the engine stopped (restart "
                                 "it)") from None

    @contextlib.contextmanager
    def step(self):
        """Around rank 0's own run of a step: a collective that fails because a rank died names the rank."""
        try:
            yield
        except RuntimeError as e:
            raise WorkbenchError(f"tensor parallelism: {self.failure() or _line(e)}; the engine stopped (restart "
                                 "it)") from None

    def close(self, *, force: bool = False) -> None:
        """Stop the workers and leave the group (idempotent); ``force``: without telling them (they failed)."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self.closed and not force:
            return
        if not self.closed and not force and self.failure() is None:  # the stop order
            with contextlib.suppress(Exception):
                broadcast_object(None)
        self._end(wait_s=0.1 if force else 10)

    def _end(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for spawned workers to exit (then kill them) and leave the group."""
        self.closed = True
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        with contextlib.suppress(Exception):
            leave()


# ---- ranks 1.. ---------------------------------------------------------------------------------------------------

def run_torchrun_worker(device="auto") -> bool:
    """Under ``torchrun --nproc-per-node N`` (N > 1), ranks 1.. run rank 0's steps here, from its ``RankSpec`` to its
    order to stop, and return True; elsewhere (rank 0, or no torchrun) return False at once. ``workbench serve``
    and ``LLM`` call it first, so that one command line serves from N processes. A failure ends the process with a
    one-line message (exit status 1)."""
    from ..device import resolve_device

    launch = torchrun_launch()
    if launch is None or launch[0] == 0:
        return False
    rank, size = launch
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    try:
        join(rank, size, device=device, timeout_s=TORCHRUN_JOIN_TIMEOUT_S)
        try:
            spec = recv_object(0)
        except Exception as e:  # noqa: BLE001 - rank 0 failed before it started the engine
            raise WorkbenchError(f"rank 0 went away before the engine started ({_line(e)})") from None
        _ignore_stop_signals()  # from here on rank 0 says when to stop (until then torchrun's SIGTERM ends it)
        _run_rank(spec, device)
    except Exception as e:  # noqa: BLE001 - one line, then exit 1: torchrun reports the failed rank
        print(f"workbench: tensor-parallel rank {rank}: {_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        with contextlib.suppress(Exception):
            leave()
    print(f"workbench: tensor-parallel rank {rank}: stopped with rank 0", file=sys.stderr, flush=True)
    return True


def _spawned_worker(spec: RankSpec, init: str, errors) -> None:
    """A rank that rank 0 spawned: join, then run its steps (``_run_rank``); failures go to rank 0 in one line."""
    torch.set_num_threads(max(1, torch.get_num_threads() // spec.size))
    _ignore_stop_signals()
    try:
        device = torch.device("cuda", spec.rank) if spec.device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join(spec.rank, spec.size, init_method=init, device=device, timeout_s=JOIN_TIMEOUT_S)
        _run_rank(spec, device)
    except BaseException as e:  # noqa: BLE001 - to rank 0 in one line
        errors.put((spec.rank, f"{type(e).__name__}: {_line(e)}"))
        raise SystemExit(1)
    finally:
        with contextlib.suppress(Exception):
            leave()


def _run_rank(spec: RankSpec, device: torch.device) -> None:
    """Build this rank's program and KV cache, report ready (or why not) to rank 0, then run each step it
    broadcasts until it sends None."""
    from ..kernels.gemm import batch_invariant

    try:
        executor, read = _build_rank(spec, device)
        error = None
    except Exception as e:  # noqa: BLE001 - rank 0 raises it, naming this rank
        error = e
    gather_objects({"error": f"{type(error).__name__}: {_line(error)}"} if error else {"weights_read": read})
    go = broadcast_object()  # False: some rank failed to start, all stop
    if error is not None:
        raise error
    if not go:
        return
    while True:
        message = broadcast_object()
        if message is None:
            return
        kind, *args = message
        with torch.no_grad():
            if kind == "eager":
                with batch_invariant():
                    executor.program.run(**{k: v.to(device) for k, v in args[0].items()}, **executor.cache)
            elif kind == "capture":
                executor._capture(tuple(args[0]))
            elif kind == "replay":
                executor.replay_static(tuple(args[0]), args[1])
            else:
                raise WorkbenchError(f"rank 0 sent an unknown step message {kind!r}; every rank must run the same "
                                     "workbench version")


def _build_rank(spec: RankSpec, device: torch.device):
    """(this rank's executor: its program, KV cache and step graphs as rank 0's; what it read from the engine's
    weights or None)."""
    from ..engine.weights import read_weights
    from ..graph.executor import Program
    from ..kernels.autotune import TunedChoices
    from ..plugins import load_plugin
    from .executor import Executor

    if spec.device_type != device.type:
        raise WorkbenchError(f"rank 0 runs on {spec.device_type}, this rank on {device.type}; give every rank the same "
                             "--device")
    for plugin in spec.plugins:
        load_plugin(plugin)
    graph = Graph.loads(spec.graph)
    read = None
    if spec.weights_file is not None:
        params, read = read_weights(spec.weights_file, graph, rank=spec.rank, tied=spec.tied, device=device)
    else:
        params = spec.params
    choices = TunedChoices.from_json(spec.choices) if spec.choices else None
    program = Program(graph, params, device=device, choices=choices)
    if device.type == "cuda":
        program = program.for_gpu_steps()  # as rank 0's (``runnable.open_runnable``)
    graphs = spec.graphs or {"cuda_graphs": False}
    return Executor(program, spec.num_blocks, **graphs), read


def _ignore_stop_signals() -> None:
    """A worker stops when rank 0 says so: Ctrl-C in a terminal and torchrun's SIGTERM reach every process, and a
    worker that died at once would fail the requests rank 0 is still finishing."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
