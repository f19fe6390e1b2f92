"""Greedy sampling: the one-pass Triton kernel against the torch chain it replaces, same process.

    python3 bench/sampling.py --rows 1,64,256,512 --vocab 128256

For each batch of bf16 logits [rows, vocab] (random, so ties are rare): the argmax and its log-softmax as
``Sampler`` computed them before (an fp32 copy, log_softmax, argmax, gather: the torch chain) and as
``kernels.triton_sampling.greedy_logprobs`` computes them, each timed as a CUDA-graph replay of 5 calls
(GPU time; in the engine it sits between two decode steps). Their outputs are compared first. The key
columns: the speed-up over the torch chain, and the kernel's read of the logits as a share of the copy
bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.kernels.triton_sampling import chunking, greedy_logprobs  # noqa: E402
from workbench.profiling import time_fn  # noqa: E402
from workbench.profiling.ceilings import copy_gbps  # noqa: E402


def torch_chain(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``Sampler.launch`` runs for greedy rows without the kernel."""
    x = logits.float()
    logprobs = torch.log_softmax(x, dim=-1)
    tokens = x.argmax(dim=-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,64,256,512")
    ap.add_argument("--vocab", type=int, default=128256, help="Llama-3's vocabulary")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = args.device
    ceiling = copy_gbps(device)
    g = torch.Generator(device=device).manual_seed(0)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        logits = (3 * torch.randn(rows, args.vocab, device=device, generator=g)).bfloat16()
        tokens, logprobs = greedy_logprobs(logits)
        ref_tokens, ref_logprobs = torch_chain(logits)
        same = bool((tokens == ref_tokens).all())
        err = float((logprobs - ref_logprobs).abs().max())
        kernel = time_fn(lambda: greedy_logprobs(logits), repeats=20, device=device, graph_calls=5)
        chain = time_fn(lambda: torch_chain(logits), repeats=20, device=device, graph_calls=5)
        moved = logits.numel() * logits.element_size()
        results.append({"rows": rows, "vocab": args.vocab, "chunks": chunking(rows, args.vocab)[1],
                        "tokens_equal": same, "logprob_max_diff": err, "kernel_ms": kernel.median_ms,
                        "torch_ms": chain.median_ms, "speedup": chain.median_ms / kernel.median_ms,
                        "of_copy": moved / (kernel.median_ms * 1e-3) / 1e9 / ceiling})
    gpu = torch.cuda.get_device_name(device)
    print(f"\n{gpu}, torch {torch.__version__}; bf16 logits, vocab {args.vocab}; copy bandwidth {ceiling:.0f} GB/s")
    print(f"{'rows':>5} {'chunks/row':>10} {'torch ms':>9} {'kernel ms':>10} {'speedup':>8} {'of copy':>8} "
          f"{'tokens equal':>12} {'logprob diff':>12}")
    for r in results:
        print(f"{r['rows']:>5} {r['chunks']:>10} {r['torch_ms']:>9.4f} {r['kernel_ms']:>10.4f} {r['speedup']:>7.2f}x "
              f"{r['of_copy']:>8.1%} {str(r['tokens_equal']):>12} {r['logprob_max_diff']:>12.1e}")
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "copy_gbps": ceiling,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
