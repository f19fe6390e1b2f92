"""Load an engine directory: verify it, then bind its graph to its weights on a device.

    engine = load_engine("engine/")                      # the GPU when there is one ("auto"), else the CPU
    engine = load_engine("engine/", device="cuda")       # the tuned kernels, on the GPU they were tuned on
    engine = load_engine("engine/", device="cuda", retune=True)   # re-tune for this GPU (timings cached)
    engine = load_engine("engine/", tensor_parallel_size=2, rank=1)  # rank 1's shard: its slices of the weights
    engine.program, engine.tokenizer, engine.chat_template, engine.config, engine.limits, engine.manifest

Loading reads only the engine directory: no workspace, no checkpoint, no ``transformers`` model code (the
tokenizer is loaded from the engine's own files by transformers' tokenizer classes). It checks, in order,
and fails with a ``WorkbenchError`` that says what is wrong and how to fix it:

  1. it is an engine directory (manifest.json and engine.json);
  2. the format version of both files is one this workbench reads (a newer one: upgrade workbench);
  3. the libraries it requires: workbench at least the version that exported it (the graph may use ops,
     passes or fields added since), torch at least ``MIN_TORCH``, and every op of the graph resolves in
     this torch and registry (an op this torch lacks names the torch that exported it);
  4. every file the manifest lists is there with the same sha256 (a missing or altered file is named).

Weights are read straight from the safetensors file (``engine.weights``), parameter by parameter. An engine
records the tensor-parallel size it was built and tuned for (the manifest's ``tensor_parallel_size``; 1 when
absent); its graph and weights are stored unsharded, and a load at size N > 1 runs the sharding pass
(``graph.passes.tensor_parallel``) and reads only rank ``rank``'s slices. Another size than the engine's re-shards
when the graph allows it (its kernel choices were tuned for the other size's per-rank shapes, so they do not
apply) and is refused in one line naming both sizes when it does not.

Kernel choices from the tune stage apply only where they were measured: on a CUDA device whose GPU name
and SM count, CUDA, torch and triton versions equal the manifest's ``tuned_for`` (what the timing cache is
keyed by). Anywhere else (another GPU, other library versions, the CPU) the engine warns and runs the
default kernels, or with ``retune=True`` (a GPU only) times the engine's profile on this GPU; those
timings are cached under ``$WORKBENCH_HOME/engines/<engine id>/timings.json``, so a second load is quick.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..env import environment, environment_key, sha256_file
from ..errors import WorkbenchError
from ..graph.paged import whole_size
from .format import ENGINE_JSON, FORMAT_VERSION, MANIFEST, TIMINGS, WEIGHTS, EngineLimits, older
from .weights import read_weights


@dataclass
class Engine:
    """A loaded engine: its program ready to run, tokenizer, limits and what it was built from."""

    path: Path
    program: Any  # graph.executor.Program
    tokenizer: Any | None
    chat_template: str | None
    config: dict[str, Any]
    limits: EngineLimits
    manifest: dict[str, Any]
    info: dict[str, Any]  # engine.json without the graph: model, profiles, precision, choices, weights
    #: the kernel choices the program runs (TunedChoices), or None for the default kernels
    choices: Any | None = None
    #: where the choices come from: "engine" (tuned for this GPU), "retuned" (here), or None
    tuning: str | None = None
    #: the tensor-parallel size ``program`` is a shard of (1: the whole graph), and which rank's
    tensor_parallel_size: int = 1
    rank: int = 0
    #: when ``tensor_parallel_size`` > 1, the reports of the sharding pass and the passes after it (``shard_and_fuse``)
    tp_reports: list | None = None
    #: what reading the weights took from the file (``engine.weights.WeightsRead``)
    weights_read: Any | None = None

    @property
    def built_tensor_parallel_size(self) -> int:
        """The tensor-parallel size the engine was built (and tuned) for."""
        return built_size(self.manifest)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    @property
    def tied(self) -> dict[str, str]:
        """Parameter name -> the stored name it shares (tied weights are stored once)."""
        return dict(self.info["weights"].get("tied") or {})

    @property
    def profile(self):
        from ..kernels.profiles import OptimizationProfile

        return OptimizationProfile.from_json(self.info["profiles"][0])

    @property
    def precision(self) -> dict[str, Any] | None:
        return self.info.get("precision")


#: What every engine.json holds (``export``); a file without one of them is refused before anything is built.
ENGINE_KEYS = ("graph", "limits", "weights", "profiles")


def read_engine(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Checks 1-4 of the module docstring without building anything: (manifest, engine.json, its bytes)."""
    path = Path(path)
    if not path.is_dir():
        raise WorkbenchError(f"{path} is not a directory; give an engine directory written by `workbench export`")
    if not (path / MANIFEST).is_file() and not (path / ENGINE_JSON).is_file():
        hint = (f" it is a workspace: export it with `workbench export {path} --out ENGINE`"
                if (path / "capture").is_dir() else " write one with `workbench export WS --out DIR`")
        raise WorkbenchError(f"{path} is not an engine directory (no {MANIFEST} or {ENGINE_JSON});{hint}")
    manifest = _read_json(path, MANIFEST)
    _check_format(path, MANIFEST, manifest, manifest)
    _check_manifest_fields(path, manifest)
    if not (path / ENGINE_JSON).is_file():
        raise WorkbenchError(_missing(path, ENGINE_JSON, manifest))
    raw = (path / ENGINE_JSON).read_bytes()
    info = _parse_json(path, ENGINE_JSON, raw)
    _check_format(path, ENGINE_JSON, info, manifest)
    missing = [key for key in ENGINE_KEYS if key not in info]
    if missing:
        raise WorkbenchError(f"{path / ENGINE_JSON} has no {', '.join(repr(k) for k in missing)}; it is not an "
                             f"engine.json `workbench export` wrote: re-export the engine (`workbench export "
                             f"{_workspace(manifest)} --out {path}`)")
    check_requirements(path, manifest)
    verify_files(path, manifest, preread={ENGINE_JSON: raw})
    return manifest, info, raw


def load_engine(path: str | Path, *, device: str | torch.device = "auto", retune: bool = False,
                progress: bool = True, tensor_parallel_size: int | None = None, rank: int = 0) -> Engine:
    """Verify and load the engine at ``path`` onto ``device`` (see the module docstring): the whole graph, or with
    ``tensor_parallel_size`` N > 1 rank ``rank``'s shard of it and only its slices of the weights (None: the size
    the engine was built for)."""
    from ..graph.executor import Program
    from ..graph.ir import Graph
    from ..graph.paged import PagedLayout, is_paged, scales_by_name
    from ..kernels.autotune import TunedChoices

    from ..device import resolve_device

    path, device = Path(path), resolve_device(device)
    if retune and device.type != "cuda":
        raise WorkbenchError("retune=True times kernels on a CUDA GPU, and this engine is being loaded on "
                             f"{device.type!r}; load with device='cuda' on the GPU machine, or without retune to "
                             "run the default kernels here")
    manifest, info, raw = read_engine(path)
    with _malformed(path, ENGINE_JSON, manifest):
        graph = Graph.from_json(info["graph"])
        check_ops(graph, manifest)
        limits = EngineLimits.from_json(info["limits"])
        scales_by_name(graph)  # engines written before the KV scales went by name
        layout = PagedLayout.from_graph(graph) if is_paged(graph) else None
    if layout is None or (layout.block_size, layout.dtype) != (limits.block_size, limits.kv_cache_dtype):
        raise WorkbenchError(f"{path / ENGINE_JSON}: limits (block size {limits.block_size}, KV cache "
                             f"{limits.kv_cache_dtype}) do not match the graph's paged cache; re-export the engine")
    built = built_size(manifest)
    size = built if tensor_parallel_size is None else tensor_parallel_size
    with _malformed(path, ENGINE_JSON, manifest):
        graph, tp_reports = shard_engine_graph(path, graph, built, size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise WorkbenchError(f"rank {rank!r} is outside 0..{size - 1} (tensor-parallel size {size})")
    with _malformed(path, ENGINE_JSON, manifest):
        tied = dict(info["weights"].get("tied") or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise ValueError("weights.tied must map names to names")
    params, weights_read = read_weights(path / WEIGHTS, graph, rank=rank, tied=tied, device=device)

    choices, tuning = None, None
    if info.get("choices") and size != built:
        warnings.warn(f"engine {path} was built and tuned for tensor-parallel size {built} and runs re-sharded for "
                      f"{size}: its kernel choices were tuned for other per-rank shapes, so it runs the default "
                      f"kernels; rebuild it with `workbench build ... --tp {size}` to tune it for that", stacklevel=2)
    elif info.get("choices"):
        reason = tuning_mismatch(manifest.get("tuned_for") or {}, device)
        if reason is None:
            with _malformed(path, ENGINE_JSON, manifest):
                choices, tuning = TunedChoices.from_json(info["choices"]), "engine"
        elif not retune:
            tuned = (manifest.get("tuned_for") or {}).get("gpu", "an unknown GPU")
            warnings.warn(f"engine {path} was tuned on {tuned}, but {reason}: its kernel choices do not apply, so "
                          "it runs the default kernels; load it with retune=True on a GPU (`--retune`) to tune "
                          "it for this one", stacklevel=2)
    with _malformed(path, ENGINE_JSON, manifest):
        program = Program(graph, params, device=device)
    if retune:
        choices, tuning = _retune(path, program, info, manifest, raw, progress), "retuned"
    if choices is not None:
        program = program.with_choices(choices)
    tokenizer = load_tokenizer(path, info, manifest)
    info = {k: v for k, v in info.items() if k != "graph"}
    return Engine(path, program, tokenizer, getattr(tokenizer, "chat_template", None), dict(info.get("config", {})),
                  limits, manifest, info, choices, tuning, size, rank, tp_reports, weights_read)


def built_size(manifest: dict) -> int:
    """The tensor-parallel size an engine was built and tuned for (its manifest's; 1 for engines before it)."""
    return int(manifest.get("tensor_parallel_size") or 1)


def shard_engine_graph(path: Path, graph, built: int, size):
    """(``graph`` sharded for ``size`` ranks, the reports of ``shard_and_fuse``; the graph itself and None for one
    rank). An engine built for ``built`` ranks that cannot be sharded for ``size`` is refused in one line naming
    both."""
    from ..graph.passes.tensor_parallel import shard_and_fuse

    if whole_size(size) == 1:
        return graph, None
    try:
        return shard_and_fuse(graph, size)
    except WorkbenchError as e:
        if size == built:
            raise WorkbenchError(f"engine {path} (built for tensor-parallel size {built}) does not shard: {e}") \
                from None
        raise WorkbenchError(f"engine {path} was built for tensor-parallel size {built} and cannot be re-sharded for "
                             f"{size} ({e}): run it with --tp {built} (tensor_parallel_size={built}), or rebuild it "
                             f"for {size} ranks with `workbench build ... --tp {size}`") from None


def load_tokenizer(path: Path, info: dict, manifest: dict):
    """The engine's tokenizer from its own files (tokenizer classes only, never model code); None if it has none."""
    if not info.get("tokenizer"):
        return None
    if not isinstance(info["tokenizer"], str):
        raise WorkbenchError(f"{path / ENGINE_JSON}: 'tokenizer' is {str(info['tokenizer'])[:60]!r}, not the name of "
                             "the engine's tokenizer directory; re-export the engine")
    directory = path / info["tokenizer"]
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for files it cannot read
        exported = manifest.get("versions", {}).get("transformers")
        raise WorkbenchError(f"cannot load the tokenizer in {directory} ({type(e).__name__}: {str(e)[:200]}); it "
                             f"was written by transformers {exported}: install that version or newer") from None


def check_requirements(path: Path, manifest: dict) -> None:
    """Installed libraries at least those the manifest requires (see ``format.MIN_TORCH`` for torch's rule)."""
    from importlib import metadata

    from .. import __version__

    for lib, required in (manifest.get("requires") or {}).items():
        if required is None:  # the exporting machine could not tell its version: nothing to check
            continue
        try:  # workbench itself: the package that runs (it may be on PYTHONPATH, not pip-installed)
            installed = __version__ if lib == "workbench" else metadata.version(lib)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None:
            raise WorkbenchError(f"engine {path} requires {lib} >= {required}, which is not installed; install it")
        if older(installed, str(required)):
            exported = manifest.get("versions", {}).get(lib, required)
            raise WorkbenchError(f"engine {path} requires {lib} >= {required} (it was exported with {lib} {exported}), "
                                 f"and this is {lib} {installed}: upgrade {lib} (pip install -U {lib}) or re-export "
                                 "the engine with this version")


def check_ops(graph, manifest: dict) -> None:
    """Every op of the graph resolves here, once the plugins the engine was built with are loaded; one that does
    not names the torch the engine was exported with."""
    from ..kernels.registry import REGISTRY
    from ..plugins import load_plugin

    for spec in manifest.get("plugins") or ():
        try:
            load_plugin(spec)
        except WorkbenchError as e:
            raise WorkbenchError(f"the engine was built with a plugin that does not load here: {e}") from None
    for op in sorted({n.op for n in graph.nodes}):
        try:
            REGISTRY.get(op)
        except WorkbenchError as e:
            exported = manifest.get("versions", {}).get("torch")
            raise WorkbenchError(f"{e}; the engine was exported with torch {exported}, this is torch "
                                 f"{torch.__version__}: install torch >= {exported} or re-export the engine "
                                 "here") from None


def verify_files(path: Path, manifest: dict, *, preread: dict[str, bytes] | None = None) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or ENGINE_JSON not in files:
        raise WorkbenchError(f"{path / MANIFEST} lists no files; it is not a manifest `workbench export` wrote: "
                             "re-export the engine")
    for name, entry in files.items():
        f = path / name
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int):
            raise WorkbenchError(f"{path / MANIFEST}: its entry for {name!r} is {entry!r}, not {{\"sha256\": ..., "
                                 f"\"bytes\": ...}}; it is not a manifest `workbench export` wrote: re-export the "
                                 f"engine (`workbench export {_workspace(manifest)} --out {path}`)")
        if not f.is_file():
            raise WorkbenchError(_missing(path, name, manifest))
        if preread and name in preread:
            digest, size = hashlib.sha256(preread[name]).hexdigest(), len(preread[name])
        else:
            size = f.stat().st_size
            digest = sha256_file(f) if size == entry.get("bytes") else None
        if digest != entry.get("sha256"):
            found = f"{size} bytes, expected {entry.get('bytes')}" if digest is None else \
                f"sha256 {digest[:12]}…, expected {str(entry.get('sha256'))[:12]}…"
            raise WorkbenchError(f"{f} was altered since the engine was exported ({found}); re-export the engine "
                                 f"(`workbench export {_workspace(manifest)} --out {path}`) or restore the file")


def tuning_mismatch(tuned_for: dict, device: torch.device) -> str | None:
    """Why kernel choices tuned in ``tuned_for`` (a timing cache's environment key) do not apply on ``device``,
    or None when they do."""
    if device.type != "cuda":
        return f"it runs on the {device.type.upper()} here"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available here"
    props = torch.cuda.get_device_properties(device)
    here = {"gpu": props.name, "sm_count": props.multi_processor_count, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": environment()["versions"]["triton"]}
    diff = [f"{k} {tuned_for.get(k)!r} there, {v!r} here" for k, v in here.items() if tuned_for.get(k) != v]
    return ("it runs with " + "; ".join(diff)) if diff else None


def _retune(path: Path, program, info: dict, manifest: dict, raw: bytes, progress: bool):
    """Tune the engine's profile on this GPU; timings cached per engine (and per GPU: the cache is keyed)."""
    import shutil

    from ..kernels.autotune import TimingCache, autotune_profile
    from ..kernels.profiles import OptimizationProfile
    from ..models.cache import home

    cache_path = home() / "engines" / hashlib.sha256(raw).hexdigest()[:16] / TIMINGS
    shipped = path / TIMINGS
    if not cache_path.is_file() and shipped.is_file() and TimingCache.view(shipped).env == environment_key():
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped, cache_path)  # the engine's own timings were measured in this very environment
    try:
        cache = TimingCache.open(cache_path)
    except WorkbenchError:  # measured before a driver or library upgrade: start afresh
        cache = TimingCache.open(cache_path, reset=True)
    profile = OptimizationProfile.from_json(info["profiles"][0])
    tuned = autotune_profile(program, profile, cache, progress=progress,
                             batch_invariant=manifest.get("batch_invariant") is True)  # as the engine was built
    cache.save()
    return tuned


def _check_format(path: Path, name: str, data: Any, manifest: dict) -> None:
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        by = (manifest.get("versions") or {}).get("workbench") if isinstance(manifest, dict) else None
        raise WorkbenchError(f"{path / name} has engine format version {version}, newer than this workbench reads "
                             f"({FORMAT_VERSION}){f'; it was written by workbench {by}' if by else ''}: upgrade "
                             "workbench, or re-export the engine with this one")
    if version != FORMAT_VERSION:
        raise WorkbenchError(f"{path / name} has an unknown engine format version {version!r} (this workbench reads "
                             f"{FORMAT_VERSION}); it was not written by `workbench export`: re-export the engine")


#: The manifest's fields that loading reads, and the JSON types `workbench export` writes them as
_MANIFEST_FIELDS = {"files": dict, "requires": dict, "versions": dict, "plugins": list, "tuned_for": (dict, type(None)),
                    "workspace": (dict, type(None)), "tensor_parallel_size": int}


def _check_manifest_fields(path: Path, manifest: dict) -> None:
    """Each field loading reads has the type `workbench export` writes (a hand-edited one is named, in one line)."""
    for key, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if key in manifest and not isinstance(value, kind):
            raise WorkbenchError(f"{path / MANIFEST}: {key!r} is {str(value)[:60]!r}, not what `workbench export` "
                                 f"writes; re-export the engine (`workbench export {_workspace(manifest)} --out "
                                 f"{path}`)")
    tp = manifest.get("tensor_parallel_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise WorkbenchError(f"{path / MANIFEST}: 'tensor_parallel_size' is {str(tp)[:60]!r}, not a whole number >= 1; "
                             f"re-export the engine (`workbench export {_workspace(manifest)} --out {path}`)")
    if not all(isinstance(v, (str, type(None))) for v in (manifest.get("requires") or {}).values()) \
            or not all(isinstance(v, str) for v in manifest.get("plugins") or ()):
        raise WorkbenchError(f"{path / MANIFEST}: 'requires' must map libraries to versions and 'plugins' list "
                             "module names or files; re-export the engine")


class _malformed:
    """``with _malformed(path, name, manifest):`` turns the errors of reading a structure that is not what
    `workbench export` wrote (a missing key, a wrong type; the hashes matched, so it was made or edited by hand)
    into one line that names the file and the fix. WorkbenchErrors pass through."""

    def __init__(self, path: Path, name: str, manifest: dict):
        self.path, self.name, self.manifest = path, name, manifest

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or issubclass(kind, WorkbenchError) or not issubclass(kind, Exception):
            return False
        what = " ".join(f"{kind.__name__}: {e}".split())[:200]
        raise WorkbenchError(f"{self.path / self.name} is malformed ({what}); it is not what `workbench export` "
                             f"wrote: re-export the engine (`workbench export {_workspace(self.manifest)} --out "
                             f"{self.path}`)") from None


def _read_json(path: Path, name: str) -> Any:
    if not (path / name).is_file():
        raise WorkbenchError(f"engine {path} has no {name}; an export that did not finish leaves no engine: "
                             "re-export it with `workbench export WS --out DIR`")
    return _parse_json(path, name, (path / name).read_bytes())


def _parse_json(path: Path, name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{path / name} is not valid JSON ({e}); re-export the engine") from None


def _missing(path: Path, name: str, manifest: dict) -> str:
    return (f"engine {path} is missing {name}, which its manifest lists; re-export it "
            f"(`workbench export {_workspace(manifest)} --out {path}`) or restore the file")


def _workspace(manifest: dict) -> str:
    workspace = manifest.get("workspace") if isinstance(manifest, dict) else None
    return str(workspace.get("root") or "WS") if isinstance(workspace, dict) else "WS"
