"""Compiling a tuning's candidates side by side before they are timed (``kernels/precompile.py``): every candidate
about to be timed is called once from a pool of threads, one key per work, failures left to the timing; what is
timed and chosen does not change. The pool itself runs here on CPU functions (a GPU is where it compiles)."""

import json
import threading

import pytest
import torch

from test_autotune import PlantedTimer, steps
from workbench.errors import WorkbenchError
from workbench.kernels import autotune as A
from workbench.kernels.precompile import compile_threads, precompile


def test_each_call_runs_once_from_the_pool_and_failures_are_counted():
    ran, lock = [], threading.Lock()

    def fn(x, *, scale=1, config=None):
        with lock:
            ran.append((x, scale, config, threading.current_thread().name))
        if x == 3:
            raise RuntimeError("out of resources")
        return x * scale

    calls = [(fn, (x,), {"scale": 2}, {"BLOCK": x} if x % 2 else None) for x in range(6)]
    stats = precompile(calls, device="cpu", threads=3, progress=False)
    assert sorted((x, s, c) for x, s, c, _ in ran) == [(x, 2, {"BLOCK": x} if x % 2 else None) for x in range(6)]
    assert all(name.startswith("wb-compile") for *_, name in ran)
    assert (stats.calls, stats.failed, stats.threads) == (6, 1, 3)
    assert "compiled 6 calls on 3 threads" in stats.line() and "1 failed" in stats.line()
    assert precompile(calls, device="cpu", threads=1, progress=False) is None  # one thread: nothing to gain
    assert precompile([], device="cpu", threads=4, progress=False) is None


def test_the_thread_count_comes_from_the_environment_or_the_cores(monkeypatch):
    monkeypatch.setenv("WORKBENCH_COMPILE_THREADS", "3")
    assert compile_threads() == 3
    monkeypatch.setenv("WORKBENCH_COMPILE_THREADS", "many")
    with pytest.raises(WorkbenchError, match="WORKBENCH_COMPILE_THREADS='many' is not a whole number"):
        compile_threads()
    monkeypatch.delenv("WORKBENCH_COMPILE_THREADS")
    assert 1 <= compile_threads() <= 16


@pytest.fixture
def spy(monkeypatch):
    seen = []

    def fake(calls, *, device, progress):
        seen.append(list(calls))
        return None

    monkeypatch.setattr(A, "precompile_calls", fake)
    return seen


def test_the_tuning_compiles_every_candidate_it_will_time_once_per_work(program, tmp_path, spy):
    cache = A.TimingCache.open(tmp_path / "t.json")
    A._time_steps(program, steps(program), cache, timer=PlantedTimer(), progress=False, precompile=True)
    (calls,) = spy
    from workbench.kernels.registry import REGISTRY

    names = {id(fn): (op, tactic) for op in REGISTRY.names() for tactic, fn in REGISTRY.get(op).tactics.items()}
    made = [(*names[id(fn)], json.dumps(config, sort_keys=True), A._dtypes(args)) for fn, args, _, config in calls]
    # one call per tactic, config and argument dtypes (the same kernels at other shapes), none for the reference
    assert len(set(made)) == len(made) and len(made) > 10
    # and every (tactic, config) that is timed was called
    timed = {(e["op"], t["tactic"], json.dumps(t["config"], sort_keys=True)) for e in cache.entries.values()
             for t in e["timings"] if t["tactic"] != "reference"}
    assert timed == {m[:3] for m in made}
    # a second tuning over the same cache times nothing, so it compiles nothing
    A._time_steps(program, steps(program), cache, timer=PlantedTimer(stop_after=0), progress=False, precompile=True)
    assert spy[1] == []


def test_on_the_cpu_the_tuning_compiles_nothing_ahead_and_chooses_the_same(program, tmp_path, spy):
    plain = A.autotune(program, steps(program), A.TimingCache.open(tmp_path / "a.json"), timer=PlantedTimer(),
                       progress=False)
    assert spy == []  # default: only on a GPU
    keys = A._time_steps(program, steps(program), A.TimingCache.open(tmp_path / "b.json"), timer=PlantedTimer(),
                         progress=False, precompile=True)
    assert A._choose(program, keys, A.TimingCache.open(tmp_path / "b.json")) == plain


def test_an_engine_warms_up_its_small_graphs_side_by_side_and_touches_only_the_scratch_block(program, monkeypatch):
    """Before capturing, the executor runs each graph's padding-only step of at most WARM_UP_TOKENS tokens once: the
    smallest alone on the calling thread, the others from the pool (on a GPU their kernels compile in parallel),
    never more tokens in flight than the largest graph's. Those steps write the scratch block alone, so the cache's
    blocks keep every value; larger graphs are left to their captures."""
    from workbench.runtime.executor import WARM_UP_TOKENS, Executor

    ex = Executor(program, 8, graph_token_sizes=(64, 1024), max_seqs=4)
    g = torch.Generator().manual_seed(0)
    for t in ex.cache.values():
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    before = {k: t[:, :8].clone() for k, t in ex.cache.items()}  # [K/V, block, ...]: all but the scratch block (8)
    scratch = {k: t[:, 8].clone() for k, t in ex.cache.items()}
    ran, lock, flight = [], threading.Lock(), [0, 0]  # tokens in flight now, most at once
    real = Executor._warm_run

    def record(self, key):
        with lock:
            ran.append((key, threading.current_thread().name))
            flight[0] += max(key)
            flight[1] = max(flight)
        real(self, key)
        with lock:
            flight[0] -= max(key)

    monkeypatch.setattr(Executor, "_warm_run", record)
    keys = [(64, 4), (1, 1), (48, 48), (32, 32), (4, 4), (1024, 4)]
    done = ex.warm_up(keys, threads=3, max_tokens=64)
    assert sorted(k for k, _ in ran) == sorted(k for k in keys if k[0] <= 64) and done.failed == 0
    assert ran[0] == ((1, 1), threading.current_thread().name)  # the smallest first, here
    assert all(name.startswith("wb-compile") for _, name in ran[1:])
    assert flight[1] <= 1024
    for k, t in ex.cache.items():
        assert torch.equal(t[:, :8], before[k]), k
        assert not torch.equal(t[:, 8], scratch[k]), k  # the steps ran, writing their K/V there
    # the largest key bounds the tokens in flight: at most 64 here, so the 48- and 32-token steps never overlap
    ran.clear()
    flight[:] = [0, 0]
    ex.warm_up([k for k in keys if k[0] <= 64], threads=3, max_tokens=64)
    assert flight[1] <= 64 and len(ran) == 5
    assert ex.warm_up(keys, threads=1) is None
    ex.tensor_parallel = object()  # rank 0 of a sharded program: its steps pair up with the other ranks'
    assert ex.warm_up(keys, threads=3) is None


def test_capture_warms_up_first_on_a_gpu(program, monkeypatch):
    from workbench.runtime.executor import Executor

    ex = Executor(program, 8, graph_token_sizes=(64,), max_seqs=4)
    order = []
    monkeypatch.setattr(ex, "warm_up", lambda keys, progress=False: order.append(("warm_up", sorted(keys))))
    monkeypatch.setattr(ex, "_capture_here", lambda key: order.append(("capture", key)))
    ex.capture([1, 2], [64])
    assert order == [("capture", (64, 4)), ("capture", (2, 2)), ("capture", (1, 1))]  # CPU: no warm-up
    order.clear()
    ex.cuda_graphs = True  # as on a GPU
    ex.capture([1, 2], [64])
    assert order == [("warm_up", [(1, 1), (2, 2), (64, 4)]), ("capture", (64, 4)), ("capture", (2, 2)),
                     ("capture", (1, 1))]


def test_each_thread_runs_on_the_callers_gpu(monkeypatch):
    """A pool thread starts on device 0: it is moved to the device given, or for "cuda" alone (what
    device="auto" resolves to) to the caller's current device, never handed an index-less device."""
    moved, lock = [], threading.Lock()

    def set_device(index):
        assert isinstance(index, int)
        with lock:
            moved.append(index)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = [(lambda: None, (), {}, None)] * 4
    assert precompile(calls, device="cuda", threads=2, progress=False).failed == 0 and moved == [1] * 4
    moved.clear()
    assert precompile(calls, device="cuda:3", threads=2, progress=False).failed == 0 and moved == [3] * 4
    # a fault the device reports only at the end is one line that says how to find the call behind it
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (_ for _ in ()).throw(
        RuntimeError("CUDA error: an illegal memory access was encountered")))
    with pytest.raises(WorkbenchError, match="WORKBENCH_COMPILE_THREADS=1 to run each call alone"):
        precompile(calls, device="cuda", threads=2, progress=False)


def test_each_call_runs_in_the_callers_modes_and_context():
    import contextvars

    var = contextvars.ContextVar("var", default="unset")
    seen = []

    def fn():
        seen.append((var.get(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    token = var.set("caller's")
    try:
        with torch.inference_mode():
            precompile([(fn, (), {}, None)] * 3, device="cpu", threads=2, progress=False)
        with torch.no_grad():
            precompile([(fn, (), {}, None)] * 3, device="cpu", threads=2, progress=False)
    finally:
        var.reset(token)
    assert seen == [("caller's", False, True)] * 3 + [("caller's", False, False)] * 3
