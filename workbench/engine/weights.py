"""An engine's weights read straight from its safetensors file: each parameter whole, or one rank's slices.

    params, read = read_weights(engine / "weights.safetensors", graph, tied=tied, rank=1)
    read.bytes, read.sharded_bytes, read.file_bytes       # what this rank took from the file

The file is memory-mapped (safetensors' ``safe_open``) and each parameter of ``graph`` is read on its own: whole
when it is not sharded, else only the pieces of its stored tensor that ``Param.shard`` gives rank ``rank``
(``get_slice(name)[...]``: the mapped pages of those pieces, never the whole tensor). So each rank of a TP-N engine
holds its slices plus the replicated tensors (norms, embeddings), rank 0 no more than the others, and nothing is
read whole and then cut. A piece that is already contiguous (the rows of a column-parallel weight) stays a view of
the mapped file, as whole tensors do; pieces to join (fused q/k/v) or columns (a row-parallel weight) are copied
once into the rank's tensor. A parameter tied to another (stored once: ``tied`` maps its name to the stored one)
is read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import WorkbenchError


@dataclass(frozen=True)
class WeightsRead:
    """What one ``read_weights`` took from the file (tensor bytes, headers not counted)."""

    tensors: int        # parameters read (a tied one counts once)
    bytes: int          # every tensor byte read: the rank's slices and the whole unsharded tensors
    sharded_bytes: int  # of those, the slices of sharded parameters
    file_bytes: int     # the tensor bytes the file holds

    def summary(self) -> str:
        return (f"read {self.bytes / 1e6:.1f} MB of the engine's {self.file_bytes / 1e6:.1f} MB of weights, "
                f"{self.sharded_bytes / 1e6:.1f} MB of it slices")


def read_weights(path: str | Path, graph, *, rank: int = 0, tied: Mapping[str, str] | None = None,
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], WeightsRead]:
    """Rank ``rank``'s values of ``graph``'s params (sharded or not) from the safetensors file at ``path``, on
    ``device``, and what was read (see the module docstring). A parameter the file lacks is named in one line."""
    from safetensors import safe_open

    size = graph.meta.get("tensor_parallel", {}).get("size", 1)
    if not 0 <= rank < size:
        raise WorkbenchError(f"rank {rank} is outside the graph's tensor-parallel size {size}")
    device = torch.device(device)
    tied = dict(tied or {})
    params: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}  # stored name -> its tensor, read once
    count = total = sharded = 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored_names = set(f.keys())
            file_bytes = sum(_nbytes(f.get_slice(k)) for k in stored_names)
            missing = [n for n, p in graph.params.items()
                       if tied.get(_source(n, p), _source(n, p)) not in stored_names]
            if missing:
                raise WorkbenchError(f"{path} lacks {len(missing)} graph parameters (e.g. {missing[0]!r}); "
                                     "re-export the engine")
            for name, p in graph.params.items():
                stored = tied.get(_source(name, p), _source(name, p))
                if p.shard is None:
                    if stored not in whole:
                        whole[stored] = f.get_tensor(stored).to(device)
                        count, total = count + 1, total + _tensor_bytes(whole[stored])
                    params[name] = whole[stored]
                    continue
                t, n = _slices(f.get_slice(stored), p.shard, rank)
                params[name] = t.to(device)
                count, total, sharded = count + 1, total + n, sharded + n
    except WorkbenchError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types; the hashes matched, so: versions
        raise WorkbenchError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "check that safetensors and torch are at least the versions in its manifest") from None
    return params, WeightsRead(count, total, sharded, file_bytes)


def _source(name: str, p) -> str:
    return p.shard["source"] if p.shard is not None else name


def _slices(view, shard: dict, rank: int) -> tuple[torch.Tensor, int]:
    """Rank ``rank``'s pieces of a stored tensor (a safetensors slice view) along ``shard["dim"]``, joined, and
    the bytes read."""
    dim, ranks = shard["dim"], shard["ranks"][rank]
    shape = view.get_shape()
    pieces = [view[tuple(slice(s, e) if d == dim else slice(None) for d in range(len(shape)))] for s, e in ranks]
    read = sum(_tensor_bytes(p) for p in pieces)
    if len(pieces) == 1 and pieces[0].is_contiguous():
        return pieces[0], read  # a view of the mapped file: no copy
    return (torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].contiguous()), read


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(view) -> int:
    """The bytes of a stored tensor, from its header (nothing read)."""
    n = 1
    for d in view.get_shape():
        n *= d
    return n * _DTYPE_BYTES.get(view.get_dtype(), 1)
