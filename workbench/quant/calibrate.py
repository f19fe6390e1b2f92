"""Calibration: run the calibration set through the graph and collect statistics per linear group.

    ids = calibration_ids(tokenizer)                       # datasets/calibration.txt, tokenized
    ids = calibration_ids(tokenizer, "my_data.jsonl")      # or any file: plain text, or JSONL with "text"
    stats = calibrate(program, ids, samples=64, seq_len=256, observer="max")
    stats.input_scale("layers.3.down", "fp8")              # static per-tensor activation scale
    stats.save(path) / CalibrationStats.load(path, graph)  # safetensors + JSON beside it

At every linear group's input (one per group: fused siblings read the same tensor) two observers
watch x: the chosen per-tensor ``observer`` (max, percentile, mse, entropy; see ``observers``),
whose threshold gives the static activation scale, and a per-channel max (x's last dim), which
SmoothQuant needs. At every paged attention node, per-tensor maxima of the step's K and V give the
FP8 KV cache's per-layer scales. Weights are known in full: their per-output-channel maxima are
taken once.

The calibration tokens are cut into ``samples`` sequences of ``seq_len`` tokens, run
``batch`` sequences per step as a flat paged batch (the runtime's layout). Defaults follow
TensorRT-LLM / ModelOpt practice on a GPU (512 × 512) and are smaller on a CPU (32 × 256); without an
explicit ``samples`` the count is what the set holds, up to that default (``choose_sizes``). A set too small
for an explicit request is refused with the numbers, never silently reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WorkbenchError
from ..progress import progress_bar
from ..kernels.fused import attention_input
from .observers import MaxObserver, Observer, make_observer
from .plan import linear_groups, model_fingerprint

GPU_DEFAULTS = {"samples": 512, "seq_len": 512}
CPU_DEFAULTS = {"samples": 32, "seq_len": 256}


def default_sizes(device: str | torch.device) -> dict[str, int]:
    return dict(GPU_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS)


def calibration_ids(tokenizer, name_or_path: str | Path = "calibration") -> torch.Tensor:
    """A text set as one long sequence of token ids: a name of ``datasets/`` or a file's path (plain text, or
    JSONL with a ``text`` field; ``evaluate.load_text``)."""
    from ..evaluate import dataset_text

    return torch.tensor(tokenizer(dataset_text(name_or_path)).input_ids, dtype=torch.long)


def choose_sizes(num_tokens: int, device: str | torch.device, *, samples: int | None = None,
                 seq_len: int | None = None, source: str = "the calibration set") -> tuple[int, int]:
    """(samples, seq_len) for a set of ``num_tokens`` tokens: ``seq_len`` defaults to the device's; ``samples``
    to what the set holds, up to the device's default, so the defaults take a small set whole instead of failing.
    An explicit ``samples`` the set cannot fill is refused with the numbers (``source`` names the set)."""
    defaults = default_sizes(device)
    seq_len = seq_len or defaults["seq_len"]
    if seq_len < 2:
        raise WorkbenchError(f"seq_len must be >= 2 tokens per calibration sample (got {seq_len})")
    most = num_tokens // seq_len
    if not samples:
        if most < 1:
            raise WorkbenchError(f"{source} has {num_tokens} tokens, fewer than one sample of {seq_len} tokens; "
                                 f"ask for shorter samples (at most {num_tokens}) or give a larger calibration set")
        return min(most, defaults["samples"]), seq_len
    if samples < 1:
        raise WorkbenchError(f"samples must be >= 1 (got {samples})")
    if num_tokens < samples * seq_len:
        raise WorkbenchError(f"{source} has {num_tokens} tokens, too few for {samples} samples x {seq_len} tokens "
                             f"({samples * seq_len}); ask for at most {most} samples of {seq_len} tokens (or leave "
                             "the sample count out to take what it holds), shorter samples, or a larger calibration set")
    return samples, seq_len


@dataclass
class CalibrationStats:
    """What calibration saw: per group an activation observer and x's per-channel amax, per layer K/V maxima,
    per group the weights' per-output-channel amax."""

    model: str
    observer: str
    samples: int
    seq_len: int
    activations: dict[str, Observer] = field(default_factory=dict)
    channels: dict[str, MaxObserver] = field(default_factory=dict)
    kv: dict[int, dict[str, MaxObserver]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    data: dict | None = None  # what the tokens were (sha256, token count): statistics are reused on the same only

    # ---- answers ----------------------------------------------------------------------------------------
    def input_scale(self, group: str, fmt: str) -> torch.Tensor:
        """The static per-tensor scale of the group's input for ``fmt`` ("fp8" or "int8")."""
        return self._observer(group).scale(fmt).reshape(1)

    def channel_amax(self, group: str) -> torch.Tensor:
        """max |x_j| per input channel j of the group's input (SmoothQuant's activation side)."""
        self._observer(group)
        return self.channels[group].amax()

    def kv_scales(self, layer: int) -> tuple[float, float]:
        """FP8 E4M3 scales (amax / 448) of layer's K and V."""
        if layer not in self.kv:
            raise WorkbenchError(f"no K/V statistics for layer {layer}; calibrate a paged graph (after the passes)")
        return tuple(float(self.kv[layer][x].scale("fp8")) for x in ("k", "v"))

    def _observer(self, group: str) -> Observer:
        if group not in self.activations:
            raise WorkbenchError(f"no calibration statistics for group {group!r}; these statistics cover "
                                 f"{len(self.activations)} groups ({', '.join(list(self.activations)[:3])} ...)")
        return self.activations[group]

    def check_model(self, graph) -> None:
        fp = model_fingerprint(graph)
        if fp != self.model:
            raise WorkbenchError(f"these calibration statistics come from another model (fingerprint {self.model}, "
                                 f"this graph's is {fp}); calibrate this model")

    def table(self):
        """A DataFrame: one row per group with its input's amax, threshold and scales, and the weights' amax."""
        import pandas as pd

        rows = []
        for g, obs in self.activations.items():
            chan = self.channels[g].amax()
            rows.append({"group": g, "x_amax": float(obs.amax()), "x_threshold_fp8": float(obs.threshold("fp8")),
                         "x_threshold_int8": float(obs.threshold("int8")),
                         "x_channel_amax_ratio": float(chan.max() / chan.median().clamp(min=1e-12)),
                         "w_amax": float(self.weights[g].max()) if g in self.weights else float("nan"),
                         "samples": obs.samples})
        return pd.DataFrame(rows)

    # ---- persistence -----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, observers = {}, {}
        for prefix, obs in self._all():
            t, meta = obs.state_dict()
            for k, v in t.items():
                tensors[f"{prefix}/{k}"] = v
            observers[prefix] = meta
        for g, w in self.weights.items():
            tensors[f"weights/{g}"] = w.detach().float().cpu()
        meta = {"model": self.model, "observer": self.observer, "samples": self.samples, "seq_len": self.seq_len,
                "observers": observers, "kv_layers": sorted(self.kv), "data": self.data}
        return tensors, meta

    def _all(self):
        for g, obs in self.activations.items():
            yield f"act/{g}", obs
        for g, obs in self.channels.items():
            yield f"chan/{g}", obs
        for layer, kv in self.kv.items():
            for x, obs in kv.items():
                yield f"kv/{layer}/{x}", obs

    def save(self, path: str | Path) -> None:
        """``path`` (.safetensors) and ``path`` with .json: both written atomically."""
        from safetensors.torch import save

        from ..env import atomic_write

        tensors, meta = self.state()
        path = Path(path)
        atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}))
        atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=1) + "\n").encode())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "CalibrationStats":
        stats = cls(meta["model"], meta["observer"], meta["samples"], meta["seq_len"], data=meta.get("data"))
        for prefix, m in meta["observers"].items():
            obs = Observer.from_state({k[len(prefix) + 1:]: v for k, v in tensors.items()
                                       if k.startswith(prefix + "/")}, m)
            kind, rest = prefix.split("/", 1)
            if kind == "act":
                stats.activations[rest] = obs
            elif kind == "chan":
                stats.channels[rest] = obs
            else:
                layer, x = rest.split("/")
                stats.kv.setdefault(int(layer), {})[x] = obs
        stats.weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
        return stats

    @classmethod
    def load(cls, path: str | Path, graph=None) -> "CalibrationStats":
        """Read statistics saved by ``save``; with ``graph``, refuse those of another model."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise WorkbenchError(f"no calibration statistics at {path} (and {meta_path.name}); run calibration first")
        try:
            meta = json.loads(meta_path.read_text())
            stats = cls.from_state(load_file(str(path)), meta)
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise WorkbenchError(f"{path} is not a readable set of calibration statistics ({e}); re-run calibration") from None
        if graph is not None:
            stats.check_model(graph)
        return stats


def _kv_layer(node, kv_inputs: dict[str, int]) -> int | None:
    from ..graph.ir import Ref

    cache = node.args[3] if len(node.args) > 3 else None
    return kv_inputs.get(cache.name) if isinstance(cache, Ref) else None


@torch.no_grad()
def calibrate(program, ids: torch.Tensor, *, samples: int | None = None, seq_len: int | None = None,
              batch: int = 4, observer: str = "max", progress: bool = True, **observer_options) -> CalibrationStats:
    """Statistics of ``program`` (a paged graph, after the passes) over ``samples`` sequences of ``seq_len``
    tokens cut from ``ids``, ``batch`` sequences per step. ``observer`` (and its options) watches each
    group's input; see the module docstring."""
    from ..graph.paged import PagedLayout, SimplePagedCache, is_paged

    graph = program.graph
    if not is_paged(graph):
        raise WorkbenchError("calibration runs a paged graph: run the passes first (`workbench optimize`)")
    layout = PagedLayout.from_graph(graph)
    if batch < 1:
        raise WorkbenchError(f"batch must be >= 1 sequence per step (got {batch})")
    ids = ids.reshape(-1)
    samples, seq_len = choose_sizes(ids.numel(), program.device, samples=samples, seq_len=seq_len)
    make_observer(observer, **observer_options)  # a bad kind or option fails here, before any work
    groups = linear_groups(graph)
    first_node = {g.nodes[0]: name for name, g in groups.items()}
    kv_inputs = layout.cache_inputs
    attention = {n.name: _kv_layer(n, kv_inputs) for n in graph.nodes if n.op == "workbench.paged_attention"}
    stats = CalibrationStats(model_fingerprint(graph), observer, samples, seq_len)
    for name in groups:
        stats.activations[name] = make_observer(observer, **observer_options)
        stats.channels[name] = MaxObserver(axis=-1)
    for layer in attention.values():
        if layer is not None:
            stats.kv[layer] = {"k": MaxObserver(), "v": MaxObserver()}
    for name, g in groups.items():
        w = torch.cat([program.params[p].detach().abs().float().amax(dim=1) for p in g.weights])
        stats.weights[name] = w.cpu()

    def observe(node, op, args, kwargs):
        if node in first_node:
            g = first_node[node]
            x = args[0].reshape(-1, args[0].shape[-1])
            stats.activations[g].update(x)
            stats.channels[g].update(x)
        elif attention.get(node) is not None:
            kv = stats.kv[attention[node]]
            # the keys as the cache holds them: normed (Qwen3's k_norm) and rotated when the attention does it
            k = attention_input(args[1], kwargs.get("k_norm"), kwargs.get("norm_eps"), kwargs.get("cos"),
                                kwargs.get("sin"))
            kv["k"].update(k)
            kv["v"].update(args[2])

    watched = set(first_node) | {n for n, layer in attention.items() if layer is not None}
    chunks = ids[: samples * seq_len].reshape(samples, seq_len)
    blocks = layout.blocks_for(seq_len) * batch
    with progress_bar(samples, "calibrate", "sample", enabled=progress) as bar:
        for start in range(0, samples, batch):
            part = chunks[start:start + batch]
            cache = SimplePagedCache(layout, blocks, program.device)
            inputs = cache.step_inputs([(i, row.tolist()) for i, row in enumerate(part)])
            program.run(_observe=(watched, observe), **inputs)
            bar.update(len(part))
    return stats
