"""The hardware ceilings that rooflines are drawn against, measured on the device in use.

    copy_gbps(device)      device-to-device copy, bytes read + written per second (memory ceiling)
    matmul_tflops(device)  an 8192³ bf16 product on random data (matrix-unit ceiling)

Measured, not taken from datasheets (METHOD.md): sustained rates differ from the spec sheet.
"""

from __future__ import annotations

import torch

from .timing import time_fn


def copy_gbps(device: str | torch.device = "cuda", nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, repeats=20, device=device)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: str | torch.device = "cuda", n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, warmup=3, repeats=10, device=device)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12
