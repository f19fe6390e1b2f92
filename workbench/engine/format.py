"""What an engine directory holds, its format version, and the runtime limits it was exported with.

    engine/
      engine.json           format version, IR (params already fused and quantized), model config,
                            optimization profiles, precision plan, runtime limits, kernel choices
      weights.safetensors   every graph parameter by name, as the graph runs it (unsharded: each rank of a
                            tensor-parallel run reads its own slices, ``engine.weights``)
      timings.json          the tune stage's timing cache (every timing), when the engine was tuned
      tokenizer/            tokenizer files and chat template (save_pretrained), when the model has them
      manifest.json         written last: sha256 of every file above, library versions, what loading
                            requires, the GPU (and torch, triton, CUDA) the kernels were tuned on, and the
                            tensor-parallel size it was built and tuned for (``tensor_parallel_size``; absent: 1)

``FORMAT_VERSION`` changes whenever a reader of the previous version would misread a new engine.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import WorkbenchError

FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TIMINGS = "timings.json"
TOKENIZER_DIR = "tokenizer"

#: The oldest torch the engine's IR (ATen ops) and weight dtypes (fp8) are known to run on: the GPU
#: machine's. Engines move between torch 2.13 (CPU) and 2.11 (GPU), so the exporting torch itself is not
#: required; an op this torch lacks is caught op by op when loading (``load.check_ops``).
MIN_TORCH = "2.11"


def is_engine_dir(path: Any) -> bool:
    """Whether ``path`` looks like an engine directory (it has engine.json or manifest.json)."""
    if not isinstance(path, (str, Path)):
        return False
    p = Path(path)
    return p.is_dir() and ((p / ENGINE_JSON).is_file() or (p / MANIFEST).is_file())


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> (2, 13, 0): the release numbers only (local and pre-release tags are ignored)."""
    release = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text or ""))
    if not release:
        raise WorkbenchError(f"cannot read version {text!r}")
    return tuple(int(x) for x in release.group(1).split("."))


def older(installed: str, required: str) -> bool:
    a, b = parse_version(installed), parse_version(required)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) < b + (0,) * (width - len(b))


#: The runtime's defaults where nothing was tuned or asked for: as many sequences and tokens per step as the
#: serving engines default to on an 80 GB GPU (vLLM: 8192 batched tokens; TensorRT-LLM: max_num_tokens 8192), so
#: that offline throughput is not capped by the limits (an 8B FP8 model's KV cache on an 80 GB GPU holds about
#: as many requests of 2000 tokens: BENCHMARKS.md, 2026-11-25, "the whole GPU for the KV cache"). The KV cache,
#: not these, bounds what runs at once on a smaller GPU.
DEFAULT_MAX_NUM_SEQS = 512
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class EngineLimits:
    """What the runtime may ask of the engine: the longest sequence (prompt + output), the most sequences
    and tokens in one step, and the KV cache layout the graph was built for (block size, cache dtype)."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    kv_cache_dtype: str

    def __post_init__(self) -> None:
        for f in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise WorkbenchError(f"engine limits: {f} must be an integer >= 1, got {v!r}")

    @classmethod
    def for_graph(cls, graph, profile=None, overrides: Mapping[str, Any] | None = None) -> "EngineLimits":
        """Defaults from the graph (its context length, KV layout) and the tuned ``profile`` (the most tokens
        and sequences a step was tuned for), with ``overrides`` checked against what the graph can run."""
        from ..graph.paged import PagedLayout, is_paged

        if not is_paged(graph):
            raise WorkbenchError("engine limits need a graph with paged attention; run the insert_paged_attention "
                                 "pass first (`workbench optimize`)")
        layout = PagedLayout.from_graph(graph)
        overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise WorkbenchError(f"unknown engine limit(s) {', '.join(sorted(unknown))}; limits: {', '.join(known)}")
        for f, have in (("block_size", layout.block_size), ("kv_cache_dtype", layout.dtype)):
            if f in overrides and overrides[f] != have:
                raise WorkbenchError(f"engine limits: {f} is fixed by the graph ({have!r}), not {overrides[f]!r}; "
                                     "the KV block size is set when the passes insert paged attention and the "
                                     "cache dtype by the precision plan (--kv-cache)")
        context = int(graph.meta.get("config", {}).get("max_position_embeddings") or 8192)
        limits = cls(max_model_len=overrides.get("max_model_len", context),
                     max_num_seqs=overrides.get("max_num_seqs", profile.max_seqs if profile else DEFAULT_MAX_NUM_SEQS),
                     max_num_batched_tokens=overrides.get("max_num_batched_tokens",
                                                          profile.max_tokens if profile else DEFAULT_MAX_NUM_BATCHED_TOKENS),
                     block_size=layout.block_size, kv_cache_dtype=layout.dtype)
        if limits.max_model_len > context:
            raise WorkbenchError(f"engine limits: max_model_len {limits.max_model_len} is beyond the model's context "
                                 f"({context} positions, max_position_embeddings); give at most {context}")
        for f, dim in (("max_num_batched_tokens", "tokens"), ("max_num_seqs", "seqs")):
            top = graph.dims.get(dim, {}).get("max")
            if top is not None and getattr(limits, f) > top:
                raise WorkbenchError(f"engine limits: {f} {getattr(limits, f)} is beyond what the graph runs "
                                     f"({dim} <= {top})")
        if profile is not None and limits.max_num_batched_tokens > profile.max_tokens:
            raise WorkbenchError(f"engine limits: max_num_batched_tokens {limits.max_num_batched_tokens} is beyond "
                                 f"the tuned profile's max_tokens ({profile.max_tokens}): steps that large have no "
                                 "tuned kernels; give at most that, or tune a profile with a larger --max-tokens")
        return limits

    def narrowed(self, *, fixed: bool = True, **overrides: int | None) -> "EngineLimits":
        """These limits with ``overrides`` (max_model_len, max_num_seqs, max_num_batched_tokens; None keeps one).
        With ``fixed`` (an engine's limits: what it was built and tuned for) a limit may only be lowered; else
        (a workspace's or a model's defaults) any positive value is taken, max_model_len up to the model's
        context."""
        from dataclasses import replace

        known = {"max_model_len", "max_num_seqs", "max_num_batched_tokens"}
        unknown = set(overrides) - known
        if unknown:
            raise WorkbenchError(f"unknown runtime limit(s) {', '.join(sorted(unknown))}; limits: {', '.join(sorted(known))}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        for k, v in changes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkbenchError(f"{k} must be an integer >= 1, got {v!r}")
            if fixed and v > getattr(self, k):
                flag = "--" + k.replace("_", "-")
                raise WorkbenchError(f"{k} {v} is beyond this engine's {getattr(self, k)}, what it was built for; "
                                     f"give at most that, or rebuild it with `workbench build ... {flag} {v}`")
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EngineLimits":
        try:
            return cls(**data)
        except TypeError as e:
            raise WorkbenchError(f"engine.json has invalid limits ({e}); re-export the engine") from None
