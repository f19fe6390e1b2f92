"""workbench: optimize and serve decoder LLMs on NVIDIA GPUs, one inspectable stage at a time.

The core imports with torch, transformers and safetensors alone; plotting,
widget and server packages are imported inside the functions that need them.
"""

from .errors import WorkbenchError

__version__ = "0.1.0"
__all__ = ["WorkbenchError", "__version__"]
