"""The workbench IR, its capture from torch.export, the reference executor and tables of a graph."""

from .capture import Captured, capture
from .executor import Program
from .ir import Graph, Node, Param, Ref, TensorSpec

__all__ = ["Captured", "Graph", "Node", "Param", "Program", "Ref", "TensorSpec", "capture"]
