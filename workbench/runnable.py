"""One way to open what runs: an engine directory, a workspace or a model source, as a program with its
tokenizer and limits. ``LLM``, ``workbench serve``, ``workbench eval`` and ``workbench generate`` all open
what they run here; a workspace's "latest" graph is ``pipeline.latest_stage``'s.

    r = open_runnable("engine/")          # an engine: verified, its tuned kernels where they apply, its limits
    r = open_runnable("ws/")              # a workspace: the graph of its latest up-to-date stage
    r = open_runnable("smollm2-135m")     # a model source (named model, preset, HF directory, GGUF file,
                                          # config.json): captured and optimized in memory, nothing written
    r.program, r.tokenizer, r.chat_template, r.limits, r.name, r.kind, r.stage

``tensor_parallel_size`` N > 1 opens rank 0's shard (``r.sharding`` says how the other ranks get theirs: the
runtime's ``tensor_parallel``): of an engine, only its slices of the weights are read; of anything else, the whole
model is loaded and cut. ``None`` runs an engine at the size it was built for (its manifest), anything else whole.

``device="auto"`` (the default) is the GPU when there is one (``workbench.device``). A model source runs in
bf16 on a GPU and fp32 on the CPU (``dtype``), untuned: on a GPU its steps run each op's graph-safe default
kernels (``Program.for_gpu_steps``). Quantizing and tuning are stages: ``workbench build`` makes an engine
with them.

``batch_invariant=True`` opens it in the batch-invariant mode (``kernels/invariant.py``: one invariant tactic and
config per op for every step); None (the default) takes an engine's own setting (``workbench build
--batch-invariant`` records it in the manifest), off for anything else, or an opened ``Runnable``'s as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .device import resolve_device
from .errors import WorkbenchError
from .graph.paged import is_paged, whole_size
from .graph.sharding import Sharding, shard_in_memory

@dataclass
class Runnable:
    """What the runtime and the evaluation commands run, with where it came from."""

    program: Any                   # graph.executor.Program, on the device
    tokenizer: Any | None
    chat_template: str | None
    name: str                      # what a server calls the model: the directory's or the source's name
    kind: str                      # "engine" | "workspace" | "model" | "program"
    stage: str                     # the graph that runs: "engine", a workspace stage, or "passes" (a model source)
    limits: Any | None             # engine.format.EngineLimits (None for a graph without paged attention)
    engine: Any | None = None      # the loaded engine.load.Engine (manifest, profile, precision) for an engine
    source: Any | None = None      # the models.intake.ModelSource, where known
    notes: list[str] = field(default_factory=list)
    #: rank 0's ``graph.sharding.Sharding`` when ``program`` is its shard of several ranks, else None
    sharding: Any | None = None
    batch_invariant: bool = False  # the program runs in the batch-invariant mode (``program.batch_invariant``)

    @property
    def device(self) -> torch.device:
        return self.program.device


def open_runnable(target, *, device: str | torch.device = "auto", stage: str = "latest", tokenizer=None,
                  paged: bool = True, dtype: str = "auto", kv_block_size: int | None = None,
                  progress: bool = True, tensor_parallel_size: int | None = 1,
                  batch_invariant: bool | None = None) -> Runnable:
    """Open ``target`` to run on ``device`` (see the module docstring). ``stage`` picks a workspace's graph
    ("latest": ``pipeline.latest_stage``); ``tokenizer`` (a tokenizer object, or a model directory or name) replaces the
    model's own; ``paged=False`` also admits a workspace's captured graph (perplexity, not the runtime);
    ``dtype`` and ``kv_block_size`` apply to a model source; ``tensor_parallel_size``: rank 0's shard of that
    many ranks (None: an engine's own size, else 1); ``batch_invariant``: see the module docstring."""
    if batch_invariant is not None and not isinstance(batch_invariant, bool):
        raise WorkbenchError(f"batch_invariant must be True, False or None (the engine's own setting), not "
                             f"{batch_invariant!r}")
    if isinstance(target, Runnable):  # opened already (a bench running several engines over one load)
        if batch_invariant is None or batch_invariant == target.batch_invariant:
            return target
        program = target.program.with_batch_invariance(batch_invariant)
        return replace(target, program=program, batch_invariant=batch_invariant,
                       notes=target.notes + [n for n in program.notes if n not in target.notes])
    device = resolve_device(device)
    if tensor_parallel_size is not None:
        whole_size(tensor_parallel_size, "tensor_parallel_size")
    runnable = _open(target, device, stage, tokenizer, paged, dtype, kv_block_size, progress, tensor_parallel_size)
    if runnable.sharding is None and (tensor_parallel_size or 1) > 1:  # the whole model here: rank 0 cuts slices
        runnable.program, runnable.sharding = shard_in_memory(runnable.program, tensor_parallel_size)
    if batch_invariant is None:
        batch_invariant = engine_batch_invariant(runnable.engine) if runnable.engine is not None else False
    if batch_invariant:  # before for_gpu_steps: its notes are then about what runs
        runnable.program = runnable.program.with_batch_invariance()
        runnable.batch_invariant = True
        if runnable.device.type != "cuda":
            runnable.notes += runnable.program.notes
    if runnable.device.type == "cuda" and not runnable.program.graph_safe:
        # the implementations GPU steps run: tuned choices where they apply and are graph-safe, each op's GPU
        # default kernel elsewhere (never the reference paged attention, which reads the host)
        runnable.program = runnable.program.for_gpu_steps()
        runnable.notes += runnable.program.notes
    return runnable


def engine_batch_invariant(engine) -> bool:
    """Whether a loaded engine was built in the batch-invariant mode (its manifest's ``batch_invariant``)."""
    flag = engine.manifest.get("batch_invariant", False)
    if not isinstance(flag, bool):
        raise WorkbenchError(f"{engine.path / 'manifest.json'}: 'batch_invariant' is {str(flag)[:60]!r}, not true or "
                             "false; re-export the engine (`workbench build ... --batch-invariant`)")
    return flag


def _open(target, device, stage, tokenizer, paged, dtype, kv_block_size, progress, tensor_parallel_size) -> Runnable:
    from .engine.format import EngineLimits, is_engine_dir
    from .graph.executor import Program

    tok = load_tokenizer_spec(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if isinstance(target, Program):
        limits = EngineLimits.for_graph(target.graph) if is_paged(target.graph) else None
        return Runnable(target, tok, template_of(tok), "model", "program", "program", limits)
    if is_engine_dir(target):
        from .engine import load_engine

        if stage != "latest":
            raise WorkbenchError(f"{target} is an engine directory, which holds one graph: leave stage at 'latest' "
                                 f"(got {stage!r}), or give the workspace to run another stage")
        engine = load_engine(target, device=device, progress=progress, tensor_parallel_size=tensor_parallel_size)
        tok = tok or engine.tokenizer
        template = (engine.chat_template if tokenizer is None else None) or template_of(tok)
        from .models.intake import ModelSource

        source = ModelSource.from_json(engine.info["model"]["source"]) if engine.info.get("model", {}).get(
            "source") else None
        sharding = None
        if engine.tensor_parallel_size > 1:
            sharding = Sharding.of_engine(engine)
        return Runnable(engine.program, tok, template, Path(target).resolve().name, "engine", "engine",
                        engine.limits, engine, source, sharding=sharding)
    if _is_workspace(target):
        return _open_workspace(Path(target), device, stage, tok, tokenizer is None, paged)
    if stage != "latest":
        raise WorkbenchError(f"{target!r} is a model source, not a workspace: it has no stages to pick "
                             f"(got stage {stage!r}); capture it into a workspace first")
    return _open_model(str(target), device, tok, tokenizer is None, dtype, kv_block_size, progress)


def _is_workspace(target) -> bool:
    if not isinstance(target, (str, Path)):
        return False
    from .workspace import STAGE_ORDER

    p = Path(target)
    return p.is_dir() and any((p / stage).is_dir() for stage in STAGE_ORDER)


def _open_workspace(root: Path, device, stage: str, tok, own_tokenizer: bool, paged: bool) -> Runnable:
    from .engine.format import EngineLimits
    from .models.intake import load_tokenizer
    from .pipeline import latest_stage, load_program, workspace_source
    from .workspace import Workspace

    ws = Workspace(root, create=False)
    if stage == "latest":
        stage = latest_stage(ws, device=device, paged=paged)
    elif stage == "tune" and device.type != "cuda":
        raise WorkbenchError(f"the tune stage's choices run on a CUDA GPU, and this runs on {device.type!r}; run "
                             "another stage here (or leave stage at 'latest')")
    source = workspace_source(ws)
    program = load_program(ws, stage=stage, device=device)
    tok = tok or (load_tokenizer(source) if own_tokenizer else None)
    limits = EngineLimits.for_graph(program.graph) if is_paged(program.graph) else None
    return Runnable(program, tok, template_of(tok), root.resolve().name, "workspace", stage, limits, None, source)


def _open_model(spec: str, device, tok, own_tokenizer: bool, dtype: str, kv_block_size: int | None,
                progress: bool) -> Runnable:
    """Capture and optimize a model source in memory (the capture and passes stages, without a workspace)."""
    import time

    from .engine.format import EngineLimits
    from .models.intake import load_tokenizer, resolve_source
    from .pipeline import optimize

    source = resolve_source(spec)
    t0 = time.perf_counter()
    # the passes' checks are the optimize stage's
    result = optimize(source, dtype=dtype, device=device, kv_block_size=kv_block_size, check=False)
    graph, program, optimized = result.captured.graph, result.program, result.graph
    notes = [f"{source.spec}: captured and optimized in memory in {time.perf_counter() - t0:.1f} s "
             f"({graph.meta['dtype']}, "
             f"{len(graph.nodes)} -> {len(optimized.nodes)} nodes, untuned)"]
    if progress:
        import sys

        print(f"workbench: {notes[0]}", file=sys.stderr, flush=True)
    tok = tok or (load_tokenizer(source) if own_tokenizer else None)
    name = Path(spec).stem if Path(spec).suffix == ".gguf" else Path(spec).name or spec
    return Runnable(program, tok, template_of(tok), name, "model", "passes", EngineLimits.for_graph(optimized),
                    None, source, notes)


def load_tokenizer_spec(spec: str | Path):
    """A tokenizer from a directory of tokenizer files alone, or from a model source's files (name, directory)."""
    from .models.intake import load_tokenizer, resolve_source

    if (Path(spec) / "tokenizer.json").is_file() or (Path(spec) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer  # a directory of tokenizer files alone (no weights needed)

        return AutoTokenizer.from_pretrained(str(spec))
    tok = load_tokenizer(resolve_source(spec, fetch=False))
    if tok is None:
        raise WorkbenchError(f"{spec!r} has random weights and no tokenizer; give a model directory or name with one")
    return tok


def template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return template if isinstance(template, str) else None
