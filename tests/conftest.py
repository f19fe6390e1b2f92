"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it
is set here, at import time of the first module pytest loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


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
def tiny_program():
    """tiny-llama's optimized graph (every pass, paged attention) bound to its weights, on the CPU."""
    return optimized_program()


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


def prefill_then_decode(program):
    """Graph inputs of two steps on a fresh paged cache: a prefill of two prompts (12 and 9 tokens), then a
    decode step of both."""
    from workbench.graph.paged import cache_for

    cache = cache_for(program.graph, num_blocks=8)
    return [cache.step_inputs([(0, list(range(3, 15))), (1, list(range(40, 49)))]),
            cache.step_inputs([(0, [7]), (1, [8])])]
