"""Checks of model files that turn deep library tracebacks into one-line errors.

Each check reads only headers: a 500 MB safetensors file is validated without
reading its tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import WorkbenchError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_safetensors(path: Path) -> dict:
    """Parse the header and check the file holds every byte it promises; returns the header."""
    size = path.stat().st_size
    fix = "re-download or re-convert the model"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WorkbenchError(f"{path} is truncated ({size} bytes, no safetensors header); {fix}")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise WorkbenchError(f"{path} is corrupt or truncated (header of {n} bytes in a {size}-byte file); {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WorkbenchError(f"{path} is corrupt (its safetensors header is not valid JSON); {fix}") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise WorkbenchError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes "
                             f"but the file has {size}; {fix}")
    return header


def check_gguf(path: Path) -> None:
    fix = "download it again (`workbench fetch` verifies the checksum)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WorkbenchError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); {fix}")
    try:
        import gguf
    except ImportError:
        raise WorkbenchError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        gguf.GGUFReader(str(path))
    except Exception as e:
        raise WorkbenchError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e}); {fix}") from None


def check_hf_dir(path: Path, *, need_tokenizer: bool = True) -> dict:
    """Check a Hugging Face model directory; returns its parsed config.json."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise WorkbenchError(f"{path} has no config.json, so it is not a Hugging Face model directory "
                             "(expected config.json, *.safetensors and tokenizer files)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{cfg_path} is not valid JSON ({e}); restore it from the original checkpoint") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise WorkbenchError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not read: "
                             "convert them with transformers' save_pretrained(safe_serialization=True))")
    for w in weights:
        check_safetensors(w)
    if need_tokenizer and not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise WorkbenchError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                             "files from the original checkpoint into it")
    return config
