"""Tensor parallelism on the CPU (issue 27): the sharding pass, its weights per rank and its collectives, run by
2 and 4 gloo processes against the unsharded graph in fp32.

Each case is optimized (and quantized) once here; the ranks get the sharded graph and the unsharded weights, take
their slices (``rank_params``), and run a prefill step of three sequences plus 32 greedy tokens through the paged
KV cache. Their logits must equal the unsharded graph's (relative error < 1e-5) and their tokens its tokens."""

import json
from collections import Counter

import pytest
import torch

from workbench.distributed import spawn, tensor_parallel
from workbench.errors import WorkbenchError
from workbench.evaluate import paged_greedy
from workbench.graph.executor import Program
from workbench.graph.paged import cache_for
from workbench.graph.passes.tensor_parallel import rank_params, shard_tensor_parallel
from workbench.models import load_model
from workbench.pipeline import optimize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seqs():
    g = torch.Generator().manual_seed(27)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 30)]


def _run(program, greedy=True):
    """(prefill logits of the three sequences, 32 greedy tokens after the second, or None)."""
    (logits,) = program.run(**cache_for(program.graph).step_inputs(list(enumerate(_seqs()))))
    return logits, paged_greedy(program, torch.tensor(_seqs()[1]), 32) if greedy else None


def _rank(rank, size, init, cases):
    """One rank: each case's sharded program run inside the group (module level: spawned processes import it)."""
    out = []
    with tensor_parallel(rank, size, init_method=init):
        for graph, params, greedy in cases:
            out.append(_run(Program(graph, rank_params(graph, params, rank)), greedy))
    return out


@pytest.fixture(scope="module")
def programs():
    cache = {}

    def get(name, fmt=None):
        if (name, fmt) not in cache:
            program = optimize(load_model(name).source, device="cpu").program
            if fmt is not None:
                from workbench.quant import PrecisionPlan, calibrate, quantized_program

                torch.manual_seed(1)
                stats = calibrate(program, torch.randint(1, 512, (600,)), samples=4, seq_len=48, progress=False)
                plan = PrecisionPlan.uniform(program.graph, fmt, kv_cache="fp8" if fmt == "fp8" else "bf16")
                program = quantized_program(program, plan, stats)
            cache[name, fmt] = program
        return cache[name, fmt]

    return get


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("size,cases", [
    (2, [("tiny-llama", None), ("tiny-mistral", None), ("tiny-qwen2", None), ("tiny-qwen3", None), ("tiny-gpt2", None),
         ("tiny-gemma2", None), ("tiny-gemma3", None), ("tiny-llama", "fp8"), ("tiny-llama", "int8_sq"),
         ("tiny-llama", "int8_wo")]),
    (4, [("tiny-llama", None)]),  # 2 KV heads on 4 ranks: each KV head on two ranks
])
def test_sharded_ranks_equal_one_device(programs, size, cases):
    """TP-2 (every tiny family, and FP8 / INT8 SmoothQuant / weight-only INT8 plans) and TP-4 (KV heads
    replicated) give the unsharded graph's logits and greedy tokens on every rank."""
    work, expected, exact, unquantized = [], [], [], {}
    for name, fmt in cases:
        program = programs(name, fmt)
        graph, report = shard_tensor_parallel(program.graph, size)
        kinds = Counter(m.what for m in report.matches)
        layers = program.graph.meta["config"]["num_hidden_layers"]
        assert kinds["o row-parallel + all_reduce"] == kinds["down row-parallel + all_reduce"] == layers
        assert Counter(n.op for n in graph.nodes)["workbench.all_reduce"] == 2 * layers
        work.append((graph, dict(program.params), fmt is None))  # quantized plans: logits only (below)
        expected.append(_run(program, fmt is None))
        if name not in unquantized:
            unquantized[name] = expected[-1][0] if fmt is None else _run(programs(name), False)[0]
        exact.append(unquantized[name])
    ranks = spawn(_rank, size, work)
    for rank, results in enumerate(ranks):
        for (name, fmt), (logits, tokens), (ref_logits, ref_tokens), fp32 in zip(cases, results, expected, exact):
            if fmt is None:
                assert _rel(logits, ref_logits) < 1e-5, (name, rank)
                assert tokens == ref_tokens, (name, rank)
            else:  # a row-parallel linear quantizes its x per token over the rank's columns: other rounding, no
                # larger an error against the unquantized logits than one device's
                assert _rel(logits, fp32) < 1.5 * _rel(ref_logits, fp32) + 1e-4, (name, fmt, rank)


def test_rank_params_read_only_their_slices(programs):
    """A rank's fused q/k/v weight is its query heads' rows and its KV heads' rows of the stored tensor; the
    row-parallel o weight its heads' columns; a tied lm_head a sharded twin of the embedding table."""
    program = programs("tiny-llama")
    graph, _ = shard_tensor_parallel(program.graph, 2)
    full = dict(program.params)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    w = full[qkv]  # rows: 4 query heads x 16, 2 KV heads x 16 for k, then v
    r1 = rank_params(graph, full, 1)
    assert torch.equal(r1[qkv], torch.cat([w[32:64], w[80:96], w[112:128]]))
    assert torch.equal(r1["model.layers.0.self_attn.o_proj.weight"],
                       full["model.layers.0.self_attn.o_proj.weight"][:, 32:64])
    assert graph.meta["paged"]["kv_heads"] == 1 and graph.meta["tensor_parallel"] == {"size": 2}
    assert graph.params["lm_head.weight.tp"].shard["source"] == "lm_head.weight"  # tied: the embedding stays whole
    assert r1["lm_head.weight"].shape == (512, 64) and r1["lm_head.weight.tp"].shape == (256, 64)
    from workbench.graph.ir import Graph

    assert Graph.loads(graph.dumps()).params[qkv].shard == graph.params[qkv].shard  # kept in the IR's JSON


@pytest.mark.parametrize("size,message", [
    (3, "tensor-parallel size 3 does not divide the 4 query heads"),
    (0, "must be a whole number >= 1"),
])
def test_a_size_that_cannot_shard_is_refused_in_one_line(programs, size, message):
    with pytest.raises(WorkbenchError, match=message) as e:
        shard_tensor_parallel(programs("tiny-llama").graph, size)
    assert "\n" not in str(e.value)


def test_heads_packed_per_head_are_refused_in_one_line(programs):
    """GPT-NeoX packs q, k and v per head; the pass says it cannot shard that layout rather than split it wrong."""
    with pytest.raises(WorkbenchError, match="cut from its projection per head") as e:
        shard_tensor_parallel(programs("tiny-neox").graph, 2)
    assert "\n" not in str(e.value)


def test_a_sharded_graph_is_not_sharded_again(programs):
    graph, _ = shard_tensor_parallel(programs("tiny-llama").graph, 2)
    with pytest.raises(WorkbenchError, match="sharded already"):
        shard_tensor_parallel(graph, 2)


def test_a_rank_that_fails_is_named():
    with pytest.raises(WorkbenchError, match="tensor-parallel rank 1 failed: ValueError: rank 1 broke"):
        spawn(_fail_on_one, 2)


def _fail_on_one(rank, size, init):
    if rank == 1:
        raise ValueError("rank 1 broke")
    return rank


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 40, 9, 21, 60, 14)]


def test_llm_with_two_ranks_generates_what_one_does(programs):
    """``LLM(program, tensor_parallel_size=2)``: in-flight batching of 6 requests of different lengths through a
    small cache (chunked prefill, 8 tokens a step) gives the one-rank LLM's greedy tokens and log-probs."""
    from workbench import LLM, SamplingParams

    program = programs("tiny-llama")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    one = LLM(program, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4).generate(_prompts(), params)
    with LLM(program, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4, tensor_parallel_size=2) as llm:
        assert Counter(m.what for m in llm.tp_report.matches)["o row-parallel + all_reduce"] == 2
        two = llm.generate(_prompts(), params)
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        for a, b in zip(two, one):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        workers = llm.engine.executor.tensor_parallel
    assert all(not p.is_alive() for p in workers.procs)  # closed with the block


def test_a_dead_rank_stops_the_engine_with_its_name(programs):
    from workbench import LLM, SamplingParams

    with LLM(programs("tiny-llama"), num_blocks=32, tensor_parallel_size=2) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        workers = llm.engine.executor.tensor_parallel
        workers.procs[0].kill()
        workers.procs[0].join()
        with pytest.raises(WorkbenchError, match=r"tensor parallelism: rank 1 died \(exit code -9\)"):
            llm.generate([[4, 5, 6]], SamplingParams(max_tokens=2))


def test_workbench_serve_with_two_ranks_answers_and_stops_on_sigterm():
    """``workbench serve tiny-llama --tp 2``: an OpenAI completion (token ids in, token ids out: random weights
    have no tokenizer), streamed and not, equals the one-rank LLM's greedy tokens; SIGTERM exits 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    from test_serve import wait_until_up
    from workbench import LLM, SamplingParams

    expected = LLM("tiny-llama", num_blocks=32).generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0,
                                                                                      ignore_eos=True))[0].token_ids
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "tiny-llama", "--tp", "2", "--port", str(port),
                             "--log-level", "warning", "--num-blocks", "32"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url)
        body = {"model": "tiny-llama", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected
        streamed = []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    streamed += [t for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
        assert streamed == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
