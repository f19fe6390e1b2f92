"""The scheduler: in-flight batching with a token budget per step, chunked prefill, preemption by recompute.

    sched = Scheduler(BlockManager(1024, 16), SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64))
    sched.add(Request("r1", prompt_ids, max_tokens=64))
    out = sched.schedule()              # SchedulerOutput: which requests run how many new tokens this step
    ...                                 # the executor runs out.scheduled, samples where out says so
    sched.update(out, {"r1": token})    # tokens sampled for the requests that reached their last token
    sched.finish("r1", Status.FINISHED_STOPPED)   # the engine decides stops; abort() for cancellations

**One step** (every request is "tokens to compute", prefill and decode alike, as in vLLM v1):
  1. Running requests, oldest first, each get their uncomputed tokens (1 for a decode; the next chunk of a
     long prompt) within the step's token budget. When the cache has no block for one, the newest running
     request is preempted: its blocks are freed, it goes back to the front of the waiting queue and is
     later recomputed from the start (its prefix blocks may still be cached); if it is the one asking, it
     waits.
  2. If nothing was preempted, waiting requests are admitted in arrival order while the budget, the
     ``max_num_seqs`` limit and the policy allow: their prefix-cache hit is taken, then as much of the
     rest as the budget allows (chunked prefill; without it a prompt must fit the budget whole).

**Policies** (TensorRT-LLM's capacity scheduler names):
  ``max_utilization``       admit when the blocks for this step's tokens are free; decodes may later
                            preempt (most concurrency)
  ``guaranteed_no_evict``   admit only when the blocks for prompt + max_tokens can be reserved now; a
                            running request never needs a block it does not hold, so nothing is preempted

Deterministic: no randomness, and ties break by arrival order then request id. Pure bookkeeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import WorkbenchError
from .block_manager import BlockManager
from .request import Request, Status

POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    chunked_prefill: bool = True
    policy: str = "max_utilization"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise WorkbenchError(f"scheduler: max_num_batched_tokens ({self.max_num_batched_tokens}) and "
                                 f"max_num_seqs ({self.max_num_seqs}) must be >= 1")
        if self.policy not in POLICIES:
            raise WorkbenchError(f"scheduler: unknown policy {self.policy!r}; use one of {', '.join(POLICIES)}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int      # tokens run this step, starting at request.num_computed_tokens
    samples: bool            # the chunk reaches the request's last token: its logits give the next token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    num_prefill_tokens: int = 0   # tokens of requests still computing their prompt (or a recompute)
    num_decode_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.bm = block_manager
        self.config = config or SchedulerConfig()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise WorkbenchError(f"request id {req.request_id!r} is already in use; give each request its own id")
        if not req.prompt_token_ids:
            raise WorkbenchError(f"request {req.request_id!r} has an empty prompt; give it at least one token")
        if req.max_tokens < 1:
            raise WorkbenchError(f"request {req.request_id!r}: max_tokens must be >= 1, got {req.max_tokens}")
        if not self.config.chunked_prefill and req.max_total_tokens > self.config.max_num_batched_tokens:
            raise WorkbenchError(f"request {req.request_id!r} can grow to {req.max_total_tokens} tokens, more than "
                                 f"max_num_batched_tokens ({self.config.max_num_batched_tokens}), and chunked "
                                 "prefill is off, so a recompute after preemption could never be scheduled; turn "
                                 "chunked prefill on or raise max_num_batched_tokens")
        need = -(-req.max_total_tokens // self.bm.block_size)
        if need > self.bm.num_blocks:
            raise WorkbenchError(f"request {req.request_id!r} can grow to {req.max_total_tokens} tokens "
                                 f"({need} blocks), more than the whole KV cache ({self.bm.num_blocks} blocks of "
                                 f"{self.bm.block_size}); shorten the prompt or max_tokens, or give the cache more "
                                 "memory")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, request_id: str, status: Status) -> Request:
        """End a request (stopped, length or aborted): it leaves the queues and its blocks are freed."""
        if not status.finished:
            raise WorkbenchError(f"finish() takes a finished status, not {status}")
        req = self.requests.pop(request_id, None)
        if req is None:
            raise WorkbenchError(f"no unfinished request {request_id!r}")
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req)
        req.status = status
        return req

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request wherever it is; None if it already finished."""
        if request_id not in self.requests:
            return None
        return self.finish(request_id, Status.FINISHED_ABORTED)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kept: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            if budget == 0:
                kept.append(req)
                continue
            n = min(req.num_uncomputed, budget)
            while not self.bm.can_allocate(req, n):
                victim = queue.pop() if queue else req  # the newest running request
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self.bm.allocate(req, n)
                self._schedule(req, n, out)
                budget -= n
                kept.append(req)
        self.running = kept

        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not req.block_table:  # fresh, or preempted: take its prefix-cache hit
                self.bm.match_prefix(req)
            n = min(req.num_uncomputed, budget)
            if n < req.num_uncomputed and not self.config.chunked_prefill:
                self._unmatch(req)
                break
            if self.config.policy == "guaranteed_no_evict":
                reserve = req.max_total_tokens - req.num_computed_tokens
                if not self.bm.can_allocate(req, reserve):
                    self._unmatch(req)
                    break
                self.bm.allocate(req, reserve)
                req.reserved = True
            elif not self.bm.can_allocate(req, n):
                self._unmatch(req)
                break
            else:
                self.bm.allocate(req, n)
            self.waiting.popleft()
            self.bm.count_admission(req)
            req.status = Status.RUNNING
            self.running.append(req)
            out.admitted.append(req.request_id)
            self._schedule(req, n, out)
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """After the step ran: advance each scheduled request, register its full blocks, append the tokens
        sampled for those that reached their last token (``sampled`` maps request id -> token id)."""
        for s in out.scheduled:
            req = s.request
            if req.status is not Status.RUNNING:  # finished or aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.bm.commit(req)
            if s.samples:
                if req.request_id not in sampled:
                    raise WorkbenchError(f"request {req.request_id} reached its last token but no token was "
                                         "sampled for it")
                req.output_token_ids.append(int(sampled[req.request_id]))

    # ---- internals ------------------------------------------------------------------------------------
    def _schedule(self, req: Request, n: int, out: SchedulerOutput) -> None:
        samples = req.num_computed_tokens + n == req.num_tokens
        out.scheduled.append(ScheduledRequest(req, n, samples))
        if n == 1 and samples and req.output_token_ids:  # the last sampled token: a decode
            out.num_decode_tokens += 1
        else:  # a prompt chunk, or a preempted request's recompute
            out.num_prefill_tokens += n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        if req.reserved:  # cannot happen under guaranteed_no_evict: its blocks were reserved up front
            raise WorkbenchError(f"request {req.request_id} holds a full reservation and ran out of blocks; "
                                 "report this bug")
        self.bm.free(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)

    def _unmatch(self, req: Request) -> None:
        """Give back a prefix-cache hit taken for a request that could not be admitted after all."""
        if req.block_table:
            self.bm.free(req)
