"""Graph passes: named, ordered rewrites of the workbench IR, each checked and explained.

``run_passes(graph, params)`` applies ``default_pipeline()``: ``DEFAULT_PIPELINE`` with the passes registered
with a place (``register_pass(name, after=...)``) in it. ``register_pass`` adds a user's pass (a plugin).
A tensor-parallel graph gets ``sharded_pipeline()`` after the sharding pass (``tensor_parallel.shard_and_fuse``).
"""

from . import eliminate, fold, fuse, horizontal, paged, rows, tensors  # noqa: F401  (register the built-in passes)
from . import layernorm  # noqa: F401  (the LayerNorm families' passes)
from . import collective  # noqa: F401  (fusions across a sharded graph's collectives)
from .manager import (DEFAULT_PIPELINE, FAMILY_LAYER_FUSIONS, LAYER_FUSIONS, PASSES, PLACES, GraphPass, Match,
                      PassReport, default_pipeline, register_pass, run_passes, sharded_pipeline, summary_table,
                      unfused_layers, unfused_lines)

__all__ = ["DEFAULT_PIPELINE", "FAMILY_LAYER_FUSIONS", "GraphPass", "LAYER_FUSIONS", "Match", "PASSES", "PLACES",
           "PassReport", "default_pipeline", "register_pass", "run_passes", "sharded_pipeline", "summary_table",
           "unfused_layers", "unfused_lines"]
