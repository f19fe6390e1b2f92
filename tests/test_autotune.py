"""The autotuner: every candidate timed once per distinct op instance, every timing kept, choices used,
the cache reused, resumed after an interruption, and refused on another machine. Kernels run under
the Triton interpreter; timings are planted by the test's timer (CPU timings of the interpreter mean
nothing), while every candidate still really runs."""

import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.graph.executor import Program, resolve_params
from workbench.graph.passes import run_passes
from workbench.kernels.autotune import TimingCache, autotune, tactic_ops
from workbench.models import load_model
from workbench.pipeline import capture_source, graph_weights
from workbench.runtime.paged_cache import cache_for, paged_greedy


@pytest.fixture(scope="module")
def program():
    lm = load_model("tiny-llama")
    captured = capture_source(lm.source)
    base = {**graph_weights(captured.graph, lm.source), **captured.constants}
    graph, _ = run_passes(captured.graph, base, check=False)
    return Program(graph, resolve_params(graph, base))


def steps(program):
    """Two profiles: a prefill of two prompts, then a decode step of both."""
    cache = cache_for(program.graph, num_blocks=8)
    prefill = cache.step_inputs([(0, list(range(3, 15))), (1, list(range(40, 49)))])
    decode = cache.step_inputs([(0, [7]), (1, [8])])
    return [prefill, decode]


class PlantedTimer:
    """Runs every candidate once; the reference takes 1 ms, a tactic's configs 0.5 ms minus 0.01 per position,
    so the last config of each space must win. Optionally fails one config, or stops after n calls."""

    def __init__(self, fail=None, stop_after=None):
        self.calls, self.fail, self.stop_after = 0, fail, stop_after

    def __call__(self, call, op, tactic, config):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
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
    timer = PlantedTimer()
    choices = autotune(program, steps(program), cache, timer=timer, progress=False)
    tunable = [n for n in program.graph.nodes if n.op in tactic_ops()]
    assert set(choices) == {n.name for n in tunable}
    from workbench.kernels.registry import REGISTRY

    for n in tunable:
        tactic, config = choices[n.name]
        assert tactic == "triton" and config == REGISTRY.get(n.op).tactics["triton"].configs[-1]
    # identical layers and heads share keys: far fewer entries than node instances
    saved = json.loads((tmp_path / "timings.json").read_text())
    assert saved["env"]["gpu"] == "cpu" and len(saved["entries"]) < len(tunable)
    assert timer.calls == sum(len(e["timings"]) for e in saved["entries"].values())
    for entry in saved["entries"].values():  # every candidate's timing is kept, not only the winner
        assert len(entry["timings"]) == 1 + len(REGISTRY.get(entry["op"]).tactics["triton"].configs)
    table = TimingCache.open(tmp_path / "timings.json").table()
    assert table["chosen"].sum() == len(saved["entries"])
    # a second run times nothing and chooses the same
    again = autotune(program, steps(program), TimingCache.open(tmp_path / "timings.json"),
                     timer=PlantedTimer(stop_after=0), progress=False)
    assert again == choices
    # the tuned program decodes exactly like the reference one
    prompt = torch.tensor([5, 9, 11, 2, 30])
    assert paged_greedy(program.with_choices(choices), prompt, 12) == paged_greedy(program, prompt, 12)


def test_interrupted_tuning_resumes(program, tmp_path):
    path = tmp_path / "timings.json"
    with pytest.raises(KeyboardInterrupt):
        autotune(program, steps(program), TimingCache.open(path), timer=PlantedTimer(stop_after=9), progress=False)
    done = json.loads(path.read_text())["entries"]
    assert 0 < len(done)
    timer = PlantedTimer()
    autotune(program, steps(program), TimingCache.open(path), timer=timer, progress=False)
    total = json.loads(path.read_text())["entries"]
    assert timer.calls == sum(len(e["timings"]) for k, e in total.items() if k not in done)


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

    path = Path(__file__).parent / "data" / "h100_llama3_8b_timings.json"
    with pytest.raises(WorkbenchError, match="measured elsewhere"):
        TimingCache.open(path)
    cache = TimingCache.view(path)
    assert cache.env["gpu"] == "NVIDIA H100 80GB HBM3"
    table = cache.table()
    assert table["chosen"].sum() == len(cache.entries) == 12
    fig = tactic_comparison_figure(table)
    assert sum(len(t.x) for t in fig.data) == len(table)
    chosen_bars = sum(w == 3 for t in fig.data for w in t.marker.line.width)
    assert chosen_bars == 12
    tree = op_share_figure(table)
    values = dict(zip(tree.data[0].ids, tree.data[0].values))
    best = table[table["chosen"]]
    for op, total in best.groupby("op")["ms"].sum().items():
        assert values[op] == pytest.approx(total)
