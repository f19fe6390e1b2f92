"""Tensor-parallel process groups: which ranks a graph's collectives talk to.

workbench runs tensor parallelism on ``torch.distributed`` (NCCL on GPUs, gloo on the CPU) and nothing else. A
process that runs one rank of a sharded graph joins a group first:

    with tensor_parallel(rank=0, size=2, init_method="tcp://127.0.0.1:29500"):   # or torchrun's environment
        program.run(...)             # workbench.all_reduce / all_gather talk to the other rank

``current()`` is what the collective ops read: ``None`` outside any group (a collective of one rank is the
identity, so an unsharded graph and a graph sharded for one rank run anywhere). ``torchrun`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``from_environment`` reads them, and
``join(rank, size)`` without an ``init_method`` joins the group they describe.

Two groups over the same ranks: the graph's collectives run on the default one (NCCL on GPUs), and rank 0's
messages to the other ranks (each step's inputs, a rank's set-up, the order to stop: ``broadcast_object``,
``send_object``, ``gather_objects``) on a gloo ``control`` group without a practical timeout, since a server may
wait days for its next request; gloo notices a rank that went away at once, so nothing hangs on a dead one.
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
    control: Any = None  # the gloo group of rank 0's messages (None: one rank, no messages)


#: how long a rank waits for rank 0's next message on the control group: no practical limit (an idle server)
CONTROL_TIMEOUT = datetime.timedelta(days=3650)


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
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if size > 1 else None
    _CURRENT = TPGroup(rank, size, None, backend, control)
    return _CURRENT


def leave() -> None:
    """Leave the group ``join`` made this process part of (and tear down the process group it created)."""
    import torch.distributed as dist

    global _CURRENT, _CREATED
    control, _CURRENT = _CURRENT.control if _CURRENT is not None else None, None
    if _CREATED:
        _CREATED = False
        if dist.is_initialized():
            dist.destroy_process_group()
    elif control is not None and dist.is_initialized():  # the group is someone else's: only the control group goes
        dist.destroy_process_group(control)


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


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; the GPU it runs on), 0 when not set."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise WorkbenchError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer; launch with torchrun, "
                             "which sets it") from None


# ---- rank 0's messages on the control group --------------------------------------------------------------------

def _control():
    group = current()
    if group is None or group.control is None:
        raise WorkbenchError("no tensor-parallel group of several ranks to message: join one first")
    return group.control


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass nothing): pickled, for small host-side messages."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control())
    return box[0]


def send_object(obj: Any, dst: int) -> None:
    """Send ``obj`` to rank ``dst`` alone (``recv_object`` there)."""
    import torch.distributed as dist

    dist.send_object_list([obj], dst=dst, group=_control())


def recv_object(src: int = 0) -> Any:
    """What rank ``src`` sent this rank (``send_object``)."""
    import torch.distributed as dist

    box = [None]
    dist.recv_object_list(box, src=src, group=_control())
    return box[0]


def gather_objects(obj: Any) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    group = current()
    out = [None] * group.size if group is not None and group.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_control())
    return out


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
