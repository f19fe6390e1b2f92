"""`workbench build`: every stage from a model to an engine directory, with defaults, resuming from its workspace.

    build_engine("smollm2-135m", "engine/", BuildOptions(precision="fp8"))   # workspace: engine.workspace/

    [1/5] capture: running ...            capture the graph (CaptureOptions: dtype, seed)
    [2/5] passes: up to date, skipped     the default passes (fusions, paged attention)
    [3/5] quant: ...                      fp8 | int8 (SmoothQuant W8A8) | auto (fp8 where the budget allows)
    [4/5] tune: ...                       on a GPU only: the engine's profile (from its limits)
    [5/5] export: ...                     the engine directory

A stage whose workspace artifacts are up to date (``Workspace.status`` is "ok") and were made with the
same settings is not run again, so a build that was interrupted (or re-run with the same arguments)
starts where it stopped; a stage edited by hand is never overwritten unless ``force``.
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
    samples: int | None = None       # calibration sequences (default: quant_stage's for the device)
    seq_len: int | None = None
    device: str = "auto"             # calibration and tuning device; "auto": the GPU when there is one
    tune: bool | None = None         # None: tune when a GPU is present
    kv_block_size: int | None = None # tokens per KV-cache block; None: the paged pass's default (16)
    force: bool = False              # re-run stages whose artifacts were edited by hand

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise WorkbenchError(f"build: precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.auto_budget <= 0:
            raise WorkbenchError(f"build: the auto budget is a perplexity increase in %, > 0; got {self.auto_budget}")
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
    source = resolve_source(model, seed=options.seed)
    want = _jsonable({"source": source.to_json(), "dtype": options.dtype, "seed": options.seed})
    rec = ws.record("capture")
    if rec is not None and rec["params"].get("source") != want["source"] and not options.force:
        raise WorkbenchError(f"workspace {ws.root} holds a capture of {rec['params']['source'].get('spec')!r}, not "
                             f"{model!r}; give another --workspace (or --force to re-capture it there)")
    stage("capture", _up_to_date(ws, "capture", rec is not None and rec["params"] == want),
          lambda: pipeline.capture_stage(ws, model, pipeline.CaptureOptions(dtype=options.dtype, seed=options.seed),
                                         force=options.force))

    # 2. passes ---------------------------------------------------------------------------------------------
    passes_rec = ws.record("passes")
    same_block = passes_rec is not None and passes_rec["params"].get("kv_block_size") == options.kv_block_size
    stage("passes", _up_to_date(ws, "passes", same_block),
          lambda: pipeline.passes_stage(ws, force=options.force, device=device, kv_block_size=options.kv_block_size))

    # 3. quantization -------------------------------------------------------------------------------------
    fmt = FORMAT_OF.get(options.precision)
    budget = options.auto_budget if options.precision == "auto" else None
    if options.precision == "auto" and device.startswith("cuda") and torch.cuda.get_device_capability() < (8, 9):
        fmt = "int8_sq"  # no FP8 tensor cores before Ada/Hopper
    if not quantized:
        skip_quant = "not needed (--precision bf16)"
    else:
        skip_quant = _up_to_date(ws, "quant", _quant_matches(ws.record("quant"), fmt, budget))
    stage("quant", skip_quant, lambda: pipeline.quant_stage(
        ws, fmt=fmt, auto_budget=budget, samples=options.samples, seq_len=options.seq_len, device=device,
        force=options.force))

    # 4. tuning ---------------------------------------------------------------------------------------------
    config = Graph.loads(ws.path("capture", "graph.json").read_text()).meta.get("config", {})
    max_len = options.max_model_len or int(config.get("max_position_embeddings") or 8192)
    profile = build_profile(options, max_len)
    if do_tune:
        rec = ws.record("tune")
        same = rec is not None and rec["params"].get("profile") == profile.to_json() and \
            rec["params"].get("graph") == graph_stage
        skip_tune = _up_to_date(ws, "tune", same)
    else:
        skip_tune = "skipped (no GPU here: the engine runs default kernels until tuned; re-run this build on the GPU)"
    stage("tune", skip_tune, lambda: pipeline.tune_stage(ws, profile, device=device, graph=graph_stage,
                                                         force=options.force))

    # 5. export ---------------------------------------------------------------------------------------------
    rec = ws.record("tune")
    tuned = ws.status("tune") == "ok" and rec["params"].get("graph") == graph_stage
    export_from = "tune" if tuned else graph_stage
    tuned_profile = OptimizationProfile.from_json(rec["params"]["profile"]) if tuned else None
    graph = Graph.loads(ws.path(graph_stage, "graph.json").read_text())
    limits = EngineLimits.for_graph(graph, tuned_profile, options.limits)
    rec = ws.record("export")
    same = (rec is not None and rec["params"] == _jsonable({"out": str(out.resolve()), "stage": export_from,
                                                             "limits": limits.to_json()}))
    skip_export = _up_to_date(ws, "export", same and _engine_matches(ws, out, read_engine))
    stage("export", skip_export, lambda: export_engine(ws, out, stage=export_from, limits=limits,
                                                       force=options.force))
    log(f"engine {out}: {options.precision}, {'tuned' if tuned else 'not tuned'}, max_model_len "
        f"{limits.max_model_len}, KV blocks of {limits.block_size} tokens in {limits.kv_cache_dtype}")
    return out


def build_profile(options: BuildOptions, max_model_len: int):
    """The optimization profile a build tunes: the engine's limits (default: ``format.DEFAULT_MAX_NUM_SEQS`` and
    ``DEFAULT_MAX_NUM_BATCHED_TOKENS``), decode steps tuned at 1024 tokens of context. Its buckets are powers of
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
    return OptimizationProfile(max_tokens=tokens, max_seqs=seqs, context=min(1024, max_model_len),
                               max_context=max_model_len, edges=tuple(edges))


def _up_to_date(ws: Workspace, stage: str, same_settings: bool) -> str | None:
    """The skip message when ``stage`` need not run again, else None."""
    return "up to date, skipped" if same_settings and ws.status(stage) == "ok" else None


def _quant_matches(rec: dict | None, fmt: str, budget: float | None) -> bool:
    if rec is None:
        return False
    params = rec["params"]
    if params["plan"].get("edited"):  # a plan the user edited and applied: kept, never replaced by a build
        return True
    auto = params.get("auto")
    if budget is not None:
        return bool(auto) and auto.get("format") == fmt and auto.get("budget_pct") == budget
    formats = {g.get("format") for g in params["plan"].get("groups", {}).values()} - {"bf16"}
    return not auto and formats == {fmt}


def _engine_matches(ws: Workspace, out: Path, read_engine) -> bool:
    """The engine at ``out`` is intact and is the one the workspace's export stage wrote."""
    try:
        manifest, _, _ = read_engine(out)
        return manifest == ws.read_json("export", "manifest.json")
    except WorkbenchError:
        return False


def _jsonable(obj):
    return json.loads(json.dumps(obj))
