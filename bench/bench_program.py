"""The program the diagnostic benches analyse (step_profile, step_host, engine_trace): a preset's optimized graph
with random weights, quantized when asked, built in this process, its kernels the product's GPU defaults
(``Program.for_gpu_steps``) unless a bench tunes it for its own shapes (``tune_for_shape``).

``bench/throughput.py`` does not use this: it measures an engine that ``workbench build`` made, through ``LLM``.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from workbench.models.intake import ModelSource, resolve_source
from workbench.pipeline import optimize


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The arguments ``build_program`` reads: the preset, its layer count, the precision and the KV cache's."""
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--kv-cache", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--block-size", type=int, help="tokens per KV-cache block (default: the paged pass's, 16)")


def build_program(args, device):
    """The optimized graph of the preset (random bf16 weights), quantized when asked: (source, program,
    calibration seconds). No transformers model is built (``pipeline.optimize`` reads the weights straight onto
    the device), so that only the weights the program runs stay on the GPU (with the model, an FP8 program's KV
    cache would lose 13 GiB to the unused bf16 weights); ``run_hf_fresh`` builds it for the baselines."""
    source = resolve_source(args.preset)
    if args.layers:
        source = ModelSource("random", f"{args.preset}, {args.layers} layers", None,
                             {**source.config, "num_hidden_layers": args.layers}, source.seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # tokens per KV block: --block-size, else the paged pass's default (16)
    program = optimize(source, dtype=str(dtype).removeprefix("torch."), device=device,
                       kv_block_size=getattr(args, "block_size", None) or None).program
    graph = program.graph
    calib_s = None
    if args.precision != "bf16":
        from workbench.quant import PrecisionPlan, calibrate, quantized_program

        vocab = graph.meta["config"]["vocab_size"]
        ids = torch.randint(0, vocab, (8 * 512,), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        stats = calibrate(program, ids, samples=8, seq_len=512, progress=False)
        plan = PrecisionPlan.uniform(graph, args.precision, kv_cache=args.kv_cache)
        program = quantized_program(program, plan, stats)
        calib_s = time.perf_counter() - t0
    gc.collect()
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    if device.startswith("cuda"):
        program = program.for_gpu_steps()  # the product's GPU defaults until a bench tunes it (tune_for_shape)
    return source, program, calib_s


def tune_for_shape(program, args, n_in: int, n_out: int, seqs: int, default_cache: str):
    """``program`` with the choices tuned for offline requests of ``n_in`` prompt and ``n_out`` output tokens at
    ``seqs`` sequences and ``args.max_num_batched_tokens`` tokens a step (decode buckets up to ``seqs``, tuned at
    the requests' mean context), timings kept in ``args.cache`` (else ``default_cache``, afresh); and the
    profile. Any bench that tunes so shares ``the diagnostic benches' timing caches."""
    from workbench.kernels.autotune import TimingCache, autotune_profile
    from workbench.kernels.profiles import OptimizationProfile

    total = args.max_num_batched_tokens
    edges = tuple(e for e in (1, 2, 4, 8, 16, 32, 64, 128) if e < seqs) + (seqs, total)
    profile = OptimizationProfile(max_tokens=total, max_seqs=seqs, context=n_in + n_out // 2, max_context=n_in + n_out,
                                  prefill_len=min(n_in, total), edges=tuple(sorted(set(edges))))
    cache = TimingCache.open(args.cache or Path(default_cache), reset=args.cache is None)
    return program.with_choices(autotune_profile(program, profile, cache, progress=False, top_k=args.top_k)), profile


def refuse_cache_without_autotune(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--cache`` is only read when tuning: alone it would be silently ignored and default tactics run."""
    if args.cache and not args.autotune:
        ap.error("--cache is the autotuner's timing cache: pass --autotune too (what the cache holds is not timed again)")
