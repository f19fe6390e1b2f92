"""Engine directories: a workspace's optimized graph, weights, tuning and tokenizer, self-contained and verified.

    export_engine("ws/", "engine/")                       # workbench export ws/ --out engine/
    engine = load_engine("engine/", device="cuda")        # checks format, libraries, hashes, the tuned GPU
    engine.program, engine.tokenizer, engine.limits       # what the runtime runs (LLM("engine/") does this)
    build_engine("tiny-llama", "engine/", BuildOptions(precision="fp8"))   # workbench build: every stage
    load_engine("engine/", tensor_parallel_size=2, rank=1)  # rank 1's shard: only its slices of the weights

``format`` says what the directory holds, ``export`` writes it, ``load`` verifies and loads it (``weights`` reads
the weights, whole or one rank's slices), ``build`` runs every stage from a model to an engine, resuming from its
workspace.
"""

from .build import BuildOptions, build_engine
from .export import export_engine
from .format import FORMAT_VERSION, EngineLimits, is_engine_dir
from .load import Engine, load_engine, read_engine

__all__ = ["BuildOptions", "Engine", "EngineLimits", "FORMAT_VERSION", "build_engine", "export_engine",
           "is_engine_dir", "load_engine", "read_engine"]
