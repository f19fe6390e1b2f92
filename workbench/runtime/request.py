"""A request as the runtime's bookkeeping sees it: its tokens, how many have KV in the cache, its blocks.

    req = Request("r1", prompt_token_ids=[...], max_tokens=64)
    req.token_ids            # prompt + generated so far (after a preemption: recomputed from the start)
    req.num_computed_tokens  # tokens whose K/V are in the cache (prefix-cache hits included)
    req.block_table          # cache blocks holding them, in order (owned by the block manager)

Plain data: the scheduler and the block manager update it, the engine reads it. Nothing here touches a
device.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


#: An output token the engine has asked for but not seen yet: the step that samples it is still running on
#: the device (the engine then resolves it before anything reads its value). See ``engine``.
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"              # not admitted yet, or preempted (recomputed from the start when readmitted)
    RUNNING = "running"
    FINISHED_STOPPED = "stop"        # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"       # max_tokens reached
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float = 0.0
    params: Any = None  # the engine's SamplingParams; the scheduler never reads it
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    #: chained hashes of the full blocks of ``token_ids`` that are registered in (or were found in) the cache
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0   # prefix-cache hits at the last admission
    num_preemptions: int = 0
    #: guaranteed-no-evict admission reserved blocks for prompt + max_tokens up front
    reserved: bool = False

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``token_ids[start:stop]`` without building the whole list (the executor reads a few per step)."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if stop <= n:
            return prompt[start:stop]
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        return prompt[start:] + self.output_token_ids[:stop - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold in the cache (prompt + max_tokens)."""
        return len(self.prompt_token_ids) + self.max_tokens
