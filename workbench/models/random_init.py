"""Random-weight models, built straight into the target dtype and device.

The model skeleton is built on the meta device (no memory), then each parameter
is allocated once where it will live and filled from its own generator, seeded
by ``(seed, parameter name)``. So an 8B bf16 model never exists as fp32 on the
CPU, and a parameter's values do not depend on which other parameters exist:
``init_tensor`` regenerates any one of them by name, identically (``load_weights``
uses it to give a graph its weights without building the model).

Buffers computed from the config (rotary ``inv_freq``) have no values on the
meta device; the modules that own them take only the config, so they are built
again on the CPU and their buffers copied over.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import torch

from ..errors import WorkbenchError


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight")


def init_tensor(name: str, shape: Iterable[int], *, dtype: torch.dtype, device: torch.device | str,
                seed: int, std: float = 0.02) -> torch.Tensor:
    """The value parameter ``name`` gets under ``seed``: N(0, std), norm weights N(1, 0.1)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _is_norm_weight(name):
        return t.normal_(1.0, 0.1, generator=gen)
    return t.normal_(0.0, std, generator=gen)


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
        value = (init_tensor(name, p.shape, dtype=dtype, device=device, seed=seed, std=std) if materialize
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
        try:
            fresh = type(module)(config=config)
        except Exception as e:
            raise WorkbenchError(f"cannot compute buffers {meta} of {mname or 'model'} "
                                 f"({type(module).__name__}) without weights: {e}") from e
        for n in meta:
            module._buffers[n] = fresh._buffers[n]
