"""Tensor parallelism on the CPU (issue 27): the sharding pass, its weights per rank and its collectives, run by
2 and 4 gloo processes against the unsharded graph in fp32.

Each case is optimized (and quantized) once here; the ranks get the sharded graph and the unsharded weights, take
their slices (``rank_params``), and run a prefill step of three sequences plus 32 greedy tokens through the paged
KV cache. Their logits must equal the unsharded graph's (relative error < 1e-5) and their tokens its tokens.

The product path: an engine built for two ranks (``workbench build --tp 2``, once per module) runs at that size by
default with each rank reading only its slices of the engine's file, re-shards for another size its graph allows
and refuses one it does not; ``workbench serve`` spawns its second rank, and under ``torchrun`` (torch's
``torch.distributed.run`` module, in a subprocess) the second process becomes rank 0's worker for ``serve`` and for
an ``LLM`` script alike."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from workbench.distributed import spawn, tensor_parallel
from workbench.errors import WorkbenchError
from workbench.evaluate import paged_greedy
from workbench.graph.executor import Program
from workbench.graph.paged import cache_for
from workbench.graph.passes.tensor_parallel import rank_params, shard_and_fuse, shard_tensor_parallel
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
         ("tiny-gemma2", None), ("tiny-gemma3", None), ("tiny-neox", None), ("tiny-falcon", None),
         ("tiny-falcon-mqa", None), ("tiny-llama", "fp8"), ("tiny-llama", "int8_sq"), ("tiny-llama", "int8_wo")]),
    # KV heads replicated: tiny-llama's and tiny-falcon's 2 (a Falcon group's queries split between two ranks),
    # tiny-falcon-mqa's one
    (4, [("tiny-llama", None), ("tiny-falcon", None), ("tiny-falcon-mqa", None)]),
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


# ---- fusion across the all-reduce ------------------------------------------------------------------------------

FUSED_CASES = [("tiny-llama", None, "add_rms_norm"), ("tiny-llama", "fp8", "add_rms_norm_fp8"),
               ("tiny-gemma2", None, "norm_add_rms_norm")]


def test_the_all_reduce_fuses_with_the_add_and_norm_after_it(programs):
    """``shard_and_fuse`` (what the runtime runs): every all-reduce of a row-parallel linear becomes one op with
    the residual add and RMSNorm reading it, exactly twice per layer (after o into the post-attention norm, after
    down into the next layer's input norm, the last layer's into the final norm): 2 x layers matches, none left
    unfused. On 2 gloo ranks the fused graph's logits equal the unfused sharded graph's (relative error < 1e-6:
    the same arithmetic, so in fact equal) and its 32 greedy tokens too; the FP8 plan's fused norm and Gemma's
    post-norm (the reduced value normed before the add) fuse alike."""
    work = []
    for name, fmt, norm in FUSED_CASES:
        program = programs(name, fmt)
        layers = program.graph.meta["config"]["num_hidden_layers"]
        unfused, _ = shard_tensor_parallel(program.graph, 2)
        fused, (sharded, report, merged) = shard_and_fuse(program.graph, 2)
        assert sharded.name == "shard_tensor_parallel" and report.name == "fuse_all_reduce_add_rms_norm"
        assert merged.name == "merge_parallel_all_reduces" and merged.matches == []  # a sequential residual
        assert report.accepted and report.nodes_after == report.nodes_before - 2 * layers
        whats = Counter(m.what for m in report.matches)
        if fmt == "fp8":  # the final norm feeds the lm_head, which is not FP8: its norm is the plain one
            assert whats == {f"all_reduce + {norm}": 2 * layers - 1, "all_reduce + add_rms_norm": 1}, whats
        else:
            assert whats == {f"all_reduce + {norm}": 2 * layers}, (name, whats)
        assert Counter(m.layer for m in report.matches) == {i: 2 for i in range(layers)}  # each layer's o and down
        ops = Counter(n.op for n in fused.nodes)
        assert ops["workbench.all_reduce"] == 0 and ops[f"workbench.all_reduce_{norm}"] == whats[f"all_reduce + {norm}"]
        assert report.bytes_after < report.bytes_before  # the reduced x is no longer written and read back
        params, greedy = dict(program.params), fmt is None and name == "tiny-llama"
        work += [(unfused, params, greedy), (fused, params, greedy)]
    for rank, results in enumerate(spawn(_rank, 2, work)):
        for (name, fmt, _), (logits, tokens), (fused_logits, fused_tokens) in zip(FUSED_CASES, results[::2],
                                                                                  results[1::2]):
            assert _rel(fused_logits, logits) < 1e-6, (name, fmt, rank)
            assert fused_tokens == tokens, (name, fmt, rank)


@pytest.mark.parametrize("size", [2])
def test_a_parallel_residual_reduces_once_per_layer(programs, size):
    """GPT-NeoX and Falcon add attention's and the MLP's row-parallel outputs: ``shard_and_fuse`` sums each rank's
    two partial outputs and all-reduces once per layer (the biases added after it, once); on 2 gloo ranks the
    logits equal the two-all-reduce graph's (< 1e-5: the fp32 additions in another order) and 32 greedy tokens
    too."""
    names, work = ("tiny-neox", "tiny-falcon", "tiny-falcon-mqa"), []
    for name in names:
        program = programs(name)
        layers = program.graph.meta["config"]["num_hidden_layers"]
        unmerged, _ = shard_tensor_parallel(program.graph, size)
        merged, (_, _, report) = shard_and_fuse(program.graph, size)
        assert report.name == "merge_parallel_all_reduces" and report.accepted
        assert Counter(m.layer for m in report.matches) == {i: 1 for i in range(layers)}, name
        assert Counter(n.op for n in unmerged.nodes)["workbench.all_reduce"] == 2 * layers
        assert Counter(n.op for n in merged.nodes)["workbench.all_reduce"] == layers
        work += [(unmerged, dict(program.params), True), (merged, dict(program.params), True)]
    for rank, results in enumerate(spawn(_rank, size, work)):
        for name, (logits, tokens), (merged_logits, merged_tokens) in zip(names, results[::2], results[1::2]):
            assert _rel(merged_logits, logits) < 1e-5, (name, rank)
            assert merged_tokens == tokens, (name, rank)


def test_fusion_across_the_all_reduce_leaves_other_graphs_alone(programs):
    """No all-reduce, nothing fused: an unsharded graph (the pass run as any pass, checked numerically) and one
    rank's graph; GPT-2's row-parallel bias sits between its all-reduce and its LayerNorm. A sharded pass placed
    in the default pipeline, or named in a workspace's passes, is refused in one line."""
    from workbench.graph.passes import register_pass, run_passes, sharded_pipeline

    program = programs("tiny-llama")
    same, (report,) = run_passes(program.graph, program.params, ["fuse_all_reduce_add_rms_norm"])
    assert report.matches == [] and report.accepted and same.nodes == program.graph.nodes
    one, reports = shard_and_fuse(program.graph, 1)
    assert [r.name for r in reports] == ["shard_tensor_parallel"] and one.nodes == program.graph.nodes
    _, (_, gpt2, gpt2_merged) = shard_and_fuse(programs("tiny-gpt2").graph, 2)
    assert gpt2.matches == [] and gpt2_merged.matches == []
    assert sharded_pipeline() == ["fuse_all_reduce_add_rms_norm", "merge_parallel_all_reduces"]
    with pytest.raises(WorkbenchError, match="a sharded pass runs after the sharding pass") as e:
        register_pass("my_sharded_fusion", after="fuse_silu_mul", sharded=True)
    assert "\n" not in str(e.value)


def test_the_fused_ops_triton_tactic_is_the_all_reduce_then_the_norms_kernel(monkeypatch):
    """On a GPU the fused ops run the unfused pair's kernels (until a kernel fuses the reduction): the all-reduce
    of x alone (here a stand-in that doubles it, as two equal ranks would), then the norm's Triton kernel
    (interpreted), bit for bit; each is graph-safe and its op's GPU default."""
    from workbench.kernels import collectives, triton_gemma, triton_pointwise
    from workbench.kernels.autotune import tactic_ops
    from workbench.kernels.registry import REGISTRY

    tactic_ops()
    monkeypatch.setattr(collectives, "all_reduce", lambda x: 2 * x)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)
    w, w2, scale = 1 + 0.1 * torch.randn(32, generator=g), 1 + 0.1 * torch.randn(32, generator=g), torch.tensor(0.01)
    for op, kernel, rest in (("add_rms_norm", triton_pointwise.add_rms_norm, (w, 1e-5)),
                             ("add_rms_norm_fp8", triton_pointwise.add_rms_norm_fp8, (w, 1e-5, scale)),
                             ("norm_add_rms_norm", triton_gemma.norm_add_rms_norm, (w, w2, 1e-6)),
                             ("norm_add_rms_norm_fp8", triton_gemma.norm_add_rms_norm_fp8, (w, w2, 1e-6, scale))):
        opdef = REGISTRY.get(f"workbench.all_reduce_{op}")
        tactic = opdef.tactics["triton"]
        for got, want in zip(tactic(x, r, *rest), kernel(2 * x, r, *rest)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), op
        assert opdef.gpu_defaults == ("triton",) and opdef.is_graph_safe("triton") and opdef.is_graph_safe("reference")


def test_the_fused_op_costs_the_all_reduce_link_and_the_norm_traffic(monkeypatch):
    """Over 2 ranks: the all-reduce's link bytes (2·(n−1)/n of x) plus the add + norm's memory traffic alone: the
    unfused pair's bytes less the all-reduce's own write and the norm's read of it."""
    from workbench.distributed import TPGroup
    from workbench.graph.ir import TensorSpec
    from workbench.kernels import OpCall, collectives
    from workbench.kernels.registry import REGISTRY

    monkeypatch.setattr(collectives, "current", lambda: TPGroup(0, 2))
    x = TensorSpec([1, "tokens", 64], "float32")  # 8 tokens: 2048 bytes
    w = TensorSpec([64], "float32")
    sizes = {"tokens": 8}
    reduce = REGISTRY.get("workbench.all_reduce").cost(OpCall([x], {}, [x], sizes))
    norm = REGISTRY.get("workbench.add_rms_norm").cost(OpCall([x, x, w, 1e-5], {}, [x, x], sizes))
    fused = REGISTRY.get("workbench.all_reduce_add_rms_norm").cost(OpCall([x, x, w, 1e-5], {}, [x, x], sizes))
    assert (reduce.bytes, reduce.link_bytes, norm.bytes) == (4096, 2048, 8448)
    assert (fused.link_bytes, fused.bytes) == (2048, 8448) and fused.flops == reduce.flops + norm.flops
    assert REGISTRY.get("workbench.all_reduce_add_rms_norm").graph_safe  # as all_reduce: NCCL captures it


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


@pytest.mark.parametrize("name,size,kind", [("tiny-neox", 2, "per head (GPT-NeoX)"),
                                            ("tiny-falcon", 4, "per KV group (Falcon) (KV heads replicated)"),
                                            ("tiny-falcon-mqa", 2,
                                             "queries then k then v (Falcon multi-query) (KV heads replicated)")])
def test_packed_q_k_v_give_each_rank_its_heads_columns(programs, name, size, kind):
    """A projection packing q, k and v by heads: each rank's weight rows are its heads' (the ranks' logits are
    checked above); the view after it takes the rank's head count."""
    program = programs(name)
    graph, report = shard_tensor_parallel(program.graph, size)
    cfg = program.graph.meta["config"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    packed = [m for m in report.matches if m.what == f"q/k/v column-parallel, packed {kind}"]
    assert len(packed) == cfg["num_hidden_layers"]
    (lin,) = packed[0].created
    weight = graph.params[graph.node(lin).args[1].name]
    d = program.graph.node(lin).out.shape[-1] // (heads + 2 * kv)
    local_kv = max(kv // size, 1)
    assert weight.spec.shape[0] == (heads // size + 2 * local_kv) * d
    full = program.params[weight.shard["source"]]
    rows = [torch.cat([full[s:e] for s, e in weight.shard["ranks"][r]]) for r in range(size)]
    assert all(torch.equal(rank_params(graph, program.params, r)[weight.name], rows[r]) for r in range(size))
    if kv >= size:  # no head replicated: the ranks' pieces tile the projection's rows once
        pieces = sorted(p for r in weight.shard["ranks"] for p in r)
        assert pieces[0][0] == 0 and pieces[-1][1] == full.shape[0]
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


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
    small cache (chunked prefill, 8 tokens a step) gives the one-rank LLM's greedy tokens and log-probs; its steps
    run the graph fused across the all-reduces, and its timeline records the size."""
    from workbench import LLM, SamplingParams
    from workbench.runtime.plots import timeline_figure

    program = programs("tiny-llama")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    llm1 = LLM(program, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4)
    one = llm1.generate(_prompts(), params)
    with LLM(program, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4, tensor_parallel_size=2) as llm:
        sharded, fused, _merged = llm.tp_reports
        assert Counter(m.what for m in sharded.matches)["o row-parallel + all_reduce"] == 2
        assert len(fused.matches) == 4  # every all-reduce ran fused with its add and norm
        two = llm.generate(_prompts(), params)
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        for a, b in zip(two, one):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        workers = llm.engine.executor.tensor_parallel
        steps = llm.engine.timeline()  # each step's record carries the size it ran at, and so does its figure
        assert set(steps["tensor_parallel_size"]) == {2} and llm.engine.tensor_parallel_size == 2
        assert timeline_figure(steps).layout.title.text.endswith(", tensor-parallel size 2")
    assert set(llm1.engine.timeline()["tensor_parallel_size"]) == {1}
    assert "tensor-parallel" not in timeline_figure(llm1.engine.timeline()).layout.title.text
    assert all(not p.is_alive() for p in workers.procs)  # closed with the block


def test_every_rank_captures_and_replays_the_same_step_graphs(programs):
    """Step graphs over two ranks (emulated on the CPU: each rank runs every graph step on the graph's padded static
    inputs): rank 1 builds the same graphs, captures each when rank 0 does and replays each step on rank 0's padded
    inputs, so in-flight batching through decode graphs and prompt-chunk graphs gives the one-rank tokens, with no
    step run eagerly."""
    from workbench import LLM, SamplingParams
    from workbench.runnable import open_runnable
    from workbench.runtime.engine import sharded_engine
    from workbench.runtime.scheduler import SchedulerConfig

    program = programs("tiny-llama")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    one = LLM(program, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4).generate(_prompts(), params)
    engine = sharded_engine(open_runnable(program, device="cpu", tensor_parallel_size=2), num_blocks=48,
                            config=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4), emulate_graphs=True,
                            graph_token_sizes=(16, 32))
    workers = engine.executor.tensor_parallel
    try:
        for i, prompt in enumerate(_prompts()):
            engine.add_request(str(i), prompt, params)
        while engine.has_unfinished:
            engine.step()
        two = [engine.output(str(i)) for i in range(len(_prompts()))]
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        for a, b in zip(two, one):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        steps = engine.timeline()
        assert (steps.graph_tokens > 0).all() and engine.executor.replays == len(steps)  # no eager step
        keys = set(engine.executor._graphs)
        assert any(t == s for t, s in keys) and any(t in (16, 32) for t, _ in keys)  # decode and prompt graphs
    finally:
        workers.close()
    assert all(not p.is_alive() for p in workers.procs)


def test_a_dead_rank_stops_the_engine_with_its_name(programs):
    from workbench import LLM, SamplingParams

    with LLM(programs("tiny-llama"), num_blocks=32, tensor_parallel_size=2) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        workers = llm.engine.executor.tensor_parallel
        workers.procs[0].kill()
        workers.procs[0].join()
        with pytest.raises(WorkbenchError, match=r"tensor parallelism: rank 1 died \(exit code -9\)"):
            llm.generate([[4, 5, 6]], SamplingParams(max_tokens=2))


# ---- engines for several ranks ----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_engine(tmp_path_factory):
    """tiny-llama in float32 built for two ranks: ``workbench build ... --tp 2``."""
    from workbench.cli import main

    out = tmp_path_factory.mktemp("tp") / "engine"
    assert main(["build", "tiny-llama", "--precision", "bf16", "--dtype", "float32", "--tp", "2", "--out",
                 str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_rank_tokens(tp_engine):
    """The engine re-sharded for one rank (silently: it was not tuned): its greedy tokens for ``_prompts()``."""
    import warnings

    from workbench import LLM, SamplingParams

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = LLM(tp_engine, num_blocks=48, tensor_parallel_size=1)
    assert llm.engine.executor.tensor_parallel is None and llm.runnable.sharding is None
    return [o.token_ids for o in llm.generate(_prompts(), SamplingParams(**GREEDY))]


def test_build_records_the_size_and_refuses_one_the_graph_cannot_take(tp_engine, capsys):
    from workbench.cli import main
    from workbench.engine import load_engine

    manifest = json.loads((tp_engine / "manifest.json").read_text())
    assert manifest["tensor_parallel_size"] == 2
    e = load_engine(tp_engine)  # at the size it was built for: rank 0's shard
    assert e.tensor_parallel_size == e.built_tensor_parallel_size == 2 and e.rank == 0
    assert e.program.graph.meta["tensor_parallel"] == {"size": 2}
    capsys.readouterr()
    # the same workspace (capture and passes up to date): refused before calibration, the engine left as it was
    assert main(["build", "tiny-llama", "--precision", "bf16", "--dtype", "float32", "--tp", "3", "--out",
                 str(tp_engine)]) == 2
    err = capsys.readouterr().err
    assert err == ("workbench: error: build --tp 3: tensor-parallel size 3 does not divide the 4 query heads; use a "
                   "TP size that divides 4\n"), err
    assert json.loads((tp_engine / "manifest.json").read_text()) == manifest


class _CountingOpen:
    """``safetensors.safe_open`` that counts the tensor bytes handed out (``get_tensor``, ``get_slice(..)[..]``)."""

    def __init__(self, real, counts):
        self.real, self.counts = real, counts

    def __call__(self, *args, **kwargs):
        counts, handle = self.counts, self.real(*args, **kwargs)

        class Slice:
            def __init__(self, view):
                self.view = view

            def __getitem__(self, index):
                t = self.view[index]
                counts.append(t.numel() * t.element_size())
                return t

            def __getattr__(self, name):
                return getattr(self.view, name)

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                t = self.f.get_tensor(name)
                counts.append(t.numel() * t.element_size())
                return t

            def get_slice(self, name):
                return Slice(self.f.get_slice(name))

            def keys(self):
                return self.f.keys()

        return Handle()


def test_each_rank_reads_only_its_slices_of_the_engine(tp_engine, monkeypatch):
    """``load_engine(engine, rank=r)`` (what every rank runs) gives ``rank_params``' slices of the whole weights,
    and reads, counted at safetensors, half of every sharded tensor plus the replicated ones whole: never the
    whole model, rank 0 no more than rank 1."""
    import safetensors

    from workbench.engine import load_engine

    whole = load_engine(tp_engine, tensor_parallel_size=1)
    assert whole.weights_read.bytes == whole.weights_read.file_bytes  # one rank reads every tensor once
    counts = []
    monkeypatch.setattr(safetensors, "safe_open", _CountingOpen(safetensors.safe_open, counts))
    sharded_total, read = None, []
    for rank in (0, 1):
        counts.clear()
        e = load_engine(tp_engine, rank=rank)
        graph = e.program.graph
        expected = rank_params(graph, whole.program.params, rank)
        assert sorted(e.program.params) == sorted(expected)
        for name, t in e.program.params.items():
            assert torch.equal(t, expected[name]), (rank, name)
        sources = {p.shard["source"] for p in graph.params.values() if p.shard is not None}
        sharded_total = sum(whole.program.params[s].nbytes for s in sources)
        r = e.weights_read
        assert sum(counts) == r.bytes  # what the loader says it read is what safetensors handed out
        assert r.sharded_bytes * 2 == sharded_total  # 1/2 of every sharded tensor (no KV head replicated at TP-2)
        replicated = sum(t.nbytes for n, t in e.program.params.items() if graph.params[n].shard is None)
        assert r.bytes == r.sharded_bytes + replicated < r.file_bytes
        read.append(r)
    assert read[0] == read[1]


def test_an_engine_runs_at_its_size_re_shards_or_refuses(tp_engine, one_rank_tokens):
    """``LLM(engine)`` runs at the engine's two ranks, each reading its own slices, with the tokens of the engine
    re-sharded for one rank; a size its graph cannot take is refused in one line naming both sizes and the fix."""
    from workbench import LLM, SamplingParams

    with LLM(tp_engine, num_blocks=48, max_num_batched_tokens=32, max_num_seqs=4) as llm:
        workers = llm.engine.executor.tensor_parallel
        assert workers.size == 2 and [r.name for r in llm.tp_reports] == [
            "shard_tensor_parallel", "fuse_all_reduce_add_rms_norm", "merge_parallel_all_reduces"]
        assert workers.weights_read[1] == workers.weights_read[0] == llm.runnable.sharding.weights_read
        assert [o.token_ids for o in llm.generate(_prompts(), SamplingParams(**GREEDY))] == one_rank_tokens
    with pytest.raises(WorkbenchError) as e:
        LLM(tp_engine, tensor_parallel_size=3)
    assert str(e.value) == (f"engine {tp_engine} was built for tensor-parallel size 2 and cannot be re-sharded for 3 "
                            "(tensor-parallel size 3 does not divide the 4 query heads; use a TP size that divides "
                            "4): run it with --tp 2 (tensor_parallel_size=2), or rebuild it for 3 ranks with "
                            "`workbench build ... --tp 3`")


def test_tuning_for_a_size_keys_its_timings_and_the_engine_carries_it(tp_engine, tmp_path, monkeypatch):
    """``tune --tp 2`` tunes one rank's graph (its linears at per-rank widths) under keys that carry the size; the
    engine exported from it records 2 and runs its choices at 2 only: at another size they were tuned for other
    shapes, so it warns and runs the default kernels."""
    import shutil

    from test_autotune import TINY_PROFILE

    from workbench.engine import export_engine, load_engine
    from workbench.engine import load as load_module
    from workbench.kernels.autotune import LinearShape, TimingCache, key_tensor_parallel_size
    from workbench.kernels.profiles import OptimizationProfile
    from workbench.pipeline import tune_stage
    from workbench.workspace import Workspace

    ws = Workspace(shutil.copytree(tp_engine.with_name("engine.workspace"), tmp_path / "ws"))
    tune_stage(ws, OptimizationProfile(**TINY_PROFILE), device="cpu", progress=False, tensor_parallel_size=2,
               timer=lambda call, op, tactic, config: 1.0 if tactic == "reference" else 0.5)
    cache = TimingCache.view(ws.path("tune", "timings.json"))
    assert cache.entries and {key_tensor_parallel_size(k) for k in cache.entries} == {2}
    widths = {(s.n, s.k) for s in map(LinearShape.of_key, cache.entries) if s is not None}
    # per rank: o 64x32, q/k/v and down 64x64, gate/up 128x64, lm_head 256x64 (whole: 64x64, 128x64, 64x128, ...)
    assert widths == {(64, 32), (64, 64), (128, 64), (256, 64)}
    with pytest.raises(WorkbenchError, match="tuned the per-rank graph of tensor-parallel size 2, not 1: export it "
                                             "with --tp 2"):
        export_engine(ws, tmp_path / "one", tensor_parallel_size=1)
    out = export_engine(ws, tmp_path / "engine")
    assert json.loads((out / "manifest.json").read_text())["tensor_parallel_size"] == 2
    monkeypatch.setattr(load_module, "tuning_mismatch", lambda tuned_for, device: None)  # as if on its GPU
    e = load_engine(out)
    assert e.tuning == "engine" and e.program.tuned is not None and e.tensor_parallel_size == 2
    with pytest.warns(UserWarning, match="built and tuned for tensor-parallel size 2 and runs re-sharded for 1: .* "
                                         "default kernels; rebuild it with `workbench build ... --tp 1`"):
        e = load_engine(out, tensor_parallel_size=1)
    assert e.choices is None and e.program.tuned is None


def test_the_control_group_waits_as_long_as_a_server_idles():
    """Step inputs travel on the control group, which has no practical timeout: a rank waits longer than the
    process group's own timeout (1 s here; 2 minutes when serving) for rank 0's next step and still runs it."""
    from workbench.distributed import free_port

    assert spawn(_idle_then_step, 2, free_port()) == [6.0, 6.0]


def _idle_then_step(rank, size, init, sync_port):
    import datetime

    import torch.distributed as dist

    from workbench.distributed import broadcast_object, join, leave

    # both ranks meet first (a store with a long timeout), so the group's 1 s covers its own start-up only
    store = dist.TCPStore("127.0.0.1", sync_port, size, rank == 0, timeout=datetime.timedelta(seconds=60))
    store.add("arrived", 1)
    while store.add("arrived", 0) < size:
        time.sleep(0.01)
    join(rank, size, init_method=init, timeout_s=1)
    try:
        if rank == 0:
            time.sleep(1.5)
        x = torch.full((2,), float(broadcast_object(3 if rank == 0 else None)))
        return float(collective_sum(x)[0])
    finally:
        leave()


def collective_sum(x):
    from workbench.kernels.collectives import all_reduce

    return all_reduce(x)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    """The subprocesses import this checkout (whatever the current directory) and use one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _completion(url, expected):
    """A greedy completion (token ids in and out: random weights have no tokenizer), streamed and not."""
    import httpx

    body = {"model": "engine", "prompt": _prompts()[0], "max_tokens": GREEDY["max_tokens"], "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected, r.text
    streamed = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                streamed += [t for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
    assert streamed == expected


def _wait_up(proc, url, log: Path, seconds=120):
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _serve_then_sigterm(argv, tokens, log: Path) -> tuple[int, str]:
    """Start ``argv`` (a ``workbench serve`` of the TP engine on a free port), check one OpenAI completion has
    ``tokens``, send SIGTERM: (its exit code, its log)."""
    port = _free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([*argv, "--port", str(port), "--log-level", "warning", "--num-blocks", "32",
                                 "--model-name", "engine"], env=_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, url, log)
        _completion(url, tokens)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        _stop(proc)
    return code, log.read_text()


def test_workbench_serve_of_a_two_rank_engine_answers_and_stops_on_sigterm(tp_engine, one_rank_tokens, tmp_path):
    """``workbench serve ENGINE`` (built for two ranks: no --tp needed) spawns rank 1, which reads its own slices;
    an OpenAI completion, streamed and not, has the one-rank tokens, and SIGTERM exits 0."""
    code, text = _serve_then_sigterm([sys.executable, "-m", "workbench", "serve", str(tp_engine)],
                                     one_rank_tokens[0], tmp_path / "serve.log")
    assert code == 0, text[-3000:]
    assert "tensor parallelism over 2 ranks (ranks 1.. spawned" in text
    assert "each rank reads its own slices of the engine's weights" in text


def _torchrun(*argv):
    """torchrun of 2 processes on this machine (a free rendezvous port: ``--standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv]


def test_torchrun_serve_rank_0_serves_rank_1_works(tp_engine, one_rank_tokens, tmp_path):
    """``torchrun --nproc-per-node 2 -m workbench serve ENGINE``: rank 0 serves the one-rank tokens, rank 1 runs
    its steps; SIGTERM to torchrun (which passes it to both) ends the server gracefully, rank 1 when rank 0 tells
    it. torchrun itself then exits 1 with its own SignalException: that is torchrun's, whatever its workers do."""
    code, text = _serve_then_sigterm(_torchrun("-m", "workbench", "serve", str(tp_engine)), one_rank_tokens[0],
                                     tmp_path / "torchrun.log")
    assert "tensor parallelism over 2 ranks (torchrun's processes" in text, text[-3000:]
    assert "workbench: tensor-parallel rank 1: stopped with rank 0" in text, text[-3000:]  # after rank 0's close
    assert code in (0, 1) and text.count("Traceback") == text.count("SignalException: Process"), text[-3000:]


def test_a_script_that_spawns_ranks_from_its_top_level_is_refused_in_one_line(tmp_path):
    """Spawned ranks import the main script again: an ``LLM(..., tensor_parallel_size=2)`` at its unguarded top
    level is refused before any rank starts, naming the file, the line and the fix; under ``if __name__ ==
    "__main__":`` the check passes."""
    bare = tmp_path / "bare.py"
    bare.write_text("from workbench import LLM\n"
                    "llm = LLM('tiny-llama', device='cpu', tensor_parallel_size=2)\n")
    run = subprocess.run([sys.executable, str(bare)], env=_env(), capture_output=True, text=True, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("workbench.errors.WorkbenchError: tensor parallelism starts"), \
        run.stderr[-2000:]
    assert f"import {bare} again and would run its line 2 again" in last and 'if __name__ == "__main__":' in last
    assert "captured and optimized" not in run.stderr  # refused before the model was loaded
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from workbench.runtime.tensor_parallel import check_spawnable_main\n"
                       "if __name__ == '__main__':\n"
                       "    check_spawnable_main()\n"
                       "    print('spawnable')\n"
                       "check_spawnable_main()\n")  # at the top level too: refused
    run = subprocess.run([sys.executable, str(guarded)], env=_env(), capture_output=True, text=True, timeout=120)
    assert run.stdout == "spawnable\n" and "would run its line 5 again" in run.stderr, run.stderr[-2000:]


def test_an_llm_script_under_torchrun(tp_engine, one_rank_tokens, tmp_path):
    """The same script on both ranks: rank 0's ``LLM`` generates, rank 1's runs rank 0's steps and ends its process
    when rank 0's closes; torchrun exits 0."""
    script = tmp_path / "generate.py"
    script.write_text("import sys\n"
                      "from workbench import LLM, SamplingParams\n"
                      "with LLM(sys.argv[1], num_blocks=32) as llm:\n"
                      f"    out = llm.generate({_prompts()[:2]!r}, SamplingParams(**{GREEDY!r}))\n"
                      "    print('tokens', [o.token_ids for o in out], flush=True)\n"
                      "print('rank 0 after its LLM', flush=True)\n")
    done = subprocess.run(_torchrun(str(script), str(tp_engine)), env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"tokens {one_rank_tokens[:2]}" in done.stdout
    assert done.stdout.count("rank 0 after its LLM") == 1  # rank 1 ended in LLM(...)
    assert "tensor-parallel rank 1: stopped with rank 0" in done.stderr
