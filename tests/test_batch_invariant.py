"""The batch-invariant mode (``kernels/invariant.py``): every step runs each op with one invariant tactic and config,
so a prompt's greedy tokens and logits are the same alone and inside a batch.

On the CPU the mode's Triton tactics run under TRITON_INTERPRET=1 (conftest), at tiny sizes: the tests check which
implementation and config every node runs, that the selection (tuned or not) gives each node one invariant candidate
for every bucket, that the tuner in the mode chooses one, that the attention kernel's rows do not depend on how a
prompt was chunked, and that through ``LLM`` a prompt alone and in a batch of three of different lengths (a token
budget of 8: mixed steps, a chunked prompt) gets bitwise the same tokens and logits (bf16; a group of 3 query heads
per KV head; FP8 linears over an FP8 KV cache), where a per-bucket tuned engine without the mode does not. The GPU
measurement is ``bench/batch_invariance.py --engine``.
"""

import json

import pytest
import torch

from conftest import rel_err
from workbench.errors import WorkbenchError
from workbench.graph.executor import meta_arguments
from workbench.kernels import gemm as G
from workbench.kernels import triton_attention as ta
from workbench.kernels.autotune import TimingCache, TunedChoices, autotune_profile, tactic_ops
from workbench.kernels.invariant import cost_lines, describe, select, why_variant
from workbench.kernels.registry import REFERENCE, REGISTRY
from workbench.runtime.engine import LLM
from workbench.runtime.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
tactic_ops()  # registers the Triton tactics

LINEAR = "aten.linear.default"
ATTENTION = "workbench.paged_attention"
#: configs a per-bucket tuner may pick that the mode must not run (tiny shapes: K = 64)
GEMV = {**G.GEMV_CONFIGS["16bit"][0], "BLOCK_N": 64}  # 64 weight rows a program: fewer interpreted programs
SPLIT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}
TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
ATTN_SPLIT = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 2}
ATTN_PLAIN = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}


def per_bucket_choices(graph, edges=(1, 4, 16)) -> TunedChoices:
    """What a per-bucket tuner might choose for ``graph``: the M = 1 GEMV, then split-K, then a tile (cuBLAS, the
    reference, for the lm_head at the largest bucket); attention split at bucket 1, unsplit after; the norms at
    another config in each bucket."""
    norm_configs = REGISTRY.get("workbench.rms_norm").tactics["triton"].configs
    buckets = []
    for i, _ in enumerate(edges):
        c = {}
        for n in graph.nodes:
            if n.op == LINEAR:
                c[n.name] = [("triton", GEMV), ("triton", SPLIT), ("triton", TILE)][min(i, 2)]
            elif n.op == ATTENTION:
                c[n.name] = ("triton", ATTN_SPLIT if i == 0 else ATTN_PLAIN)
            elif n.op in ("workbench.rms_norm", "workbench.add_rms_norm"):
                c[n.name] = ("triton", norm_configs[i % len(norm_configs)])
        buckets.append(c)
    head = [n.name for n in graph.nodes if n.op == LINEAR][-1]
    buckets[-1][head] = (REFERENCE, None)  # cuBLAS on a GPU
    return TunedChoices(list(edges), buckets)


# ---- which candidates are invariant, and the selection ---------------------------------------------------------

def test_every_tactic_says_whether_it_is_batch_invariant():
    for op in tactic_ops():
        opdef = REGISTRY.get(op)
        for name, fn in opdef.tactics.items():
            assert callable(getattr(fn, "invariant", None)), (op, name)
            default = getattr(fn, "invariant_default", None)
            if default is not None:
                assert why_variant(op, name, default) is None, (op, name)
    assert "cuBLAS" in why_variant("workbench.fp8_linear", "scaled_mm", {"fast_accum": True})
    assert "cuBLAS" in why_variant("workbench.int8_linear", "int_mm", None)
    assert "cuBLAS" in why_variant("workbench.w8_linear", "dequant", None)
    assert "GEMV" in why_variant(LINEAR, "triton", GEMV)
    assert "split-K" in why_variant(LINEAR, "triton", SPLIT)
    assert "launcher" in why_variant(LINEAR, "triton", None)
    assert "torch's kernels" in why_variant(LINEAR, REFERENCE, None)
    assert why_variant(ATTENTION, "triton", ta.CONFIGS[0]) is not None  # its own keys from the inputs
    assert why_variant(ATTENTION, "triton", {**ATTN_SPLIT, "NEW_FROM_CACHE": True}) is not None
    assert why_variant(ATTENTION, "triton", {**ATTN_PLAIN, "NEW_FROM_CACHE": True, "DECODE": ta.DECODE_CONFIG})
    assert why_variant(ATTENTION, "triton", {**ATTN_PLAIN, "NEW_FROM_CACHE": True}) is None
    assert why_variant("aten.add.Tensor", REFERENCE, None) is None  # no tactics: nothing to choose


def test_the_mode_runs_one_invariant_choice_per_node_at_every_step(tiny_program):
    """Per-bucket choices with a GEMV, split-K, cuBLAS and split attention: the mode keeps, per node, one
    invariant (tactic, config) for every step (the largest bucket's where it is invariant, else the op's default),
    and says what each op lost."""
    graph, tuned = tiny_program.graph, per_bucket_choices(tiny_program.graph)
    program = tiny_program.with_choices(tuned).with_batch_invariance()
    assert program.batch_invariant and program.tuned is None  # one plan for every step
    plans = [(program.implementations(t), program.configs(t)) for t in (1, 3, 4, 16, 5000)]
    assert all(p == plans[0] for p in plans)
    names, configs = plans[0]
    tunable = [n for n in graph.nodes if REGISTRY.get(n.op).tactics]
    assert tunable
    for n in tunable:
        assert names[n.name] == "triton", n.name
        assert why_variant(n.op, names[n.name], configs[n.name]) is None, n.name
        assert not configs[n.name].get("GEMV") and configs[n.name].get("SPLIT_K", 1) == 1
        assert configs[n.name].get("SPLITS", 1) == 1
    linears = [n.name for n in tunable if n.op == LINEAR]
    assert all(configs[n] == TILE for n in linears[:-1])  # the largest bucket's, invariant: kept
    assert configs[linears[-1]] == G.CONFIGS["16bit"][5]  # the lm_head's there is cuBLAS: the default
    attn = [n.name for n in tunable if n.op == ATTENTION]
    assert all(configs[a] == ta.paged_attention.invariant_default for a in attn)
    notes = "\n".join(program.notes)
    for lost in ("GEMV", "split-K", "torch's kernels", "splits 2", "own keys are tiled"):
        assert lost in notes, lost
    # untuned: each op's invariant default, one per op
    untuned = select(graph, meta_arguments(graph), None)
    per_op = {}
    for n in tunable:
        per_op.setdefault(n.op, set()).add(describe(untuned.choices[n.name]))
    assert all(len(v) == 1 for v in per_op.values()) and set(per_op) == {n.op for n in tunable}
    assert untuned.notes == []
    # choices that agree across buckets and are invariant are kept as they are
    same = TunedChoices([1, 16], [{linears[0]: ("triton", TILE)}] * 2)
    assert select(graph, None, same).choices[linears[0]] == ("triton", TILE)


def test_quantized_linears_run_the_triton_tile_not_scaled_mm(tiny_program, tiny_stats):
    from workbench.quant import PrecisionPlan, quantized_program

    for fmt, op in (("fp8", "workbench.fp8_linear"), ("int8_sq", "workbench.int8_linear"),
                    ("int8_wo", "workbench.w8_linear")):
        program = quantized_program(tiny_program, PrecisionPlan.uniform(tiny_program.graph, fmt), tiny_stats)
        tuned = TunedChoices([1], [{n.name: ("scaled_mm" if op == "workbench.fp8_linear" else
                                             "int_mm" if op == "workbench.int8_linear" else "dequant", None)
                                    for n in program.graph.nodes if n.op == op}])
        inv = program.with_choices(tuned).with_batch_invariance()
        nodes = [n.name for n in program.graph.nodes if n.op == op]
        assert nodes and all(inv.implementations()[n] == "triton" for n in nodes)
        assert all(inv.configs()[n] == G.CONFIGS["16bit" if fmt == "int8_wo" else "8bit"][5] for n in nodes)
        assert any("cuBLAS" in line for line in inv.notes)


class InvariantTimer:
    """Planted timings (nothing runs): the GEMV and split-K fastest where offered, then tiles by height; attention
    twice as fast reading its own keys from the inputs; the references slowest."""

    def __call__(self, call, op, tactic, config):
        if tactic == REFERENCE:
            return 1.0
        if op == ATTENTION:
            return 0.4 if config.get("NEW_FROM_CACHE") else 0.2
        if op == LINEAR:
            if config.get("GEMV"):
                return 0.05
            if config.get("SPLIT_K", 1) > 1:
                return 0.1
            return 0.2 + config["BLOCK_M"] / 1000 + config["BLOCK_K"] / 10000
        space = REGISTRY.get(op).tactics[tactic].configs
        return 0.5 - 0.01 * space.index(config)


def test_the_tuner_in_the_mode_chooses_one_candidate_for_every_bucket(tiny_program, tmp_path):
    from workbench.kernels.profiles import OptimizationProfile

    profile = OptimizationProfile(max_tokens=16, max_seqs=4, context=8, max_context=64, prefill_len=8,
                                  edges=(1, 4, 16))
    cache = TimingCache.open(tmp_path / "timings.json")
    tuned = autotune_profile(tiny_program, profile, cache, timer=InvariantTimer(), progress=False,
                             batch_invariant=True)
    assert tuned.batch_invariant and tuned.edges == [1, 4, 16]
    assert all(c == tuned.choices[0] for c in tuned.choices)
    tunable = {n.name: n.op for n in tiny_program.graph.nodes if REGISTRY.get(n.op).tactics}
    assert set(tuned.choices[0]) == set(tunable)
    for node, (tactic, config) in tuned.choices[0].items():
        assert why_variant(tunable[node], tactic, config) is None, node
        if tunable[node] == ATTENTION:
            assert config["NEW_FROM_CACHE"] and config.get("SPLITS", 1) == 1
        if tunable[node] == LINEAR:  # the least mean slowdown: the shortest, shallowest tile timed at every bucket
            assert config["BLOCK_M"] == min(c["BLOCK_M"] for c in G.CONFIGS["16bit"] if c.get("SPLIT_K", 1) == 1)
    assert TunedChoices.from_json(json.loads(json.dumps(tuned.to_json()))) == tuned  # saved with its flag
    lines = {line.split(":")[1].split("(")[0].strip(): line for line in cost_lines(tuned.costs)}
    assert "x at 1 (lost triton GEMV" in lines[LINEAR]  # the M = 1 bucket's GEMV (no split-K fits K = 64)
    assert "2.00x at 1" in lines[ATTENTION] and "2.00x at 16" in lines[ATTENTION]
    # the per-bucket choices come from the same timings: the GEMV at 1 token
    free = autotune_profile(tiny_program, profile, cache, timer=InvariantTimer(), progress=False)
    assert all(free.choices[0][n][1].get("GEMV") for n, op in tunable.items() if op == LINEAR)


# ---- the attention kernel: every key from the cache -------------------------------------------------------------

def attention_chunked(config, *, dtype, kv_dtype=None, cut=9, length=21, window=None, seed=0):
    """One prompt of ``length`` tokens (3 query heads per KV head) attended in one step and in two chunks
    (``cut`` tokens, then the rest over the cached ones): (outputs whole, outputs chunked, the reference's)."""
    from workbench.kernels import fused

    g = torch.Generator().manual_seed(seed)
    page, kv_heads, group, d = 4, 2, 3, 32  # head dim 32: an FP8 cache is read as int16 pairs
    blocks = -(-length // page)
    table = torch.randperm(blocks + 2, generator=g)[:blocks][None]
    q = torch.randn(1, length, kv_heads * group, d, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, kv_heads, length, d, generator=g).to(dtype) for _ in range(2))
    slots = table[0, torch.arange(length) // page] * page + torch.arange(length) % page
    scales = (0.05, 0.04) if kv_dtype is not None else (None, None)

    def run(parts, fn, cfg):
        cache, outs, start = torch.zeros(2, blocks + 2, page, kv_heads, d).to(kv_dtype or dtype), [], 0
        for n in parts:
            part = slice(start, start + n)
            outs.append(fn(q[:, :, part], k[:, :, part], v[:, :, part], cache, slots[part], table,
                           torch.tensor([start + n]), torch.tensor([0, n]), 0.3, window, *scales,
                           **({"config": cfg} if cfg else {})))
            start += n
        return torch.cat(outs, dim=2)

    return (run([length], ta.paged_attention, config), run([cut, length - cut], ta.paged_attention, config),
            run([length], fused.paged_attention, None))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, torch.float8_e4m3fn)])
def test_attention_rows_do_not_depend_on_chunking_when_every_key_comes_from_the_cache(window, dtype, kv_dtype):
    small = {"BLOCK_Q": 4, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1, "SPLITS": 1}  # several key tiles
    for config in (ta.paged_attention.invariant_default, {**small, "NEW_FROM_CACHE": True}):
        whole, chunked, ref = attention_chunked(config, dtype=dtype, kv_dtype=kv_dtype, window=window)
        assert torch.equal(whole, chunked), config
        assert rel_err(whole, ref) < (1e-5 if dtype == torch.float32 and kv_dtype is None else 1e-2)
    # the same configs reading their own keys from the inputs sum them in other tiles when chunked
    whole, chunked, _ = attention_chunked(small, dtype=dtype, kv_dtype=kv_dtype, window=window)
    assert not torch.equal(whole, chunked)


# ---- through LLM: a prompt alone and in a batch -------------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
#: a token budget of 8 for prompts of 3, 5 and 7 tokens: the first two prefill together, the third is chunked (6 + 1)
#: beside their decodes; alone, each prefills in one step
OPTIONS = dict(num_blocks=32, max_num_batched_tokens=8, max_num_seqs=4)


def logits_recorder(llm) -> dict[str, list[torch.Tensor]]:
    """request id -> the logits rows the executor returned for it, step by step (the executor's ``execute``
    wrapped)."""
    record, executor = {}, llm.engine.executor
    execute = executor.execute

    def recorded(out, feed=None):
        logits = execute(out, feed)
        for i, s in enumerate(s for s in out.scheduled if s.samples):
            record.setdefault(s.request.request_id, []).append(logits[i].clone())
        return logits

    executor.execute = recorded
    return record


def alone_and_batched(llm, compare=(0, 2)) -> list[tuple[bool, bool]]:
    """For prompts ``compare`` of three (3, 5 and 7 random token ids): (tokens equal, every step's logits bitwise
    equal) between the prompt alone and inside the batch of three."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 5, 7)]
    record = logits_recorder(llm)
    batch = llm.generate(prompts, PARAMS)
    out = []
    for i in compare:
        alone = llm.generate([prompts[i]], PARAMS)[0]
        a, b = record[alone.request_id], record[batch[i].request_id]
        assert len(a) == len(b) == PARAMS.max_tokens
        out.append((alone.token_ids == batch[i].token_ids, all(torch.equal(x, y) for x, y in zip(a, b))))
    return out


def assert_invariant_kernels_ran(llm):
    program = llm.engine.executor.program
    names, configs = program.implementations(), program.configs()
    ops = {n.op for n in program.graph.nodes if names[n.name] == "triton"}
    assert {ATTENTION} <= ops and ops & {LINEAR, "workbench.fp8_linear"}
    assert ops & {"workbench.rms_norm", "workbench.add_rms_norm", "workbench.rms_norm_fp8",
                  "workbench.add_rms_norm_fp8"}
    for n in program.graph.nodes:
        if REGISTRY.get(n.op).tactics:
            assert names[n.name] == "triton" and why_variant(n.op, "triton", configs[n.name]) is None, n.name


def test_without_the_mode_a_per_bucket_tuned_engine_changes_a_prompts_logits_in_a_batch(tiny_program):
    """The control: the same per-bucket choices (GEMV alone, split-K beside two others) give a prompt other logits
    in a batch (fp32, where a summation order shows); the mode makes them equal."""
    program = tiny_program.with_choices(per_bucket_choices(tiny_program.graph))
    free = LLM(program, batch_invariant=False, **OPTIONS)
    assert not free.batch_invariant
    assert not all(logits for _, logits in alone_and_batched(free, compare=(0,)))
    invariant = LLM(program, batch_invariant=True, **OPTIONS)
    assert invariant.batch_invariant and any("GEMV" in n for n in invariant.notes)
    assert_invariant_kernels_ran(invariant)
    assert alone_and_batched(invariant, compare=(0,)) == [(True, True)]


@pytest.fixture(scope="module")
def odd_group_config(tmp_path_factory):
    """A Llama of 6 query heads over 2 KV heads (3 per KV head: SmolLM2's layout, whose attention programs pad their
    query rows), as a config.json of random weights."""
    from workbench.models.presets import PRESETS

    d = tmp_path_factory.mktemp("odd")
    config = {**PRESETS["tiny-llama"], "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
              "model_type": "llama"}
    (d / "config.json").write_text(json.dumps(config))
    return str(d / "config.json")


@pytest.mark.parametrize("model", ["tiny-llama", "odd-group"])
def test_llm_in_the_mode_gives_a_prompt_the_same_tokens_and_logits_alone_and_in_a_batch(model, odd_group_config,
                                                                                        monkeypatch):
    llm = LLM(odd_group_config if model == "odd-group" else model, device="cpu", dtype="bfloat16",
              batch_invariant=True, **OPTIONS)
    assert llm.batch_invariant and llm.engine.executor.program.graph.meta["dtype"] == "bfloat16"
    assert_invariant_kernels_ran(llm)
    # what ran, not only what was planned: every GEMM launch at the one held tile, the attention's cache writes
    launched, writes = [], []
    gemm, write_kv = G._gemm, ta.write_kv
    monkeypatch.setattr(G, "_gemm", lambda a, b, out, config, **kw: launched.append(config) or gemm(a, b, out, config,
                                                                                                    **kw))
    monkeypatch.setattr(ta, "write_kv", lambda *a, **kw: writes.append(1) or write_kv(*a, **kw))
    assert alone_and_batched(llm) == [(True, True), (True, True)]
    assert launched and all(c == G.CONFIGS["16bit"][5] for c in launched) and writes


def test_llm_in_the_mode_with_fp8_linears_and_an_fp8_kv_cache(tiny_program, tiny_stats):
    from workbench.quant import PrecisionPlan, quantized_program

    plan = PrecisionPlan.uniform(tiny_program.graph, "fp8", kv_cache="fp8")
    llm = LLM(quantized_program(tiny_program, plan, tiny_stats), batch_invariant=True, **OPTIONS)
    assert "float8_e4m3fn" in str(llm.engine.executor.layout.dtype)
    assert_invariant_kernels_ran(llm)
    assert alone_and_batched(llm) == [(True, True), (True, True)]


# ---- the product path: build records it, LLM and serve take it -------------------------------------------------

def test_build_records_the_mode_and_llm_and_serve_run_it_by_default(tmp_path, capsys):
    from workbench.cli import build_parser, main
    from workbench.engine import load_engine
    from workbench.serve.app import open_served_engine

    out = tmp_path / "engine"
    args = ["build", "tiny-llama", "--precision", "bf16", "--out", str(out), "--workspace", str(tmp_path / "ws"),
            "--device", "cpu"]
    assert main([*args, "--batch-invariant"]) == 0
    log = capsys.readouterr().out
    assert "batch-invariant (untuned): aten.linear.default runs triton M64 N128 K64" in log
    assert "own keys from cache True" in log and ", batch-invariant" in log
    assert load_engine(out).manifest["batch_invariant"] is True
    llm = LLM(str(out), **OPTIONS)
    assert llm.batch_invariant and llm.engine.executor.program.batch_invariant
    assert_invariant_kernels_ran(llm)
    assert not LLM(str(out), batch_invariant=False, **OPTIONS).engine.executor.program.batch_invariant
    engine, served = open_served_engine(out, device="cpu", tokenizer=None, num_blocks=32, memory_fraction=None,
                                        max_num_seqs=None, max_num_batched_tokens=None, max_model_len=None,
                                        tensor_parallel_size=1)
    assert engine.executor.program.batch_invariant
    parse = build_parser().parse_args
    assert parse(["serve", str(out), "--batch-invariant"]).batch_invariant is True
    assert parse(["serve", str(out), "--no-batch-invariant"]).batch_invariant is False
    assert parse(["serve", str(out)]).batch_invariant is None
    # built again without it: only the export runs, and the manifest says so
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "[5/5] export: running" in log and "[1/5] capture: up to date" in log
    assert load_engine(out).manifest["batch_invariant"] is False
    assert not LLM(str(out), **OPTIONS).batch_invariant


def test_bad_settings_are_one_line_errors(tiny_program):
    from workbench.engine import BuildOptions

    with pytest.raises(WorkbenchError, match="batch_invariant must be True, False or None"):
        LLM(tiny_program, batch_invariant="yes", **OPTIONS)
    with pytest.raises(WorkbenchError, match="batch_invariant is True or False"):
        BuildOptions(batch_invariant=1)
    with pytest.raises(WorkbenchError, match="runs on one device"):
        LLM(tiny_program, batch_invariant=True, tensor_parallel_size=2, **OPTIONS)
