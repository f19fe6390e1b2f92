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


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty model cache, for tests that must not see the real one."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
