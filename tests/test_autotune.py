"""The autotuner: every candidate timed once per distinct op instance, every timing kept, choices used,
the cache reused, resumed after an interruption, and refused on another machine. Timings are planted by the
test's timer (CPU timings of the interpreter mean nothing). In the first test and the per-bucket one every
candidate really runs, under the Triton interpreter; the tests of the cache's logic plant timings without
running the candidates (each full run of them is about 15 s of interpreter on two cores)."""

import functools
import json

import pytest
import torch

from conftest import prefill_then_decode
from workbench.errors import WorkbenchError
from workbench.evaluate import paged_greedy
from workbench.kernels.autotune import TimingCache, autotune, instance_key, tactic_ops


def steps(program):
    return prefill_then_decode(program)


def measurements(entries) -> int:
    """Timer calls behind cache entries: one per candidate, more for near-ties (their ``samples``)."""
    return sum(len(t.get("samples", [None])) for e in entries for t in e["timings"])


class PlantedTimer:
    """The reference takes 1 ms, a tactic's configs 0.5 ms minus 0.01 per position, so the last config of each
    space must win. ``run``: runs each candidate once, at its first measurement (the near-ties' re-measurements
    are the same call object; running it again would only repeat the interpreter's work). Optionally fails one
    config, or stops after n calls."""

    def __init__(self, fail=None, stop_after=None, run=False):
        self.calls, self.fail, self.stop_after, self.run = 0, fail, stop_after, run
        self.ran = []  # the calls run so far, kept alive so that an id is never reused

    def __call__(self, call, op, tactic, config):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        if self.run and not any(c is call for c in self.ran):
            self.ran.append(call)
            call()
        if self.fail and (op, config) == self.fail:
            raise RuntimeError("out of shared memory")
        if tactic == "reference":
            return 1.0
        from workbench.kernels.registry import REGISTRY

        space = REGISTRY.get(op).tactics[tactic].configs
        return 0.5 - 0.01 * space.index(config)


def test_tunes_chooses_and_reuses(program, tmp_path):
    cache = TimingCache.open(tmp_path / "timings.json")
    timer = PlantedTimer(run=True)
    choices = autotune(program, steps(program), cache, timer=timer, progress=False)
    tunable = [n for n in program.graph.nodes if n.op in tactic_ops()]
    assert set(choices) == {n.name for n in tunable}
    from workbench.kernels.registry import REGISTRY

    # what each node's instances were timed with: the tactic's configs that its prune kept for those arguments
    node_keys, key_args = {}, {}

    def record(name, op, args, kwargs):
        key = instance_key(op, args, kwargs)
        node_keys.setdefault(name, set()).add(key)
        key_args[key] = (op, args, kwargs)

    for step in steps(program):
        program.run(_observe=({n.name for n in tunable}, record), **step)
    saved = json.loads((tmp_path / "timings.json").read_text())
    for n in tunable:  # the last config of the space among those kept at every step wins
        timed = [[t["config"] for t in saved["entries"][k]["timings"] if t["tactic"] == "triton"]
                 for k in node_keys[n.name]]
        kept = [c for c in timed[0] if all(c in t for t in timed)]
        assert choices[n.name] == ("triton", kept[-1])
    # identical layers and heads share keys: fewer entries than node instances (each seen at two steps)
    assert saved["env"]["gpu"] == "cpu" and len(saved["entries"]) < 2 * len(tunable)
    assert timer.calls == measurements(saved["entries"].values())
    for key, entry in saved["entries"].items():  # every candidate's timing is kept, not only the winner
        op, args, kwargs = key_args[key]
        fn = REGISTRY.get(op).tactics["triton"]
        space = fn.prune(fn.configs, args, kwargs) if hasattr(fn, "prune") else fn.configs
        assert [t["config"] for t in entry["timings"]] == [None, *space]
    table = TimingCache.open(tmp_path / "timings.json").table()
    assert table["chosen"].sum() == len(saved["entries"])
    # a second run times nothing and chooses the same
    again = autotune(program, steps(program), TimingCache.open(tmp_path / "timings.json"),
                     timer=PlantedTimer(stop_after=0), progress=False)
    assert again == choices
    # the tuned program decodes exactly like the reference one
    prompt = torch.tensor([5, 9, 11, 2, 30])
    # the prefill, then decode steps over the cache it wrote (more steps would repeat the decode's kernels)
    assert paged_greedy(program.with_choices(choices), prompt, 6) == paged_greedy(program, prompt, 6)


def test_keys_that_differ_only_in_float_scalars_share_one_timing(program, tmp_path):
    """Layer 1's attention given another softmax scale (as each layer of an FP8 graph has its own KV scales):
    its key is new, but it launches the same kernels on the same shapes, so it reuses layer 0's timings."""
    import copy

    from workbench.graph.executor import Program

    plain = TimingCache.open(tmp_path / "plain.json")
    plain_timer = PlantedTimer()
    autotune(program, steps(program), plain, timer=plain_timer, progress=False)
    graph = copy.deepcopy(program.graph)
    attn = [n for n in graph.nodes if n.op == "workbench.paged_attention"]
    attn[1].args = [*attn[1].args[:8], 0.3, *attn[1].args[9:]]
    scaled = Program(graph, program.params)
    cache, timer = TimingCache.open(tmp_path / "scaled.json"), PlantedTimer()
    choices = autotune(scaled, steps(scaled), cache, timer=timer, progress=False)
    assert timer.calls == plain_timer.calls  # nothing more was timed
    shared = {k: e for k, e in cache.entries.items() if "same_work_as" in e}
    assert len(cache.entries) == len(plain.entries) + len(shared) and len(shared) == 2  # prefill and decode
    for e in shared.values():
        assert e["timings"] == cache.entries[e["same_work_as"]]["timings"] and '0.3' not in e["same_work_as"]
    assert choices[attn[1].name] == choices[attn[0].name]
    reopened = TimingCache.open(tmp_path / "scaled.json")  # written to disk too
    assert reopened.entries.keys() == cache.entries.keys()


def test_a_grown_tuning_space_is_timed_afresh_from_a_cache(program, tmp_path, monkeypatch):
    """A config added to a tactic's space after a cache was made (a new kernel): the instances it is offered
    for (the linears') are timed again, all their candidates, and it can win; the others are not timed."""
    from workbench.kernels.registry import REGISTRY
    from workbench.kernels import gemm as G

    path = tmp_path / "timings.json"
    autotune(program, steps(program), TimingCache.open(path), timer=PlantedTimer(), progress=False)
    before = json.loads(path.read_text())["entries"]
    fn = REGISTRY.get("aten.linear.default").tactics["triton"]
    new = G._cfg(16, 16, 32, 1, 4, 2)  # a tile no space had
    monkeypatch.setattr(fn, "configs", [*fn.configs, new])  # last in the space: the planted timer's fastest
    timer = PlantedTimer()
    choices = autotune(program, steps(program), TimingCache.open(path), timer=timer, progress=False)
    after = json.loads(path.read_text())["entries"]
    retimed = {k for k, e in after.items() if any(t["config"] == new for t in e["timings"])}
    assert retimed and all(json.loads(k)[0] == "aten.linear.default" for k in retimed)
    assert all(after[k] == before[k] for k in after if k not in retimed)  # the rest untouched
    assert timer.calls == measurements(after[k] for k in retimed)  # all candidates of those, nothing else
    linears = [n.name for n in program.graph.nodes if n.op == "aten.linear.default"]
    assert any(choices[name] == ("triton", new) for name in linears)
    again = PlantedTimer(stop_after=0)  # and a third run times nothing
    autotune(program, steps(program), TimingCache.open(path), timer=again, progress=False)


def test_a_tactic_whose_code_changed_is_timed_again(program, tmp_path, monkeypatch):
    """Each timing records its tactic's code version; after an edit to a tactic's kernels (its version changes),
    the instances it is offered for are timed again, all their candidates, and nothing else is."""
    from workbench.kernels import autotune as A
    from workbench.kernels.registry import REGISTRY

    path = tmp_path / "timings.json"
    autotune(program, steps(program), TimingCache.open(path), timer=PlantedTimer(), progress=False)
    before = json.loads(path.read_text())["entries"]
    edited = REGISTRY.get("aten.linear.default").tactics["triton"]
    assert A.tactic_version(edited) is not None
    assert A.tactic_version(functools.partial(edited)) == A.tactic_version(edited)
    for e in before.values():
        tactics = REGISTRY.get(e["op"]).tactics
        assert all(t["version"] == (None if t["tactic"] == "reference" else A.tactic_version(tactics[t["tactic"]]))
                   for t in e["timings"])
    version = A.tactic_version
    monkeypatch.setattr(A, "tactic_version", lambda fn: "edited" if fn is edited else version(fn))
    timer = PlantedTimer()
    autotune(program, steps(program), TimingCache.open(path), timer=timer, progress=False)
    after = json.loads(path.read_text())["entries"]
    retimed = {k for k in after if after[k] != before[k]}
    assert retimed == {k for k in after if json.loads(k)[0] == "aten.linear.default"}
    assert all(t["version"] == "edited" for k in retimed for t in after[k]["timings"] if t["tactic"] == "triton")
    assert timer.calls == measurements(after[k] for k in retimed)


def test_timings_of_changed_code_are_not_shared_with_new_keys(program, tmp_path, monkeypatch):
    """Keys that differ only in float scalars share timings (previous test), but not timings measured on code
    that has changed since: an attention at a softmax scale never seen, after an edit to the attention kernels,
    is timed afresh rather than copied from the cached entry of the old scale."""
    import copy

    from workbench.graph.executor import Program
    from workbench.kernels import autotune as A
    from workbench.kernels.registry import REGISTRY

    path = tmp_path / "timings.json"
    autotune(program, steps(program), TimingCache.open(path), timer=PlantedTimer(), progress=False)
    graph = copy.deepcopy(program.graph)
    for node in graph.nodes:
        if node.op == "workbench.paged_attention":
            node.args = [*node.args[:8], 0.3, *node.args[9:]]
    scaled = Program(graph, program.params)
    edited = REGISTRY.get("workbench.paged_attention").tactics["triton"]
    version = A.tactic_version
    monkeypatch.setattr(A, "tactic_version", lambda fn: "edited" if fn is edited else version(fn))
    cache, timer = TimingCache.open(path), PlantedTimer()
    autotune(scaled, steps(scaled), cache, timer=timer, progress=False)
    new = [e for k, e in cache.entries.items() if json.loads(k)[0] == "workbench.paged_attention" and "0.3" in k]
    assert new and timer.calls == measurements(new)  # those timed, nothing else
    assert all("same_work_as" not in e for e in new)
    assert all(t["version"] == "edited" for e in new for t in e["timings"] if t["tactic"] == "triton")


def test_code_versions_ignore_docstrings_comments_and_layout():
    from workbench.kernels.autotune import code_hash

    base = 'def f(x):\n    """Doubles."""\n    return x * 2\n'
    edited = '"""A module."""\n# a comment\ndef f(x):\n    """Twice x."""\n\n    return (x *\n            2)  # why\n'
    assert code_hash(base) == code_hash(edited)
    assert code_hash(base) != code_hash(base.replace("x * 2", "x * 3"))
    assert code_hash(base) != code_hash(base.replace("def f", "def g"))
    assert code_hash(base) != code_hash(base.replace("x * 2", "x * '2'"))  # values keep their type


def test_code_versions_do_not_depend_on_fields_newer_pythons_add(monkeypatch):
    """Python 3.12 gives every function an empty ``type_params`` (3.11's trees have no such field): a cache tuned
    under one must stay current under the other."""
    import ast

    from workbench.kernels.autotune import code_hash

    source = "class A:\n    def f(self, x):\n        return [x, f'{x!r:>4}']\n"
    plain = code_hash(source)
    parse = ast.parse

    def with_new_fields(text, *args, **kwargs):
        tree = parse(text, *args, **kwargs)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                node._fields = (*node._fields, "type_params") if "type_params" not in node._fields else node._fields
                node.type_params = []
        return tree

    monkeypatch.setattr(ast, "parse", with_new_fields)
    assert code_hash(source) == plain


def test_interrupted_tuning_resumes(program, tmp_path):
    path = tmp_path / "timings.json"
    with pytest.raises(KeyboardInterrupt):
        autotune(program, steps(program), TimingCache.open(path), timer=PlantedTimer(stop_after=30), progress=False)
    done = json.loads(path.read_text())["entries"]
    assert 0 < len(done)
    timer = PlantedTimer()
    autotune(program, steps(program), TimingCache.open(path), timer=timer, progress=False)
    total = json.loads(path.read_text())["entries"]
    assert timer.calls == measurements(e for k, e in total.items() if k not in done)


def test_a_failing_config_is_recorded_and_never_chosen(program, tmp_path):
    from workbench.kernels.registry import REGISTRY

    last = REGISTRY.get("workbench.silu_mul").tactics["triton"].configs[-1]
    cache = TimingCache.open(tmp_path / "t.json")
    choices = autotune(program, steps(program), cache, timer=PlantedTimer(fail=("workbench.silu_mul", last)),
                       progress=False)
    silu = [n.name for n in program.graph.nodes if n.op == "workbench.silu_mul"]
    assert all(choices[n][1] != last for n in silu)
    errors = [t for e in cache.entries.values() for t in e["timings"] if "error" in t]
    assert errors and all("out of shared memory" in t["error"] for t in errors)


def test_cache_from_another_machine_is_refused(tmp_path):
    path = tmp_path / "timings.json"
    cache = TimingCache.open(path)
    cache.env = {**cache.env, "gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132}
    cache.save()
    with pytest.raises(WorkbenchError, match="measured elsewhere.*gpu: NVIDIA H100 80GB HBM3 here cpu"):
        TimingCache.open(path)
    assert TimingCache.open(path, reset=True).entries == {}
    path.write_text("{")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        TimingCache.open(path)


def test_views_of_a_cache_measured_on_an_h100():
    """A real timing cache from the H100 (bench/passes.py --autotune, llama-3-8b) is viewable anywhere,
    but never reused for choices here."""
    from pathlib import Path

    from workbench.profiling.views import op_share_figure, tactic_comparison_figure

    path = Path(__file__).parent / "data" / "h100_llama3_8b_tune.json"
    with pytest.raises(WorkbenchError, match="measured elsewhere"):
        TimingCache.open(path)
    cache = TimingCache.view(path)
    assert cache.env["gpu"] == "NVIDIA H100 80GB HBM3"
    table = cache.table()
    assert table["chosen"].sum() == len(cache.entries) == 44  # 11 op instances at each of 4 buckets
    assert set(cache.ceilings) == {"copy_gbps", "matmul_tflops"}
    fig = tactic_comparison_figure(table)
    assert sum(len(t.x) for t in fig.data) == len(table)
    chosen_bars = sum(w == 3 for t in fig.data for w in t.marker.line.width)
    assert chosen_bars == 44
    tree = op_share_figure(table)
    values = dict(zip(tree.data[0].ids, tree.data[0].values))
    best = table[table["chosen"]]
    for op, total in best.groupby("op")["ms"].sum().items():
        assert values[op] == pytest.approx(total)


def test_profile_buckets_and_their_steps():
    from workbench.kernels.profiles import OptimizationProfile, Step

    p = OptimizationProfile()
    assert p.edges == (1, 4, 16, 64, 256, 1024, 2048)
    assert p.step(16) == Step(seqs=16, new=1, context=1024)   # decode: one token for each of 16 sequences
    # above max_seqs, in-flight batching's steady state: the running decodes beside prompt chunks
    assert p.step(1024) == Step(seqs=2, new=480, context=0, decodes=64, decode_context=1024)
    assert p.step(2048).tokens == 2048 and p.step(256) == Step(1, 192, 0, 64, 1024)
    assert OptimizationProfile(context=0).step(1024) == Step(seqs=2, new=512, context=0)  # no context: prefill
    assert [p.bucket(t) for t in (1, 2, 4, 5, 2048)] == [0, 1, 1, 2, 6]
    with pytest.raises(WorkbenchError, match="beyond this profile's max_tokens"):
        p.bucket(2049)
    assert OptimizationProfile.from_json(p.to_json()) == p
    assert OptimizationProfile(max_tokens=100, prefill_len=48).step(100) == Step(2, 25, 0, 50, 1024)
    assert OptimizationProfile(max_tokens=100, prefill_len=48, context=0).step(100) == Step(seqs=4, new=25, context=0)
    with pytest.raises(WorkbenchError, match="last bucket edge"):
        OptimizationProfile(max_tokens=64, edges=(1, 16))
    with pytest.raises(WorkbenchError, match="context 5000 must lie"):
        OptimizationProfile(context=5000)
    with pytest.raises(WorkbenchError, match="not an optimization profile.*fields are"):
        OptimizationProfile.from_json({"tokens": 3})


TINY_PROFILE = dict(max_tokens=24, max_seqs=2, context=5, max_context=16, prefill_len=12, edges=(2, 24))


def test_mixed_representative_step_inputs(program):
    """A prompt bucket's step: the decodes (one token after ``context`` cached) first, then the prompt chunks."""
    from workbench.kernels.autotune import step_inputs
    from workbench.kernels.profiles import OptimizationProfile, Step

    step = OptimizationProfile(**TINY_PROFILE).step(24)
    assert step == Step(seqs=2, new=11, context=0, decodes=2, decode_context=5)
    inputs = step_inputs(program, step)
    assert inputs["seq_lens"].tolist() == [6, 6, 11, 11]
    assert inputs["query_start_loc"].tolist() == [0, 1, 2, 13, 24]
    assert inputs["position_ids"][0, :3].tolist() == [5, 5, 0] and inputs["input_ids"].shape == (1, 24)
    assert len(set(inputs["slot_mapping"].tolist())) == 24  # every new token has a slot of its own


def test_each_bucket_runs_its_own_choices(program, monkeypatch, tmp_path):
    """Decode steps (<= 2 tokens) tuned to the references, prefill steps to the Triton kernels:
    a step runs the choices of its bucket, and both give the reference's tokens."""
    from workbench.kernels.autotune import TunedChoices, step_inputs
    from workbench.kernels.profiles import OptimizationProfile
    from workbench.kernels.registry import REGISTRY

    profile = OptimizationProfile(**TINY_PROFILE)

    class ReferenceWins(PlantedTimer):
        def __call__(self, call, op, tactic, config):
            return super().__call__(call, op, tactic, config) * (0.1 if tactic == "reference" else 1)

    decode = autotune(program, [step_inputs(program, profile.step(2))], TimingCache.open(tmp_path / "a.json"),
                      timer=ReferenceWins(), progress=False)
    prefill = autotune(program, [step_inputs(program, profile.step(24))], TimingCache.open(tmp_path / "b.json"),
                       timer=PlantedTimer(), progress=False)
    # the reference wins every decode timing; the paged attention's reads the host (not CUDA-graph safe), so
    # its Triton kernel is chosen all the same
    attn = {n for n in decode if program.graph.node(n).op == "workbench.paged_attention"}
    assert attn and {decode[n][0] for n in attn} == {"triton"}
    assert {t for n, (t, _) in decode.items() if n not in attn} == {"reference"}
    assert {t for t, _ in prefill.values()} == {"triton"}
    calls = []
    for op in tactic_ops():
        fn = REGISTRY.get(op).tactics["triton"]

        def counted(*a, fn=fn, **k):
            calls.append(fn)
            return fn(*a, **k)

        counted.configs = fn.configs
        monkeypatch.setitem(REGISTRY.get(op).tactics, "triton", counted)
    tuned = program.with_choices(TunedChoices([2, 24], [decode, prefill]))
    prompt = torch.tensor([5, 9, 11, 2, 30, 7, 1, 8, 13, 4, 21, 3])  # 12-token prefill, then 1-token decode steps
    from workbench.graph.paged import cache_for

    cache = cache_for(program.graph, num_blocks=8)
    tuned.run(**cache.step_inputs([(0, prompt.tolist())]))
    assert len(calls) == len(prefill)  # every tuned node ran its Triton choice once
    calls.clear()
    tuned.run(**cache.step_inputs([(0, [7])]))
    assert len(calls) == len(attn)  # the decode bucket runs the references, and the attention kernel
    assert paged_greedy(tuned, prompt, 3) == paged_greedy(program, prompt, 3)  # the prefill bucket, then decode's
    with pytest.raises(WorkbenchError, match="beyond the tuned profile"):
        tuned.run(**cache_for(program.graph, num_blocks=8).step_inputs([(0, list(range(25)))]))


def test_tune_stage_persists_resumes_and_runs(optimized_ws):
    """`workbench tune` as a stage: the timing cache and the per-bucket choices are artifacts; an
    interrupted tune resumes from the cache; the tuned program decodes like the optimized one."""
    from workbench.kernels.autotune import TunedChoices
    from workbench.kernels.profiles import OptimizationProfile
    from workbench.pipeline import load_program, passes_stage, tune_stage

    ws = optimized_ws
    profile = OptimizationProfile(**TINY_PROFILE)
    with pytest.raises(KeyboardInterrupt):
        tune_stage(ws, profile, device="cpu", timer=PlantedTimer(stop_after=20), progress=False)
    assert ws.status("tune") == "missing"  # no record for an unfinished tune; its timings are kept
    partial = json.loads(ws.path("tune", "timings.json").read_text())["entries"]
    timer = PlantedTimer()
    tuned = tune_stage(ws, profile, device="cpu", timer=timer, progress=False)
    entries = json.loads(ws.path("tune", "timings.json").read_text())["entries"]
    assert timer.calls == measurements(e for k, e in entries.items() if k not in partial)
    assert ws.status("tune") == "ok" and set(ws.record("tune")["artifacts"]) == {"timings.json", "choices.json"}
    assert ws.record("tune")["params"]["profile"] == profile.to_json()
    saved = TunedChoices.from_json(ws.read_json("tune", "choices.json"))
    assert saved == tuned and saved.edges == [2, 24]
    # the two buckets were tuned at their own shapes: decode keys see 2 tokens, prefill keys 24
    q_tokens = {json.loads(k)[1][0][0][2] for k, e in entries.items() if e["op"] == "workbench.paged_attention"}
    assert q_tokens == {2, 24}
    again = tune_stage(ws, profile, device="cpu", timer=PlantedTimer(stop_after=0), progress=False)
    assert again == tuned  # everything came from the cache
    prompt = torch.tensor([5, 9, 11, 2, 30])
    fast, plain = load_program(ws, stage="tune"), load_program(ws, stage="passes")
    assert fast.tuned == tuned
    assert paged_greedy(fast, prompt, 3) == paged_greedy(plain, prompt, 3)  # the prefill bucket, then decode's
    passes_stage(ws, force=True, names=["eliminate_noops", "insert_paged_attention"])
    assert ws.status("tune") == "stale"  # a different optimized graph: the choices no longer apply


def test_rotations_copy_small_tensors_past_l2():
    from workbench.kernels.autotune import rotations

    big = torch.randn(64, 64)                       # 16 KB: "larger than L2" below, shared by every copy
    fused = torch.randn(8, 32)
    gate, up = fused[:, :16], fused[:, 16:]         # strided slices of one buffer, as after horizontal fusion
    variants = rotations((gate, up, big), {"w": torch.randn(16), "eps": 1e-6}, l2_bytes=4096)
    small_bytes = 2 * fused.nbytes + 16 * 4         # each slice's storage is the whole fused buffer
    assert len(variants) == -(-2 * 4096 // small_bytes)  # copies until they fill twice the L2 size
    first = variants[0]
    for args, kwargs in variants[1:]:
        assert args[2] is big and kwargs["eps"] == 1e-6
        for new, old in ((args[0], gate), (args[1], up), (kwargs["w"], first[1]["w"])):
            assert torch.equal(new, old) and new.stride() == old.stride() and new.data_ptr() != old.data_ptr()
    assert len({a[0].data_ptr() for a, _ in variants}) == len(variants)
    assert rotations((gate,), {}, l2_bytes=None) == [((gate,), {})]  # CPU: no copies
    assert len(rotations((gate,), {}, l2_bytes=1 << 30, most=5)) == 5


def test_top_k_times_only_the_best_ranked_gemm_configs(program, tmp_path):
    """With a cost model (the GEMM tactic's ``rank``), ``top_k`` cuts what is timed per tactic;
    tactics without one keep their whole pruned space."""
    from workbench.kernels.registry import REGISTRY

    cache = TimingCache.open(tmp_path / "t.json")
    autotune(program, steps(program)[1:], cache, timer=PlantedTimer(), progress=False, top_k=2)
    for key, entry in cache.entries.items():
        op, args = entry["op"], json.loads(key)[1]
        fn = REGISTRY.get(op).tactics["triton"]
        triton_timed = [t["config"] for t in entry["timings"] if t["tactic"] == "triton"]
        if op == "aten.linear.default":
            assert len(triton_timed) == 2
            x, w = (torch.empty(a[0], dtype=getattr(torch, a[1])) for a in args[:2])
            assert triton_timed == fn.rank(fn.prune(fn.configs, (x, w), {}), (x, w), {})[:2]
        else:
            assert len(triton_timed) > 2


def test_near_ties_are_timed_again_and_ranked_by_their_median():
    """One noisy measurement must not pick the slower of two near-equal candidates: those within 5% of the
    fastest are re-measured (interleaved) and ranked by their median; clear losers are not re-timed."""
    from workbench.kernels.autotune import refine

    truth = {"a": 1.00, "b": 1.02, "c": 1.50}
    first = {"a": 1.06, "b": 1.02, "c": 1.50}  # a's first measurement was unlucky
    timings = [{"tactic": k, "config": None, "ms": first[k]} for k in truth]
    order = []

    def measure(t):
        order.append(t["tactic"])
        return truth[t["tactic"]]

    refine(timings, measure)
    assert order == ["a", "b", "a", "b"]  # interleaved, c never re-timed
    by = {t["tactic"]: t for t in timings}
    assert by["a"]["samples"] == [1.06, 1.00, 1.00] and by["a"]["ms"] == 1.00
    assert by["b"]["ms"] == 1.02 and "samples" not in by["c"]
    assert min(timings, key=lambda t: t["ms"])["tactic"] == "a"
    failing = [{"tactic": "x", "config": None, "ms": 1.0}, {"tactic": "y", "config": None, "ms": 1.01}]
    refine(failing, lambda t: 1 / 0 if t["tactic"] == "x" else 1.01)
    assert failing[0]["samples"] == [1.0, float("inf"), float("inf")] and failing[0]["ms"] == float("inf")
