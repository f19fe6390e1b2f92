"""The engine on the CPU (tiny-llama's optimized graph, reference ops): in-flight batching with staggered
arrivals, chunked prefill, preemption forced by a tiny KV pool and shared prefixes gives each request the
tokens it gets alone; seeds, aborts, the timeline, the offline API on a workspace."""

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.evaluate import paged_greedy
from workbench.runtime.engine import LLM, LLMEngine
from workbench.runtime.sampling import SamplingParams
from workbench.runtime.scheduler import SchedulerConfig


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 512, (20,), generator=g).tolist()  # requests 0, 2, 4 share 20 leading tokens
    out = []
    for i in range(n):
        own = torch.randint(1, 512, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
        out.append(shared + own if i % 2 == 0 else own)
    return out


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_inflight_batching_gives_each_request_its_tokens_alone(program, async_scheduling):
    ps = prompts(6)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [paged_greedy(program, torch.tensor(p), 12) for p in ps]
    # 9 blocks of 16 tokens for six requests of up to 61 tokens each: preemptions are certain
    engine = LLMEngine(program, num_blocks=9, config=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=4),
                       async_scheduling=async_scheduling)
    for i in (0, 1):
        engine.add_request(f"r{i}", ps[i], greedy)
    for _ in range(3):
        engine.step()
    for i in (2, 3):
        engine.add_request(f"r{i}", ps[i], greedy)
    engine.step()
    for i in (4, 5):
        engine.add_request(f"r{i}", ps[i], greedy)
    while engine.has_unfinished:
        engine.step()
    outs = [engine.output(f"r{i}") for i in range(6)]
    assert [o.token_ids for o in outs] == alone
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    steps = engine.timeline()
    assert steps["preempted"].sum() > 0 and sum(o.metrics["num_preemptions"] for o in outs) == steps["preempted"].sum()
    assert max(o.metrics["num_cached_tokens"] for o in outs) >= 16  # a shared block came from the prefix cache
    assert (steps["prefill_tokens"] + steps["decode_tokens"]).max() <= 24  # the token budget held every step
    assert ((steps["prefill_tokens"] > 0) & (steps["decode_tokens"] > 0)).any()  # chunks beside decodes
    assert steps["kv_usage"].max() <= 1.0 and engine.scheduler.bm.num_free == 9


def test_seeded_sampling_does_not_depend_on_the_batch(program):
    ps = prompts(3, seed=1)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)

    def run(batch):
        engine = LLMEngine(program, num_blocks=32)
        for i, p in enumerate(batch):
            engine.add_request(str(i), p, sampled if i == 0 else SamplingParams(max_tokens=5, temperature=1.0,
                                                                                ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        return engine.output("0").token_ids

    assert run(ps[:1]) == run(ps) and len(run(ps[:1])) == 8


def test_abort_stop_tokens_and_the_timeline(program):
    engine = LLMEngine(program, num_blocks=16)
    p = prompts(2, seed=2)
    seeded = dict(max_tokens=12, temperature=1.5, seed=11, ignore_eos=True)  # the tiny model's greedy repeats
    alone = LLMEngine(program, num_blocks=16)
    alone.add_request("a", p[0], SamplingParams(**seeded))
    while alone.has_unfinished:
        alone.step()
    first = alone.output("a").token_ids
    k = next(i for i in range(1, 12) if first[i] not in first[:i])  # the first token that is new: the stop token
    engine.add_request("stop", p[0], SamplingParams(**seeded, stop_token_ids=[first[k]]))
    engine.add_request("gone", p[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort("gone")
    while engine.has_unfinished:
        engine.step()
    stop, gone = engine.output("stop"), engine.output("gone")
    assert stop.token_ids == first[:k + 1] and stop.finish_reason == "stop"  # the stop token is kept, as in vLLM
    assert gone.finish_reason == "abort" and len(gone.token_ids) == 2
    steps = engine.timeline()
    assert list(steps.columns[:5]) == ["step", "time", "step_ms", "prefill_tokens", "decode_tokens"]
    assert steps["finished"].sum() == 1 and steps["admitted"].sum() == 2 and engine.scheduler.bm.num_free == 16
    with pytest.raises(WorkbenchError, match="no tokenizer"):
        engine.add_request("text", "hello")
    with pytest.raises(WorkbenchError, match="already in use"):
        engine.add_request("stop", [1, 2])
    short = LLMEngine(program, num_blocks=16, max_model_len=20)
    with pytest.raises(WorkbenchError, match="max_model_len"):
        short.add_request("long", list(range(1, 16)), SamplingParams(max_tokens=6))
    short.add_request("fits", list(range(1, 16)), SamplingParams(max_tokens=5))
    vocab = program.graph.meta["config"]["vocab_size"]
    with pytest.raises(WorkbenchError, match=f"token id {vocab} is not in the vocabulary"):
        short.add_request("oov", [1, vocab])
    with pytest.raises(WorkbenchError, match=f"stop_token_ids: {vocab + 3} is not in the vocabulary"):
        short.add_request("oov", [1, 2], SamplingParams(stop_token_ids=[vocab + 3]))
    with pytest.raises(WorkbenchError, match="finite"):
        SamplingParams(temperature=float("inf"))
    engine.add_request("running", p[1], SamplingParams(max_tokens=4))
    with pytest.raises(WorkbenchError, match="still running"):
        engine.release("running")
    assert engine.release("stop").token_ids == first[:k + 1]  # released: forgotten, its id free again
    with pytest.raises(WorkbenchError, match="released"):
        engine.output("stop")
    engine.add_request("stop", [1, 2])


def scenario(program, **engine_options):
    """Eight requests mixing greedy, seeded, top-k/top-p, min_tokens, logprobs, a stop token, max_tokens 1 and
    an abort with a token in flight, arriving over the first steps; a KV pool of 7 blocks forces preemptions,
    and shared prefixes give prefix hits. Returns the outputs, the timeline, the engine and the stop token's
    index in request 3's tokens."""
    ps = prompts(8, seed=5)
    probe = LLMEngine(program, num_blocks=64)
    seeded = dict(max_tokens=10, temperature=1.5, seed=11, ignore_eos=True)  # the tiny model's greedy repeats
    probe.add_request("p", ps[3], SamplingParams(**seeded))
    while probe.has_unfinished:
        probe.step()
    first = probe.output("p").token_ids
    k = next(i for i in range(2, 10) if first[i] not in first[:i])  # the stop token: the first new one
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=0.8, top_k=20, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0),
              SamplingParams(**seeded, stop_token_ids=[first[k]]),
              SamplingParams(max_tokens=7, temperature=1.2, top_p=0.8, seed=9, min_tokens=3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    engine = LLMEngine(program, num_blocks=7, config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=5),
                       **engine_options)
    for i in range(5):
        engine.add_request(str(i), ps[i], params[i])
    for step in range(30):
        if step == 3:
            engine.add_request("5", ps[5], params[5])
            engine.add_request("6", ps[6], params[6])
        if step == 6:
            engine.abort("6")
        if step == 8:
            engine.add_request("7", ps[7], params[7])
        engine.step()
    while engine.has_unfinished:
        engine.step()
    assert engine.scheduler.bm.num_free == 7 and not engine.scheduler.running
    outs = [engine.output(str(i)) for i in range(8)]
    return outs, engine.timeline(), engine, (first, k)


def assert_same_outputs(ref, got):
    """Same tokens and finish reasons; log-probs to float32 rounding (a request is batched with others at
    other steps). The aborted request ("6") may stop at another token: it gets a prefix of the same tokens."""
    for a, b in zip(ref, got):
        if a.request_id == "6":
            assert b.finish_reason == "abort" and b.token_ids == a.token_ids[:len(b.token_ids)]
            continue
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert [[i for i, _ in t] for t in b.top_logprobs] == [[i for i, _ in t] for t in a.top_logprobs]
        assert [v for t in b.top_logprobs for _, v in t] == pytest.approx([v for t in a.top_logprobs for _, v in t],
                                                                           abs=1e-5)


def test_async_scheduling_gives_the_synchronous_tokens(program):
    """Launching step N before step N-1's tokens are read back changes nothing a request sees: stop tokens
    (the speculative extra token is dropped), max_tokens, seeds, min_tokens, aborts with a token in flight,
    preemptions and prefix hits; and every block is free at the end."""
    sync, sync_steps, _, _ = scenario(program, async_scheduling=False)
    fast, fast_steps, _, (first, k) = scenario(program, async_scheduling=True)
    assert_same_outputs(sync, fast)
    assert fast[3].token_ids == first[:k + 1] and fast[3].finish_reason == "stop"
    assert fast[2].token_ids and fast[2].finish_reason == "length"
    assert sync_steps["preempted"].sum() > 0 and fast_steps["preempted"].sum() > 0
    assert max(o.metrics["num_cached_tokens"] for o in fast) >= 16


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_every_step_in_a_graph_gives_the_eager_tokens(program, async_scheduling):
    """The CUDA-graph path on the CPU (``emulate_graphs``: each step padded into its graph's static inputs
    and run node by node): decode steps in batch-size graphs, steps with prompt chunks in token-count graphs
    (empty sequences, a padding sequence on the scratch block), placeholders fed on the device. Every
    request gets the eager engine's tokens, and the padding never touches a request's blocks."""
    eager, _, _, _ = scenario(program, async_scheduling=False)
    outs, steps, engine, _ = scenario(program, async_scheduling=async_scheduling, emulate_graphs=True,
                                      graph_token_sizes=(8, 16, 24, 32))
    assert_same_outputs(eager, outs)
    ran = steps[steps["scheduled"] > 0]
    assert engine.executor.replays == len(ran) and (ran["graph_tokens"] > 0).all()  # no step ran eagerly
    mixed = ran[ran["prefill_tokens"] > 0]
    assert set(mixed["graph_tokens"]) <= {8, 16, 24, 32} and len(set(mixed["graph_tokens"])) > 1
    assert (mixed["graph_tokens"] >= mixed["prefill_tokens"] + mixed["decode_tokens"]).all()
    decode = ran[ran["prefill_tokens"] == 0]
    assert set(decode["graph_tokens"]) <= {1, 2, 4, 8} and len(decode)
    assert steps["preempted"].sum() > 0


def test_steps_beyond_the_graphs_run_eagerly(program):
    """More tokens than the largest token graph, or no token graphs at all: those steps run node by node."""
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ps = prompts(3, seed=8)
    alone = [paged_greedy(program, torch.tensor(p), 4) for p in ps]
    for sizes in ((), (8,)):
        engine = LLMEngine(program, num_blocks=32, config=SchedulerConfig(max_num_batched_tokens=64),
                           emulate_graphs=True, graph_token_sizes=sizes)
        for i, p in enumerate(ps):
            engine.add_request(str(i), p, greedy)
        while engine.has_unfinished:
            engine.step()
        steps = engine.timeline()
        assert [engine.output(str(i)).token_ids for i in range(3)] == alone
        assert steps.loc[0, "graph_tokens"] == 0 and steps.loc[0, "prefill_tokens"] > 8  # the prompts: eager
        assert (steps.loc[steps["prefill_tokens"] == 0, "graph_tokens"] > 0).all()  # decodes: in their graphs


def test_logits_only_at_the_rows_that_sample(program):
    """The executor's graph runs lm_head on the sampling rows alone; those rows' logits equal the full graph's."""
    from workbench.runtime.block_manager import BlockManager
    from workbench.runtime.executor import Executor
    from workbench.runtime.request import Request
    from workbench.runtime.scheduler import Scheduler

    ps = prompts(3, seed=6)
    sched = Scheduler(BlockManager(16, 16), SchedulerConfig(max_num_batched_tokens=40))
    for i, p in enumerate(ps):
        sched.add(Request(str(i), p, 4))
    out = sched.schedule()  # prompt chunks: some requests reach their last token, one is cut mid-prompt
    assert any(s.samples for s in out.scheduled) and not all(s.samples for s in out.scheduled)
    ex = Executor(program, 16)
    assert ex.rows_only and "logits_indices" not in program.graph.inputs  # the workspace's graph is untouched
    inputs, last = ex.inputs(out)
    del inputs["logits_indices"]
    (full,) = program.run(**inputs)
    rows = ex.execute(out)
    assert rows.shape == (len(last), full.shape[-1])
    torch.testing.assert_close(rows, full[0, last], rtol=1e-5, atol=1e-5)


def test_llm_generates_from_a_workspace(optimized_ws):
    from workbench.pipeline import load_program

    ws = optimized_ws
    ps = prompts(3, seed=3)
    llm = LLM(ws.root, num_blocks=32)
    outs = llm.generate(ps, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    plain = load_program(ws, stage="passes")
    assert [o.token_ids for o in outs] == [paged_greedy(plain, torch.tensor(p), 5) for p in ps]
    assert [o.prompt_token_ids for o in outs] == ps and outs[0].text == ""  # no tokenizer: no text
    with pytest.raises(WorkbenchError, match="2 prompts but 3 sampling params"):
        llm.generate(ps[:2], [SamplingParams()] * 3)


def test_request_metrics_are_the_times_things_happened(program):
    engine = LLMEngine(program, num_blocks=16)
    engine.add_request("a", prompts(1, seed=4)[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    m = engine.output("a").metrics
    assert m["arrival"] <= m["first_token_time"] <= m["finished_time"]
    assert engine.output("a").metrics["finished_time"] == m["finished_time"]  # asking again changes nothing


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_finished_only_steps_return_finished_requests_alone(program, async_scheduling):
    """``step(finished_only=True)`` (what LLM.generate runs) returns the outputs of the requests that finished in
    the step and nothing else; the requests' tokens and the timeline's finished counts are those of plain steps."""
    def run(finished_only):
        engine = LLMEngine(program, num_blocks=64, async_scheduling=async_scheduling)
        for i, p in enumerate(prompts(5, seed=6)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=2 + 3 * i, temperature=0, ignore_eos=True))
        seen = []
        while engine.has_unfinished:
            outs = engine.step(finished_only=finished_only)
            seen.append(sorted((o.request_id, o.finished) for o in outs))
        return engine, seen

    plain, plain_seen = run(False)
    quiet, quiet_seen = run(True)
    assert quiet_seen == [[o for o in step if o[1]] for step in plain_seen]
    assert sum(len(s) for s in quiet_seen) == 5 and all(f for s in quiet_seen for _, f in s)
    assert list(quiet.timeline()["finished"]) == list(plain.timeline()["finished"])
    for i in range(5):
        a, b = plain.output(str(i)), quiet.output(str(i))
        assert a.token_ids == b.token_ids and len(a.token_ids) == 2 + 3 * i and a.logprobs == b.logprobs
        assert a.prompt_token_ids == prompts(5, seed=6)[i]


def test_to_device_keeps_the_values():
    from workbench.runtime.sampling import to_device

    values = [0, -1, 2**40, 7, 123456789]
    assert to_device(values, torch.device("cpu")).tolist() == values
    assert to_device(values, torch.device("cpu")).dtype == torch.long
    assert to_device([], torch.device("cpu")).shape == (0,)
    assert to_device([1.5, 2.0], torch.device("cpu"), torch.float32).tolist() == [1.5, 2.0]


def test_graph_token_sizes_cover_the_budget():
    from workbench.runtime.executor import graph_token_sizes

    sizes = graph_token_sizes(8192)
    assert sizes[0] == 64 and sizes[-1] == 8192 and len(sizes) == 15 and list(sizes) == sorted(set(sizes))
    # a step just over one size runs in the next: padding is at most half its graph, a third from 1024 tokens on
    assert all((b - a) / b <= 1 / 2 for a, b in zip(sizes, sizes[1:]))
    assert all((b - a) / b <= 1 / 3 for a, b in zip(sizes, sizes[1:]) if a >= 1024)
    assert graph_token_sizes(100) == (64, 100) and graph_token_sizes(1) == (1,)
    with pytest.raises(WorkbenchError, match="max_tokens must be >= 1"):
        graph_token_sizes(0)


def test_bf16_logits_reach_the_sampler_as_they_are():
    """A bf16 graph's logits leave the executor in bf16 (no float32 copy of every sampling row); the sampler
    converts them itself, so greedy tokens and their log-probabilities are those of the float32 logits."""
    from conftest import optimized_program
    from workbench.runtime.block_manager import BlockManager
    from workbench.runtime.executor import Executor
    from workbench.runtime.request import Request
    from workbench.runtime.sampling import Sampler
    from workbench.runtime.scheduler import Scheduler

    program = optimized_program(dtype=torch.bfloat16)
    sched = Scheduler(BlockManager(16, 16), SchedulerConfig(max_num_batched_tokens=256))
    for i, p in enumerate(prompts(3, seed=4)):
        sched.add(Request(str(i), p, 4))
    out = sched.schedule()
    logits = Executor(program, 16).execute(out)
    assert logits.dtype == torch.bfloat16 and logits.shape[0] == 3
    params = [SamplingParams(max_tokens=4, temperature=0, logprobs=1)] * 3
    got = Sampler().sample(logits, params, [None] * 3)
    tokens = logits.float().argmax(-1)
    assert got.token_ids == tokens.tolist()
    want = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs), want)


def test_the_rows_pass_finds_a_fused_norm_and_head(program):
    """select_logits_rows finds lm_head by what it computes (the logits output), not as "the last linear": a
    plugin op that fuses the final norm into the lm_head is narrowed to the sampled rows the same way, checked
    by the pass manager, and LLM generates the unfused graph's tokens through it."""
    import copy

    from workbench.graph.executor import Program
    from workbench.graph.ir import Node
    from workbench.graph.passes import run_passes
    from workbench.graph.passes.rows import lm_head
    from workbench.kernels import register_op
    from workbench.kernels.registry import REGISTRY

    add_rms_norm = REGISTRY.get("workbench.add_rms_norm").reference

    @register_op("testplugin.norm_head", replace=True)
    def norm_head(x, residual, norm_weight, eps, weight):
        """The final residual add and RMSNorm, then the lm_head: one op."""
        return torch.nn.functional.linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight)

    try:
        graph = copy.deepcopy(program.graph)
        head = lm_head(graph)
        item = next(n for n in graph.nodes if n.name == head.args[0].name)  # add_rms_norm's first output
        norm = next(n for n in graph.nodes if n.name == item.args[0].name)
        assert norm.op == "workbench.add_rms_norm" and [n.op for n in graph.nodes[-3:]] == [
            "workbench.add_rms_norm", "operator.getitem", head.op]
        fused = Node("norm_head", "testplugin.norm_head", [*norm.args[:4], head.args[1]], {}, head.outputs,
                     head.module, head.layer)
        graph.nodes[graph.nodes.index(head)] = fused
        graph.nodes.remove(item)
        graph.nodes.remove(norm)
        graph.outputs = ["norm_head"]
        graph.validate()
        assert lm_head(graph).name == "norm_head"

        rows, (report,) = run_passes(graph, program.params, ["select_logits_rows"])  # checked, every row
        assert report.accepted and len(report.matches) == 1 and report.max_rel_err < 1e-6
        narrowed = next(n for n in rows.nodes if n.name == "norm_head")
        assert [a.name[:14] for a in narrowed.args[:2]] == ["norm_head_rows"] * 2  # x and the residual
        assert narrowed.out.shape[1] == "logits_rows"

        ps = prompts(3, seed=9)
        sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        mine = LLM(Program(graph, program.params), num_blocks=32).generate(ps, sp)
        plain = LLM(program, num_blocks=32).generate(ps, sp)
        assert [o.token_ids for o in mine] == [o.token_ids for o in plain]
    finally:
        REGISTRY._ops.pop("testplugin.norm_head", None)
