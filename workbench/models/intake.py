"""Model intake: one entry point for every kind of model source.

A source spec is one of
  * a Hugging Face directory (config.json + *.safetensors + tokenizer),
  * a ``.gguf`` file,
  * a ``config.json`` file (random weights),
  * a preset name (``tiny-llama``, ``llama-3-8b``, ...: random weights),
  * a named real model (``smollm2-135m``), fetched into the model cache on first use.

``resolve_source`` turns the spec into a ``ModelSource`` record (checked, with
the files it depends on); ``load_model`` builds the transformers model;
``load_weights`` gives tensors by name for a captured graph without building a
model at all (the executor's path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import WorkbenchError
from . import cache as _cache
from .files import check_gguf, check_hf_dir
from .presets import NAMED_MODELS, PRESETS, SUPPORTED_ARCHITECTURES, make_config
from .random_init import build_random_model, init_tensor, norm_center


@dataclass
class ModelSource:
    """Where a model comes from; plain data, stored in workspace records."""

    kind: str  # "hf" | "gguf" | "random"
    spec: str
    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # for "random"
    seed: int = 0

    @property
    def files(self) -> list[Path]:
        """The files whose content defines the model (workspace records hash them)."""
        if self.kind == "hf":
            root = Path(self.path)
            return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        if self.kind == "gguf" or (self.kind == "random" and self.path):
            return [Path(self.path)]
        return []

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "path": self.path, "config": self.config, "seed": self.seed}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelSource":
        return cls(d["kind"], d["spec"], d.get("path"), dict(d.get("config") or {}), int(d.get("seed", 0)))


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any | None
    source: ModelSource


def _check_arch(config: Mapping[str, Any], where: str) -> None:
    arch = (config.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WorkbenchError(f"{where}: unsupported architecture {arch!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def resolve_source(spec: str | Path, *, seed: int = 0, fetch: bool = True) -> ModelSource:
    """Check ``spec`` and say what kind of source it is."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        config = check_hf_dir(path)
        _check_arch(config, str(path))
        return ModelSource("hf", spec, str(path.resolve()))
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf(path)
            return ModelSource("gguf", spec, str(path.resolve()))
        if path.suffix == ".json":
            try:
                config = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WorkbenchError(f"{path} is not valid JSON ({e})") from None
            _check_arch(config, str(path))
            return ModelSource("random", spec, str(path.resolve()), config, seed)
        raise WorkbenchError(f"{path} is neither a .gguf file nor a config.json; give a Hugging Face directory, "
                             "a .gguf file, a config.json, or a preset name")
    if spec in PRESETS:
        return ModelSource("random", spec, None, dict(PRESETS[spec]), seed)
    if spec in NAMED_MODELS:
        if not _cache.is_fetched(spec):
            if not fetch:
                raise WorkbenchError(f"{spec} is not in the model cache yet; run `workbench fetch {spec}`")
            _cache.fetch(spec)
        directory = _cache.model_dir(spec)
        check_hf_dir(directory)
        return ModelSource("hf", spec, str(directory))
    raise WorkbenchError(f"no file, directory, preset or model named {spec!r}; presets: {', '.join(PRESETS)}; "
                         f"models: {', '.join(NAMED_MODELS)}")


def load_model(spec: str | Path | ModelSource, *, dtype: torch.dtype | None = None, device: str = "cpu",
               seed: int = 0, materialize: bool = True) -> LoadedModel:
    """Build the transformers model for a source. ``materialize=False`` (random sources only) keeps
    parameters on the meta device: enough to capture an 8B model's graph without its weights."""
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, seed=seed)
    dtype = dtype or torch.float32
    if source.kind == "random":
        config = make_config(source.config)
        model = build_random_model(config, dtype=dtype, device=device, seed=source.seed, materialize=materialize)
        return LoadedModel(model, None, source)
    if not materialize:
        raise WorkbenchError("only random-weight sources can be loaded without weights (materialize=False)")
    from transformers import AutoModelForCausalLM

    root = hf_directory(source)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype).to(device).eval()
    return LoadedModel(model, load_tokenizer(source), source)


def hf_directory(source: ModelSource) -> Path:
    """The Hugging Face directory a real source's weights, config and tokenizer are read from: its own, or for a
    GGUF file the one it was converted into once (``cache.converted_gguf``)."""
    if source.kind == "gguf":
        return _cache.converted_gguf(Path(source.path))
    if source.kind != "hf":
        raise WorkbenchError(f"{source.spec} has random weights: it has no checkpoint directory")
    return Path(source.path)


def load_tokenizer(source: ModelSource):
    if source.kind == "random":
        return None
    from transformers import AutoTokenizer

    path = _cache.converted_gguf(Path(source.path)) if source.kind == "gguf" else Path(source.path)
    return AutoTokenizer.from_pretrained(path)


def load_weights(source: ModelSource, wanted: Mapping[str, Iterable[str]], *, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors for ``wanted`` (name -> alternative names, e.g. tied weights) without building a model.

    For a Hugging Face directory (or a GGUF file's converted one) they are read from its safetensors files;
    for a random source they are generated by name, identical to ``load_model``'s.
    """
    if source.kind == "random":
        return _random_weights(source, wanted, dtype=dtype, device=device)
    from safetensors import safe_open

    index = {}  # a GGUF file's weights are read from the directory it was converted into once
    for f in sorted(hf_directory(source).glob("*.safetensors")):
        handle = safe_open(str(f), framework="pt", device="cpu")
        index.update({k: handle for k in handle.keys()})
    out: dict[str, torch.Tensor] = {}
    for name, alts in wanted.items():
        names = (name, *alts)
        # a checkpoint saved from the base model names its tensors without the causal LM's prefix (GPT-2's on the
        # Hub: h.0.attn.c_attn.weight for transformer.h.0.attn.c_attn.weight, wte.weight for the tied lm_head)
        key = next((k for k in (*names, *(n.split(".", 1)[1] for n in names if "." in n)) if k in index), None)
        if key is None:
            raise WorkbenchError(f"weight {name!r} is not in {source.path}; the checkpoint does not match the graph")
        out[name] = index[key].get_tensor(key).to(device=device, dtype=dtype)
    return out


def _random_weights(source: ModelSource, wanted: Mapping[str, Iterable[str]], *, dtype: torch.dtype,
                    device: str | torch.device) -> dict[str, torch.Tensor]:
    """Shapes come from the meta-device model; tied tensors take the values of their first name."""
    meta = load_model(source, materialize=False).model
    named = dict(meta.named_parameters(remove_duplicate=False))
    first_name = {id(p): n for n, p in reversed(list(meta.named_parameters(remove_duplicate=False)))}
    std = source.config.get("initializer_range", 0.02)
    out = {}
    for name, alts in wanted.items():
        key = next((k for k in (name, *alts) if k in named), None)
        if key is None:
            raise WorkbenchError(f"weight {name!r} is not a parameter of {source.spec}")
        p = named[key]
        out[name] = init_tensor(first_name[id(p)], p.shape, dtype=dtype, device=device, seed=source.seed, std=std,
                                norm_mean=norm_center(meta.config))
    return out
