"""`workbench build`: every stage from a model to an engine directory, with defaults, resuming from its workspace.

    build_engine("smollm2-135m", "engine/", BuildOptions(precision="fp8"))   # workspace: engine.workspace/
    build_engine("smollm2-135m", "engine/", BuildOptions(precision="fp8", tensor_parallel_size=2))  # for 2 ranks

    [1/5] capture: running ...            capture the graph (CaptureOptions: dtype, seed)
    [2/5] passes: up to date, skipped     the default passes (fusions, paged attention)
    [3/5] quant: ...                      fp8 | int8 (SmoothQuant W8A8) | auto (fp8 where the budget allows)
    calibration: 243 samples x 512 tokens from datasets/calibration.txt (124834 tokens)
    accuracy: perplexity 18.66 -> 19.23 (+3.03%) on 2047 tokens of datasets/evaluation.txt (...); limit +5%
    [4/5] tune: ...                       on a GPU only: the engine's profile (from its limits)
    [5/5] export: ...                     the engine directory (its manifest.json holds the accuracy block)
    batch-invariant cost: ...             with ``batch_invariant``: what one invariant choice per op costs

With ``batch_invariant`` (``--batch-invariant``) the tune stage tunes for the batch-invariant mode
(``kernels/invariant.py``: one invariant tactic and config per node for every bucket), the build prints what that
costs per op against the per-bucket choices (or, untuned, which defaults the mode runs), and the manifest records
``"batch_invariant": true``, which ``LLM(engine)`` and ``workbench serve`` then run by default.

``tensor_parallel_size`` N (``--tp N``): the optimized graph must shard over N ranks (checked right after the
passes, before calibration; a size that does not divide the heads or the intermediate size is refused in one
line), the tune stage tunes the graph one rank of N runs (its timing cache's keys carry N), and the engine's
manifest records N, the size ``LLM`` and ``workbench serve`` run it at by default. The engine stays one directory
of unsharded weights: each rank reads its own slices when it loads.

A stage whose workspace artifacts are up to date (``Workspace.status`` is "ok") and were made with the
same settings is not run again, so a build that was interrupted (or re-run with the same arguments)
starts where it stopped; a stage edited by hand is never overwritten unless ``force``.

The accuracy gate: after quantization the perplexity of the quantized graph and of the unquantized optimized one
are measured on the evaluation text (``eval_data``, default datasets/evaluation.txt; the first 2048 tokens on the
CPU; seeded random ids for a model without tokenizer) on the calibration device, and the build stops before
tuning when the increase is over ``max_ppl_increase`` % unless ``force``. The result is the workspace's
``accuracy`` stage (upstream: passes and quant; the text file is an input), so an up-to-date build does not
measure again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import WorkbenchError
from ..workspace import Workspace

PRECISIONS = ("bf16", "fp8", "int8", "auto")
#: the quantized format each precision means; "auto" chooses per group within the perplexity budget
FORMAT_OF = {"fp8": "fp8", "int8": "int8_sq", "auto": "fp8"}


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "bf16"
    dtype: str = "bfloat16"          # the capture dtype: the model's precision in the engine
    seed: int = 0                    # random weights (presets, config.json)
    auto_budget: float = 1.0         # --precision auto: the largest perplexity increase allowed, in %
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    samples: int | None = None       # calibration sequences (default: what the data holds, up to the device's)
    seq_len: int | None = None
    calib_data: str | Path | None = None  # calibration text: plain text or JSONL with "text" (default: datasets/)
    eval_data: str | Path | None = None   # the accuracy gate's text (default: datasets/evaluation.txt)
    max_ppl_increase: float = 5.0    # the accuracy gate: the largest perplexity increase (%) that is exported
    device: str = "auto"             # calibration and tuning device; "auto": the GPU when there is one
    tune: bool | None = None         # None: tune when a GPU is present
    kv_block_size: int | None = None # tokens per KV-cache block; None: the paged pass's default (16)
    kv_cache: str = "bf16"           # the KV cache's format: "bf16" (the model's dtype) or "fp8" (a quantized build)
    force: bool = False              # re-run stages edited by hand; export even over the accuracy gate's limit
    tensor_parallel_size: int = 1    # the ranks the engine is built (and tuned) for
    batch_invariant: bool = False    # the batch-invariant mode: tuned in it, recorded in the manifest (LLM/serve's default)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise WorkbenchError(f"build: precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.auto_budget <= 0:
            raise WorkbenchError(f"build: the auto budget is a perplexity increase in %, > 0; got {self.auto_budget}")
        if self.kv_cache not in ("bf16", "fp8"):
            raise WorkbenchError(f"build: --kv-cache is bf16 or fp8, not {self.kv_cache!r}")
        if self.kv_cache == "fp8" and self.precision == "bf16":
            raise WorkbenchError("build: an FP8 KV cache is set by the quantization stage: give --precision fp8, int8 "
                                 "or auto with --kv-cache fp8")
        from ..pipeline import check_counts

        check_counts(samples=self.samples, seq_len=self.seq_len)  # before anything is captured
        if not self.max_ppl_increase >= 0:
            raise WorkbenchError(f"build: --max-ppl-increase is a perplexity increase in %, >= 0; got "
                                 f"{self.max_ppl_increase}")
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise WorkbenchError(f"build: --tp is the number of ranks, a whole number >= 1; got {tp!r}")
        if not isinstance(self.batch_invariant, bool):
            raise WorkbenchError(f"build: batch_invariant is True or False, not {self.batch_invariant!r}")
        if self.tune and not self._device().startswith("cuda"):
            raise WorkbenchError("build: tuning times kernels on a CUDA GPU, and there is none here; build without "
                                 "tuning, then re-run the build on the GPU machine")

    def _device(self) -> str:
        from ..device import resolve_device

        return str(resolve_device(self.device))

    @property
    def limits(self) -> dict[str, int | None]:
        return {"max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens}


def default_workspace(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".workspace")


def build_engine(model: str, out: str | Path, options: BuildOptions = BuildOptions(), *,
                 workspace: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Run capture, passes, quantization (unless bf16), tuning (on a GPU) and export; returns ``out``."""
    from .. import pipeline
    from ..graph.ir import Graph
    from ..kernels.profiles import OptimizationProfile
    from ..models.intake import resolve_source
    from .export import export_engine
    from .format import EngineLimits
    from .load import read_engine

    out = Path(out)
    ws = Workspace(workspace or default_workspace(out))
    device = options._device()
    do_tune = options.tune if options.tune is not None else device.startswith("cuda")
    quantized = options.precision != "bf16"
    graph_stage = "quant" if quantized else "passes"
    total, index = 5, iter(range(1, 6))
    log(f"building {out} from {model} in workspace {ws.root} (precision {options.precision}, device {device})")

    def stage(name: str, skip: str | None, run: Callable[[], object]) -> None:
        i = next(index)
        if skip:
            log(f"[{i}/{total}] {name}: {skip}")
            return
        log(f"[{i}/{total}] {name}: running ...")
        t0 = time.perf_counter()
        run()
        log(f"[{i}/{total}] {name}: done in {time.perf_counter() - t0:.1f} s")

    # 1. capture ------------------------------------------------------------------------------------------
    source = resolve_source(model, seed=0 if options.seed is None else options.seed)  # capture's default seed
    _check_texts(options, source, quantized)  # a bad --calib-data or --eval-data fails before any stage runs
    want = _jsonable({"source": source.to_json(), "dtype": options.dtype, "seed": options.seed})
    rec = ws.record("capture")
    if rec is not None and rec["params"].get("source") != want["source"] and not options.force:
        raise WorkbenchError(f"workspace {ws.root} holds a capture of {rec['params']['source'].get('spec')!r}, not "
                             f"{model!r}; give another --workspace (or --force to re-capture it there)")
    stage("capture", _skip(ws.up_to_date("capture", want)),
          lambda: pipeline.capture_stage(ws, model, pipeline.CaptureOptions(dtype=options.dtype, seed=options.seed),
                                         force=options.force))

    # 2. passes ---------------------------------------------------------------------------------------------
    stage("passes", _skip(ws.up_to_date("passes", matches=lambda p: p.get("kv_block_size") == options.kv_block_size)),
          lambda: pipeline.passes_stage(ws, force=options.force, device=device, kv_block_size=options.kv_block_size))
    for line in pipeline.unfused_notes(ws):  # each build says so, also when the stage was up to date
        log(f"passes: {line}")
    tp = options.tensor_parallel_size
    if tp > 1:  # before calibration: a size the graph cannot take fails now, in one line
        from ..graph.sharding import check_tensor_parallel_size

        check_tensor_parallel_size(Graph.loads(ws.path("passes", "graph.json").read_text()), tp, "build")
        log(f"tensor parallelism: the graph shards over {tp} ranks; tuning and the engine are for one rank of {tp}")

    # 3. quantization -------------------------------------------------------------------------------------
    fmt = FORMAT_OF.get(options.precision)
    budget = options.auto_budget if options.precision == "auto" else None
    if options.precision == "auto" and device.startswith("cuda") and torch.cuda.get_device_capability() < (8, 9):
        fmt = "int8_sq"  # no FP8 tensor cores before Ada/Hopper
    quant_rec = ws.record("quant")
    if not quantized:
        skip_quant = "not needed (--precision bf16)"
    else:
        calib = _calibration_request(options, source)
        skip_quant = _skip(ws.up_to_date("quant", matches=lambda p: _quant_matches(p, fmt, budget, calib, device)
                                          and p["plan"].get("kv_cache", "bf16") == options.kv_cache))
    edited = quant_rec is not None and quant_rec["params"]["plan"].get("edited")
    stage("quant", skip_quant, lambda: pipeline.quant_stage(
        ws, ws.stage_dir("quant") / "plan.json" if edited else None,
        pipeline.QuantOptions(fmt=fmt, kv_cache=options.kv_cache, samples=options.samples, seq_len=options.seq_len,
                              calib_data=options.calib_data, auto_budget=budget),
        device=device, log=log, force=options.force))
    if quantized:
        accuracy = accuracy_gate(ws, options, device, log)
    else:
        accuracy = None
        log("accuracy: not needed (--precision bf16)")

    # 4. tuning ---------------------------------------------------------------------------------------------
    config = Graph.loads(ws.path("capture", "graph.json").read_text()).meta.get("config", {})
    max_len = options.max_model_len or int(config.get("max_position_embeddings") or 8192)
    profile = build_profile(options, max_len)
    invariant = options.batch_invariant
    if do_tune:
        skip_tune = _skip(ws.up_to_date("tune", matches=lambda p: p.get("profile") == profile.to_json()
                                        and p.get("graph") == graph_stage
                                        and (p.get("tensor_parallel_size") or 1) == tp
                                        and bool(p.get("batch_invariant")) == invariant))
    else:
        skip_tune = "skipped (no GPU here: the engine runs default kernels until tuned; re-run this build on the GPU)"
    stage("tune", skip_tune, lambda: pipeline.tune_stage(ws, profile, device=device, graph=graph_stage,
                                                         force=options.force, tensor_parallel_size=tp,
                                                         batch_invariant=invariant))

    # 5. export ---------------------------------------------------------------------------------------------
    # a tune stage of the other mode or size is not exported (its choices would not be what the manifest says)
    tuned = ws.up_to_date("tune", matches=lambda p: p.get("graph") == graph_stage
                          and (p.get("tensor_parallel_size") or 1) == tp
                          and bool(p.get("batch_invariant")) == invariant)
    export_from = "tune" if tuned else graph_stage
    tuned_profile = OptimizationProfile.from_json(ws.record("tune")["params"]["profile"]) if tuned else None
    graph = Graph.loads(ws.path(graph_stage, "graph.json").read_text())
    limits = EngineLimits.for_graph(graph, tuned_profile, options.limits)
    from .export import export_params

    skip_export = _skip(ws.up_to_date("export", export_params(out, export_from, limits, invariant, tp),
                                       matches=lambda _: _engine_matches(ws, out, read_engine, accuracy)))
    stage("export", skip_export, lambda: export_engine(ws, out, stage=export_from, limits=limits,
                                                       force=options.force, accuracy=accuracy,
                                                       tensor_parallel_size=tp, batch_invariant=invariant))
    ranks = f" for {tp} ranks (tensor parallelism)" if tp > 1 else ""
    log(f"engine {out}{ranks}: {options.precision}, {'tuned' if tuned else 'not tuned'}, max_model_len "
        f"{limits.max_model_len}, KV blocks of {limits.block_size} tokens in {limits.kv_cache_dtype}"
        f"{', batch-invariant' if invariant else ''}")
    # what a GPU runs instead of a kernel that cannot take this model's shapes, one line per reason
    from ..graph.executor import gpu_fallback_notes
    from ..kernels.autotune import TunedChoices

    choices = TunedChoices.from_json(ws.read_json("tune", "choices.json")) if tuned else None
    for line in gpu_fallback_notes(graph, choices):
        log(f"GPU kernels: {line}")
    if invariant:
        for line in invariance_notes(ws, graph, choices):
            log(line)
    return out


def invariance_notes(ws: Workspace, graph, choices) -> list[str]:
    """What the batch-invariant mode runs on a GPU and what it costs, for the build log: the tune stage's cost per
    op against the per-bucket choices (``invariant.cost_lines``) when it tuned in the mode; and the selection's
    notes (``invariant.select``: ops that lost a tuned choice, or run no invariant kernel)."""
    from ..graph.executor import meta_arguments
    from ..kernels.autotune import tactic_ops
    from ..kernels.invariant import choice_lines, cost_lines, select

    tactic_ops()
    lines = []
    if choices is not None and choices.batch_invariant and ws.path("tune", "invariance.json").is_file():
        lines += cost_lines(ws.read_json("tune", "invariance.json")["costs"])
    selection = select(graph, meta_arguments(graph), choices)
    if choices is None:  # untuned: the defaults, one line per op
        lines += choice_lines(graph, selection.choices, prefix="batch-invariant (untuned)")
    return lines + selection.notes


def build_profile(options: BuildOptions, max_model_len: int):
    """The optimization profile a build tunes: the engine's limits (default: ``format.DEFAULT_MAX_NUM_SEQS`` and
    ``DEFAULT_MAX_NUM_BATCHED_TOKENS``), decode steps tuned at 1024 tokens of context (half the model's context
    where that is shorter). Its buckets are powers of
    four below ``max_num_seqs``, ``max_num_seqs`` itself (so a full decode step runs choices tuned on decodes
    alone, not on a mixed step) and ``max_num_batched_tokens`` (a full step of prompt chunks and decodes)."""
    from ..kernels.profiles import OptimizationProfile
    from .format import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS

    tokens = options.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
    seqs = min(options.max_num_seqs or DEFAULT_MAX_NUM_SEQS, tokens)
    edges, e = [], 1
    while e < seqs:
        edges.append(e)
        e *= 4
    edges = sorted({*edges, seqs, tokens})
    # a decode after ``context`` cached tokens writes position ``context``: it must lie inside the model's context
    return OptimizationProfile(max_tokens=tokens, max_seqs=seqs, context=min(1024, max_model_len // 2),
                               max_context=max_model_len, edges=tuple(edges))


def _skip(up_to_date: bool) -> str | None:
    """The skip message of a stage that need not run again (``Workspace.up_to_date``), else None."""
    return "up to date, skipped" if up_to_date else None


def _quant_matches(params: dict, fmt: str, budget: float | None, calibration: dict, device: str) -> bool:
    """A quant stage run with record params ``params`` is what a build with these settings would run."""
    recorded = params.get("calibration", {})
    if params.get("device") != device or any(recorded.get(k) != v for k, v in calibration.items()):
        return False  # other data, sizes or device (whose default sizes differ): calibrate again
    if params["plan"].get("edited"):  # a plan the user edited and applied: kept, never replaced by a build
        return True
    auto = params.get("auto")
    if budget is not None:
        return bool(auto) and auto.get("format") == fmt and auto.get("budget_pct") == budget
    formats = {g.get("format") for g in params["plan"].get("groups", {}).values()} - {"bf16"}
    return not auto and formats == {fmt}


def _engine_matches(ws: Workspace, out: Path, read_engine, accuracy: dict | None) -> bool:
    """The engine at ``out`` is intact, is the one the workspace's export stage wrote, and carries ``accuracy``."""
    try:
        manifest, _, _ = read_engine(out)
        return manifest == ws.read_json("export", "manifest.json") and manifest.get("accuracy") == accuracy
    except WorkbenchError:
        return False


def _check_texts(options: BuildOptions, source, quantized: bool) -> None:
    """Read --calib-data and --eval-data (which only a quantized build uses) once up front, so a bad file fails in
    one line before any stage runs."""
    from ..evaluate import dataset_path, load_text

    for option, given in (("--calib-data", options.calib_data), ("--eval-data", options.eval_data)):
        if given is None or not quantized:
            continue
        if source.kind == "random":
            raise WorkbenchError(f"{option} {given}: this model has random weights and no tokenizer to read text "
                                 f"with; leave {option} out (it uses seeded random token ids)")
        load_text(dataset_path(given), option=option)


def _calibration_request(options: BuildOptions, source) -> dict:
    """What the quant stage's params["calibration"] must hold for a build with ``options`` to reuse it."""
    from ..evaluate import dataset_path

    data = None if source.kind == "random" else str(dataset_path(options.calib_data or "calibration").resolve())
    return {"file": data, "requested": {"samples": options.samples, "seq_len": options.seq_len}}


# ---- the accuracy gate ---------------------------------------------------------------------------------------
#: evaluation tokens the gate measures on the CPU (the whole set on a GPU), and random ids for a model without text
CPU_EVAL_TOKENS = 2048
RANDOM_EVAL_TOKENS = 2048
EVAL_WINDOW, EVAL_STRIDE = 512, 256  # as `workbench eval`


def accuracy_gate(ws: Workspace, options: BuildOptions, device: str, log: Callable[[str], None]) -> dict:
    """Perplexity of the quantized graph against the unquantized optimized one (``_measure_accuracy``, or the
    workspace's up-to-date ``accuracy`` stage), said in one line; refuses an increase over
    ``options.max_ppl_increase`` % unless ``options.force``. Returns the engine manifest's "accuracy" block."""
    source_random = _workspace_source(ws).kind == "random"
    name = options.eval_data or "evaluation"
    params = _jsonable({"dataset": None if source_random else str(_dataset_file(name)),
                        "max_tokens": RANDOM_EVAL_TOKENS if source_random else
                        (None if device.startswith("cuda") else CPU_EVAL_TOKENS),
                        "window": EVAL_WINDOW, "stride": EVAL_STRIDE, "device": device})
    if ws.up_to_date("accuracy", params):
        result, when = ws.read_json("accuracy", "accuracy.json"), " (measured before: up to date)"
    else:
        result, when = _measure_accuracy(ws, params, name, force=options.force, log=log), ""
    limit = options.max_ppl_increase
    within = result["increase_pct"] <= limit
    block = {**{k: v for k, v in result.items() if k != "what"}, "max_tokens": params["max_tokens"],
             "limit_pct": limit, "within_limit": within, "forced": not within and options.force}
    change = (f"{result['ppl_base']:.2f} -> {result['ppl']:.2f} ({_pct(result['increase_pct'])}) on "
              f"{result['tokens']} {result['what']}")
    if within:
        log(f"accuracy: perplexity {change}; limit +{limit:g}%{when}")
        return block
    if options.force:
        log(f"accuracy: perplexity {change}; OVER the limit +{limit:g}%, exported anyway (--force){when}")
        return block
    gentler = ("a smaller --budget or --precision bf16" if options.precision == "auto" else "a gentler precision "
               "such as --precision auto")
    raise WorkbenchError(f"accuracy gate: the {options.precision} graph's perplexity rises {change}, over the limit of +{limit:g}% "
                         f"(--max-ppl-increase); build with {gentler}, or export it anyway with --force")


def _measure_accuracy(ws: Workspace, params: dict, name, *, force: bool, log: Callable[[str], None]) -> dict:
    """Measure the passes and quant graphs' perplexity as ``params`` says (``accuracy_gate``) into the workspace's
    ``accuracy`` stage (accuracy.json); on a GPU both run the steps the engine runs (``Program.for_gpu_steps``)."""
    from ..evaluate import dataset_label, load_text, logits_fn, perplexity
    from ..graph.ir import Graph
    from ..models.intake import load_tokenizer
    from ..pipeline import load_program

    device = params["device"]
    config = Graph.loads(ws.path("passes", "graph.json").read_text()).meta.get("config", {})
    if params["dataset"] is None:
        vocab = int(config["vocab_size"])
        ids = torch.randint(1, vocab, (params["max_tokens"],), generator=torch.Generator().manual_seed(2))
        dataset, files = "random token ids (no tokenizer)", []
        what = "seeded random token ids (the model has no tokenizer)"
    else:
        path = Path(params["dataset"])
        tokenizer = load_tokenizer(_workspace_source(ws))
        text = load_text(path, option=None if name == "evaluation" else "--eval-data")
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        dataset, files = dataset_label(name), [path]
        what = f"tokens of {dataset}"
        if params["max_tokens"] is not None and ids.numel() > params["max_tokens"]:
            what += f" (its first {params['max_tokens']} tokens of {ids.numel()}: capped on the CPU)"
            ids = ids[:params["max_tokens"]]
    window = min(params["window"], int(config.get("max_position_embeddings") or params["window"]))
    stride = min(params["stride"], max(1, window // 2))
    log(f"accuracy: measuring the perplexity of the quantized and the unquantized graph on {device}, {ids.numel()} "
        f"{what} ...")
    ppl = {}
    with ws.run("accuracy", params=params, upstream=("passes", "quant"), input_files=files, force=force) as run:
        for stage in ("passes", "quant"):
            program = load_program(ws, stage=stage, device=device)
            if device.startswith("cuda"):
                program = program.for_gpu_steps()  # the kernels the engine runs
            ppl[stage] = perplexity(logits_fn(program), ids, window=window, stride=stride, progress=True)
            del program
        base, quant = ppl["passes"], ppl["quant"]
        result = {"ppl_base": base.perplexity, "ppl": quant.perplexity,
                  "increase_pct": (quant.perplexity / base.perplexity - 1) * 100, "tokens": quant.tokens_scored,
                  "dataset": dataset, "what": what, "window": window, "stride": stride, "device": device}
        run.write_json("accuracy.json", result)
    return result


def _pct(x: float) -> str:
    return f"{x:+.2f}%" if x == 0 or abs(x) >= 0.01 else f"{x:+.1e}%"


def _dataset_file(name) -> Path:
    from ..evaluate import dataset_path

    return dataset_path(name).resolve()


def _workspace_source(ws: Workspace):
    from ..pipeline import workspace_source

    return workspace_source(ws)


def _jsonable(obj):
    return json.loads(json.dumps(obj))
