"""The workbench IR, its capture from torch.export (``graph.capture``), the reference executor
(``graph.executor``), tables, figures, passes.

The IR types import eagerly; ``Program`` loads on first use, so that ``workbench.kernels``
(which the executor needs) can itself use the IR types.
"""

from .ir import Graph, Node, Param, Ref, TensorSpec

__all__ = ["Graph", "Node", "Param", "Program", "Ref", "TensorSpec"]


def __getattr__(name):
    if name == "Program":
        from .executor import Program

        return Program
    raise AttributeError(name)
