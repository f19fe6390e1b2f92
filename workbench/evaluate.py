"""Evaluation that works the same on a ``transformers`` model and on a workbench program.

Both are reduced to a *logits function*: token ids [1, T] -> logits [1, T, vocab].

* ``perplexity``: sliding windows over a long token sequence; every token after
  the first is scored exactly once, with as much left context as the window
  allows (at least ``window - stride`` tokens once past the first window), and
  the result is weighted by tokens, not by windows.
* ``greedy``: greedy decoding by recomputing the whole sequence each step (no KV
  cache: this is the oracle the runtime's cached decoding is checked against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import WorkbenchError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DATASETS = Path(__file__).resolve().parent.parent / "datasets"


def hf_logits(model: torch.nn.Module) -> LogitsFn:
    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(model.device), use_cache=False).logits

    return fn


def dataset_text(name: str) -> str:
    """A text set from ``datasets/``: ``calibration`` or ``evaluation``."""
    path = DATASETS / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in DATASETS.glob("*.txt")) if DATASETS.is_dir() else []
        raise WorkbenchError(f"no dataset {name!r} in {DATASETS}; available: {', '.join(known) or 'none'}")
    return path.read_text()


@dataclass
class Perplexity:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored


def perplexity(logits_fn: LogitsFn, ids: torch.Tensor, *, window: int = 512, stride: int = 256,
               progress: bool = False) -> Perplexity:
    """Token-weighted perplexity of ``ids`` under ``logits_fn`` with sliding windows.

    The first window scores tokens 1..window-1; each later one scores the next
    ``stride`` tokens and reaches back so that it holds ``window`` tokens, i.e.
    ``window - stride`` tokens of context before the first token it scores (at
    least one, when ``stride >= window``).
    """
    ids = ids.reshape(-1)
    n = ids.numel()
    if n < 2:
        raise WorkbenchError("perplexity needs at least 2 tokens")
    if window < 2 or stride < 1:
        raise WorkbenchError(f"window must be >= 2 and stride >= 1 (got window={window}, stride={stride})")
    spans, scored_to = [], 1  # token 0 has no context and is never scored
    while scored_to < n:
        end = min(window, n) if scored_to == 1 else min(scored_to + stride, n)
        begin = max(0, end - window)
        if begin >= scored_to:  # stride >= window: keep one token of context, stay within the window
            begin = scored_to - 1
            end = min(begin + window, n)
        spans.append((begin, scored_to, end))
        scored_to = end
    nll_sum, scored = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc="perplexity", unit="window")
    for begin, first, end in spans:
        chunk = ids[begin:end].unsqueeze(0)
        logits = logits_fn(chunk)[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i+1
        targets = chunk[0, 1:].to(logprobs.device)
        nll = -logprobs.gather(1, targets[:, None])[:, 0]
        nll = nll[first - begin - 1:]  # tokens first..end-1
        nll_sum += nll.double().sum().item()
        scored += nll.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Perplexity(math.exp(nll_sum / scored), nll_sum, scored, len(spans))


@torch.no_grad()
def greedy(logits_fn: LogitsFn, prompt: torch.Tensor, max_new_tokens: int, *,
           eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of ``prompt`` ([T] ids); returns only the new tokens."""
    ids = prompt.reshape(1, -1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits_fn(ids)[0, -1].argmax())
        new.append(nxt)
        if nxt == eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return new
