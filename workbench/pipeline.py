"""Stage drivers: each reads its inputs, calls the library, and writes a workspace stage.

``capture_stage`` (``workbench capture``, folder ``capture/``), ``passes_stage`` (``workbench optimize``,
``passes/``), ``quant_stage`` (``workbench quantize``, ``quant/``) and ``tune_stage`` (``workbench tune``,
``tune/``) all have that shape; the export stage is ``engine.export_engine``. ``load_program`` rebuilds a
runnable program from a workspace without the original ``transformers`` model object.

``optimize(source)`` is the capture and passes stages in memory, without a workspace: what opening a model
source to run (``runnable``), the tests' programs and the bench scripts start from.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .device import resolve_device
from .errors import WorkbenchError
from .graph.capture import Captured, capture
from .graph.executor import Program, resolve_params
from .graph.ir import Graph, dtype_from_name
from .graph.paged import scales_by_name
from .graph.views import summary
from .models.intake import ModelSource, load_weights, resolve_source
from .models.presets import make_config
from .models.random_init import build_random_model
from .workspace import Workspace


@dataclass(frozen=True)
class CaptureOptions:
    """What the capture stage is asked to do; validated once, stored in the stage record. ``dtype`` "auto" (the
    default) is resolved here (``auto_dtype``): bfloat16 on a machine with a GPU, float32 on the CPU."""

    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise WorkbenchError(f"capture dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        object.__setattr__(self, "dtype", auto_dtype(self.dtype))


def auto_dtype(dtype: str, device: str | torch.device = "auto") -> str:
    """A capture dtype, "auto" resolved: bfloat16 where ``device`` is a GPU, float32 on the CPU (as vLLM's "auto"
    never runs float32 on a GPU, and the CPU's reference ops are exact and fastest in float32)."""
    if dtype != "auto":
        return dtype
    cuda = torch.cuda.is_available() if str(device) == "auto" else torch.device(device).type == "cuda"
    return "bfloat16" if cuda else "float32"


def capture_source(source: ModelSource, options: CaptureOptions | None = None) -> Captured:
    """Capture a source's graph. Weights are never loaded: the model is built on the meta device from the
    source's config (a GGUF file's, from the directory it is converted into once)."""
    options = options or CaptureOptions()
    dtype = dtype_from_name(options.dtype)
    if source.kind in ("hf", "gguf"):  # a GGUF file's config from the directory it is converted into once
        import json

        from .models.intake import hf_directory

        config = make_config(json.loads((hf_directory(source) / "config.json").read_text()))
    else:
        config = make_config(source.config)
    model = build_random_model(config, dtype=dtype, device="meta", seed=source.seed, materialize=False)
    return capture(model)


def graph_weights(graph: Graph, source: ModelSource, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint tensors a graph reads, by their checkpoint names: its weights, or for
    parameters that passes derived (fused QKV, ...), the tensors they are derived from."""
    wanted: dict[str, list[str]] = {}
    for name, p in graph.params.items():
        if p.kind != "parameter":
            continue
        for src, aliases in (p.derived["inputs"] if p.derived else [[name, p.aliases]]):
            wanted[src] = aliases
    return load_weights(source, wanted, dtype=dtype_from_name(graph.meta.get("dtype", "float32")), device=device)


def program_for(graph: Graph, constants: dict[str, torch.Tensor], source: ModelSource, *,
                device: str | torch.device = "auto") -> Program:
    """Bind a graph (captured or optimized) to the source's weights on ``device`` ("auto": the GPU when there is one)."""
    device = resolve_device(device)
    base = {**graph_weights(graph, source, device=device), **{k: v.to(device) for k, v in constants.items()}}
    return Program(graph, resolve_params(graph, base), device=device)


@dataclass
class Optimized:
    """What ``optimize`` made: the optimized program and how it came to be."""

    program: Program        # the optimized graph (paged attention) bound to the source's weights on the device
    captured: Captured      # the graph as captured, with its constants (weights stay in the source)
    reports: list           # one graph.passes.PassReport per pass (numeric checks only with check=True)
    source: ModelSource

    @property
    def graph(self) -> Graph:
        return self.program.graph

    def captured_program(self) -> Program:
        """The captured graph (no paged attention) bound to the source's weights, on the program's device."""
        return program_for(self.captured.graph, self.captured.constants, self.source, device=self.program.device)

    def unfused(self) -> list[str]:
        """One line per standard layer fusion that left decoder layers unfused (``passes.unfused_lines``)."""
        from .graph.passes import unfused_lines

        return unfused_lines(self.reports, _num_layers(self.graph), self.graph.meta.get("architecture"))


def _num_layers(graph: Graph) -> int:
    layers = graph.meta.get("config", {}).get("num_hidden_layers")
    return int(layers) if layers is not None else len({n.layer for n in graph.nodes if n.layer is not None})


def unfused_notes(ws: Workspace) -> list[str]:
    """The passes stage's ``unfused_lines``: which decoder layers each standard fusion left on reference ops."""
    from .graph.passes import PassReport, unfused_lines

    reports = [PassReport.from_json(r) for r in json.loads(ws.path("passes", "report.json").read_text())]
    graph = Graph.loads(ws.path("passes", "graph.json").read_text())
    return unfused_lines(reports, _num_layers(graph), graph.meta.get("architecture"))


def optimize(source: str | Path | ModelSource, *, dtype: str = "auto", device: str | torch.device = "auto",
             passes: list[str] | None = None, check: bool = False, kv_block_size: int | None = None,
             seed: int = 0) -> Optimized:
    """Capture and optimize a model source in memory: the capture and passes stages without a workspace.

    ``source``: whatever ``models.resolve_source`` takes (a named model, preset, HF directory, GGUF file,
    config.json; ``seed`` for random weights), or a ``ModelSource``. ``dtype``: the capture dtype ("auto": bf16
    on a GPU, fp32 on the CPU). ``passes``: the pass names (default: ``default_pipeline()``); their numeric
    checks run on ``device`` only with ``check`` (they are the optimize stage's). ``kv_block_size``: tokens per
    KV-cache block of the paged graph (default: the paged pass's, 16). The weights are read once, straight onto
    ``device``, and feed both the checks and the program."""
    from .graph.passes import run_passes
    from .models.intake import resolve_source

    device = resolve_device(device)
    dtype = auto_dtype(dtype, device)
    if not isinstance(source, ModelSource):
        source = resolve_source(source, seed=seed)
    captured = capture_source(source, CaptureOptions(dtype=dtype, seed=seed))
    graph = captured.graph
    if kv_block_size is not None:
        graph.meta["kv_block_size"] = _block_size(kv_block_size)
    base = {**graph_weights(graph, source, device=device), **{k: v.to(device) for k, v in captured.constants.items()}}
    optimized, reports = run_passes(graph, base, passes, check=check, device=device)
    return Optimized(Program(optimized, resolve_params(optimized, base), device=device), captured, reports, source)


def capture_stage(ws: Workspace, spec: str, options: CaptureOptions | None = None, *,
                  force: bool = False) -> Captured:
    """`workbench capture`: capture ``spec`` into ``ws/capture`` (``options``: default ``CaptureOptions()``)."""
    options = options or CaptureOptions()
    source = resolve_source(spec, seed=options.seed)
    with ws.run("capture", params={"source": source.to_json(), "dtype": options.dtype, "seed": options.seed},
                input_files=source.files, force=force) as run:
        captured = capture_source(source, options)
        run.write_text("graph.json", captured.graph.dumps())
        run.write_safetensors("constants.safetensors", captured.constants)
        run.write_json("summary.json", summary(captured.graph))
    return captured


def load_graph(ws: Workspace, stage: str = "capture") -> tuple[Graph, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    graph = Graph.loads(ws.path(stage, "graph.json").read_text())
    scales_by_name(graph)  # graphs written before the KV scales went by name
    constants = load_file(str(ws.path("capture", "constants.safetensors")))
    return graph, constants


def workspace_source(ws: Workspace) -> ModelSource:
    rec = ws.record("capture")
    if rec is None:
        raise WorkbenchError(f"{ws.root} has no capture stage; run `workbench capture MODEL {ws.root}`")
    return ModelSource.from_json(rec["params"]["source"])


def passes_stage(ws: Workspace, names: list[str] | None = None, *, force: bool = False,
                 device: str | torch.device = "auto", kv_block_size: int | None = None, on_pass=None):
    """`workbench optimize`: run graph passes on the captured graph into ``ws/passes``; each pass's numeric
    check runs on ``device`` (a GPU makes an 8B model's checks seconds instead of minutes on the CPU).
    ``kv_block_size``: tokens per KV-cache block of the paged graph (default: the paged pass's, 16).
    ``on_pass``: ``run_passes``'s progress callback.

    Returns the optimized graph and the per-pass reports."""
    from .graph.passes import PASSES, default_pipeline, run_passes
    from .graph.passes.paged import runtime_gap

    names = default_pipeline() if names is None else list(names)
    runtime = [n for n in names if n in PASSES and PASSES[n].runtime_only]
    if runtime:
        raise WorkbenchError(f"pass {runtime[0]!r} is applied by the runtime to the graph it runs, not to a "
                             "workspace's graph; leave it out of --passes")
    sharded = [n for n in names if n in PASSES and PASSES[n].sharded]
    if sharded:
        raise WorkbenchError(f"pass {sharded[0]!r} rewrites a tensor-parallel graph after its sharding (--tp), not a "
                             "workspace's graph; leave it out of --passes")
    device = resolve_device(device)
    source = workspace_source(ws)
    graph, constants = load_graph(ws, "capture")
    settings = {"passes": names}  # the stage record's params (a build compares kv_block_size with them)
    if kv_block_size is not None:
        graph.meta["kv_block_size"] = settings["kv_block_size"] = _block_size(kv_block_size)
    with ws.run("passes", params=settings, upstream=("capture",), force=force) as run:
        # the weights only feed the checks: made (random sources) or read straight onto the checking device
        params = {**graph_weights(graph, source, device=device), **{k: v.to(device) for k, v in constants.items()}}
        optimized, reports = run_passes(graph, params, names, device=device, on_pass=on_pass)
        run.write_text("graph.json", optimized.dumps())
        run.write_json("report.json", [r.to_json() for r in reports])
    gap = runtime_gap(optimized, names)
    if gap:  # saved all the same (a graph to study), but the runtime and its notebook would fail on it later
        warnings.warn(gap, stacklevel=2)
    return optimized, reports


def _block_size(kv_block_size: int) -> int:
    if kv_block_size < 1:
        raise WorkbenchError(f"kv_block_size is tokens per KV-cache block, >= 1; got {kv_block_size}")
    return int(kv_block_size)


@dataclass(frozen=True)
class QuantOptions:
    """What the quant stage is asked to do (``workbench quantize``, a build's quant step): built once at the edge,
    its settings land in the stage record's params.

    ``fmt``: the format of every group when no plan is given (lm_head kept in the model's precision), and the
    format an auto plan chooses groups for; ``weights``, ``activations`` and ``alpha`` are that format's options
    (None: the format's default). ``kv_cache``: the KV cache's format of a plan made here. ``samples`` and
    ``seq_len``: the calibration sizes (None: chosen from the data and the device); ``observer``: the statistic of
    each input's range; ``calib_data``: the calibration text (None: datasets/calibration.txt). ``auto_budget``
    (perplexity increase in %): choose the plan by sensitivity within it, measured on ``probe_tokens`` tokens.
    ``full_sweep``: measure every group's sensitivity (True), or a subset sized to about 3 minutes (False); None:
    every group on a GPU, the subset on a CPU, where the full sweep of a 135M model takes hours
    (``quant.sensitivity.plan_sweep``: the unmeasured groups stay bf16)."""

    fmt: str = "fp8"
    kv_cache: str = "bf16"
    weights: str | None = None
    activations: str | None = None
    alpha: float | None = None
    samples: int | None = None
    seq_len: int | None = None
    observer: str = "max"
    calib_data: str | Path | None = None
    auto_budget: float | None = None
    probe_tokens: int = 2048
    full_sweep: bool | None = None

    def __post_init__(self) -> None:
        from .quant.plan import FORMATS, KV_FORMATS  # the plan's own messages, said before anything loads

        if self.fmt not in FORMATS:
            raise WorkbenchError(f"format {self.fmt!r} is unknown; use one of {', '.join(FORMATS)}")
        if self.kv_cache not in KV_FORMATS:
            raise WorkbenchError(f"kv_cache format {self.kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}")
        check_counts(samples=self.samples, seq_len=self.seq_len, probe_tokens=self.probe_tokens)

    @property
    def format_options(self) -> dict[str, object]:
        """The options given for ``fmt`` (those left None are the format's defaults)."""
        given = {"weights": self.weights, "activations": self.activations, "alpha": self.alpha}
        return {k: v for k, v in given.items() if v is not None}


def check_counts(**counts) -> None:
    """Refuse, in one line, a count (calibration samples, tokens) that is not a whole number >= 1; None passes."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise WorkbenchError(f"{name} must be a whole number >= 1 (got {value!r}); leave it out for the default")


def quant_stage(ws: Workspace, plan=None, options: QuantOptions = QuantOptions(), *,
                device: str | torch.device = "auto", force: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = None):
    """`workbench quantize`: calibrate the optimized graph and apply a precision plan into ``ws/quant``.

    ``plan``: a PrecisionPlan, a path to its JSON, or None for every group in ``options.fmt`` (with its format
    options, lm_head kept in the model's precision) and the KV cache in ``options.kv_cache``. Writes
    stats.safetensors (+ stats.json), plan.json, graph.json (the quantized graph), weights.safetensors (quantized
    weights and scales) and report.json. Calibration statistics already in the stage with the same settings, data
    and model are reused.

    ``options.calib_data``: the calibration text, a plain-text file or JSONL with a ``text`` field
    (``evaluate.load_text``; default datasets/calibration.txt; a model without tokenizer calibrates on seeded
    random ids instead). ``options.samples`` defaults to what the data holds, up to the device's default
    (``calibrate.choose_sizes``); the count chosen is recorded in the record's params["calibration"] and said
    through ``log``. The data file is an input of the stage: changing its content makes the stage stale.

    ``options.auto_budget`` (perplexity increase in %): instead of applying ``plan`` as it is, measure each
    group's sensitivity to ``fmt`` (with its options) and choose the plan with the most groups in ``fmt`` whose
    whole-plan perplexity stays within the budget (``quant.auto_plan.auto_plan``); groups the given plan marks
    as edited keep their format, and so does its KV cache. Both run on the first ``options.probe_tokens`` tokens
    of datasets/evaluation.txt (random ids for a model without tokenizer); sensitivity.json is written too and
    report.json gets the verified result under "auto_plan". Returns (plan, stats, report)."""
    from .models.intake import load_tokenizer
    from .quant import CalibrationStats, PrecisionPlan, calibrate, quantize_graph
    from .quant.plan import model_fingerprint

    fmt, auto_budget, observer = options.fmt, options.auto_budget, options.observer
    fmt_options = options.format_options
    device = resolve_device(device)
    source = workspace_source(ws)
    tokenizer = load_tokenizer(source)
    text = _calibration_text(tokenizer, options.calib_data)  # before any weights load: a bad file fails at once
    program = load_program(ws, stage="passes", device=device)
    graph = program.graph
    if plan is None:
        plan = PrecisionPlan.uniform(graph, "bf16" if auto_budget is not None else fmt, kv_cache=options.kv_cache,
                                     **({} if auto_budget is not None else fmt_options))
    elif not isinstance(plan, PrecisionPlan):
        path = Path(plan)
        if not path.is_file():
            raise WorkbenchError(f"no precision plan at {path}")
        plan = PrecisionPlan.loads(path.read_text())
    if plan.model is None:
        plan.model = model_fingerprint(graph)
    plan.validate(graph)
    ids, calib, input_files = _calibration_data(text, graph, device, options.samples, options.seq_len)
    calib["observer"] = observer
    data = {k: calib[k] for k in ("sha256", "tokens", "random_seed") if k in calib}  # what the statistics saw
    stats_path = ws.stage_dir("quant") / "stats.safetensors"
    params = {"plan": plan.to_json(), "calibration": calib, "device": str(device)}
    if auto_budget is not None:
        params["auto"] = {"budget_pct": auto_budget, "format": fmt, "options": fmt_options,
                          "probe_tokens": options.probe_tokens,
                          **({} if options.full_sweep is None else {"full_sweep": options.full_sweep})}
    with ws.run("quant", params=params, upstream=("passes",), input_files=input_files, force=force) as run:
        stats = None
        if stats_path.is_file() and stats_path.with_suffix(".json").is_file():
            old = CalibrationStats.load(stats_path)
            if (old.model, old.observer, old.samples, old.seq_len, old.data) == (
                    model_fingerprint(graph), observer, calib["samples"], calib["seq_len"], data):
                stats = old
        if log is not None:
            log(f"calibration: {calib['samples']} samples x {calib['seq_len']} tokens "
                + (f"from {calib['text']} ({calib['tokens']} tokens)" if "tokens" in calib else f"of {calib['text']}")
                + ("; statistics reused" if stats is not None else ""))
        if stats is None:
            stats = calibrate(program, ids, samples=calib["samples"], seq_len=calib["seq_len"], observer=observer,
                              progress=progress)
            stats.data = data
        tensors, meta = stats.state()
        run.write_safetensors("stats.safetensors", tensors)
        run.write_json("stats.json", meta)
        auto = None
        if auto_budget is not None:
            plan, auto = _auto_plan_stage(run, program, stats, tokenizer, plan, fmt, auto_budget,
                                          options.probe_tokens, progress, fmt_options, options.full_sweep, log)
        quantized, new, report = quantize_graph(graph, dict(program.params), plan, stats)
        if auto is not None:
            report["auto_plan"] = auto
        run.write_text("plan.json", plan.dumps())
        run.write_text("graph.json", quantized.dumps())
        run.write_safetensors("weights.safetensors", {k: v.cpu() for k, v in new.items()})
        run.write_json("report.json", report)
    return plan, stats, report


def _calibration_text(tokenizer, calib_data):
    """(token ids, label, path) of ``quant_stage``'s calibration text, or None for a model without tokenizer."""
    from .evaluate import dataset_label, dataset_path, load_text

    if tokenizer is None:
        if calib_data is not None:
            raise WorkbenchError(f"--calib-data {calib_data}: this model has random weights and no tokenizer to read "
                                 "text with; leave --calib-data out (it calibrates on seeded random token ids)")
        return None
    name = "calibration" if calib_data is None else calib_data
    path, label = dataset_path(name), dataset_label(name)
    text = load_text(path, option=None if calib_data is None else "--calib-data")
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long), label, path  # as quant.calibration_ids


def _calibration_data(text, graph, device, samples, seq_len):
    """(token ids, the record's params["calibration"], the stage's input files) for ``quant_stage``: the text's
    tokens (``_calibration_text``) and the sizes chosen for them, or seeded random ids without a text."""
    from .quant.calibrate import choose_sizes, default_sizes
    from .env import sha256_file

    requested = {"samples": samples, "seq_len": seq_len}
    if text is None:
        sizes = default_sizes(device)
        samples, seq_len = samples or sizes["samples"], seq_len or sizes["seq_len"]
        vocab = graph.params[_lm_head_weight(graph)].spec.shape[0]
        ids = torch.randint(1, vocab, (samples * seq_len,), generator=torch.Generator().manual_seed(0))
        calib = {"samples": samples, "seq_len": seq_len, "text": "random token ids (no tokenizer)", "random_seed": 0,
                 "requested": requested}
        return ids, calib, []
    ids, label, path = text
    samples, seq_len = choose_sizes(ids.numel(), device, samples=samples, seq_len=seq_len,
                                    source=f"the calibration set {label}")
    calib = {"samples": samples, "seq_len": seq_len, "text": label, "file": str(path.resolve()),
             "sha256": sha256_file(path), "tokens": int(ids.numel()), "requested": requested}
    return ids, calib, [path]


def _auto_plan_stage(run, program, stats, tokenizer, base_plan, fmt, budget, probe_tokens, progress, options,
                     full_sweep=None, log=None):
    """Sensitivity of the groups to ``fmt`` (every group, or the subset ``plan_sweep`` sizes to the machine:
    ``QuantOptions.full_sweep``) and the auto plan within ``budget`` (see ``quant_stage``)."""
    from .evaluate import dataset_text
    from .quant.auto_plan import auto_plan
    from .quant.sensitivity import plan_sweep, sensitivity

    if fmt == "bf16":
        raise WorkbenchError("an auto plan chooses which groups to quantize: give a quantized --format "
                             "(fp8, int8_sq or int8_wo) with the budget")
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(dataset_text("evaluation")).input_ids)[:probe_tokens]
    else:
        vocab = program.graph.params[_lm_head_weight(program.graph)].spec.shape[0]
        ids = torch.randint(1, vocab, (probe_tokens,), generator=torch.Generator().manual_seed(2))
    window = min(256, ids.numel())
    stride = max(1, window // 2)
    sweep = plan_sweep(program, stats, ids, formats=[fmt], full=full_sweep, window=window, stride=stride)
    sweep.full_switch = "--full-sweep (QuantOptions(full_sweep=True))"
    line = f"auto plan: {sweep}"
    if log is None:  # the estimate, before the long part starts
        print(line, flush=True)
    else:
        log(line)
    report = sensitivity(program, stats, ids, formats=[fmt], groups=sweep.groups, base_plan=base_plan,
                         window=window, stride=stride, progress=progress, **options)
    run.write_json("sensitivity.json", report.to_json())
    plan, info = auto_plan(report, program, stats, ids, budget_pct=budget, base_plan=base_plan, window=window,
                           stride=stride, progress=progress)
    info = {k: v for k, v in info.items() if k != "history"} | {
        "probe_tokens": int(ids.numel()), "window": window, "stride": stride, "format": fmt,
        "sweep": {"groups": len(sweep.groups), "of": sweep.total_groups,
                  "seconds_per_variant": sweep.seconds_per_variant},
        "bf16_groups": [g for g in plan.groups if plan.format_of(g) == "bf16"],
        "history": [{k: v for k, v in h.items() if k != "quantized"} for h in info["history"]]}
    return plan, info


def _lm_head_weight(graph) -> str:
    """The output projection's weight (its rows are the vocabulary)."""
    from .quant import linear_groups

    groups = linear_groups(graph)
    if "lm_head" not in groups:
        raise WorkbenchError("this graph has no lm_head linear to size the vocabulary from")
    return groups["lm_head"].weights[0]


def tune_stage(ws: Workspace, profile, *, device: str | torch.device = "auto", timer=None, reset: bool = False,
               force: bool = False, progress: bool = True, top_k: int | None = None, graph: str = "auto",
               tensor_parallel_size: int = 1, batch_invariant: bool = False):
    """`workbench tune`: autotune the optimized graph for every bucket of ``profile`` into ``ws/tune``.

    ``graph``: the stage whose graph is tuned: "quant" (the quantized graph), "passes", or "auto": the
    quantized graph when the quant stage is up to date, else the optimized one. The record names it, and
    ``load_program(ws, stage="tune")`` runs that graph; re-running that stage makes the tune stale.

    ``tune/timings.json`` is the timing cache, saved after every op instance: an interrupted run
    resumes from it, a second run times nothing new, and a cache measured on another GPU or
    library version is refused (``reset`` starts it afresh). ``tune/choices.json`` holds the
    choices per bucket that ``load_program(ws, stage="tune")`` runs with. ``top_k``: time only the
    configs a tactic's cost model ranks best (see ``autotune``). ``batch_invariant``: tune for the batch-invariant
    mode (one invariant choice per node for every bucket: ``autotune_profile``); ``tune/invariance.json`` then holds
    what that costs against the per-bucket choices (``invariant.cost_lines`` reads it).

    ``tensor_parallel_size`` N > 1 tunes the graph one rank of N runs (``graph.passes.tensor_parallel``: rank 0's
    shard, fused across its all-reduces as the runtime runs it, its collectives the identity in this one process): the choices name that graph's nodes, the timing
    cache's keys carry N (``autotune.instance_key``), and an engine exported from it records N."""
    from .kernels.autotune import TimingCache, autotune_profile

    device = resolve_device(device)
    if device.type != "cuda" and timer is None:
        raise WorkbenchError(f"tuning times kernels on a CUDA GPU, and this runs on {device.type!r}; run "
                             "`workbench tune` on the GPU machine (views of a saved timing cache work anywhere)")
    if graph == "auto":
        graph = "quant" if ws.status("quant") == "ok" else "passes"
    if graph not in ("passes", "quant"):
        raise WorkbenchError(f"tune: graph must be 'auto', 'passes' or 'quant', got {graph!r}")
    program = load_program(ws, stage=graph, device=device)
    if tensor_parallel_size != 1:
        from .graph.sharding import check_tensor_parallel_size, rank0_program

        check_tensor_parallel_size(program.graph, tensor_parallel_size, "tune")
        program, _ = rank0_program(program, tensor_parallel_size)
    params = {"profile": profile.to_json(), "device": str(device), "top_k": top_k, "graph": graph,
              "tensor_parallel_size": tensor_parallel_size, **({"batch_invariant": True} if batch_invariant else {})}
    with ws.run("tune", params=params, upstream=(graph,), force=force) as run:
        cache = TimingCache.open(run.directory / "timings.json", reset=reset)
        tuned = autotune_profile(program, profile, cache, timer=timer, progress=progress, top_k=top_k,
                                 batch_invariant=batch_invariant)
        cache.save()
        run.adopt("timings.json")
        run.write_json("choices.json", tuned.to_json())
        if batch_invariant:
            run.write_json("invariance.json", {"costs": [r.to_json() for r in tuned.costs]})
    return tuned


def load_program(ws: Workspace, *, stage: str = "capture", device: str | torch.device = "auto") -> Program:
    """A runnable program for the workspace's graph of ``stage``, weights read from the model source
    (``stage="quant"``: the quantized graph, its quantized weights from the stage). ``stage="tune"`` is the
    graph that was tuned (optimized or quantized) running the autotuner's choices (a CUDA device)."""
    from .kernels.autotune import TunedChoices

    source = workspace_source(ws)
    choices = None
    if stage == "tune":
        if ws.record("tune") is None:
            raise WorkbenchError(f"{ws.root} has no tune stage; run `workbench tune {ws.root}` on the GPU first")
        choices = TunedChoices.from_json(ws.read_json("tune", "choices.json"))
        stage = ws.record("tune")["params"].get("graph", "passes")  # the graph that was tuned
        tp = ws.record("tune")["params"].get("tensor_parallel_size") or 1
        if tp != 1:
            raise WorkbenchError(f"the tune stage of {ws.root} tuned the graph of one rank of {tp} (tensor "
                                 f"parallelism); export it (`workbench export {ws.root} --out ENGINE`) and run the "
                                 f"engine with --tp {tp}, or run another stage of the workspace")
    graph, constants = load_graph(ws, stage)
    if stage == "quant":  # quantized weights and scales come from the stage, the rest from the source
        from safetensors.torch import load_file

        constants = {**constants, **load_file(str(ws.path("quant", "weights.safetensors")))}
    program = program_for(graph, constants, source, device=device)
    return program.with_choices(choices) if choices else program


#: Stages whose graph the runtime can run (paged attention), newest first; "capture" runs only without it.
RUNNABLE_STAGES = ("tune", "quant", "passes")
_COMMANDS = {"tune": "tune", "quant": "quantize", "passes": "optimize", "capture": "capture"}


def latest_stage(ws, *, device: str | torch.device | None = None, paged: bool = True) -> str:
    """The newest stage of workspace ``ws`` that is up to date ("ok" in ``workbench info``): tune, quant, passes
    (and capture unless ``paged``: the captured graph has no KV cache). The tune stage counts only where its
    choices run: on a CUDA ``device`` (None: anywhere, as an export carries them). A newer stage that exists
    but is stale, modified or interrupted is passed over with a warning saying what to re-run."""
    device = None if device is None else resolve_device(device)
    order = [*RUNNABLE_STAGES, *(() if paged else ("capture",))]
    passed = []
    for stage in order:
        status = ws.status(stage)
        if status == "missing":
            continue
        if stage == "tune" and device is not None and device.type != "cuda":
            continue  # tuned choices are Triton kernels and cuBLAS paths: a GPU's
        if stage == "tune" and device is not None and (ws.record("tune") or {}).get("params", {}).get(
                "tensor_parallel_size", 1) != 1:
            continue  # choices for one rank of a sharded graph: an engine's (export it), not this program's
        if status == "ok":
            if passed:
                warnings.warn(f"{ws.root}: running the {stage} stage, since " + "; ".join(passed), stacklevel=3)
            return stage
        passed.append(f"the {stage} stage is {status} (re-run `workbench {_COMMANDS[stage]} {ws.root}`)")
    what = "an optimized graph (`workbench optimize`)" if paged else "a captured graph (`workbench capture`)"
    detail = f": {'; '.join(passed)}" if passed else ""
    raise WorkbenchError(f"{ws.root} has no up-to-date stage to run; it needs {what}{detail}")
