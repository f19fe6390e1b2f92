"""The hardware ceilings that rooflines are drawn against, measured on the device in use.

    copy_gbps(device)      device-to-device copy, bytes read + written per second (memory ceiling): the best of
                           several sizes and repeats
    spec_sheet_gbps(device) the vendor's figure, printed beside (never used as the ceiling)
    matmul_tflops(device)  an 8192³ bf16 product on random data (matrix-unit ceiling)

Measured, not taken from datasheets (METHOD.md): sustained rates differ from the spec sheet.
"""

from __future__ import annotations

import torch

from .timing import time_fn


#: Memory bandwidth on the vendor's spec sheet, GB/s, by the start of ``torch.cuda.get_device_name()``: what
#: batch-1 rows print beside the measured ceiling (no GPU copies at the spec-sheet rate).
SPEC_SHEET_GBPS = {"NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H100 PCIe": 2000.0, "NVIDIA H100 NVL": 3900.0,
                   "NVIDIA H200": 4800.0, "NVIDIA A100-SXM4-80GB": 2039.0, "NVIDIA A100-SXM4-40GB": 1555.0}


def copy_gbps(device: str | torch.device = "cuda", sizes: tuple[int, ...] = (512 << 20, 1 << 30, 2 << 30),
              rounds: int = 3) -> float:
    """The device-to-device copy ceiling, bytes read + written per second: the best of ``rounds`` timings (each the
    median of 10 copies) at each of several ``sizes``. A ceiling is what the device can reach, so the best is
    taken: a single median at one size undercounts (clocks ramp, other work shares the device; an example in
    BENCHMARKS.md, "Figures moved out of source docstrings")."""
    def rate(nbytes: int) -> float:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        return max(2 * nbytes / (time_fn(lambda: dst.copy_(src), warmup=3, repeats=10, device=device).median_ms
                                 * 1e-3) / 1e9 for _ in range(rounds))

    return max(rate(n) for n in sizes)


def spec_sheet_gbps(device: str | torch.device = "cuda") -> float | None:
    """The spec sheet's memory bandwidth of the device (``SPEC_SHEET_GBPS``), or None for a device not listed."""
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in SPEC_SHEET_GBPS.items() if name.startswith(k)), None)


def matmul_tflops(device: str | torch.device = "cuda", n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, warmup=3, repeats=10, device=device)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12
