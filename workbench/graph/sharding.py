"""A program sharded over several ranks, as the runtime runs it, below the runtime so that every stage can use it.

``Sharding`` is the sharded graph and where each rank's weights come from; ``RankSpec`` is what rank 0 sends a
rank to build its shard; ``rank0_program`` / ``shard_in_memory`` cut a program whose weights are in memory
(tuning with ``--tp``, ``LLM(model, tensor_parallel_size=N)``); ``check_tensor_parallel_size`` is the one check
build, tune and export make of a size. The processes that run the ranks are ``runtime.tensor_parallel``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..distributed import from_environment
from ..errors import WorkbenchError
from .ir import Graph
from .paged import whole_size


@dataclass
class Sharding:
    """A program sharded over ``size`` ranks (rank 0's program is the runnable's) and where each rank's weights
    come from: ``weights_file`` (an engine's: each rank reads its own slices) or ``params`` (the unsharded
    weights in memory, which rank 0 cuts for every rank)."""

    size: int
    graph: Graph  # the sharded graph
    reports: list  # the PassReports of the sharding pass and the passes after it (``shard_and_fuse``)
    weights_file: str | None = None
    tied: dict[str, str] = field(default_factory=dict)
    params: Mapping[str, torch.Tensor] | None = None
    weights_read: Any | None = None  # what rank 0 read from the engine file (engine.weights.WeightsRead)

    @classmethod
    def of_engine(cls, engine) -> "Sharding":
        """The sharding of a loaded engine's rank-0 shard (``load_engine(..., tensor_parallel_size=N)``), whose
        ranks this machine must have GPUs for (unless torchrun's ranks span machines)."""
        if torchrun_launch() is None:
            check_size(engine.tensor_parallel_size, engine.program.device,
                       f"; give --tp (tensor_parallel_size) to run engine {engine.path} re-sharded for fewer")
        return cls(engine.tensor_parallel_size, engine.program.graph, engine.tp_reports, str(engine.weights_file),
                   engine.tied, None, engine.weights_read)

    def spec(self, rank: int, program, num_blocks: int, graphs: dict | None = None) -> "RankSpec":
        """What rank ``rank`` needs to build its shard of ``program``, rank 0's as its executor runs it (the
        sampled-rows variant of the sharded graph, its tuned choices): every rank runs the same graph.
        ``graphs``: rank 0's executor's step-graph settings (``runtime.tensor_parallel.graph_settings``), so that
        each rank captures the same step graphs; None: its steps run eagerly."""
        from .passes.tensor_parallel import rank_params
        from ..plugins import loaded

        params = None
        if self.weights_file is None:
            params = {k: v.detach().cpu() for k, v in rank_params(program.graph, self.params, rank).items()}
        choices = program.tuned.to_json() if program.tuned is not None else None
        return RankSpec(rank, self.size, program.graph.dumps(), num_blocks, program.device.type, loaded(), choices,
                        self.weights_file, dict(self.tied), params, graphs)

    def summary(self) -> str:
        """One line for a log: the size, how the ranks run, the sites sharded and fused, and where the weights
        come from."""
        how = "torchrun's processes" if torchrun_launch() is not None else "ranks 1.. spawned"
        where = (f"each rank reads its own slices of the engine's weights (rank 0: {self.weights_read.summary()})"
                 if self.weights_read is not None else "rank 0 holds the whole model and hands each rank its slices")
        sharded, *after = self.reports
        fused = "".join(f", {len(r.matches)} by {r.name}" for r in after if r.accepted and r.matches)
        return (f"tensor parallelism over {self.size} ranks ({how}; {len(sharded.matches)} sharded sites{fused}); "
                f"{where}")


@dataclass(frozen=True)
class RankSpec:
    """What rank 0 sends rank ``rank`` to run its shard: small unless the weights come from memory."""

    rank: int
    size: int
    graph: str  # the sharded graph (``Graph.dumps``)
    num_blocks: int  # KV-cache blocks, as rank 0's
    device_type: str
    plugins: list[str]  # plugin specs rank 0 loaded (ops the graph may use)
    choices: dict | None
    weights_file: str | None  # an engine's safetensors file: this rank reads its slices from it
    tied: dict[str, str]
    params: dict[str, torch.Tensor] | None  # else this rank's tensors (on the CPU)
    graphs: dict | None = None  # rank 0's step-graph settings (the executor's); None: eager steps


def torchrun_launch() -> tuple[int, int] | None:
    """(rank, size) when torchrun launched this process as one of several, else None."""
    env = from_environment()
    return env if env is not None and env[1] > 1 else None


def check_size(size, device: torch.device, fix: str = "") -> int:
    """``tensor_parallel_size`` checked: a whole number >= 1, and on GPUs no more than there are (``fix``: what to
    say beyond that)."""
    whole_size(size, "tensor_parallel_size")
    if size > 1 and device.type == "cuda" and torch.cuda.device_count() < size:
        raise WorkbenchError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}{fix}")
    return size


# ---- rank 0 -----------------------------------------------------------------------------------------------------

def rank0_program(program, size: int):
    """(rank 0's shard of ``program`` over ``size`` ranks, the reports of ``shard_and_fuse``): the weights in
    memory."""
    from .executor import Program
    from .passes.tensor_parallel import rank_params, shard_and_fuse

    graph, reports = shard_and_fuse(program.graph, size)
    return Program(graph, rank_params(graph, program.params, 0), device=program.device), reports


def shard_in_memory(program, size: int) -> tuple[Any, Sharding]:
    """(rank 0's program, the ``Sharding``) of a program whose whole weights are in memory."""
    rank0, reports = rank0_program(program, size)
    return rank0, Sharding(size, rank0.graph, reports, params=dict(program.params))


def check_tensor_parallel_size(graph, size, what: str) -> int:
    """``size`` checked: a whole number >= 1 for which ``graph`` shards (the pass's one-line reason otherwise)."""
    from .passes.tensor_parallel import shard_tensor_parallel

    whole_size(size, f"{what} --tp: the tensor-parallel size")
    if size > 1:
        try:
            shard_tensor_parallel(graph, size)
        except WorkbenchError as e:
            raise WorkbenchError(f"{what} --tp {size}: {e}") from None
    return size
