"""Optimization profiles: the ranges of steps an engine will run, cut into shape buckets.

Like TensorRT's dynamic-shape profiles, a profile bounds what the engine is tuned for and
runs: tokens per step (the flat batch of new tokens, prefill and decode mixed), sequences per
step, and context per sequence. Kernel timings depend on the shapes, so the token range is
cut into **buckets**; each bucket is tuned on one representative step and a step of ``t``
tokens runs the choices of the first bucket whose edge is >= t:

    tokens per step:  1 | 2..4 | 5..16 | 17..64 | 65..256 | 257..1024 | 1025..max_tokens
    bucket edge:      1     4      16      64       256       1024       max_tokens

The representative step of an edge ``t``: ``t`` tokens, as decode (one new token for each of
``t`` sequences, each with ``context`` tokens cached) while ``t <= max_seqs``; above, as an
in-flight batching step in its steady state: the decodes of the running sequences
(``min(max_seqs, t // 2)`` of them, each after ``context`` cached tokens) beside prompt chunks
that fill the rest (over ``ceil(rest / prefill_len)`` fresh sequences). Kernels that treat the two
kinds of sequence differently (paged attention) are then tuned on the mix they will run; with
``context`` 0 the step is a plain prefill. ``context`` is the profile's "opt" context, the length
it is tuned at (TensorRT's opt shape).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import WorkbenchError


@dataclass(frozen=True)
class Step:
    """One representative step: ``new`` tokens for each of ``seqs`` sequences after ``context`` cached ones,
    and ``decodes`` sequences more with one new token each after ``decode_context`` cached ones."""
    seqs: int
    new: int
    context: int
    decodes: int = 0
    decode_context: int = 0

    @property
    def tokens(self) -> int:
        return self.seqs * self.new + self.decodes


@dataclass(frozen=True)
class OptimizationProfile:
    max_tokens: int = 2048
    max_seqs: int = 64
    context: int = 1024
    max_context: int = 4096
    prefill_len: int = 512
    #: bucket edges in tokens per step; empty: powers of four up to max_tokens, then max_tokens
    edges: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_seqs", "max_context", "prefill_len"):
            if getattr(self, name) < 1:
                raise WorkbenchError(f"optimization profile: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.context <= self.max_context:
            raise WorkbenchError(f"optimization profile: context {self.context} must lie in 0..max_context "
                                 f"({self.max_context})")
        edges = tuple(self.edges) or _default_edges(self.max_tokens)
        if list(edges) != sorted(set(edges)) or edges[0] < 1:
            raise WorkbenchError(f"optimization profile: bucket edges must be distinct, ascending and >= 1, got {list(edges)}")
        if edges[-1] != self.max_tokens:
            raise WorkbenchError(f"optimization profile: the last bucket edge ({edges[-1]}) must be max_tokens "
                                 f"({self.max_tokens}), so every step the profile admits has a bucket")
        object.__setattr__(self, "edges", edges)

    def step(self, edge: int) -> Step:
        if edge <= self.max_seqs:
            return Step(seqs=edge, new=1, context=self.context)
        decodes = min(self.max_seqs, edge // 2) if self.context else 0
        prompt = edge - decodes
        seqs = -(-prompt // self.prefill_len)
        if prompt % seqs:
            seqs = next(s for s in range(seqs, prompt + 1) if prompt % s == 0)
        return Step(seqs=seqs, new=prompt // seqs, context=0, decodes=decodes,
                    decode_context=self.context if decodes else 0)

    def bucket(self, tokens: int) -> int:
        """Index of the bucket a step of ``tokens`` tokens runs in."""
        if tokens > self.max_tokens:
            raise WorkbenchError(f"a step of {tokens} tokens is beyond this profile's max_tokens ({self.max_tokens}); "
                                 "tune a profile with a larger max_tokens or schedule smaller steps")
        return next(i for i, e in enumerate(self.edges) if tokens <= e)

    def to_json(self) -> dict:
        return {**asdict(self), "edges": list(self.edges)}

    @classmethod
    def from_json(cls, data: dict) -> "OptimizationProfile":
        try:
            return cls(**{**data, "edges": tuple(data.get("edges", ()))})
        except TypeError as e:
            raise WorkbenchError(f"not an optimization profile ({e}); fields are: "
                                 + ", ".join(cls.__dataclass_fields__)) from None


def _default_edges(max_tokens: int) -> tuple[int, ...]:
    edges, e = [], 1
    while e < max_tokens:
        edges.append(e)
        e *= 4
    return (*edges, max_tokens)
