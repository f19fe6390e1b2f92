"""The KV block manager and the scheduler: tiny pools, exact block ids, eviction order, prefix-cache hits,
chunked prefill, preemption by recompute, both policies, aborts. Pure bookkeeping: no model runs here."""

import pytest

from workbench.errors import WorkbenchError
from workbench.runtime import block_manager as B
from workbench.runtime.block_manager import BlockManager
from workbench.runtime.request import Request, Status
from workbench.runtime.scheduler import Scheduler, SchedulerConfig


def computed(req, n):
    """Mark n more tokens of req computed, as a step would (commit registers its full blocks)."""
    req.num_computed_tokens += n


# --- block manager ----------------------------------------------------------------------------------------

def test_blocks_are_handed_out_in_order_and_freed_tail_first():
    bm = BlockManager(6, 4)
    r1, r2 = Request("r1", list(range(10)), 4), Request("r2", list(range(20, 25)), 4)
    assert bm.blocks_needed(r1, 10) == 3 and bm.allocate(r1, 10) == [0, 1, 2]
    assert bm.allocate(r2, 5) == [3, 4]
    assert bm.num_free == 1 and bm.usage == pytest.approx(5 / 6)
    r2.num_computed_tokens = 5
    assert bm.blocks_needed(r2, 3) == 0 and bm.blocks_needed(r2, 4) == 1  # 8 tokens fit 2 blocks, 9 need 3
    assert not bm.can_allocate(r1, 20)  # 20 tokens: 5 blocks, 2 more than it holds
    with pytest.raises(WorkbenchError, match="KV cache full: request r1 needs 2 more blocks, 1 free of 6"):
        bm.allocate(r1, 20)
    bm.free(r1)  # last block first: 2, then 1, then 0 join the free list after 5
    assert list(bm._free) == [5, 2, 1, 0] and r1.block_table == [] and r1.num_computed_tokens == 0
    assert bm.allocate(Request("r3", [1], 4), 8) == [5, 2]


def test_prefix_cache_hits_full_computed_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(8, 4)
    r1 = Request("r1", list(range(10)), 4)
    bm.allocate(r1, 10)
    computed(r1, 10)
    bm.commit(r1)  # blocks 0 and 1 are full; block 2 holds 2 tokens and is not registered
    assert bm.num_cached == 2 and [bm.blocks[i].hash is not None for i in range(3)] == [True, True, False]
    bm.free(r1)
    r2 = Request("r2", list(range(8)) + [77, 78, 79], 4)  # shares the first two blocks
    assert bm.match_prefix(r2) == 8
    assert r2.block_table == [0, 1] and r2.num_computed_tokens == 8 and r2.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 1 and 0 not in bm._free
    r3 = Request("r3", list(range(8)), 4)  # the whole prompt is cached: its last block is computed again
    assert bm.match_prefix(r3) == 4 and r3.block_table == [0]
    assert bm.blocks[0].ref_count == 2
    bm.free(r2)
    assert bm.blocks[0].ref_count == 1 and 1 in bm._free and 0 not in bm._free
    r4 = Request("r4", [5] + list(range(1, 10)), 4)  # differs in the first token: no hit at all
    assert bm.match_prefix(r4) == 0 and r4.block_table == []
    bm.count_admission(r2)
    bm.count_admission(r4)
    assert bm.hit_rate == pytest.approx(8 / 21)


def test_eviction_takes_the_least_recently_freed_block_and_drops_its_hash():
    bm = BlockManager(4, 2)
    a, b = Request("a", [1, 2, 3, 4], 1), Request("b", [5, 6, 7, 8], 1)
    for r in (a, b):
        bm.allocate(r, 4)
        computed(r, 4)
        bm.commit(r)
    bm.free(a)  # free list: a's blocks 1, 0
    bm.free(b)  # then b's: 3, 2
    assert list(bm._free) == [1, 0, 3, 2] and bm.num_cached == 4
    c = Request("c", [9, 9, 9], 1)
    assert bm.allocate(c, 3) == [1, 0]  # a's blocks go first: a's prefix is evicted, b's is still cached
    assert bm.evictions == 2 and bm.num_cached == 2
    assert bm.match_prefix(Request("a2", [1, 2, 3, 4, 5], 1)) == 0
    assert bm.match_prefix(Request("b2", [5, 6, 7, 8, 9], 1)) == 4


def test_a_hash_collision_never_shares_wrong_blocks(monkeypatch):
    monkeypatch.setattr(B, "block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(4, 2)
    a = Request("a", [1, 2, 3], 1)
    bm.allocate(a, 3)
    computed(a, 3)
    bm.commit(a)
    assert bm.match_prefix(Request("x", [8, 9, 3], 1)) == 0  # same hash, other tokens: no hit
    assert bm.match_prefix(Request("y", [1, 2, 3], 1)) == 2


def test_prefix_caching_off_and_bad_sizes():
    bm = BlockManager(4, 2, prefix_caching=False)
    a = Request("a", [1, 2, 3], 1)
    bm.allocate(a, 3)
    computed(a, 3)
    bm.commit(a)
    bm.free(a)
    assert bm.num_cached == 0 and bm.match_prefix(Request("b", [1, 2, 3], 1)) == 0
    with pytest.raises(WorkbenchError, match="at least one block"):
        BlockManager(0, 16)


# --- scheduler ----------------------------------------------------------------------------------------------

def drive(sched, max_steps=100):
    """Run the scheduler with a stand-in model: the token sampled for a request is 1000 + how many it
    has; requests finish at max_tokens. Returns one entry per step: (scheduled, preempted, block tables)."""
    log = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            break
        out = sched.schedule()
        log.append(([(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled], out.preempted,
                    [list(r.block_table) for r in sched.running]))
        sched.update(out, {s.request.request_id: 1000 + len(s.request.output_token_ids)
                           for s in out.scheduled if s.samples})
        for s in out.scheduled:
            r = s.request
            if r.status is Status.RUNNING and len(r.output_token_ids) >= r.max_tokens:
                sched.finish(r.request_id, Status.FINISHED_LENGTH)
    return log


def test_chunked_prefill_mixes_with_decodes_and_preemption_recomputes():
    """4 blocks of 4 tokens, 8 tokens per step, two 6-token prompts generating 10 tokens each."""
    sched = Scheduler(BlockManager(4, 4), SchedulerConfig(max_num_batched_tokens=8))
    a, b = Request("a", list(range(6)), 10), Request("b", list(range(50, 56)), 10)
    sched.add(a)
    sched.add(b)
    log = drive(sched)
    assert log[:4] == [
        ([("a", 6, True), ("b", 2, False)], [], [[0, 1], [2]]),  # b's prompt is chunked: 2 of its 6 tokens fit
        ([("a", 1, True), ("b", 4, True)], [], [[0, 1], [2, 3]]),  # a decodes beside b's last chunk
        ([("a", 1, True), ("b", 1, True)], [], [[0, 1], [2, 3]]),
        # a's 9th token needs a third block and none is free: b, the newest, is preempted; its tail block
        # (3) was freed first, so a takes it
        ([("a", 1, True)], ["b"], [[0, 1, 3]]),
    ]
    assert log[7][2] == [[0, 1, 3, 2]]  # a's 13th token takes block 2, evicting b's cached prefix
    # once a finishes, b is recomputed from the start: its prompt and the 2 tokens it had, in one chunk
    assert log[10] == ([("b", 8, True)], [], [[2, 3]])
    assert a.output_token_ids == b.output_token_ids == list(range(1000, 1010))  # as if each ran alone
    assert (a.num_preemptions, b.num_preemptions, sched.num_preemptions) == (0, 1, 1)
    assert len(log) == 18 and sched.bm.num_free == 4


def test_guaranteed_no_evict_reserves_and_never_preempts():
    sched = Scheduler(BlockManager(4, 4), SchedulerConfig(max_num_batched_tokens=8, policy="guaranteed_no_evict"))
    a, b = Request("a", list(range(6)), 10), Request("b", list(range(50, 56)), 10)
    sched.add(a)
    sched.add(b)
    log = drive(sched)
    assert log[0] == ([("a", 6, True)], [], [[0, 1, 2, 3]])  # a reserved prompt + max_tokens: all 4 blocks
    assert all(not preempted for _, preempted, _ in log)
    first_b = next(i for i, (scheduled, _, _) in enumerate(log) if scheduled and scheduled[0][0] == "b")
    assert first_b == 10 and log[first_b][0] == [("b", 6, True)]  # b starts when a has finished
    assert a.output_token_ids == b.output_token_ids == list(range(1000, 1010))


def test_prefix_hits_skip_computed_tokens_and_max_num_seqs_limits_the_batch():
    sched = Scheduler(BlockManager(16, 4), SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2))
    shared = list(range(100, 112))
    first = Request("first", shared + [1], 2)
    sched.add(first)
    drive(sched)
    reqs = [Request(f"r{i}", shared + [i, i + 1], 2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    # 12 shared tokens = 3 cached blocks; only 2 requests fit max_num_seqs
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 2), ("r1", 2)]
    assert reqs[0].num_cached_tokens == 12 and reqs[0].block_table[:3] == reqs[1].block_table[:3]
    assert out.admitted == ["r0", "r1"] and out.num_prefill_tokens == 4 and list(sched.waiting) == [reqs[2]]
    assert sched.bm.blocks[reqs[0].block_table[0]].ref_count == 2


def test_abort_and_finish_free_blocks_wherever_the_request_is():
    sched = Scheduler(BlockManager(8, 4), SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=1))
    a, b = Request("a", list(range(9)), 5), Request("b", [1, 2], 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.update(out, {"a": 7})
    assert sched.bm.num_free == 5 and a.status is Status.RUNNING and b.status is Status.WAITING
    assert sched.abort("b").status is Status.FINISHED_ABORTED and list(sched.waiting) == []
    assert sched.abort("a").status is Status.FINISHED_ABORTED and sched.running == []
    assert sched.bm.num_free == 8 and not sched.has_unfinished and sched.abort("a") is None
    with pytest.raises(WorkbenchError, match="finished status"):
        sched.finish("x", Status.RUNNING)


@pytest.mark.parametrize("req,config,match", [
    (Request("a", [], 4), {}, "empty prompt"),
    (Request("a", [1], 0), {}, "max_tokens must be >= 1"),
    (Request("a", list(range(60)), 10), {}, "more than the whole KV cache"),
    (Request("a", list(range(10)), 10), {"chunked_prefill": False, "max_num_batched_tokens": 16},
     "chunked prefill is off"),
])
def test_requests_the_cache_cannot_hold_are_refused(req, config, match):
    sched = Scheduler(BlockManager(4, 16), SchedulerConfig(**config))
    with pytest.raises(WorkbenchError, match=match):
        sched.add(req)


def test_duplicate_ids_and_bad_configs_are_refused():
    sched = Scheduler(BlockManager(4, 4))
    sched.add(Request("a", [1], 1))
    with pytest.raises(WorkbenchError, match="already in use"):
        sched.add(Request("a", [2], 1))
    with pytest.raises(WorkbenchError, match="unknown policy 'fifo'"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(WorkbenchError, match="must be >= 1"):
        SchedulerConfig(max_num_seqs=0)
