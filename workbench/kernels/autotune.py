"""Kernel autotuning: time every tactic and config per op instance and shape, keep every timing.

    cache = TimingCache.open(ws_dir / "timings.json")       # refuses a cache from another GPU or library version
    tuned = autotune_profile(program, OptimizationProfile(), cache)   # per token bucket (kernels/profiles.py)
    fast = program.with_choices(tuned)                       # each step runs its bucket's choices
    choices = autotune(program, steps, cache)                # or: node -> (tactic, config) for given steps
    cache.linear_times("workbench.fp8_linear")               # LinearShape(tokens, n, k, input_scale) -> best ms

How it works:
  1. each example step runs once through the program, recording the arguments each node
     whose op has tactics receives (their shapes and dtypes make the key);
  2. for every distinct key (op, argument shapes and dtypes: identical layers are tuned once;
     keys that differ only in float scalars, such as per-layer FP8 scales, share one timing)
     the reference and every tactic × config (the kernel module's ``CONFIGS``) that the tactic's
     ``prune`` keeps (resources, shape; with ``top_k``, the best of its cost model's ``rank``) are
     timed on those very arguments: on a GPU as CUDA-graph replays (kernel time, no launch
     overhead), cycling through copies of the arguments that together exceed the L2 cache; on a GPU
     the candidates about to be timed are first called once from a pool of threads, so that their
     Triton kernels compile on every core (``precompile.py``), then timed one at a time;
  3. every timing goes into the cache, which is written atomically after each key, so an
     interrupted run resumes where it stopped and a second run times nothing (unless the tuning
     spaces grew since, or a tactic's code changed: each timing records its tactic's ``tactic_version``,
     and an entry that lacks a timing of a candidate offered now, at its current version, is timed afresh);
  4. candidates within ``CLOSE_CALL`` (5%) of the fastest are timed ``RETIMES`` more times,
     interleaved, and ranked by the median of their measurements: one measurement's noise
     (a few percent on a GPU) must not pick the slower of two near-equal candidates;
  5. each node gets the fastest candidate for its key that a CUDA graph may capture (``OpDef.is_graph_safe``:
     the runtime replays its steps as graphs, so an unsafe candidate is timed and kept, never chosen).

The cache file records the environment it was measured in (GPU name and SM count, CUDA,
torch and triton versions) and the copy and GEMM ceilings measured there (for rooflines).
Opening it elsewhere raises a clear error instead of reusing timings that do not apply;
``TimingCache.open(path, reset=True)`` starts afresh, ``TimingCache.view(path)`` only looks.

Keys are ``instance_key`` strings (one rank's graph of a tensor-parallel engine: with its size, so per-rank timings
never stand in for one-GPU ones); only this module writes or reads them (``read_key``): callers ask the cache
(``best``, ``table``, ``linear_times``: the best time of a linear op at each shape) instead of parsing keys.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import inspect
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..env import atomic_write, environment_key
from ..errors import WorkbenchError
from ..progress import progress_bar
from ..profiling.ceilings import copy_gbps, matmul_tflops
from ..profiling.timing import time_fn
from .precompile import precompile as precompile_calls
from .registry import REFERENCE, REGISTRY

CACHE_VERSION = 1


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return [list(v.shape), str(v.dtype).removeprefix("torch.")]
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v]
    return v if isinstance(v, (int, float, bool, str, type(None))) else repr(v)


def instance_key(op: str, args: tuple, kwargs: Mapping[str, Any], tensor_parallel_size: int = 1) -> str:
    """Op and its arguments' shapes, dtypes and scalar values: equal keys run identical work. An instance of one
    rank's graph of ``tensor_parallel_size`` N > 1 carries N: a per-rank timing is measured on a GPU whose
    neighbours run the other ranks (and the collectives' kernels share its SMs), so it is kept apart from a
    one-GPU timing of the same shapes, and one cache holds the tunings of several sizes side by side."""
    key = [op, _describe(list(args)), {k: _describe(v) for k, v in sorted(kwargs.items())}]
    if tensor_parallel_size != 1:
        key.append({"tensor_parallel_size": tensor_parallel_size})
    return json.dumps(key)


def read_key(key: str) -> tuple[str, list, dict[str, Any]]:
    """An ``instance_key`` read back: (op, its arguments, its keyword arguments) as described there (a tensor
    as [shape, dtype name], lists as lists, other values as themselves or their repr)."""
    op, args, kwargs = json.loads(key)[:3]
    return op, args, kwargs


def key_tensor_parallel_size(key: str) -> int:
    """The tensor-parallel size an ``instance_key`` was made for (1: a whole graph's)."""
    rest = json.loads(key)[3:]
    return int(rest[0].get("tensor_parallel_size", 1)) if rest and isinstance(rest[0], dict) else 1


#: linear ops whose fourth argument is a static activation scale (None: scaled per token when run)
INPUT_SCALED = ("workbench.fp8_linear", "workbench.int8_linear")


@dataclass(frozen=True)
class LinearShape:
    """The work of one linear call: x [..., K] times weight [N, K]; ``tokens`` (M) is the product of x's leading
    dims. ``input_scale``: for the ops of ``INPUT_SCALED``, whether a static activation scale was given; None
    for the others."""

    tokens: int
    n: int
    k: int
    input_scale: bool | None = None

    @classmethod
    def of_key(cls, key: str) -> "LinearShape | None":
        """The shape of a linear op's ``instance_key`` (x first, the weight second); None for another op's."""
        return _linear_shape(key)


@functools.lru_cache(maxsize=4096)  # keys repeat across calls (one per group and format of a sensitivity sweep)
def _linear_shape(key: str) -> LinearShape | None:
    try:
        op, args, _ = read_key(key)
        (x_shape, _), (w_shape, _) = args[0], args[1]
        n, k = (int(d) for d in w_shape)
        if int(x_shape[-1]) != k:
            return None
        tokens = math.prod(int(d) for d in x_shape[:-1])
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    scaled = (len(args) > 3 and args[3] is not None) if op in INPUT_SCALED else None
    return LinearShape(tokens, n, k, scaled)


def _floats_masked(v: Any) -> Any:
    if isinstance(v, float):
        return "float"
    if isinstance(v, list):
        return [_floats_masked(x) for x in v]
    if isinstance(v, dict):
        return {k: _floats_masked(x) for k, x in v.items()}
    return v


def work_key(key: str) -> str:
    """``key`` with its float scalars masked: instances that differ only in such values (an epsilon, a
    softmax scale, the per-layer FP8 KV-cache scales) launch the same kernels on the same shapes, so one
    timing serves them all (the 32 layers of an FP8 graph are then tuned once, not 32 times)."""
    return json.dumps(_floats_masked(json.loads(key)))


@dataclass
class TimingCache:
    path: Path
    env: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the hardware ceilings rooflines are drawn against, measured once on the GPU the timings come
    #: from: {"copy_gbps": ..., "matmul_tflops": ...} (empty until a GPU tuning run measured them)
    ceilings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, *, reset: bool = False) -> "TimingCache":
        path, env = Path(path), environment_key()
        if reset or not path.is_file():
            return cls(path, env)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"timing cache {path} is not valid JSON ({e}); delete it or open with reset=True") from None
        if data.get("version") != CACHE_VERSION:
            raise WorkbenchError(f"timing cache {path} has version {data.get('version')!r}, this workbench writes "
                                 f"{CACHE_VERSION}; re-tune (reset=True)")
        if data.get("env") != env:
            diff = {k: (data.get("env", {}).get(k), env[k]) for k in env if data.get("env", {}).get(k) != env[k]}
            raise WorkbenchError(f"timing cache {path} was measured elsewhere ({', '.join(f'{k}: {a} here {b}' for k, (a, b) in diff.items())}); "
                                 "its timings do not apply here: re-tune (reset=True) or use a cache from this machine")
        return cls(path, env, data["entries"], data.get("ceilings", {}))

    @classmethod
    def view(cls, path: str | Path) -> "TimingCache":
        """Open any cache read-only, whatever machine measured it: for looking at timings, never for
        choosing (``autotune`` needs ``open``, which refuses timings from elsewhere)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise WorkbenchError(f"cannot read timing cache {path} ({e})") from None
        return cls(path, data.get("env", {}), data.get("entries", {}), data.get("ceilings", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"version": CACHE_VERSION, "env": self.env, "ceilings": self.ceilings,
                                            "entries": self.entries}, indent=1).encode())

    def best(self, key: str) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        return min(entry["timings"], key=lambda t: t["ms"]) if entry else None

    def linear_times(self, op: str) -> dict[LinearShape, float]:
        """Best time for linear op ``op`` at each shape it was timed at: the fastest finite timing of its
        instances of that ``LinearShape`` (instances that differ in anything else, such as x as [1, M, K] or
        [M, K], count as one). Shapes with no finite timing are left out."""
        best: dict[LinearShape, float] = {}
        for key, entry in self.entries.items():
            shape = _linear_shape(key)
            if shape is None or (entry["op"] if "op" in entry else read_key(key)[0]) != op:
                continue
            ms = [float(t["ms"]) for t in entry.get("timings", []) if math.isfinite(float(t.get("ms", math.inf)))]
            if ms:
                best[shape] = min(best.get(shape, math.inf), min(ms))
        return best

    def table(self):
        """Every timing as a DataFrame: op, key, tactic, config, ms, whether it was chosen."""
        import pandas as pd

        rows = []
        for key, entry in self.entries.items():
            best = self.best(key)
            for t in entry["timings"]:
                rows.append({"op": entry["op"], "key": key, "tactic": t["tactic"], "config": json.dumps(t["config"]),
                             "ms": t["ms"], "chosen": t is best})
        return pd.DataFrame(rows, columns=["op", "key", "tactic", "config", "ms", "chosen"])


def _dtypes(args: tuple) -> tuple:
    """The dtypes of ``args``' tensors, in order (None for anything else): what, besides a config, picks a kernel."""
    return tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args)


def _candidates(op: str, args: tuple, kwargs: Mapping[str, Any], top_k: int | None = None,
                batch_invariant: bool = False) -> list[tuple[str, dict | None, Callable]]:
    """The reference, then every tactic with every config of its tuning space (``fn.configs``) that
    its ``fn.prune(configs, args, kwargs)`` keeps for these arguments (configs that cannot fit or
    cannot pay off at this shape are never timed). With ``top_k``, a tactic with a cost model
    (``fn.rank(configs, args, kwargs)``, best first) has only its ``top_k`` best-ranked configs timed.
    ``batch_invariant``: also the invariant configs the batch-invariant mode may choose from at every bucket
    (``invariant.invariant_candidates``: e.g. tiles taller than M, attention reading every key from the cache)."""
    opdef = REGISTRY.get(op)
    out = [(REFERENCE, None, opdef.reference)]
    for name, fn in opdef.tactics.items():
        configs = getattr(fn, "configs", None)
        if not configs:
            out.append((name, None, fn))
            continue
        if hasattr(fn, "prune"):
            configs = fn.prune(configs, args, kwargs)
        if top_k and hasattr(fn, "rank"):
            configs = fn.rank(configs, args, kwargs)[:top_k]
        out += [(name, cfg, fn) for cfg in configs]
    if batch_invariant:
        from .invariant import invariant_candidates

        seen = {(n, json.dumps(c, sort_keys=True)) for n, c, _ in out}
        out += [c for c in invariant_candidates(opdef, args, kwargs) if (c[0], json.dumps(c[1], sort_keys=True))
                not in seen]
    return out


def code_hash(source: str) -> str:
    """A digest of Python source's code: docstrings, comments and layout left out, so that only an edit that can
    change what runs changes it. The same under every Python version that parses the source alike: the syntax
    tree is written out without the empty fields newer versions add (``ast.dump`` writes those: 3.12's
    ``type_params=[]``), so a cache tuned under one Python is current under another."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(_written_out(tree).encode()).hexdigest()[:16]


def _written_out(node: Any) -> str:
    if isinstance(node, ast.AST):
        fields = (f"{name}={_written_out(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != [] and name != "type_comment")
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return f"[{','.join(_written_out(v) for v in node)}]"
    return repr(node)


@functools.lru_cache(maxsize=None)
def _source_hash(path: str, mtime: float) -> str | None:  # keyed on the file's mtime: a reload is seen
    try:
        return code_hash(Path(path).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def tactic_version(fn: Callable) -> str | None:
    """What a tactic's timings depend on besides its arguments: the code of the module that defines it (its
    kernels, their launcher and tuning space; docstrings and comments aside), read from its file. A timing
    recorded at another version was measured on other code: the autotuner times that instance again. Per
    module, not per function: an edit to one GEMM kernel retimes every GEMM. None where there is no Python
    source (a builtin): such a tactic is never retimed for its code. (A file edited but not yet imported again
    reads as its new version.)"""
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = sys.modules.get(getattr(inspect.unwrap(fn), "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    try:
        return _source_hash(path, Path(path).stat().st_mtime)
    except OSError:
        return None


def _version(name: str, fn: Callable) -> str | None:
    """The version a timing of candidate ``name`` records: the tactic's (``tactic_version``); none for the
    reference, a baseline whose timing rarely decides (an edit to the reference ops would otherwise retime
    every instance of every op they serve)."""
    return None if name == REFERENCE else tactic_version(fn)


def _current(entry: dict) -> bool:
    """Whether every timing of a cache entry was measured on its tactic's current code (a tactic no longer
    registered counts as changed)."""
    opdef = REGISTRY.get(entry["op"])
    for t in entry["timings"]:
        fn = opdef.reference if t["tactic"] == REFERENCE else opdef.tactics.get(t["tactic"])
        if fn is None or t.get("version") != _version(t["tactic"], fn):
            return False
    return True


def _covers(entry: dict, candidates: list[tuple[str, dict | None, Callable]]) -> bool:
    """Whether a cache entry has a timing for every candidate (tactic and config) in ``candidates``, measured on
    the tactic's current code (``tactic_version``)."""
    timed = {(t["tactic"], json.dumps(t["config"], sort_keys=True), t.get("version")) for t in entry["timings"]}
    return all((name, json.dumps(config, sort_keys=True), _version(name, fn)) in timed
               for name, config, fn in candidates)


Timer = Callable[[Callable[[], Any], str, str, "dict | None"], float]


#: candidates within this fraction of the fastest are timed again (see ``refine``)
CLOSE_CALL = 0.05
#: how many more measurements each of them gets
RETIMES = 2


def refine(timings: list[dict], measure: Callable[[dict], float], *, within: float = CLOSE_CALL,
           rounds: int = RETIMES) -> None:
    """Settle near-ties: the timings (dicts with ``ms``) within ``within`` of the fastest are measured
    ``rounds`` more times by ``measure(timing)``, interleaved (round-robin, so drift hits all alike); each
    keeps its ``samples`` and its ``ms`` becomes their median. In place; a failed re-measurement is inf."""
    finite = [t for t in timings if math.isfinite(t["ms"])]
    if len(finite) < 2:
        return
    fastest = min(t["ms"] for t in finite)
    close = [t for t in finite if t["ms"] <= fastest * (1 + within)]
    if len(close) < 2:
        return
    for _ in range(rounds):
        for t in close:
            try:
                ms = float(measure(t))
            except Exception:  # noqa: BLE001 - it ran once already; a later failure still disqualifies it
                ms = math.inf
            t.setdefault("samples", [t["ms"]]).append(ms)
    for t in close:
        t["ms"] = statistics.median(t["samples"])


def autotune(program, steps: Iterable[Mapping[str, torch.Tensor]], cache: TimingCache, *,
             timer: Timer | None = None, progress: bool = True,
             top_k: int | None = None) -> dict[str, tuple[str, dict | None]]:
    """Tune every node of ``program`` whose op has tactics, on the argument shapes ``steps`` produce.

    Returns node name -> (tactic, config) of the fastest candidate. ``timer(call, op, tactic,
    config) -> ms`` defaults to ``profiling.time_fn`` on ``call`` (CUDA-graph replays on a GPU).
    ``top_k`` times only the best-ranked configs of tactics that have a cost model (``fn.rank``).
    An instance already in the cache is timed again only if it lacks a candidate that this call would time:
    a tactic or config added since (a new kernel), one that a larger ``top_k`` reaches, or one whose code has
    changed since its timing (``tactic_version``); then all of its candidates are timed afresh, in one process,
    as for a new instance.
    """
    return _choose(program, _time_steps(program, steps, cache, timer=timer, progress=progress, top_k=top_k), cache)


def _time_steps(program, steps: Iterable[Mapping[str, torch.Tensor]], cache: TimingCache, *,
                timer: Timer | None = None, progress: bool = True, top_k: int | None = None,
                batch_invariant: bool = False, precompile: bool | None = None) -> dict[str, set[str]]:
    """``autotune``'s timing: every candidate of every instance ``steps`` show, into ``cache``; returns node ->
    the keys of its instances. ``batch_invariant``: with the candidates of the batch-invariant mode.
    ``precompile`` (default: on a GPU): first call the candidates to be timed from a pool of threads, so that their
    kernels compile in parallel (``kernels/precompile.py``)."""
    def default_timer(call, op, tactic, config):
        # kernel time from CUDA-graph replays (launch overhead left out; what graph-replayed steps see),
        # over calls cycling through the argument copies
        return time_fn(call, warmup=2, repeats=10, device=program.device, graph_calls=max(10, call.variants)).median_ms

    timer = timer or default_timer
    if program.device.type == "cuda" and not cache.ceilings:
        cache.ceilings = {"copy_gbps": copy_gbps(program.device), "matmul_tflops": matmul_tflops(program.device)}
    l2_bytes = torch.cuda.get_device_properties(program.device).L2_cache_size if program.device.type == "cuda" else None
    ops = tactic_ops()
    tunable = {n.name for n in program.graph.nodes if n.op in ops}
    seen: dict[str, tuple[str, tuple, dict]] = {}  # key -> (op, args, kwargs) of its first instance
    node_keys: dict[str, set[str]] = {}

    tensor_parallel_size = program.graph.meta.get("tensor_parallel", {}).get("size", 1)

    def record(name, op, args, kwargs):
        key = instance_key(op, args, kwargs, tensor_parallel_size)
        node_keys.setdefault(name, set()).add(key)
        seen.setdefault(key, (op, args, kwargs))

    for step in steps:
        program.run(_observe=(tunable, record), **step)
    for key, (op, args, kwargs) in seen.items():  # a cached instance that lacks a candidate offered now is
        entry = cache.entries.get(key)           # timed afresh: a cache must not hide a new kernel for good
        if entry is not None and not _covers(entry, _candidates(op, args, kwargs, top_k, batch_invariant)):
            del cache.entries[key]
    todo = [k for k in seen if k not in cache.entries]
    timed = {}  # work key -> a cached key timed for that work, on the tactics' current code
    for key, entry in cache.entries.items() if todo else ():
        if work_key(key) not in timed and _current(entry):
            timed[work_key(key)] = key
    if precompile is None:
        precompile = program.device.type == "cuda"
    if precompile:  # the candidates about to be timed (one key per work), compiled side by side first
        fresh = {}  # work key -> the first key to time for it (the others copy its timings)
        for key in todo:
            if work_key(key) not in timed:
                fresh.setdefault(work_key(key), key)
        calls, kernels = [], set()
        for k in fresh.values():
            for tactic, config, fn in _candidates(*seen[k], top_k, batch_invariant):
                # one call per tactic, config and dtypes: at other shapes a config mostly launches the same
                # kernels (a GEMM does not specialize on M, and on N and K only by divisibility), which two threads
                # would compile side by side; a shape that does need a kernel of its own compiles when timed
                kernel = (tactic, id(fn), json.dumps(config, sort_keys=True), _dtypes(seen[k][1]))
                if tactic != REFERENCE and kernel not in kernels:
                    kernels.add(kernel)
                    calls.append((fn, seen[k][1], seen[k][2], config))
        compiled = precompile_calls(calls, device=program.device, progress=progress)
        if compiled is not None and (progress is True or compiled.failed):
            print(f"autotune: {compiled.line()}", file=sys.stderr)
    with progress_bar(len(todo), "autotune", "op", enabled=progress) as bar:
        for key in todo:
            op, args, kwargs = seen[key]
            same = timed.get(work_key(key))
            if same is not None:  # the same kernels on the same shapes were timed already: their timings
                cache.entries[key] = {"op": op, "timings": copy.deepcopy(cache.entries[same]["timings"]),
                                      "same_work_as": same}
                bar.update(1)
                continue
            timings, calls = [], {}  # id(timing) -> its call, for the near-ties' re-measurements
            variants = rotations(args, kwargs, l2_bytes)
            for tactic, config, fn in _candidates(op, args, kwargs, top_k, batch_invariant):
                call = _Call(fn, config, variants)
                version = _version(tactic, fn)
                try:
                    ms = float(timer(call, op, tactic, config))
                except Exception as e:  # a config that cannot run here (resources): recorded, never chosen
                    timings.append({"tactic": tactic, "config": config, "ms": math.inf, "version": version,
                                    "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                timings.append({"tactic": tactic, "config": config, "ms": ms, "version": version})
                calls[id(timings[-1])] = call
            refine(timings, lambda t: timer(calls[id(t)], op, t["tactic"], t["config"]))
            del variants, calls
            cache.entries[key] = {"op": op, "timings": timings}
            timed.setdefault(work_key(key), key)
            cache.save()  # after every key: an interrupted run resumes here
            bar.update(1)
    if todo:
        cache.save()
    return node_keys


def _choose(program, node_keys: Mapping[str, set[str]], cache: TimingCache) -> dict[str, tuple[str, dict | None]]:
    """``autotune``'s choice: node -> its fastest graph-safe candidate over its instances' timings."""
    choices = {}
    for name, keys in node_keys.items():
        # a node seen at several shapes gets the candidate with the least total time over them,
        # among the candidates timed at every one of them (pruning can drop a config at some shapes)
        totals: dict[tuple[str, str], list[float]] = {}
        for key in keys:
            for t in cache.entries[key]["timings"]:
                totals.setdefault((t["tactic"], json.dumps(t["config"])), []).append(t["ms"])
        everywhere = {tk: sum(ms) for tk, ms in totals.items() if len(ms) == len(keys)}
        # the runtime captures its steps in CUDA graphs: a candidate that may not be captured is never chosen
        # (while a safe one was timed), however fast it ran
        opdef = REGISTRY.get(program.graph.node(name).op)
        safe = {tk: ms for tk, ms in everywhere.items() if opdef.is_graph_safe(tk[0]) and math.isfinite(ms)}
        (tactic, config), _ = min((safe or everywhere).items(), key=lambda kv: kv[1])
        choices[name] = (tactic, json.loads(config))
    return choices


class _Call:
    """A candidate called on its arguments, the next copy of them at each call (see ``rotations``)."""

    def __init__(self, fn: Callable, config: dict | None, variants: list[tuple[tuple, dict]]) -> None:
        self.fn, self.config, self.all, self.i = fn, config, variants, 0
        self.variants = len(variants)

    def __call__(self):
        args, kwargs = self.all[self.i]
        self.i = (self.i + 1) % self.variants
        if self.config is not None:
            return self.fn(*args, **kwargs, config=self.config)
        return self.fn(*args, **kwargs)


def rotations(args: tuple, kwargs: Mapping[str, Any], l2_bytes: int | None, *, budget: int = 256 << 20,
              most: int = 32) -> list[tuple[tuple, dict]]:
    """The arguments and copies of them, for timing calls that cycle through the copies.

    Timed alone, an op whose tensors fit in L2 (tens of MB on a data-center GPU) finds them there on every
    repeat; in the model they were evicted by the layers between. So every tensor smaller than
    L2 gets copies (same shape and strides, same values) until the copies together are twice
    the L2 size (at most ``most`` copies and ``budget`` bytes); larger tensors (the KV cache) are
    shared. Without an L2 size (the CPU), the arguments alone."""
    if not l2_bytes:
        return [(tuple(args), dict(kwargs))]
    l2 = l2_bytes
    small: dict[int, torch.Tensor] = {}

    def collect(v):
        if isinstance(v, torch.Tensor) and v.nbytes < l2:
            small[id(v)] = v
        elif isinstance(v, (list, tuple)):
            for x in v:
                collect(x)

    collect(list(args) + list(kwargs.values()))
    total = sum(t.untyped_storage().nbytes() for t in small.values())
    copies = min(most, -(-2 * l2 // max(total, 1)), budget // max(total, 1)) if small else 1
    out = [(tuple(args), dict(kwargs))]
    for _ in range(copies - 1):
        fresh = {i: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                 for i, t in small.items()}

        def swap(v):
            if isinstance(v, torch.Tensor):
                return fresh.get(id(v), v)
            if isinstance(v, (list, tuple)):
                return type(v)(swap(x) for x in v)
            return v

        out.append((swap(tuple(args)), {k: swap(v) for k, v in kwargs.items()}))
    return out


@dataclass
class TunedChoices:
    """The autotuner's choices per shape bucket of an optimization profile: a step of ``t`` tokens
    runs ``choices[i]`` (node -> (tactic, config)) of the first bucket with ``edges[i] >= t``.
    ``batch_invariant``: tuned in the batch-invariant mode (every bucket the same invariant choices);
    ``costs``: that tuning's ``invariant.CostRow``s (not saved with the choices: the tune stage writes them apart)."""
    edges: list[int]
    choices: list[dict[str, tuple[str, dict | None]]]
    batch_invariant: bool = False
    costs: list = field(default_factory=list, compare=False, repr=False)

    def bucket(self, tokens: int) -> int:
        for i, edge in enumerate(self.edges):
            if tokens <= edge:
                return i
        raise WorkbenchError(f"a step of {tokens} tokens is beyond the tuned profile (largest bucket "
                             f"{self.edges[-1]} tokens); tune a profile with a larger max_tokens")

    def for_tokens(self, tokens: int) -> dict[str, tuple[str, dict | None]]:
        return self.choices[self.bucket(tokens)]

    def to_json(self) -> dict:
        return {"edges": self.edges, "choices": [{n: list(tc) for n, tc in c.items()} for c in self.choices],
                **({"batch_invariant": True} if self.batch_invariant else {})}

    @classmethod
    def from_json(cls, data: dict) -> "TunedChoices":
        return cls(list(data["edges"]), [{n: (t, cfg) for n, (t, cfg) in c.items()} for c in data["choices"]],
                   bool(data.get("batch_invariant", False)))

    def table(self):
        """One row per bucket and tuned node: edge, node, tactic, config (a DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{"edge": e, "node": n, "tactic": t, "config": json.dumps(cfg)}
                             for e, c in zip(self.edges, self.choices) for n, (t, cfg) in c.items()],
                            columns=["edge", "node", "tactic", "config"])


def step_inputs(program, step, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Graph inputs of one representative ``Step`` (see ``profiles``): random token ids and, for a
    graph with paged attention, a fresh paged cache with the context of every sequence reserved."""
    from ..graph.paged import PagedLayout, SimplePagedCache, is_paged

    vocab = program.graph.meta.get("config", {}).get("vocab_size", 1000)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (step.seqs, step.context + step.new), generator=gen)
    if not is_paged(program.graph):
        if step.context or step.decodes:
            raise WorkbenchError("this graph has no KV cache (run the insert_paged_attention pass): "
                                 "it can only be tuned on prefill steps; use a profile with context 0")
        pos = torch.arange(step.new).repeat(step.seqs)[None]
        return {"input_ids": ids.reshape(1, -1).to(program.device), "position_ids": pos.to(program.device)}
    layout = PagedLayout.from_graph(program.graph)
    # (cached ids, new ids) per sequence: the running decodes, then the prompt chunks
    rows = [(r[:step.decode_context].tolist(), r[step.decode_context:].tolist())
            for r in torch.randint(0, vocab, (step.decodes, step.decode_context + 1), generator=gen)]
    rows += [(r[:step.context].tolist(), r[step.context:].tolist()) for r in ids]
    cache = SimplePagedCache(layout, sum(layout.blocks_for(len(c) + len(n)) for c, n in rows), program.device)
    history = [(i, c) for i, (c, _) in enumerate(rows) if c]
    if history:  # the contexts' slots are reserved; what they hold does not change any timing
        cache.step_inputs(history)
    return cache.step_inputs([(i, n) for i, (_, n) in enumerate(rows)])


def autotune_profile(program, profile, cache: TimingCache, *, timer: Timer | None = None,
                     progress: bool = True, top_k: int | None = None, batch_invariant: bool = False) -> TunedChoices:
    """Tune ``program`` for every bucket of ``profile`` (an ``OptimizationProfile``), each on its
    representative step; one bucket's inputs (and KV cache) at a time.

    ``batch_invariant``: tune for the batch-invariant mode (``kernels/invariant.py``). Each bucket times its usual
    candidates and the mode's (``_candidates``); each node then gets one invariant candidate for every bucket
    (``invariant.choose_across_buckets``: the least mean slowdown against each bucket's fastest invariant one), and
    ``costs`` compares it with the per-bucket choices."""
    if not batch_invariant:
        chosen = [autotune(program, [step_inputs(program, profile.step(edge))], cache, timer=timer, progress=progress,
                           top_k=top_k) for edge in profile.edges]
        return TunedChoices(list(profile.edges), chosen)
    from .invariant import choose_across_buckets

    keys = [_time_steps(program, [step_inputs(program, profile.step(edge))], cache, timer=timer, progress=progress,
                        top_k=top_k, batch_invariant=True) for edge in profile.edges]
    free = [_choose(program, k, cache) for k in keys]
    chosen, costs = choose_across_buckets(program.graph, keys, cache.entries, free, profile.edges)
    return TunedChoices(list(profile.edges), [dict(chosen) for _ in profile.edges], True, costs)


def tactic_ops() -> set[str]:
    """Ops that have at least one tactic besides their reference."""
    # registers the Triton tactics
    from . import gemm, triton_attention, triton_gemma, triton_ln, triton_pointwise  # noqa: F401

    return {name for name in REGISTRY.names() if REGISTRY.get(name).tactics}
