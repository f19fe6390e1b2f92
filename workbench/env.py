"""Files and the machine: atomic writes, content hashes, and the environment records and caches are keyed by.

    atomic_write(path, data)       # bytes, or a function writing to the open file: temp file, fsync, rename
    sha256_file(path)              # hex digest, read in 4 MiB blocks
    environment()                  # {"versions": {python, workbench, torch, ...}, "host": {..., "gpu": {...} | None}}
    environment_key()              # what a timing depends on: torch, triton, CUDA, GPU name and SM count

Every stage writes through ``atomic_write`` (a run killed mid-write leaves the previous file intact), the
workspace records ``environment()`` beside each stage's artifacts, and timing caches and traces carry
``environment_key()`` so that timings are never reused on another GPU or library version. This module
imports nothing of workbench but its version, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, data: bytes | Callable[[io.BufferedWriter], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """Library versions and the machine, for records and caches."""
    from importlib import metadata

    from . import __version__

    # workbench's own version from the package that runs (it may be on PYTHONPATH, not pip-installed)
    versions = {"python": platform.python_version(), "workbench": __version__}
    for pkg in ("torch", "triton", "transformers", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    host = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpu": None}
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        host["gpu"] = {"name": props.name, "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {"versions": versions, "host": host}


def environment_key() -> dict[str, Any]:
    """What a timing depends on besides the op and its shapes (from ``environment()``)."""
    import torch

    env = environment()
    gpu = env["host"]["gpu"] or {}
    return {"torch": torch.__version__, "triton": env["versions"]["triton"], "cuda": torch.version.cuda,
            "gpu": gpu.get("name", "cpu"), "sm_count": gpu.get("sm_count", 0)}
