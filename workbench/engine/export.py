"""Export a workspace's optimized (quantized, tuned) graph and its weights as a self-contained engine directory.

    export_engine("ws/", "engine/")                                   # the latest up-to-date stage: tune, quant, passes
    export_engine(ws, "engine/", stage="quant", limits={"max_model_len": 4096})
    export_engine(ws, "engine/", tensor_parallel_size=2)              # an engine for 2 ranks (the tune stage's size)

The engine needs neither the workspace nor the original checkpoint: weights are written as the graph
runs them (fused QKV and gate/up, RoPE tables, quantized weights and scales), so a parameter that a pass
derived is stored, not re-derived. The directory is built under a hidden temporary name beside ``out``
(every file fsynced, the manifest last) and renamed into place: an interrupted export leaves no engine
that loads, and a previous engine at ``out`` is replaced only once the new one is complete.

An engine for N ranks (``tensor_parallel_size``: the tune stage's size when it is exported, else 1) stores the same
unsharded graph and weights: each rank shards the graph and reads its own slices when it loads
(``engine.load``). The manifest records the size (``tensor_parallel_size``), and the export checks that the graph
shards for it.

The workspace records the export as its ``export`` stage (with a copy of the manifest), so a stale
engine shows in ``workbench info`` when an upstream stage is re-run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

try:
    import fcntl
except ImportError:  # not POSIX: leftovers are told apart by process id alone
    fcntl = None

import torch

from ..errors import WorkbenchError
from ..graph.sharding import check_tensor_parallel_size
from ..env import atomic_write, environment, sha256_file
from ..plugins import loaded as loaded_plugins
from ..workspace import Workspace
from .format import (ENGINE_JSON, FORMAT_VERSION, MANIFEST, MIN_TORCH, TIMINGS, TOKENIZER_DIR, WEIGHTS, EngineLimits,
                     is_engine_dir)

#: Stages an engine can be exported from, newest first ("latest" takes the newest that is up to date).
EXPORTABLE = ("tune", "quant", "passes")


def export_params(out: Path, stage: str, limits: EngineLimits, batch_invariant: bool,
                  tensor_parallel_size: int = 1) -> dict[str, Any]:
    """The export stage's record params: what makes an engine at ``out`` stale when it changes."""
    return {"out": str(Path(out).resolve()), "stage": stage, "limits": limits.to_json(),
            "tensor_parallel_size": tensor_parallel_size, **({"batch_invariant": True} if batch_invariant else {})}


def export_engine(ws: Workspace | str | Path, out: str | Path, *, stage: str = "latest",
                  limits: EngineLimits | Mapping[str, Any] | None = None, force: bool = False,
                  accuracy: Mapping[str, Any] | None = None, tensor_parallel_size: int | None = None,
                  batch_invariant: bool | None = None) -> Path:
    """Write the engine directory of ``ws``'s ``stage`` to ``out``; returns ``out``.

    ``stage``: "latest" (the newest up-to-date of tune, quant and passes: ``pipeline.latest_stage``), or one of
    those by name; it must be up to date (``workbench info`` says "ok"). ``limits``: overrides of the runtime limits (max_model_len,
    max_num_seqs, max_num_batched_tokens), defaults from the model's context and the tuned profile.
    ``force``: re-record the export even if ``ws/export`` was edited by hand. ``accuracy``: the build's accuracy
    gate result (perplexity before and after quantization), recorded in the manifest under "accuracy".
    ``tensor_parallel_size``: the ranks the engine is for (default: the tune stage's size when exporting it, else
    1); it must be the tune stage's when exporting that (its choices are for that size's per-rank graph).
    ``batch_invariant``: recorded in the manifest, so that ``LLM(engine)`` and ``workbench serve`` run the
    batch-invariant mode by default; None: as the tune stage ran (in the mode or not), off when untuned."""
    from ..graph.paged import is_paged
    from ..kernels.autotune import TimingCache, TunedChoices
    from ..kernels.profiles import OptimizationProfile
    from ..models.intake import load_tokenizer
    from ..pipeline import latest_stage, load_program, workspace_source

    ws = ws if isinstance(ws, Workspace) else Workspace(ws, create=False)
    out = Path(out)
    if stage == "latest":
        stage = latest_stage(ws)  # on any device: the engine carries the tuned choices for the GPU they fit
    if stage not in EXPORTABLE:
        raise WorkbenchError(f"cannot export the {stage!r} stage; export one of {', '.join(EXPORTABLE)} (the captured "
                             f"graph has no paged KV cache: run `workbench optimize {ws.root}`)")
    status = ws.status(stage)
    if status != "ok":
        command = {"tune": "tune", "quant": "quantize", "passes": "optimize"}[stage]
        raise WorkbenchError(f"the {stage} stage of {ws.root} is {status}, not up to date: re-run it "
                             f"(`workbench {command} {ws.root}`) or export another stage with --stage")
    _check_out(out, ws)

    graph_stage, choices, profile, tuned_for, timings, tuned_tp = stage, None, None, None, None, None
    if stage == "tune":
        rec = ws.record("tune")
        tuned_tp = int(rec["params"].get("tensor_parallel_size") or 1)
        graph_stage = rec["params"].get("graph", "passes")
        choices = TunedChoices.from_json(ws.read_json("tune", "choices.json"))
        if batch_invariant is None:
            batch_invariant = choices.batch_invariant
        profile = OptimizationProfile.from_json(rec["params"]["profile"])
        timings = ws.path("tune", "timings.json")
        tuned_for = TimingCache.view(timings).env
    program = load_program(ws, stage=graph_stage, device="cpu")  # weights as the graph runs them
    graph = program.graph
    if not is_paged(graph):
        raise WorkbenchError(f"the {graph_stage} graph of {ws.root} has no paged attention, which the runtime needs: "
                             f"re-run `workbench optimize {ws.root}` with the default passes (insert_paged_attention)")
    given = tensor_parallel_size
    tp = check_tensor_parallel_size(graph, (tuned_tp or 1) if given is None else given, "export")
    if tuned_tp is not None and tp != tuned_tp:
        raise WorkbenchError(f"the tune stage of {ws.root} tuned the per-rank graph of tensor-parallel size "
                             f"{tuned_tp}, not {tp}: export it with --tp {tuned_tp}, or re-tune it (`workbench tune "
                             f"{ws.root} --tp {tp}`)")
    limits = limits if isinstance(limits, EngineLimits) else EngineLimits.for_graph(graph, profile, limits)
    if profile is None:  # not tuned: the profile the limits describe, for re-tuning on a GPU later
        profile = OptimizationProfile(max_tokens=limits.max_num_batched_tokens, max_seqs=limits.max_num_seqs,
                                      context=min(1024, limits.max_model_len), max_context=limits.max_model_len)
    source = workspace_source(ws)
    tokenizer = load_tokenizer(source)

    engine_graph = type(graph).from_json(graph.to_json())
    for p in engine_graph.params.values():
        p.derived = None  # stored as computed: the engine never re-derives from checkpoint tensors
    tensors, tied = _dedupe(program.params)
    info = {
        "format_version": FORMAT_VERSION,
        "model": {"architecture": graph.meta.get("architecture"), "model_type": graph.meta.get("model_type"),
                  "dtype": graph.meta.get("dtype"), "source": source.to_json()},
        "config": graph.meta.get("config", {}),
        "limits": limits.to_json(),
        "profiles": [profile.to_json()],
        "tuned": choices is not None,
        "choices": choices.to_json() if choices else None,
        "precision": graph.meta.get("precision"),
        "weights": {"file": WEIGHTS, "tied": tied, "count": len(program.params),
                    "bytes": sum(t.numel() * t.element_size() for t in tensors.values())},
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "graph": engine_graph.to_json(),
    }
    if batch_invariant is not None and not isinstance(batch_invariant, bool):
        raise WorkbenchError(f"export: batch_invariant is True, False or None, not {batch_invariant!r}")
    batch_invariant = bool(batch_invariant)
    params = export_params(out, stage, limits, batch_invariant, tp)
    with ws.run("export", params=params, upstream=(stage,), force=force) as run:
        env = environment()
        manifest_extra = {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": env["versions"],
            "requires": {"workbench": env["versions"]["workbench"], "torch": MIN_TORCH},
            "exported_on": env["host"],
            "tuned_for": tuned_for,
            "tensor_parallel_size": tp,
            "plugins": loaded_plugins(),
            "workspace": {"root": str(ws.root.resolve()), "stage": stage, "graph": graph_stage},
            "batch_invariant": batch_invariant,  # LLM(engine) and `workbench serve` run the mode by default
            **({"accuracy": dict(accuracy)} if accuracy is not None else {}),
        }
        manifest = _write_engine(out, info, tensors, tokenizer, timings, manifest_extra)
        run.write_json("manifest.json", manifest)
    return out


def _check_out(out: Path, ws: Workspace) -> None:
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{out} is a file; give a directory for the engine (--out)")
    if out.resolve() == ws.root.resolve() or ws.root.resolve() in out.resolve().parents:
        raise WorkbenchError(f"the engine cannot go inside the workspace ({ws.root}); give another --out")
    if out.is_dir() and any(out.iterdir()) and not is_engine_dir(out):
        raise WorkbenchError(f"{out} exists and is not an engine directory; refusing to replace it: give an empty "
                             "or new directory (--out)")


def _dedupe(params: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (safetensors refuses shared memory) and ``name -> stored name`` for identical views
    (tied weights) stored once; overlapping but different views are copied."""
    tensors, tied, seen = {}, {}, {}
    for name, t in params.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:
            tensors[name] = t
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen:
            tied[name] = seen[view]
            continue
        if any(v[0] == view[0] for v in seen):
            t = t.clone()
            view = (t.untyped_storage().data_ptr(), *view[1:])
        seen[view] = name
        tensors[name] = t
    return tensors, tied


def _write_engine(out: Path, info: dict, tensors: dict[str, torch.Tensor], tokenizer, timings: Path | None,
                  manifest_extra: dict) -> dict:
    """Build the directory under a temporary name beside ``out``, then rename it into place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    lock = _hold(tmp)  # while this export lives: the next one tells a dead export's leftover from a running one
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "workbench_engine": str(FORMAT_VERSION)})
        os.chmod(tmp / WEIGHTS, tmp.stat().st_mode & 0o666)  # safetensors creates it owner-only; as umask says
        _fsync(tmp / WEIGHTS)
        if timings is not None:
            atomic_write(tmp / TIMINGS, timings.read_bytes())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            for f in (tmp / TOKENIZER_DIR).rglob("*"):
                if f.is_file():
                    _fsync(f)
            _fsync(tmp / TOKENIZER_DIR)
        atomic_write(tmp / ENGINE_JSON, (json.dumps(info, indent=1) + "\n").encode())
        files = {f.relative_to(tmp).as_posix(): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "files": files, **manifest_extra}
        atomic_write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # last: its hashes
        _swap_into_place(tmp, out)
    finally:
        os.close(lock)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _hold(directory: Path) -> int:
    """An open descriptor of ``directory`` holding an exclusive lock on it until closed (or the process dies)."""
    fd = os.open(directory, os.O_RDONLY)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _held(directory: Path) -> bool:
    """Whether a live export holds ``directory`` (``_hold``); False where locks are unavailable."""
    if fcntl is None:
        return False
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory to ``out``; a previous engine there is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Temporary directories of exports to ``out`` whose process died (never renamed into place). A ``tmp``
    one is stale unless a live export holds its lock (a process id alone would not do: a container's next
    process often gets the dead one's id); an ``old`` one unless its process id is alive."""
    for d in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = d.name[len(out.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not d.is_dir():
            continue
        if kind == "tmp" and fcntl is not None:
            if not _held(d):
                shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            pid = int(rest.split("-")[0])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another export to the same place is running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
