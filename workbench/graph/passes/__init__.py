"""Graph passes: named, ordered rewrites of the workbench IR, each checked and explained.

``run_passes(graph, params)`` applies ``default_pipeline()``: ``DEFAULT_PIPELINE`` with the passes registered
with a place (``register_pass(name, after=...)``) in it. ``register_pass`` adds a user's pass (a plugin).
"""

from . import eliminate, fold, fuse, horizontal, paged, tensors  # noqa: F401  (register the built-in passes)
from .manager import (PASSES, PLACES, GraphPass, Match, PassReport, default_pipeline, register_pass, run_passes,
                      summary_table)

#: The standard pipeline, in order. Norms are fused before the residual adds that feed them.
DEFAULT_PIPELINE = (
    "eliminate_noops",
    "fold_rope_tables",
    "eliminate_duplicates",
    "collapse_layout_chains",
    "fuse_rms_norm",
    "fuse_add_rms_norm",
    "fuse_silu_mul",
    "fuse_rope",
    "fuse_attention",
    "fuse_parallel_linears",
    "insert_paged_attention",
    "fuse_rope_into_attention",
)

__all__ = ["DEFAULT_PIPELINE", "GraphPass", "Match", "PASSES", "PLACES", "PassReport", "default_pipeline",
           "register_pass", "run_passes", "summary_table"]
