"""Compiling a tuning's candidates side by side before they are timed (``kernels/precompile.py``): every candidate
about to be timed is called once from a pool of threads, one key per work, failures left to the timing; what is
timed and chosen does not change. The pool itself runs here on CPU functions (a GPU is where it compiles)."""

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
    assert "compiled 6 candidates on 3 threads" in stats.line() and "1 failed" in stats.line()
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
    timed = [e for e in cache.entries.values() if "same_work_as" not in e]
    # every candidate but the reference of each work timed, each once: (fn, args, kwargs, config)
    assert len(calls) == sum(len(e["timings"]) - 1 for e in timed)
    assert len({(id(fn), id(args), repr(config)) for fn, args, _, config in calls}) == len(calls)
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
    """Before capturing, the executor runs each graph's padding-only step of at most WARM_UP_TOKENS tokens once from
    the pool (on a GPU their kernels compile in parallel); those steps write the scratch block alone, so the
    cache's blocks keep every value, and larger graphs are left to their captures."""
    from workbench.runtime.executor import WARM_UP_TOKENS, Executor

    ex = Executor(program, 8, graph_token_sizes=(64, 1024), max_seqs=4)
    g = torch.Generator().manual_seed(0)
    for t in ex.cache.values():
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    before = {k: t[:, :8].clone() for k, t in ex.cache.items()}  # [K/V, block, ...]: all but the scratch block (8)
    scratch = {k: t[:, 8].clone() for k, t in ex.cache.items()}
    ran, lock = [], threading.Lock()
    real = Executor._warm_run

    def record(self, key):
        with lock:
            ran.append((key, threading.current_thread().name))
        real(self, key)

    monkeypatch.setattr(Executor, "_warm_run", record)
    keys = [(1, 1), (4, 4), (64, 4), (1024, 4)]
    done = ex.warm_up(keys, threads=2)
    assert sorted(k for k, _ in ran) == sorted(k for k in keys if k[0] <= WARM_UP_TOKENS) and done.failed == 0
    assert all(name.startswith("wb-compile") for _, name in ran)
    for k, t in ex.cache.items():
        assert torch.equal(t[:, :8], before[k]), k
        assert not torch.equal(t[:, 8], scratch[k]), k  # the steps ran, writing their K/V there
    assert ex.warm_up(keys, threads=1) is None


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
