"""Evaluation that works the same on a ``transformers`` model and on a workbench program.

Both are reduced to a *logits function*: token ids [1, T] -> logits [1, T, vocab].

* ``perplexity``: sliding windows over a long token sequence; every token after
  the first is scored exactly once, with as much left context as the window
  allows (at least ``window - stride`` tokens once past the first window), and
  the result is weighted by tokens, not by windows.
* ``greedy``: greedy decoding by recomputing the whole sequence each step (no KV
  cache: this is the oracle the runtime's cached decoding is checked against).
* ``logits_fn``, ``paged_greedy``, ``program_greedy``: the same for a workbench program, whose
  paged graph runs its steps over a ``graph.paged.SimplePagedCache``.

Text sets (``dataset_text``) are the shipped ``datasets/`` by name or any file by path, read by
``load_text``: plain text, or JSONL with a ``text`` field per line. Calibration reads its data the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import WorkbenchError
from .progress import progress_bar

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DATASETS = Path(__file__).resolve().parent.parent / "datasets"


def hf_logits(model: torch.nn.Module) -> LogitsFn:
    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(model.device), use_cache=False).logits

    return fn


#: How the shipped sets join their documents (datasets/README.md): a blank line, a line "---", a blank line.
DOCUMENT_SEPARATOR = "\n\n---\n\n"
JSONL_SUFFIXES = (".jsonl", ".json")


def dataset_path(name_or_path: str | Path) -> Path:
    """The file of a text set: a name of ``datasets/`` (``calibration``, ``evaluation``) or a file's path."""
    s = str(name_or_path)
    p = Path(s)
    shipped = DATASETS / f"{s}.txt"
    if isinstance(name_or_path, str) and "/" not in s and not p.suffix and shipped.is_file():
        return shipped
    if isinstance(name_or_path, str) and "/" not in s and not p.suffix and not p.exists():
        known = sorted(q.stem for q in DATASETS.glob("*.txt")) if DATASETS.is_dir() else []
        raise WorkbenchError(f"no dataset {s!r} in {DATASETS}; available: {', '.join(known) or 'none'}, or give a "
                             "text file's path (plain text, or JSONL with a \"text\" field)")
    return p


def dataset_label(name_or_path: str | Path) -> str:
    """How records and messages name a text set: ``datasets/NAME.txt`` for a shipped one, else the path given."""
    p = dataset_path(name_or_path)
    return f"datasets/{p.name}" if p.parent.resolve() == DATASETS.resolve() else str(name_or_path)


def dataset_text(name_or_path: str | Path) -> str:
    """A text set: a name of ``datasets/`` (``calibration`` or ``evaluation``) or a file's path (``load_text``)."""
    return load_text(dataset_path(name_or_path))


def load_text(path: str | Path, *, option: str | None = None) -> str:
    """The text of a plain-text file, or of a JSONL file whose lines are objects with a string ``text`` (by its
    suffix, .jsonl or .json, or by its first line being such an object): its documents joined as the shipped
    sets join theirs (``DOCUMENT_SEPARATOR``, one newline at the end). Anything else is a one-line
    ``WorkbenchError`` naming the file, the line and the fix (``option``: the flag that gave the path)."""
    path = Path(path)
    given = f"{option} {path}" if option else str(path)
    if not path.exists():
        raise WorkbenchError(f"{given}: no such file; give a plain-text file, or JSONL with one "
                             "{\"text\": \"...\"} object per line")
    if not path.is_file():
        raise WorkbenchError(f"{given} is not a file; give a plain-text file, or JSONL with one "
                             "{\"text\": \"...\"} object per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise WorkbenchError(f"{given} is not UTF-8 text (line {line}: byte 0x{data[e.start]:02x}); convert it to "
                             f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name}`)") from None
    if path.suffix.lower() in JSONL_SUFFIXES or _looks_like_jsonl(text):
        text = _jsonl_text(text, given)
    if not text.strip():
        raise WorkbenchError(f"{given} holds no text (it is empty or only whitespace); give a file with text")
    return text


def _looks_like_jsonl(text: str) -> bool:
    import json

    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "text" in obj


def _jsonl_text(text: str, given: str) -> str:
    import json

    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fix = 'each line of a JSONL file is one object with a string "text", e.g. {"text": "..."}'
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{given} line {number} is not JSON ({e.msg}, column {e.colno}); {fix}") from None
        if not isinstance(obj, dict):
            raise WorkbenchError(f"{given} line {number} is a JSON {type(obj).__name__}, not an object; {fix}")
        if not isinstance(obj.get("text"), str):
            has = "has no \"text\"" if "text" not in obj else f"has a {type(obj['text']).__name__} \"text\""
            raise WorkbenchError(f"{given} line {number} {has} (keys: {', '.join(map(str, obj)) or 'none'}); {fix}")
        docs.append(obj["text"].strip("\n"))
    joined = DOCUMENT_SEPARATOR.join(d for d in docs if d.strip())
    return joined + "\n" if joined else ""


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
    with progress_bar(len(spans), "perplexity", "window", enabled=progress) as bar:
        for begin, first, end in spans:
            chunk = ids[begin:end].unsqueeze(0)
            logits = logits_fn(chunk)[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)  # position i predicts token i+1
            targets = chunk[0, 1:].to(logprobs.device)
            nll = -logprobs.gather(1, targets[:, None])[:, 0]
            nll = nll[first - begin - 1:]  # tokens first..end-1
            nll_sum += nll.double().sum().item()
            scored += nll.numel()
            bar.update(1)
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


# ---- drivers for workbench programs (paged graphs run their steps through graph.paged's SimplePagedCache) ----
def paged_greedy(program, prompt: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                 num_blocks: int = 64) -> list[int]:
    """Greedy decoding through a paged graph: one prefill step, then one token per step from the cache."""
    from .graph.paged import cache_for

    cache = cache_for(program.graph, num_blocks=num_blocks, device=program.device)
    new: list[int] = []
    step = prompt.reshape(-1).tolist()
    for _ in range(max_new_tokens):
        (logits,) = program.run(**cache.step_inputs([(0, step)]))
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        if nxt == eos_token_id:
            break
        step = [nxt]
    return new


def logits_fn(program) -> LogitsFn:
    """A logits function ([1, T] ids -> [1, T, vocab]) for any program: a paged graph runs each
    call as one fresh sequence's prefill; any other graph runs as it is."""
    from .graph.paged import PagedLayout, SimplePagedCache, is_paged

    if not is_paged(program.graph):
        return program
    layout = PagedLayout.from_graph(program.graph)

    def run(ids: torch.Tensor) -> torch.Tensor:
        cache = SimplePagedCache(layout, layout.blocks_for(ids.shape[-1]), program.device)
        (logits,) = program.run(**cache.step_inputs([(0, ids.reshape(-1).tolist())]))
        return logits

    return run


def program_greedy(program, prompt: torch.Tensor, max_new_tokens: int, *,
                   eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with any program: KV-cached through a paged graph, full recompute otherwise."""
    from .graph.paged import PagedLayout, is_paged

    if is_paged(program.graph):
        blocks = PagedLayout.from_graph(program.graph).blocks_for(prompt.numel() + max_new_tokens)
        return paged_greedy(program, prompt, max_new_tokens, eos_token_id=eos_token_id, num_blocks=blocks)
    return greedy(program, prompt, max_new_tokens, eos_token_id=eos_token_id)
