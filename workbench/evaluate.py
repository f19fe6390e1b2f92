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
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise WorkbenchError("perplexity needs at least 2 tokens")
    if not 0 < stride <= window:
        raise WorkbenchError(f"stride must be in 1..window ({window}), not {stride}")
    starts = list(range(0, max(ids.numel() - window, 0) + stride, stride))
    nll_sum, scored, prev_end = 0.0, 0, 1  # token 0 has no context and is never scored
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="perplexity", unit="window")
    windows = 0
    for begin in starts:
        end = min(begin + window, ids.numel())
        if end <= prev_end:
            break
        chunk = ids[begin:end].unsqueeze(0)
        logits = logits_fn(chunk)[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i+1
        targets = chunk[0, 1:].to(logprobs.device)
        picked = -logprobs.gather(1, targets[:, None])[:, 0]
        first = prev_end - begin - 1  # index into targets of the first token not scored yet
        nll_sum += picked[first:].double().sum().item()
        scored += picked.numel() - first
        prev_end = end
        windows += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Perplexity(math.exp(nll_sum / scored), nll_sum, scored, windows)


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
