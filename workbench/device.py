"""The one device rule: every entry point takes ``device="auto"``, which means the GPU when there is one.

    resolve_device("auto")      # torch.device("cuda") on a GPU machine, torch.device("cpu") elsewhere
    resolve_device("cuda")      # on a machine without a GPU: a WorkbenchError saying so, in one line

Stage functions, ``load_engine``, ``LLM``, the server and every CLI command call this once at their edge
and pass the resolved ``torch.device`` down.
"""

from __future__ import annotations

import torch

from .errors import WorkbenchError

AUTO = "auto"


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """``"auto"`` (or None): CUDA when available, else the CPU; anything else as given, checked."""
    if device is None or (isinstance(device, str) and device.strip().lower() == AUTO):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WorkbenchError(f"unknown device {device!r} ({e}); give 'auto', 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WorkbenchError(f"device {str(device)!r} asks for a CUDA GPU, and there is none here (torch "
                                 f"{torch.__version__}); use device 'auto' or 'cpu' on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WorkbenchError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s); give an index below that")
    elif dev.type not in ("cpu", "meta"):
        raise WorkbenchError(f"device {str(device)!r} is not supported; give 'auto', 'cpu' or 'cuda'")
    return dev


def is_cuda(device: str | torch.device | None = AUTO) -> bool:
    return resolve_device(device).type == "cuda"
