"""Linear groups and the precision plan: which format each group of linears (and the KV cache) runs in.

A **linear group** is the unit of precision: the linears that read one input and are (or would be)
one GEMM after horizontal fusion, so they must share a format.

    layers.{i}.qkv      q_proj, k_proj, v_proj (or the fused qkv_proj)
    layers.{i}.o        o_proj
    layers.{i}.gate_up  gate_proj, up_proj (or the fused gate_up_proj)
    layers.{i}.down     down_proj
    layers.{i}.fc       the up projection of a plain (ungated) MLP: GPT-2's c_fc, NeoX's and Falcon's dense_h_to_4h
    lm_head             the output projection (its tied embedding stays high precision either way)

Groups are found from the graph: each ``aten.linear`` node's weight parameter names its module
(``model.layers.3.mlp.down_proj.weight``), so any Llama-family graph, fused or not, is covered; the LayerNorm
families' module names map to the same kinds (``_FAMILY_KINDS``: GPT-2's ``transformer.h.3.attn.c_attn`` is
``layers.3.qkv``).

A **PrecisionPlan** is plain, versioned JSON a user can edit by hand or in the widget::

    {"version": 1, "model": "<fingerprint>", "kv_cache": "bf16",
     "groups": {"layers.0.qkv": {"format": "fp8", "weights": "channel"},
                "layers.0.down": {"format": "int8_sq", "alpha": 0.5}, ..., "lm_head": {"format": "bf16"}},
     "edited": ["layers.0.down"]}

Formats (``FORMATS``):

    bf16      the model's own precision (bf16/fp16/fp32): the baseline
    fp8       FP8 E4M3 W8A8: weights per output channel (default) or per tensor; activations static per
              tensor (calibrated), or "activations": "dynamic" (per token, computed at run time)
    int8_sq   INT8 W8A8 with SmoothQuant: activation outliers migrated into the weights by per-channel
              factors s_j = amax(x_j)^alpha / amax(W_:,j)^(1-alpha); weights per channel; activations
              dynamic per token (default) or static per tensor
    int8_wo   INT8 weight-only (W8A16): weights per channel, activations untouched

The KV cache is "bf16" (the model's precision) or "fp8" (E4M3, one calibrated scale per layer for K
and one for V).

Validity rules, checked by ``PrecisionPlan.validate(graph)`` with messages that say how to fix:
every group of the graph is named (lm_head too: it is never implied), no unknown group, no fused
sibling named alone (``layers.0.q`` → ``layers.0.qkv``), no embedding, known formats and options.
``edited`` lists the groups a user set by hand: ``auto_plan`` and the widget never overwrite them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import WorkbenchError

PLAN_VERSION = 1
FORMATS = ("bf16", "fp8", "int8_sq", "int8_wo")
KV_FORMATS = ("bf16", "fp8")
#: options each format takes, with their defaults
OPTIONS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "fp8": {"weights": "channel", "activations": "static"},
    "int8_sq": {"weights": "channel", "activations": "dynamic", "alpha": 0.5},
    "int8_wo": {"weights": "channel"},
}
_CHOICES = {"weights": ("channel", "tensor"), "activations": ("static", "dynamic")}
#: the module names of a linear -> its group kind; fused siblings map to the same kind
_KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o",
          "gate_proj": "gate_up", "up_proj": "gate_up", "gate_up_proj": "gate_up", "down_proj": "down",
          "lm_head": "lm_head"}
#: the LayerNorm families' linears, by (parent module, module): packed q/k/v, the attention's output, the MLP's up
#: projection ("fc": no gate) and its down projection (GPT-2's Conv1D names, NeoX's and Falcon's)
_FAMILY_KINDS = {("attn", "c_attn"): "qkv", ("attn", "c_proj"): "o", ("mlp", "c_fc"): "fc",
                 ("mlp", "c_proj"): "down",
                 ("attention", "query_key_value"): "qkv", ("attention", "dense"): "o",
                 ("self_attention", "query_key_value"): "qkv", ("self_attention", "dense"): "o",
                 ("mlp", "dense_h_to_4h"): "fc", ("mlp", "dense_4h_to_h"): "down"}
_SIBLING_NAMES = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
_EMBEDDINGS = ("embed", "wte", "tok_embeddings")


@dataclass(frozen=True)
class LinearGroup:
    """One precision unit: its name, layer, kind and the linear nodes (and their weights) in it."""

    name: str
    layer: int | None
    kind: str
    nodes: tuple[str, ...]
    weights: tuple[str, ...]


def _group_of(weight: str) -> tuple[str, int | None, str]:
    module = weight.removesuffix(".T").removesuffix(".weight")  # .T: a weight stored transposed (GPT-2's Conv1D)
    parent, short = ([""] + module.rsplit(".", 2)[-2:])[-2:]
    kind = _FAMILY_KINDS.get((parent, short)) or _KINDS.get(short, short)
    m = re.search(r"(?:layers|h)\.(\d+)\.", module)
    if m:
        return f"layers.{m.group(1)}.{kind}", int(m.group(1)), kind
    return (kind if kind == "lm_head" else module), None, kind


def linear_groups(graph) -> dict[str, LinearGroup]:
    """The graph's linear groups in graph order (see the module docstring)."""
    from ..graph.ir import Ref

    found: dict[str, dict[str, Any]] = {}
    for n in graph.nodes:
        if n.op != "aten.linear.default" or len(n.args) < 2 or not isinstance(n.args[1], Ref):
            continue
        weight = n.args[1].name
        if weight not in graph.params:
            continue
        name, layer, kind = _group_of(weight)
        g = found.setdefault(name, {"layer": layer, "kind": kind, "nodes": [], "weights": []})
        g["nodes"].append(n.name)
        g["weights"].append(weight)
    return {k: LinearGroup(k, v["layer"], v["kind"], tuple(v["nodes"]), tuple(v["weights"])) for k, v in found.items()}


def model_fingerprint(graph) -> str:
    """Identifies the model a plan or a set of statistics belongs to: architecture, and the names and shapes
    of its linear weights (not their values, so the same model captured again matches)."""
    weights = sorted((w, graph.params[w].spec.shape) for g in linear_groups(graph).values() for w in g.weights)
    text = json.dumps([graph.meta.get("architecture"), weights], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PrecisionPlan:
    """Format per linear group, and the KV cache's; see the module docstring for the JSON and the rules."""

    groups: dict[str, dict[str, Any]]
    kv_cache: str = "bf16"
    model: str | None = None
    edited: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, graph, fmt: str = "bf16", *, lm_head: str = "bf16", kv_cache: str = "bf16",
                **options: Any) -> "PrecisionPlan":
        """Every group in ``fmt`` (with ``options``) except lm_head, which gets its own (high precision by default)."""
        if fmt not in FORMATS:
            raise WorkbenchError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
        unknown = [k for k in options if k not in OPTIONS[fmt]]
        if unknown:
            allowed = ", ".join(OPTIONS[fmt]) or "none"
            raise WorkbenchError(f"format {fmt} takes no option {unknown[0]!r} (options: {allowed})")
        groups = {}
        for name, g in linear_groups(graph).items():
            f = lm_head if g.kind == "lm_head" else fmt
            groups[name] = {"format": f, **({k: v for k, v in options.items() if k in OPTIONS.get(f, {})})}
        plan = cls(groups, kv_cache, model_fingerprint(graph))
        plan.validate(graph)
        return plan

    def with_format(self, group: str, fmt: str, *, edited: bool = False, **options: Any) -> "PrecisionPlan":
        """A copy with ``group`` set to ``fmt``; ``edited`` marks it as a user's choice."""
        plan = copy.deepcopy(self)
        if group == "kv_cache":
            plan.kv_cache = fmt
        else:
            plan.groups[group] = {"format": fmt, **options}
        if edited and group not in plan.edited:
            plan.edited.append(group)
        return plan

    # ---- reading --------------------------------------------------------------------------------------
    def format_of(self, group: str) -> str:
        return self.kv_cache if group == "kv_cache" else self.groups[group]["format"]

    def options(self, group: str) -> dict[str, Any]:
        """The group's options with the format's defaults filled in."""
        spec = self.groups[group]
        return {**OPTIONS[spec["format"]], **{k: v for k, v in spec.items() if k != "format"}}

    def quantized(self) -> list[str]:
        return [g for g, s in self.groups.items() if s["format"] != "bf16"]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.groups.values():
            counts[s["format"]] = counts.get(s["format"], 0) + 1
        return counts

    # ---- validity -------------------------------------------------------------------------------------
    def validate(self, graph) -> "PrecisionPlan":
        """Raise a WorkbenchError naming the first rule broken and the fix; returns self."""
        if self.version != PLAN_VERSION:
            raise WorkbenchError(f"precision plan version {self.version} is not supported (this workbench reads "
                                 f"version {PLAN_VERSION}); re-create the plan with PrecisionPlan.uniform")
        known = linear_groups(graph)
        fingerprint = model_fingerprint(graph)
        if self.model is not None and self.model != fingerprint:
            raise WorkbenchError(f"this precision plan was made for another model (fingerprint {self.model}, this "
                                 f"graph's is {fingerprint}); make a new plan for this model")
        if self.kv_cache not in KV_FORMATS:
            raise WorkbenchError(f"kv_cache format {self.kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}")
        for name, spec in self.groups.items():
            if name not in known:
                raise WorkbenchError(_unknown_group(name, known))
            if not isinstance(spec, dict) or "format" not in spec:
                raise WorkbenchError(f"group {name!r}: expected {{\"format\": ...}}, got {spec!r}")
            fmt = spec["format"]
            if fmt not in FORMATS:
                raise WorkbenchError(f"group {name!r}: format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
            for key, value in spec.items():
                if key == "format":
                    continue
                if key not in OPTIONS[fmt]:
                    allowed = ", ".join(OPTIONS[fmt]) or "none"
                    raise WorkbenchError(f"group {name!r}: format {fmt} takes no option {key!r} (options: {allowed})")
                if key in _CHOICES and value not in _CHOICES[key]:
                    raise WorkbenchError(f"group {name!r}: {key} must be one of {', '.join(_CHOICES[key])}, "
                                         f"got {value!r}")
                if key == "alpha" and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                    raise WorkbenchError(f"group {name!r}: SmoothQuant alpha must be a number in [0, 1], got {value!r}")
        missing = [g for g in known if g not in self.groups]
        if missing:
            which = "lm_head is never implied: name it" if "lm_head" in missing else "every group must be named"
            raise WorkbenchError(f"the plan leaves out {len(missing)} linear groups ({', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''}); {which}, e.g. with \"bf16\" to keep it "
                                 "unquantized (PrecisionPlan.uniform builds a complete plan)")
        stray = [e for e in self.edited if e not in self.groups and e != "kv_cache"]
        if stray:
            raise WorkbenchError(f"'edited' names groups the plan does not have: {', '.join(stray)}")
        return self

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "kv_cache": self.kv_cache,
                "groups": copy.deepcopy(self.groups), "edited": list(self.edited)}

    @classmethod
    def from_json(cls, obj: Any) -> "PrecisionPlan":
        if not isinstance(obj, dict) or "groups" not in obj:
            raise WorkbenchError("a precision plan is a JSON object with \"version\", \"groups\" and \"kv_cache\"; "
                                 "see workbench.quant.plan for the format")
        unknown = set(obj) - {"version", "model", "kv_cache", "groups", "edited"}
        if unknown:
            raise WorkbenchError(f"precision plan: unknown keys {', '.join(sorted(unknown))} (keys: version, model, "
                                 "kv_cache, groups, edited)")
        groups = {k: (dict(v) if isinstance(v, dict) else {"format": v}) for k, v in obj["groups"].items()}
        return cls(groups, obj.get("kv_cache", "bf16"), obj.get("model"), list(obj.get("edited", [])),
                   obj.get("version", PLAN_VERSION))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def loads(cls, text: str) -> "PrecisionPlan":
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"precision plan is not valid JSON ({e})") from None


def _unknown_group(name: str, known: dict[str, LinearGroup]) -> str:
    if any(e in name for e in _EMBEDDINGS):
        return (f"group {name!r} is an embedding: embeddings stay in high precision (their rows are gathered, "
                "not multiplied); remove it from the plan")
    m = re.fullmatch(r"(layers\.\d+\.)(\w+)", name)
    if m and m.group(2).removesuffix("_proj") in _SIBLING_NAMES:
        fused = m.group(1) + _SIBLING_NAMES[m.group(2).removesuffix("_proj")]
        return (f"group {name!r} is one of fused siblings that share one GEMM and one format; name the group "
                f"{fused!r} instead")
    close = [k for k in known if k.split(".")[-1] == name.split(".")[-1]][:3]
    hint = f" (groups look like {', '.join(close or list(known)[:3])})"
    return f"the plan names {name!r}, which is not a linear group of this model{hint}"
