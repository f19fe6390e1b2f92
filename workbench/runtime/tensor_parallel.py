"""The runtime over several ranks: one scheduler (rank 0), the same step on every rank.

``LLM(model, tensor_parallel_size=N)`` shards its program (``graph.passes.tensor_parallel``), runs rank 0 in its
own process, and starts ranks 1..N-1 as worker processes (``TPWorkers``). Each step, rank 0 broadcasts the step's
inputs (token ids, positions, slot mapping, block tables, sequence lengths, the sampled rows: a few KB) and every
rank runs its shard of the graph against its own KV cache (its KV heads only); the graph's all-reduces and the
logits' all-gather run inside. Rank 0 samples; the scheduler, abort, preemption and prefix caching are the one-rank
runtime's, unchanged.

This first runtime runs its steps eagerly: CUDA graphs across ranks (NCCL captures collectives) are not captured
yet, so on GPUs it is a correctness path, not a speed one. Rank 0 loads the whole model and hands each worker its
slices (``rank_params``) through shared memory; a worker that dies ends the engine with a message naming it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from ..distributed import free_port, join, leave
from ..errors import WorkbenchError
from ..graph.ir import Graph

#: seconds a rank waits for the others to join before giving up
JOIN_TIMEOUT_S = 120.0


class TPWorkers:
    """Ranks 1..size-1 of a sharded program, each in its own process, fed each step by rank 0 (this process)."""

    def __init__(self, graph: Graph, params: dict[str, torch.Tensor], size: int, num_blocks: int,
                 device: torch.device) -> None:
        from ..graph.passes.tensor_parallel import rank_params
        import torch.multiprocessing as mp

        self.size = size
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        init = f"tcp://127.0.0.1:{free_port()}"
        text = graph.dumps()
        self.procs = []
        for rank in range(1, size):
            mine = {k: v.detach().cpu() for k, v in rank_params(graph, params, rank).items()}
            p = ctx.Process(target=_worker, args=(rank, size, init, text, mine, num_blocks, device.type, self.errors),
                            daemon=True, name=f"workbench-tp-rank{rank}")
            p.start()
            self.procs.append(p)
        try:
            self.group = join(0, size, init_method=init, device=device, timeout_s=JOIN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the worker's own reason is the useful one
            self.close(force=True)
            raise WorkbenchError(f"the tensor-parallel ranks did not start: {self.failure() or e}") from None
        self.closed = False

    def failure(self) -> str | None:
        """The first worker's error or death, in one line; None while all are alive."""
        with contextlib.suppress(Exception):
            rank, message = self.errors.get_nowait()
            return f"rank {rank} failed: {message}"
        for rank, p in enumerate(self.procs, 1):
            if p.exitcode not in (None, 0):
                return f"rank {rank} died (exit code {p.exitcode})"
        return None

    def broadcast(self, inputs: dict[str, Any] | None) -> None:
        """Send one step's inputs (None: stop) from rank 0 to every rank."""
        import torch.distributed as dist

        dead = self.failure()
        if dead:
            raise WorkbenchError(f"tensor parallelism: {dead}; the engine stopped (restart it)")
        payload = None if inputs is None else {k: v.cpu() for k, v in inputs.items()}
        try:
            dist.broadcast_object_list([payload], src=0)
        except Exception as e:  # noqa: BLE001
            raise WorkbenchError(f"tensor parallelism: {self.failure() or e}; the engine stopped (restart it)") from None

    @contextlib.contextmanager
    def step(self):
        """Around rank 0's own run of a step: a collective that fails because a rank died names the rank."""
        try:
            yield
        except RuntimeError as e:
            raise WorkbenchError(f"tensor parallelism: {self.failure() or str(e).splitlines()[0]}; the engine "
                                 "stopped (restart it)") from None

    def close(self, *, force: bool = False) -> None:
        """Stop the workers and leave the group (idempotent)."""
        if getattr(self, "closed", True) and not force:
            return
        self.closed = True
        if not force and self.failure() is None:
            with contextlib.suppress(Exception):
                self.broadcast(None)
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()) if not force else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        with contextlib.suppress(Exception):
            leave()


def _worker(rank: int, size: int, init: str, graph_text: str, params: dict, num_blocks: int, device_type: str,
            errors) -> None:
    """One rank: join, build the program and its KV cache, then run each step rank 0 broadcasts until None."""
    import torch.distributed as dist

    from ..graph.executor import DEFAULTS, Program
    from ..graph.paged import PagedLayout
    from ..kernels.gemm import batch_invariant

    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    try:
        device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        graph = Graph.loads(graph_text)
        join(rank, size, init_method=init, device=device, timeout_s=JOIN_TIMEOUT_S)
        program = Program(graph, params, device=device, tactics=DEFAULTS if device.type == "cuda" else None)
        cache = PagedLayout.from_graph(graph).new_caches(num_blocks + 1, device)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                break
            with torch.no_grad(), batch_invariant():
                program.run(**{k: v.to(device) for k, v in box[0].items()}, **cache)
    except BaseException as e:  # noqa: BLE001 - to rank 0 in one line
        errors.put((rank, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        raise SystemExit(1)
    finally:
        with contextlib.suppress(Exception):
            leave()


def check_size(size, device: torch.device) -> int:
    """``tensor_parallel_size`` checked: a whole number >= 1, and on GPUs no more than there are."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise WorkbenchError(f"tensor_parallel_size must be a whole number >= 1, got {size!r}")
    if size > 1 and device.type == "cuda" and torch.cuda.device_count() < size:
        raise WorkbenchError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
    return size


def sharded_engine(program, size: int, tokenizer=None, *, cuda_graphs: bool | None = None, **engine_options):
    """(an ``LLMEngine`` of rank 0 of ``program`` sharded over ``size`` ranks, with ranks 1.. started as workers;
    the sharding pass's report). ``engine_options`` are ``LLMEngine``'s; steps run eagerly and synchronously."""
    from ..graph.executor import DEFAULTS, Program
    from ..graph.passes.tensor_parallel import rank_params, shard_tensor_parallel
    from .engine import LLMEngine

    if cuda_graphs:
        raise WorkbenchError("tensor parallelism runs its steps eagerly for now: leave cuda_graphs unset")
    graph, report = shard_tensor_parallel(program.graph, size)
    rank0 = Program(graph, rank_params(graph, program.params, 0), device=program.device,
                    tactics=DEFAULTS if program.device.type == "cuda" else None)
    engine = LLMEngine(rank0, tokenizer, cuda_graphs=False, async_scheduling=False, **engine_options)
    ex = engine.executor
    ex.tensor_parallel = TPWorkers(ex.program.graph, dict(program.params), size, ex.num_blocks, ex.device)
    return engine, report
