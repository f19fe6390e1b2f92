"""Random-weight models, built straight into the target dtype and device.

The model skeleton is built on the meta device (no memory), then each parameter
is allocated once where it will live and filled there, in chunks, from a
counter-based generator keyed by ``(seed, parameter name)``: element i's value is
a hash of i, turned into a normal sample (Box-Muller) in float32, then cast. So an
8B bf16 model never exists as fp32 on the CPU; a parameter's values do not depend
on which other parameters exist (``init_tensor`` regenerates any one of them by
name, identically: ``load_weights`` uses it to give a graph its weights without
building the model); and they do not depend on the device or the dtype either
(integer hashing is exact everywhere; the float32 transform may differ in the last
bit between CPU and GPU math libraries). A preset is the same model on the CPU and
on the GPU, in float32 and in bfloat16: an engine built on the GPU and transformers
loaded on the CPU compare the same weights. (``torch.Generator`` would not: its CPU
and CUDA streams differ, and so do its float32 and bfloat16 samples.)

Buffers computed from the config (rotary ``inv_freq``) have no values on the
meta device; the modules that own them take only the config, so they are built
again on the CPU and their buffers copied over. Gemma's embedding scale (a scalar
buffer, sqrt(hidden)) is rebuilt from the number its module keeps.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch

from ..errors import WorkbenchError


def _is_norm_weight(name: str) -> bool:
    """A norm's scale (N(1, 0.1), not N(0, std)): ``…norm.weight``, or GPT-2's and Falcon's ``ln_1`` / ``ln_f`` /
    ``ln_attn`` (a LayerNorm scaled near 0 would make the whole model's logits near 0)."""
    module, _, leaf = name.rpartition(".")
    last = module.rpartition(".")[2]
    return leaf == "weight" and ("norm" in last or last.startswith("ln_"))


def norm_center(config) -> float:
    """Where random norm weights are centred: 1, or 0 for norms that scale by (1 + w) (Gemma's, which transformers
    initializes to zeros), so that every family's norms scale by about 1. (Centred at 1, Gemma 3's q/k norms doubled
    q and k, and its tiny model's attention scores were 4x Qwen3's: a softmax far sharper than a real model's.)"""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return 0.0 if str(model_type or "").startswith("gemma") else 1.0


#: Elements filled per chunk: bounds the scratch (int64 counters and hashes, float32 samples) to about 200 MB.
CHUNK = 1 << 22
_M31 = (1 << 31) - 1


def _mix(h: torch.Tensor, mul: int, shift: int) -> torch.Tensor:
    """One multiply-xorshift round on 31-bit values: products stay below 2**62, so every device computes the
    same integers."""
    return ((h ^ (h >> shift)) * mul) & _M31


def _hash31(x: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 31-bit hashes of int64 counters ``x`` (< 2**40) under ``key``."""
    h = ((x & _M31) * 0x2C1B3C6D + (x >> 31) * 0x1B873593 + key) & _M31
    h = _mix(_mix(h, 0x297A2D39, 15), 0x2545F491, 13)
    return h ^ (h >> 16), _mix(h, 0x1CE4E5B9, 16) ^ (h >> 11)


def init_tensor(name: str, shape: Iterable[int], *, dtype: torch.dtype, device: torch.device | str,
                seed: int, std: float = 0.02, norm_mean: float = 1.0) -> torch.Tensor:
    """The value parameter ``name`` gets under ``seed``: N(0, std), norm weights N(norm_mean, 0.1) (``norm_center``);
    the same values on any device and (up to the cast) in any dtype."""
    device = torch.device(device)
    key = zlib.crc32(f"{seed}:{name}".encode()) & _M31
    mean, scale = (norm_mean, 0.1) if _is_norm_weight(name) else (0.0, std)
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        i = torch.arange(start, min(start + CHUNK, flat.numel()), device=device, dtype=torch.int64)
        h1, h2 = _hash31(i, key)
        u1 = (h1.to(torch.float32) + 1.0) / 2.0 ** 31  # (0, 1]
        u2 = h2.to(torch.float32) / 2.0 ** 31          # [0, 1)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        flat[start:start + i.numel()] = (z * scale + mean).to(dtype)
    return t


def build_random_model(config, *, dtype: torch.dtype, device: torch.device | str, seed: int,
                       materialize: bool = True) -> torch.nn.Module:
    """A transformers causal LM with random weights; ``materialize=False`` leaves parameters on meta."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    _restore_buffers(model, config)
    std = getattr(config, "initializer_range", 0.02)
    new: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():  # first name of each (possibly tied) tensor
        value = (init_tensor(name, p.shape, dtype=dtype, device=device, seed=seed, std=std,
                             norm_mean=norm_center(config)) if materialize
                 else torch.empty(p.shape, dtype=dtype, device="meta"))
        new[id(p)] = torch.nn.Parameter(value, requires_grad=False)
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[pname] = new[id(p)]
    for module in model.modules():
        for bname, b in list(module._buffers.items()):
            if b is not None and materialize:
                module._buffers[bname] = b.to(device)
    return model


def _restore_buffers(model: torch.nn.Module, config) -> None:
    for mname, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if meta == ["embed_scale"] and hasattr(module, "scalar_embed_scale"):
            # Gemma's scaled word embedding: its buffer is the number it was built with (sqrt(hidden))
            module._buffers["embed_scale"] = torch.tensor(module.scalar_embed_scale)
            continue
        try:
            fresh = type(module)(config=config)
        except Exception as e:
            raise WorkbenchError(f"cannot compute buffers {meta} of {mname or 'model'} "
                                 f"({type(module).__name__}) without weights: {e}") from e
        for n in meta:
            module._buffers[n] = fresh._buffers[n]
