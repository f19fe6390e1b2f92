"""Where an engine's values on the GPU leave the same engine's on the CPU, node by node (issue 22's greedy
mismatches: every tiny-mistral engine and tiny-llama's auto engine matched 0 greedy tokens of transformers on the
H100, while their CPU runs match).

    python3 bench/divergence_check.py tiny-mistral:bf16 tiny-llama:auto tiny-llama:bf16 [--tune]

Each MODEL:PRECISION is built (untuned; with ``--tune`` by ``workbench build``, tuned as a user's build is on
a GPU), then opened
twice: on the GPU (the kernels a GPU step runs: tuned where graph-safe, GPU defaults else) and on the CPU (the
reference ops). One prefill step of a seeded random prompt runs through each with every value kept; the table
lists the nodes whose relative error (GPU against CPU) first passes the tolerance, with the error of their
inputs (the op that made the error has small input errors). Then the greedy tokens of the GPU program, the CPU
program and transformers fp32 on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.cli import main as workbench_main  # noqa: E402
from workbench.engine.build import BuildOptions, build_engine  # noqa: E402
from workbench.evaluate import greedy, hf_logits, paged_greedy  # noqa: E402
from workbench.graph.ir import Ref  # noqa: E402
from workbench.graph.paged import cache_for  # noqa: E402
from workbench.models.intake import load_model, resolve_source  # noqa: E402
from workbench.runnable import open_runnable  # noqa: E402


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def values(program, ids):
    cache = cache_for(program.graph, num_blocks=8, device=program.device)
    return program.run(keep_all=True, **cache.step_inputs([(0, ids)]))


def check(spec: str, work: Path) -> None:
    model, precision = spec.rsplit(":", 1)
    engine = work / f"{Path(model).stem}-{precision}"
    t = time.perf_counter()
    if TUNE:
        rc = workbench_main(["build", model, "--precision", precision, "--out", str(engine),
                             "--workspace", str(work / f"{Path(model).stem}.ws")])
    else:  # the same build without its tuning: the GPU runs the default kernels
        build_engine(model, engine, BuildOptions(precision=precision, tune=False),
                     workspace=work / f"{Path(model).stem}.ws", log=lambda line: None)
        rc = 0
    print(f"\n== {spec}: build rc {rc} ({'tuned' if TUNE else 'untuned'}) in {time.perf_counter() - t:.0f} s",
          flush=True)
    gpu = open_runnable(engine, device="cuda" if torch.cuda.is_available() else "cpu").program
    cpu = open_runnable(engine, device="cpu").program
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (12,), generator=g).tolist()
    vg, vc = values(gpu, ids), values(cpu, ids)
    nodes = {n.name: n for n in gpu.graph.nodes}
    impl = gpu.implementations(len(ids)) if hasattr(gpu, "implementations") else {}
    errs = {}
    for name, n in nodes.items():
        a, b = vg.get(name), vc.get(name)
        if isinstance(a, (tuple, list)):
            a, b = a[0], b[0]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and b.is_floating_point() and \
                a.shape == b.shape and b.numel():
            errs[name] = rel(a.float(), b.float())
    tol = 0.02 if precision == "bf16" else 0.08
    shown = 0
    print(f"{'node':34} {'op':32} {'impl':14} {'rel err':>9}  inputs' rel err")
    for name, n in nodes.items():
        e = errs.get(name)
        if e is None or e <= tol:
            continue
        ins = [f"{a.name}={errs[a.name]:.1e}" for a in n.args if isinstance(a, Ref) and a.name in errs]
        print(f"{name[:34]:34} {n.op[:32]:32} {str(impl.get(name, '-'))[:14]:14} {e:9.2e}  {' '.join(ins)[:120]}")
        shown += 1
        if shown >= 12:
            break
    if not shown:
        print(f"no node past {tol}")
    out = gpu.graph.outputs[0]
    print(f"logits rel err {errs.get(out, float('nan')):.2e}; last-row argmax gpu {int(vg[out][0, -1].argmax())} "
          f"cpu {int(vc[out][0, -1].argmax())}")
    hf = load_model(resolve_source(model), dtype=torch.float32).model
    print("greedy gpu ", paged_greedy(gpu, torch.tensor(ids), 8))
    print("greedy cpu ", paged_greedy(cpu, torch.tensor(ids), 8))
    print("greedy hf32", greedy(hf_logits(hf), torch.tensor(ids), 8))
    if torch.cuda.is_available():
        hf = load_model(resolve_source(model), dtype=torch.float32, device="cuda").model
        print("hf32 cuda  ", greedy(hf_logits(hf), torch.tensor(ids, device="cuda"), 8), flush=True)


TUNE = "--tune" in sys.argv

if __name__ == "__main__":
    work = Path("/tmp/divergence")
    for spec in (a for a in sys.argv[1:] if not a.startswith("--")):
        try:
            check(spec, work)
        except Exception as e:  # noqa: BLE001 - a diagnostic: say it, go on to the next
            import traceback

            traceback.print_exc()
            print(f"{spec}: {type(e).__name__}: {e}", flush=True)
