"""Op registry (reference implementations, cost models, tactics) and kernels."""

from .cost import Cost, OpCall
from .registry import REGISTRY, OpDef, OpRegistry, get_op, register_op
from . import fused  # noqa: E402,F401  (registers the fused ops)
from . import fused_ln  # noqa: E402,F401  (the LayerNorm families' fused ops)
from . import gemm  # noqa: E402,F401  (registers the quantized linears: fp8, int8, weight-only int8)
from . import collectives  # noqa: E402,F401  (registers all_reduce and all_gather)

__all__ = ["Cost", "OpCall", "OpDef", "OpRegistry", "REGISTRY", "get_op", "register_op"]
