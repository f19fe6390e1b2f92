"""NVTX ranges for Nsight Systems, and the per-op ranges that ``Program.run`` can emit.

    with nvtx_range("prefill"): ...          # a named range on the timeline
    @nvtx_range("decode step")               # the same as a decorator
    with nvtx_ops(): program.run(...)        # one range per graph node, named "{node} {op}"
    WORKBENCH_NVTX=1 python bench/...        # per-op ranges for the whole process

Ranges go through the ``nvtx`` package when it is importable, else through
``torch.cuda.nvtx`` (both are imported only when a range is entered). Without CUDA there is no one to see them: a range is a
no-op, and ``nvtx_ops()`` leaves the executor on its fast path.

Per-op ranges are a context variable holding a range factory (``label -> context manager``),
not a module global: it is set for the ``with`` block only, per thread and per task.
``Program.run`` reads it once per run (``op_ranges()``); ``trace.trace_program`` installs a
``torch.profiler.record_function`` factory the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, ContextManager, Iterator

import torch

RangeFactory = Callable[[str], ContextManager]
_Emitter = tuple[Callable[[str], object], Callable[[], object]]  # (push(name), pop())

ENV_VAR = "WORKBENCH_NVTX"

_UNSET = object()  # no block has said anything: WORKBENCH_NVTX decides
_OP_RANGES: contextvars.ContextVar = contextvars.ContextVar("workbench_op_ranges", default=_UNSET)


def _emitter() -> _Emitter | None:
    """(push, pop) of the NVTX backend in use, or None without CUDA (nothing would record them)."""
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx  # the NVIDIA package: absent on some machines, hence imported here
    except ImportError:
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return (lambda name: nvtx.push_range(message=name)), nvtx.pop_range


class _Range(contextlib.ContextDecorator):
    """One named range; ``resolve()`` gives the emitter on entry. Reentrant (recursion, a decorator
    shared by threads): each entry remembers its own pop."""

    def __init__(self, name: str, resolve: Callable[[], _Emitter | None]) -> None:
        self.name, self._resolve, self._pops = name, resolve, []

    def __enter__(self) -> "_Range":
        emitter = self._resolve()
        if emitter is None:
            self._pops.append(None)
        else:
            push, pop = emitter
            push(self.name)
            self._pops.append(pop)
        return self

    def __exit__(self, *exc) -> bool:
        pop = self._pops.pop()
        if pop is not None:
            pop()
        return False


def nvtx_range(name: str) -> _Range:
    """A context manager (or decorator) emitting the NVTX range ``name``; a no-op without CUDA.

    The backend is looked up on each entry, so a range created at import time (a decorator)
    still finds CUDA initialised later."""
    return _Range(name, _emitter)


def op_ranges() -> RangeFactory | None:
    """The range factory ``Program.run`` wraps each node in, or None (the fast path).

    Set by ``nvtx_ops()`` / ``op_ranges_as()`` for a block, or process-wide by ``WORKBENCH_NVTX=1``."""
    factory = _OP_RANGES.get()
    if factory is not _UNSET:
        return factory
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        emitter = _emitter()
        if emitter is not None:
            return lambda label: _Range(label, lambda: emitter)
    return None


def enabled() -> bool:
    """Whether ``Program.run`` emits a range per node here and now."""
    return op_ranges() is not None


@contextlib.contextmanager
def op_ranges_as(factory: RangeFactory | None) -> Iterator[None]:
    """Within the block, ``Program.run`` wraps each node call in ``factory("{node} {op}")``.

    The innermost block wins; ``None`` turns per-op ranges off, overriding ``WORKBENCH_NVTX=1``."""
    token = _OP_RANGES.set(factory)
    try:
        yield
    finally:
        _OP_RANGES.reset(token)


@contextlib.contextmanager
def nvtx_ops() -> Iterator[None]:
    """Per-node NVTX ranges in ``Program.run`` within the block (for Nsight Systems).

    The backend is resolved once here, not per node; without CUDA nothing is installed and
    runs keep their fast path."""
    emitter = _emitter()
    if emitter is None:
        yield
        return
    with op_ranges_as(lambda label: _Range(label, lambda: emitter)):
        yield
