"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it
is set here, at import time of the first module pytest loads.
"""

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


#: kernels against their references: relative error by dtype
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN: an element a kernel misses fails the test."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def kernel_close(out, ref, dtype):
    """A kernel's output against its reference: same dtype and shape, finite, within ``KERNEL_TOL``."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < KERNEL_TOL[dtype]


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``: the suite's files split over two worker processes) each worker runs torch on
    one intra-op thread: two workers with two threads each on two cores wait for each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on two shared cores, threads over small matrices wait for each other and for other processes (a file of
    tiny-llama steps ran ten times slower, a 49152-way draw twenty). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty model cache, for tests that must not see the real one."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def optimized_program(model: str = "tiny-llama", dtype: torch.dtype = torch.float32):
    """``model``'s optimized graph (every pass, paged attention) captured in ``dtype`` and bound to its
    weights, on the CPU."""
    from workbench.pipeline import optimize

    return optimize(model, dtype=str(dtype).removeprefix("torch."), device="cpu").program


@pytest.fixture(scope="session")
def checked_optimize():
    """name -> ``pipeline.optimize(name, device="cpu", check=True)`` of a tiny preset (float32, every pass, each
    checked), made once per session: ``tiny_program``, test_capture (its ``captured``), test_families,
    test_kernels_attention, test_paged and test_passes start from the same ones (a second or two each). Tests must
    not change them."""
    from workbench.pipeline import optimize

    made = {}

    def get(name: str):
        if name not in made:
            made[name] = optimize(name, device="cpu", check=True)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_program(checked_optimize):
    """tiny-llama's optimized graph (every pass, paged attention) bound to its weights, on the CPU."""
    return checked_optimize("tiny-llama").program


@pytest.fixture(scope="session")
def program(tiny_program):
    """``tiny_program`` under the name most test modules use (a module may define its own ``program``)."""
    return tiny_program


@pytest.fixture(scope="session")
def tiny_stats(tiny_program):
    """Calibration statistics of ``tiny_program`` over random token ids: 6 sequences of 48 tokens, 4 per step."""
    from workbench.quant import calibrate

    torch.manual_seed(1)
    return calibrate(tiny_program, torch.randint(1, 512, (3000,)), samples=6, seq_len=48, batch=4, progress=False)


@pytest.fixture(scope="session")
def stats(tiny_stats):
    """``tiny_stats`` under the name the quantization tests use."""
    return tiny_stats


@pytest.fixture(scope="session")
def llama_3_8b_meta():
    """Llama-3-8B in bf16 on the meta device (no weights) and its captured graph: about 8 s of torch.export, shared
    by test_capture (the capture) and test_passes (the passes over it). Tests must not change the graph."""
    from workbench.graph.capture import capture
    from workbench.models import load_model

    lm = load_model("llama-3-8b", dtype=torch.bfloat16, materialize=False)
    return lm, capture(lm.model)


@pytest.fixture(scope="session")
def _tiny_llama_workspaces(tmp_path_factory):
    """Two workspaces of tiny-llama made once per session: "captured" (the capture stage) and "optimized" (capture
    and passes). Tests get copies (``captured_ws``, ``optimized_ws``), never these."""
    from workbench.pipeline import capture_stage, passes_stage
    from workbench.workspace import Workspace

    root = tmp_path_factory.mktemp("tiny-llama-workspaces")
    capture_stage(Workspace(root / "captured"), "tiny-llama")
    shutil.copytree(root / "captured", root / "optimized")
    passes_stage(Workspace(root / "optimized"), device="cpu")
    return root


def copy_workspace(source: Path, to: Path):
    """A copy of workspace directory ``source`` at ``to``, opened: copy2 keeps the mtimes, so every stage stays ok."""
    from workbench.workspace import Workspace

    shutil.copytree(source, to)
    return Workspace(to)


@pytest.fixture
def captured_ws(_tiny_llama_workspaces, tmp_path):
    """A workspace at ``tmp_path/ws`` with tiny-llama captured: a copy of one captured once per session (each
    capture is a second or more of torch.export; a dozen tests start from this one)."""
    return copy_workspace(_tiny_llama_workspaces / "captured", tmp_path / "ws")


@pytest.fixture
def optimized_ws(_tiny_llama_workspaces, tmp_path):
    """A workspace at ``tmp_path/ws`` with tiny-llama captured and its passes run (every pass), copied likewise."""
    return copy_workspace(_tiny_llama_workspaces / "optimized", tmp_path / "ws")


def prefill_then_decode(program):
    """Graph inputs of two steps on a fresh paged cache: a prefill of two prompts (12 and 9 tokens), then a
    decode step of both."""
    from workbench.graph.paged import cache_for

    cache = cache_for(program.graph, num_blocks=8)
    return [cache.step_inputs([(0, list(range(3, 15))), (1, list(range(40, 49)))]),
            cache.step_inputs([(0, [7]), (1, [8])])]


NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def tiny_notebook(path: Path, directory: Path) -> Path:
    """A copy of notebook ``path`` in ``directory`` that runs on ``tiny-llama`` with its workspace in
    ``directory/ws``: the cell tagged ``parameters`` (the papermill convention) replaced by those values."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "each notebook has exactly one parameters cell"
    values = {"MODEL": "tiny-llama", "WORKSPACE": str(directory / "ws")}
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    directory.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, directory / path.name)
    return directory / path.name


def browser_missing() -> str | None:
    """Why tests/test_browser.py cannot run here, or None when it can: it drives the system's Chromium (Debian's
    ``chromium``, which install.sh installs where it can) with the ``playwright`` package (the dev extra). The
    notebooks run in exactly one place: in the browser when this is None, else headless in
    tests/test_notebooks.py."""
    if shutil.which("chromium") is None:
        return "no chromium on PATH (install.sh installs Debian's chromium where apt-get and root or sudo are at hand)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None
