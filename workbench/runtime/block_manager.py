"""The KV block manager: fixed-size blocks, reference counts, a free list in eviction order, prefix caching.

    bm = BlockManager(num_blocks=1024, block_size=16)
    hit = bm.match_prefix(req)          # at admission: cached blocks of req's leading full blocks (ref'd)
    if bm.can_allocate(req, n):         # room for n more tokens' K/V?
        bm.allocate(req, n)             # grow req.block_table to cover num_computed_tokens + n
    bm.commit(req)                      # after a step: full blocks get their hash (shareable from now on)
    bm.free(req)                        # finished or preempted: blocks go back (still cached while unused)

**Blocks.** The cache holds ``num_blocks`` blocks of ``block_size`` token slots; a request's K/V live in
the blocks of its ``block_table`` (token ``t`` in block ``t // block_size``, slot ``t % block_size``).

**Prefix caching.** A full block is identified by a hash chained over the token ids of every block up to
it: ``h_i = hash((h_{i-1}, tokens of block i))``, so equal hashes mean equal prefixes (the block keeps
its tokens and parent hash, and a hit is only taken when they match exactly: a hash collision can never
share wrong K/V). Blocks are registered once their K/V are computed (``commit``). At admission
``match_prefix`` takes the longest run of registered blocks that starts the request's tokens, adds a
reference to each and marks their tokens computed; at least one token is always left to compute, since
the next token's logits come from running it.

**Eviction.** A block whose reference count drops to 0 goes to the end of the free list but keeps its
hash: it can still be hit. Allocation takes the free list's head, the least recently freed block, and
only then drops its hash (LRU eviction). A request's blocks are freed last-first, so its tail, the part
least likely to be shared, is evicted before its head.

Pure bookkeeping: no tensors, no device (the executor owns the cache memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..errors import WorkbenchError
from .request import Request


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The chained hash of a full block (Python's tuple hash: deterministic for ints across runs)."""
    return hash((parent, tokens))


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    parent: int | None = None          # the hash of the block before it (None for a first block)
    tokens: tuple[int, ...] = ()       # its token ids, kept to verify a hash hit exactly


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise WorkbenchError(f"the KV cache needs at least one block of at least one token (got num_blocks="
                                 f"{num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head: evicted first
        self._cached: dict[int, int] = {}  # hash -> block id
        self.queries = self.hits = 0       # tokens of admitted requests, and how many of them were cache hits
        self.evictions = 0

    # ---- state -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks not referenced by any request (cached ones included: they are reclaimable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds: more than a request can ever have, so a server caps its context there."""
        return self.num_blocks * self.block_size

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """More blocks ``req`` needs to hold ``num_new_tokens`` more tokens' K/V."""
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self._free)

    # ---- prefix cache ------------------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Take the cached blocks that start ``req``'s tokens (``req`` must hold no blocks); returns the
        tokens they cover, now counted in ``req.num_computed_tokens``."""
        if req.block_table or req.num_computed_tokens:
            raise WorkbenchError(f"request {req.request_id} already holds blocks; match_prefix is for admission")
        tokens = req.token_ids
        usable = (len(tokens) - 1) // self.block_size  # leave at least one token to compute
        if not self.prefix_caching:
            return 0
        parent = None
        for i in range(usable):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, chunk)
            bid = self._cached.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            if block.tokens != chunk or block.parent != parent:
                break  # a hash collision: not the same prefix
            self._ref(bid)
            req.block_table.append(bid)
            req.block_hashes.append(h)
            parent = h
        hit = len(req.block_table) * self.block_size
        req.num_computed_tokens = req.num_cached_tokens = hit
        return hit

    def count_admission(self, req: Request) -> None:
        """Add an admitted request's lookup to the hit statistics (``hit_rate``)."""
        self.queries += req.num_tokens
        self.hits += req.num_cached_tokens

    @property
    def hit_rate(self) -> float:
        """Share of admitted requests' tokens found in the prefix cache."""
        return self.hits / self.queries if self.queries else 0.0

    def commit(self, req: Request) -> None:
        """Register ``req``'s blocks that are full of computed K/V (call after each step)."""
        if not self.prefix_caching:
            return
        full = min(req.num_computed_tokens // self.block_size, len(req.block_table))
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), full):
            chunk = tuple(req.token_slice(i * self.block_size, (i + 1) * self.block_size))
            h = block_hash(parent, chunk)
            block = self.blocks[req.block_table[i]]
            if h not in self._cached and block.hash is None:
                self._cached[h] = block.id
                block.hash, block.parent, block.tokens = h, parent, chunk
            req.block_hashes.append(h)
            parent = h

    # ---- allocation --------------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int) -> list[int]:
        """Grow ``req.block_table`` to hold ``num_new_tokens`` more tokens; returns the new block ids."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            raise WorkbenchError(f"KV cache full: request {req.request_id} needs {need} more blocks, "
                                 f"{len(self._free)} free of {self.num_blocks}; check can_allocate first")
        new = [self._take() for _ in range(need)]
        req.block_table += new
        return new

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks (last first) and forget its place in the cache."""
        for bid in reversed(req.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[bid] = None
        req.block_table = []
        req.block_hashes = []
        req.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds."""
        for bid in self._free:
            self._uncache(self.blocks[bid])

    # ---- internals ---------------------------------------------------------------------------------
    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._free[bid]
        block.ref_count += 1

    def _take(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:
            self.evictions += 1
            self._uncache(block)
        block.ref_count = 1
        return bid

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self._cached.get(block.hash) == block.id:
            del self._cached[block.hash]
        block.hash, block.parent, block.tokens = None, None, ()
