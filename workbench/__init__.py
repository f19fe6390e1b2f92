"""workbench: optimize and serve decoder LLMs on NVIDIA GPUs, one inspectable stage at a time.

    from workbench import LLM, SamplingParams
    llm = LLM("smollm2-135m")          # a model source, a workspace or an engine directory; GPU when there is one
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))

The core imports with torch, transformers and safetensors alone; plotting,
widget and server packages are imported inside the functions that need them.
``LLM`` and ``SamplingParams`` are imported on first use, so ``import workbench`` stays light.
"""

from .errors import WorkbenchError
from .plugins import load_plugins

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "WorkbenchError", "__version__", "load_plugins"]


def __getattr__(name: str):
    if name == "LLM":
        from .runtime.engine import LLM

        return LLM
    if name == "SamplingParams":
        from .runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
