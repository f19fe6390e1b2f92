"""Tensor-parallel process groups: which ranks a graph's collectives talk to.

workbench runs tensor parallelism on ``torch.distributed`` (NCCL on GPUs, gloo on the CPU) and nothing else. A
process that runs one rank of a sharded graph joins a group first:

    with tensor_parallel(rank=0, size=2, init_method="tcp://127.0.0.1:29500"):   # or torchrun's environment
        program.run(...)             # workbench.all_reduce / all_gather talk to the other rank

``current()`` is what the collective ops read: ``None`` outside any group (a collective of one rank is the
identity, so an unsharded graph and a graph sharded for one rank run anywhere). ``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``from_environment`` joins the group they describe.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import WorkbenchError


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group."""

    rank: int
    size: int
    group: Any = None  # a torch.distributed ProcessGroup (None: the default group)
    backend: str = "gloo"


_CURRENT: TPGroup | None = None
_CREATED = False  # join made the process group


def current() -> TPGroup | None:
    """The group the collective ops of this process talk to; None outside ``tensor_parallel``."""
    return _CURRENT


def default_backend(device: str | torch.device) -> str:
    """NCCL for CUDA devices, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join(rank: int, size: int, *, init_method: str | None = None, backend: str | None = None,
         device: str | torch.device = "cpu", timeout_s: float = 300.0) -> TPGroup:
    """Make this process rank ``rank`` of tensor-parallel group ``size`` (creating the default process group
    when there is none) until ``leave``; the collective ops talk to it."""
    import torch.distributed as dist

    global _CURRENT, _CREATED
    if not 0 <= rank < size:
        raise WorkbenchError(f"tensor-parallel rank {rank} is outside 0..{size - 1}; give each of the {size} "
                             "processes its own rank")
    if _CURRENT is not None:
        raise WorkbenchError(f"this process is rank {_CURRENT.rank} of a tensor-parallel group already; one "
                             "group per process (close the other LLM first)")
    backend = backend or default_backend(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _CREATED = True
    if size > 1 and dist.get_world_size() != size:
        raise WorkbenchError(f"the process group has {dist.get_world_size()} ranks, the tensor-parallel size is "
                             f"{size}; launch as many processes as the TP size (torchrun --nproc-per-node {size})")
    _CURRENT = TPGroup(rank, size, None, backend)
    return _CURRENT


def leave() -> None:
    """Leave the group ``join`` made this process part of (and tear down the process group it created)."""
    import torch.distributed as dist

    global _CURRENT, _CREATED
    _CURRENT = None
    if _CREATED:
        _CREATED = False
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def tensor_parallel(rank: int, size: int, *, init_method: str | None = None, backend: str | None = None,
                    device: str | torch.device = "cpu", timeout_s: float = 300.0) -> Iterator[TPGroup]:
    """``join`` for the block, then ``leave``."""
    group = join(rank, size, init_method=init_method, backend=backend, device=device, timeout_s=timeout_s)
    try:
        yield group
    finally:
        leave()


def from_environment() -> tuple[int, int] | None:
    """(rank, world size) from torchrun's ``RANK`` / ``WORLD_SIZE``, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise WorkbenchError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not "
                             "integers; launch with torchrun, which sets them") from None


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, size: int, *args, timeout_s: float = 600.0) -> list:
    """Run ``fn(rank, size, init_method, *args)`` in ``size`` fresh processes (torch's "spawn" start method) and
    return their results in rank order; a rank that raises or dies ends the others, and the error names it.
    ``fn`` must be importable (a module-level function); each process joins the group by ``init_method``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_run_rank, args=(fn, rank, size, init, args, results), daemon=True)
             for rank in range(size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    import queue
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise WorkbenchError(f"tensor-parallel rank {dead[0]} died (exit code {procs[dead[0]].exitcode}) "
                                         "before it answered; the other ranks were stopped") from None
                if time.monotonic() > deadline:
                    raise WorkbenchError(f"tensor-parallel ranks {sorted(set(range(size)) - set(out))} did not "
                                         f"answer within {timeout_s:.0f} s; the others were stopped") from None
                continue
            if not ok:
                raise WorkbenchError(f"tensor-parallel rank {rank} failed: {value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(size)]


def _run_rank(fn, rank: int, size: int, init: str, args: tuple, results) -> None:
    torch.set_num_threads(1)
    try:
        value = fn(rank, size, init, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent in one line
        results.put((rank, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return
    # plain pickle: tensors travel as bytes, not as shared memory that this process's exit would take away
    results.put((rank, True, pickle.dumps(value)))
