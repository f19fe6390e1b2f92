"""The probe: what a precision plan costs in perplexity and KL on evaluation tokens, against the unquantized program.

    base = reference_logits(program, ids, window=256, stride=128)   # the unquantized program, run once
    measure(quantized_program(program, plan, stats), base)           # {"ppl", "ppl_delta_pct", "kl"}: one pass
    evaluate_plan(program, plan, stats, ids)                         # the same from a plan, base computed here

``ids`` are scored by ``evaluate.perplexity`` in sliding windows (``window`` tokens, a new window every
``stride``). The unquantized program runs each window once; its log-probabilities at the scored positions
(each token after the first exactly once, as perplexity counts them) are kept (``BaseLogits``: tokens x vocab
x 4 bytes, on the CPU), so each quantized variant costs one pass. KL is KL(base || quantized) of the next-token
distributions, averaged over those scored positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import WorkbenchError
from .plan import PrecisionPlan


@dataclass
class BaseLogits:
    """The unquantized program on the probe: per window, log-probabilities at the scored positions."""

    ids: torch.Tensor
    window: int
    stride: int
    logprobs: list[torch.Tensor] = field(repr=False)
    ppl: float

    def matches(self, ids: torch.Tensor, window: int, stride: int) -> bool:
        return (window, stride) == (self.window, self.stride) and torch.equal(ids.reshape(-1).cpu(), self.ids)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window, as ``evaluate.perplexity`` walks them (checked per call)."""
    spans, scored_to = [], 1
    while scored_to < n:
        end = min(window, n) if scored_to == 1 else min(scored_to + stride, n)
        begin = max(0, end - window)
        if begin >= scored_to:
            begin = scored_to - 1
            end = min(begin + window, n)
        spans.append((begin, scored_to, end))
        scored_to = end
    return spans


def probe_ids(ids: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """``ids`` flat on the CPU, checked to hold at least one window."""
    ids = torch.as_tensor(ids).reshape(-1).cpu()
    if window < 2 or stride < 1:
        raise WorkbenchError(f"window must be >= 2 and stride >= 1 (got window={window}, stride={stride})")
    if ids.numel() < window:
        raise WorkbenchError(f"the evaluation ids have {ids.numel()} tokens, fewer than one window of {window}: "
                             f"pass at least {window} tokens or a smaller window")
    return ids


class _Recorder:
    """A logits function that runs ``fn`` on each window and hands the scored rows' log-probs to ``sink``."""

    def __init__(self, fn, spans, sink) -> None:
        self.fn, self.spans, self.sink, self.i = fn, spans, sink, 0

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        begin, first, end = self.spans[self.i]
        if chunk.shape[-1] != end - begin:  # invariant: our windows are perplexity's windows
            raise WorkbenchError(f"window {self.i} has {chunk.shape[-1]} tokens, expected {end - begin}: "
                                 "sensitivity's windows no longer follow evaluate.perplexity's; report this bug")
        logits = self.fn(chunk)
        rows = logits[0, first - begin - 1:end - begin - 1].float()
        self.sink(self.i, torch.log_softmax(rows, dim=-1))
        self.i += 1
        return logits


@torch.no_grad()
def reference_logits(program, ids: torch.Tensor, *, window: int = 256, stride: int = 128) -> BaseLogits:
    """Run the unquantized ``program`` over ``ids`` once; what every variant is compared with."""
    from ..evaluate import logits_fn, perplexity

    ids = probe_ids(ids, window, stride)
    spans = _windows(ids.numel(), window, stride)
    kept: list[torch.Tensor] = []
    result = perplexity(_Recorder(logits_fn(program), spans, lambda i, lp: kept.append(lp.cpu())),
                        ids.to(program.device), window=window, stride=stride)
    return BaseLogits(ids, window, stride, kept, result.perplexity)


@torch.no_grad()
def measure(program, base: BaseLogits) -> dict[str, float]:
    """ppl of ``program`` on the probe, its change vs the base and the mean KL(base || program)."""
    from ..evaluate import logits_fn, perplexity

    kl_sum, rows = 0.0, 0

    def compare(i, lp):
        nonlocal kl_sum, rows
        ref = base.logprobs[i].to(lp.device)
        kl_sum += (ref.exp() * (ref - lp)).sum().double().item()
        rows += lp.shape[0]

    spans = _windows(base.ids.numel(), base.window, base.stride)
    ppl = perplexity(_Recorder(logits_fn(program), spans, compare), base.ids.to(program.device),
                     window=base.window, stride=base.stride).perplexity
    return {"ppl": ppl, "ppl_delta_pct": 100.0 * (ppl / base.ppl - 1.0), "kl": max(kl_sum / rows, 0.0)}


def base_for(program, ids: torch.Tensor, window: int, stride: int, base_logits: BaseLogits | None) -> BaseLogits:
    """``base_logits`` checked to be of ``ids``, ``window`` and ``stride``; computed here when not given."""
    if base_logits is None:
        return reference_logits(program, ids, window=window, stride=stride)
    if not base_logits.matches(ids, window, stride):
        raise WorkbenchError("base_logits were computed on other ids, window or stride; compute them with "
                             "reference_logits(program, ids, window=..., stride=...) for this evaluation")
    return base_logits


def evaluate_plan(program, plan: PrecisionPlan, stats, ids: torch.Tensor, *, window: int = 256, stride: int = 128,
                  base_logits: BaseLogits | None = None) -> dict[str, float]:
    """{"ppl", "ppl_delta_pct", "kl", "base_ppl"} of ``program`` under ``plan`` on ``ids``, against the
    unquantized program (``base_logits`` from ``reference_logits``, computed here when not given)."""
    from .apply import quantized_program

    ids = probe_ids(ids, window, stride)
    base_logits = base_for(program, ids, window, stride, base_logits)
    result = measure(quantized_program(program, plan, stats), base_logits)
    return {**result, "base_ppl": base_logits.ppl}
