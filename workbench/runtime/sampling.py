"""Sampling for the paged-KV runtime: per-request parameters, the batched sampler, stop checks, detokenization.

One decode step of the engine, for the rows of a batch, uses this module in order:

    suppress  = [suppressed_tokens(p, num_generated, eos) for each row]    min_tokens: forbid EOS / stop ids
    out       = Sampler().sample(logits [rows, vocab], params, generators, suppress)
    delta     = detokenizer.add(out.token_ids[row])                       new text of that row
    stop, why, keep = check_stop(p, generated_ids, token, detokenizer.text, eos)

Conventions (vLLM's):

* ``SampleOutput.logprobs`` and ``top_logprobs`` are the *model's* distribution: log-softmax of the raw
  logits, before suppression, temperature, top-k and top-p. They therefore do not depend on how the
  token was chosen, and a greedy and a sampled request see the same numbers.
* Processing order for a sampled row: suppression (-inf), temperature, top-k, top-p on the top-k
  renormalised distribution, then one draw with the row's generator. A greedy row (temperature 0) is
  the argmax of its suppressed logits; ties go to the lowest id.
* Reproducibility: a row's draw depends only on its own logits, parameters and generator, never on its
  batch-mates, so ``make_generator`` with a seed gives the same tokens whatever shares the batch.

Nothing here owns a device: tensors stay where the caller's logits are, and only the final token ids,
log-probs and top log-probs cross to the host (one ``tolist`` each).

**Without waiting for the GPU.** ``Sampler.launch`` queues the whole draw on the logits' device and
returns a ``PendingSample``: the tokens as a device tensor (the engine feeds them to the next step
before the host has seen them) and copies to the host already under way; ``PendingSample.result()``
waits for those copies alone. Host-to-device inputs (row indices, temperatures, suppressed ids) go
through pinned memory without blocking, so nothing here makes the host wait for queued GPU work.
``sample`` is ``launch(...).result()``.

**Greedy batches on a GPU** (every row greedy, nothing suppressed, no top log-probs) take one Triton pass
over the logits for the argmax and its log-probability (``kernels.triton_sampling``), the same values as
the torch chain here, which reads and writes an fp32 copy of the logits four times.
"""

from __future__ import annotations

import array
import math
from dataclasses import asdict, dataclass

import torch

from ..errors import WorkbenchError

# A token is kept by top-p while the probability mass *before* it is below top_p. Float32 sums carry
# rounding of about 1e-7 per term, so a set whose mass equals top_p up to that noise counts as reaching
# it: six tokens of 0.1 sum to 0.59999996, and top_p 0.6 must keep exactly those six.
_TOP_P_TOLERANCE = 1e-6

# Tokens of context decoded before the first unread token. Enough for SentencePiece's leading-space rule
# and for byte-level BPE characters of up to four bytes split one byte per token.
_DETOKENIZE_CONTEXT = 5


#: The seeds a generator takes (``torch.Generator.manual_seed``): 64 bits, a negative one as its two's complement.
MIN_SEED, MAX_SEED = -2**63, 2**64 - 1


def derived_seed(seed: int, i: int) -> int:
    """Seed ``seed + i`` in 64-bit arithmetic (what ``manual_seed`` makes of it), e.g. for a request's i-th choice:
    always a valid seed, and for a seed that does not wrap, ``seed + i`` itself."""
    value = (seed + i) % 2**64
    return value if seed >= 0 else value - 2**64 if value >= 2**63 else value


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops; field names and defaults follow vLLM.

    ``stop`` is normalised to a list of strings and ``stop_token_ids`` to a list of ints.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top log-probs returned per token, besides the chosen token's
    min_tokens: int = 0

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise WorkbenchError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}; "
                                 "ask for at least one token")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise WorkbenchError(f"temperature and top_p must be finite numbers, got {self.temperature!r} and "
                                 f"{self.top_p!r}")
        if self.temperature < 0:
            raise WorkbenchError(f"temperature must be >= 0, got {self.temperature}; "
                                 "use 0 for greedy decoding or a positive value to sample")
        if not 0 < self.top_p <= 1:
            raise WorkbenchError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn top-p off")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise WorkbenchError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}; "
                                 "use -1 to consider every token")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise WorkbenchError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}; "
                                 "use 0 to allow stopping at any token")
        if self.min_tokens > self.max_tokens:
            raise WorkbenchError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens}); "
                                 "raise max_tokens or lower min_tokens")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise WorkbenchError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}; "
                                 "use None to return no top log-probs")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise WorkbenchError(f"seed must be an integer from {MIN_SEED} to {MAX_SEED} (a 64-bit seed) or None, "
                                 f"got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise WorkbenchError(f"stop must be non-empty strings, got {self.stop!r}; "
                                 "an empty stop string would end every request at once")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise WorkbenchError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleOutput:
    """One step's result, one entry per row. Log-probs are of the model's (raw-logit) distribution."""

    token_ids: list[int]
    logprobs: list[float]  # log-prob of the chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # params.logprobs most likely (id, log-prob), best first


def make_generator(params: SamplingParams, device: str | torch.device) -> torch.Generator | None:
    """A generator seeded with ``params.seed`` on ``device``, made once per request; None (the global RNG)
    when the request has no seed."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def suppressed_tokens(params: SamplingParams, num_generated: int, eos_token_id: int | None) -> set[int]:
    """Token ids the next token may not be, given ``num_generated`` tokens already generated: EOS (unless
    ``ignore_eos``) and ``stop_token_ids`` while fewer than ``min_tokens`` were generated, else none.

    Pass one set per row as ``Sampler.sample(..., suppress=...)``.
    """
    if num_generated >= params.min_tokens:
        return set()
    ids = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        ids.add(eos_token_id)
    return ids


class PendingSample:
    """A launched draw: ``tokens`` (device, one per row) now, the ``SampleOutput`` once ``result()`` is called."""

    def __init__(self, tokens: torch.Tensor, chosen: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor] | None,
                 wanted: list[int | None]) -> None:
        self.tokens, self.wanted = tokens, wanted
        self._event = None
        parts = (tokens, chosen) + (top or ())
        if tokens.device.type == "cuda":  # copies into pinned host memory, queued behind the draw
            self._host = [t.to("cpu", non_blocking=True) for t in parts]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(parts)

    def result(self) -> SampleOutput:
        if self._event is not None:
            self._event.synchronize()
        tokens, chosen, *top = (t.tolist() for t in self._host)
        if top:
            values, ids = top
            tops = [None if k is None else list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(self.wanted)]
        else:
            tops = [None if k is None else [] for k in self.wanted]
        return SampleOutput(tokens, chosen, tops)


class ReadySample(PendingSample):
    """A draw already read back (the engine's row-by-row fallback): the same interface as ``PendingSample``."""

    def __init__(self, tokens: torch.Tensor, output: SampleOutput) -> None:
        self.tokens, self.wanted, self._output = tokens, [None] * len(output.token_ids), output

    def result(self) -> SampleOutput:
        return self._output


class Sampler:
    """Picks one token per row of a batch of logits; stateless (the randomness lives in the generators)."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               suppress: list[set[int]] | None = None) -> SampleOutput:
        """Tokens for ``logits`` [rows, vocab] (any float dtype, any device), one ``params`` and generator
        per row; ``suppress`` optionally lists, per row, token ids that must not be chosen."""
        return self.launch(logits, params, generators, suppress).result()

    def launch(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               suppress: list[set[int]] | None = None) -> PendingSample:
        """``sample`` without waiting: the draw is queued on the logits' device (see the module docstring)."""
        rows = len(params)
        if logits.dim() != 2 or logits.shape[0] != rows or len(generators) != rows:
            raise WorkbenchError(f"sample got logits of shape {tuple(logits.shape)} for {rows} params and "
                                 f"{len(generators)} generators; give [rows, vocab] logits and one of each per row")
        if suppress is not None and len(suppress) != rows:
            raise WorkbenchError(f"sample got {len(suppress)} suppress sets for {rows} rows; give one per row")
        wanted = [p.logprobs for p in params]
        if _fused_greedy(logits) and not any(wanted) and all(p.greedy for p in params) \
                and (suppress is None or not any(suppress)):
            from ..kernels.triton_sampling import greedy_logprobs

            tokens, chosen = greedy_logprobs(logits)  # one read of the logits instead of four fp32 passes
            return PendingSample(tokens, chosen, None, wanted)
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # the model's distribution, reported as is
        if suppress is not None and any(suppress):
            logits = _suppress(logits, suppress)

        tokens = logits.argmax(dim=-1)  # greedy rows keep this; argmax returns the first (lowest) maximal id
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            index = to_device(sampled, logits.device)
            tokens[index] = _draw(logits[index], [params[i] for i in sampled], [generators[i] for i in sampled])

        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        most = max((k for k in wanted if k), default=0)
        top = logprobs.topk(min(most, logprobs.shape[-1]), dim=-1) if most else None
        return PendingSample(tokens, chosen, tuple(top) if top is not None else None, wanted)


def _fused_greedy(logits: torch.Tensor) -> bool:
    """Whether an all-greedy batch takes the one-pass Triton kernel (``kernels.triton_sampling``): on CUDA."""
    return logits.is_cuda


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on ``device``; to a GPU through pinned memory without blocking the host (the
    executor stages a step's inputs with it too)."""
    if dtype == torch.long and values:  # through array: a third of torch.tensor's time on a list of ints
        host = torch.frombuffer(array.array("q", values), dtype=torch.long)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _suppress(logits: torch.Tensor, suppress: list[set[int]]) -> torch.Tensor:
    rows = [i for i, ids in enumerate(suppress) for _ in ids]
    cols = [t for ids in suppress for t in ids]
    logits = logits.clone()  # .float() returns the caller's tensor when it already is float32
    logits[to_device(rows, logits.device), to_device(cols, logits.device)] = float("-inf")
    return logits


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row (all rows have temperature > 0): temperature, top-k, top-p, then a draw."""
    device = logits.device
    temperature = to_device([p.temperature for p in params], device, torch.float32)
    scaled = logits / temperature[:, None]
    filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if filtered:
        index = to_device(filtered, device)
        drop = _top_k_top_p_drop(scaled[index], [params[i] for i in filtered])
        scaled[index] = scaled[index].masked_fill(drop, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)

    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:  # one call on the global RNG for all of them
        index = to_device(unseeded, device)
        tokens[index] = torch.multinomial(probs[index], 1)[:, 0]
    for i, generator in enumerate(generators):
        if generator is not None:  # a row's own stream: its draws do not depend on the other rows
            tokens[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return tokens


def _top_k_top_p_drop(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Boolean [rows, vocab], True for the tokens top-k and then top-p remove.

    Works on the logits sorted best first (stable, so ties keep the lower id first): top-k drops ranks
    >= k; top-p then drops every rank whose preceding mass, under the top-k distribution, already reaches
    top_p. Rank 0 is always kept.
    """
    rows, vocab = scaled.shape
    device = scaled.device
    top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], device)
    top_p = to_device([p.top_p - _TOP_P_TOLERANCE if p.top_p < 1 else float("inf") for p in params], device,
                torch.float32)
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter_(1, order, drop)


def check_stop(params: SamplingParams, token_ids_so_far: list[int], new_token: int, text_so_far: str,
               eos_token_id: int | None) -> tuple[bool, str | None, int]:
    """Whether a request ends after ``new_token``: ``(stop, reason, keep)``.

    Call it after appending: ``token_ids_so_far`` are all generated ids *including* ``new_token`` (its
    last element) and ``text_so_far`` all generated text including the new token's delta. ``reason`` is
    "stop" (EOS unless ``ignore_eos``, a ``stop_token_ids`` id, or a stop string) or "length"
    (``max_tokens`` reached), None while running. ``keep`` is how many characters of ``text_so_far`` the
    output keeps: for a stop string the text before its first occurrence (vLLM drops the stop string),
    otherwise all of it (a stop token's text stays; EOS, a special token, decodes to "").

    While ``len(token_ids_so_far) <= min_tokens`` nothing but the length limit ends the request.
    Stop strings are searched in the whole text; since an earlier call would have stopped on an earlier
    match, a match found here ends in the new text, except one completed within the first
    ``min_tokens`` tokens, which then ends the request at the first token allowed to stop.
    """
    num_generated = len(token_ids_so_far)
    if num_generated > params.min_tokens:
        if (new_token == eos_token_id and not params.ignore_eos) or new_token in params.stop_token_ids:
            return True, "stop", len(text_so_far)
        if params.stop:
            found = [i for i in (text_so_far.find(s) for s in params.stop) if i >= 0]
            if found:
                return True, "stop", min(found)
    if num_generated >= params.max_tokens:
        return True, "length", len(text_so_far)
    return False, None, len(text_so_far)


class IncrementalDetokenizer:
    """The text of generated tokens, one token at a time, for a Hugging Face tokenizer.

    Decoding a token alone is wrong twice over: a byte-level BPE token may hold only part of a UTF-8
    character (it decodes to '\\ufffd'), and SentencePiece drops the leading space of the first token
    it decodes. So each step decodes a short window of ids instead:

        window = [ ... context ids ... | unread ids ... new id ]
                                       ^ read
        delta  = decode(window)[len(decode(window[:read])):]

    The context makes the first unread token decode as it would mid-sequence. While the window's text
    ends in '\\ufffd' (a character still incomplete) nothing is emitted and the window grows; once it is
    complete the delta is emitted and the unread ids become the next context. Invariant: ``text`` is
    ``decode(prompt + generated)`` minus ``decode(prompt)`` (without clean-up of tokenization spaces),
    except for a trailing incomplete character, held back until a later token completes it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window = list(prompt_token_ids[-_DETOKENIZE_CONTEXT:])
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        self._token_ids: list[int] = []
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Appends one generated token; returns the text it completes ("" while a character is incomplete)."""
        self._token_ids.append(token_id)
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith("\ufffd") or len(text) <= len(self._context_text):
            return ""
        delta = text[len(self._context_text):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        self._text += delta
        return delta

    @property
    def text(self) -> str:
        """All generated text emitted so far."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """All generated token ids added so far."""
        return self._token_ids
