"""How long each notebook takes as a person runs it: every code cell in order, one fresh Python process per
notebook (as a fresh kernel), all sharing one workspace as notebooks 01-06 do when run in order.

    python3 bench/notebook_times.py --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/notebook_times.json
    python3 bench/notebook_times.py --model tiny-llama --notebooks 01,02     # a quick check

Each notebook's parameters cell (tagged ``parameters``) gets ``MODEL`` and ``WORKSPACE``; the cells run in an
IPython shell (the kernel's own cell semantics: magics, display of the last expression), without a kernel or a
browser, so the times are the notebook's own work, which is what its first cell promises. The table gives each
notebook's seconds, its slowest cell, and the ratio to the time its first cell states for a 2-core CPU (the
baseline a reader is given; "-" where the cell states none). ``--baseline-cpu`` also runs every notebook with
the GPU hidden (``CUDA_VISIBLE_DEVICES=""``) in the same call, in a workspace of its own, and gives that ratio.

Needs ipython, ipywidgets and plotly (on the GPU machine: carried as wheels, ``.nbwhl``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path: Path, model: str, workspace: str) -> list[str]:
    """The notebook's code cells, its parameters cell replaced by ``model`` and ``workspace``."""
    nb = json.loads(path.read_text())
    out = []
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        source = "".join(c["source"])
        if "parameters" in c.get("metadata", {}).get("tags", []):
            source = f"MODEL = {model!r}\nWORKSPACE = {workspace!r}"
        out.append(source)
    return out


def stated_cpu_seconds(path: Path) -> float | None:
    """The 2-core CPU time the notebook's first cell states for the default model ("about 70 s on a 2-core CPU",
    "about 3 minutes"), or None."""
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    m = re.search(r"about (\d+(?:\.\d+)?) (s|minutes?) on a 2-core CPU", first)
    if not m:
        return None
    return float(m.group(1)) * (60 if m.group(2).startswith("minute") else 1)


def run_one(path: Path, model: str, workspace: str) -> dict:
    """Run one notebook's cells in this process; seconds per cell and the first error."""
    from IPython.core.interactiveshell import InteractiveShell

    os.chdir(Path(workspace).parent)
    shell = InteractiveShell.instance()
    times, error = [], None
    for i, source in enumerate(cells(path, model, workspace)):
        t0 = time.perf_counter()
        result = shell.run_cell(source, store_history=False)
        times.append(time.perf_counter() - t0)
        if not result.success:
            error = f"cell {i + 1}: {result.error_in_exec or result.error_before_exec!r}"
            break
    return {"notebook": path.name, "cells_s": times, "seconds": sum(times), "error": error}


def run_all(names: list[Path], model: str, workspace: Path, env: dict, log) -> list[dict]:
    rows = []
    for path in names:
        cmd = [sys.executable, __file__, "--one", str(path), "--model", model, "--workspace", str(workspace)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        log.write(f"== {path.name} ({'cpu' if env.get('CUDA_VISIBLE_DEVICES') == '' else 'default'})\n"
                  f"{proc.stdout}\n{proc.stderr}\n")
        log.flush()
        lines = [line for line in proc.stdout.splitlines() if line.startswith("NOTEBOOK_TIMES ")]
        row = json.loads(lines[-1][len("NOTEBOOK_TIMES "):]) if lines else {
            "notebook": path.name, "cells_s": [], "seconds": None,
            "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
        row["process_s"] = time.perf_counter() - t0  # with Python's start and imports, as a kernel's first cell
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--notebooks", help="comma-separated number prefixes (default: all)")
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/notebook_times/ws"))
    ap.add_argument("--baseline-cpu", action="store_true", help="also run them with the GPU hidden, in this call")
    ap.add_argument("--out", type=Path, help="JSON of the rows")
    ap.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "notebook_times.log")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: run this notebook in this process
    args = ap.parse_args()
    if args.one:
        row = run_one(args.one, args.model, str(args.workspace))
        print("NOTEBOOK_TIMES " + json.dumps(row), flush=True)
        return

    import torch

    wanted = args.notebooks.split(",") if args.notebooks else None
    names = [p for p in NOTEBOOKS if wanted is None or p.name.split("_")[0] in wanted]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    runs = {"default": (args.workspace, dict(os.environ))}
    if args.baseline_cpu:
        hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        runs["cpu"] = (args.workspace.with_name(args.workspace.name + "-cpu"), hidden)
    results = {}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "w") as log:
        for name, (workspace, env) in runs.items():
            workspace.parent.mkdir(parents=True, exist_ok=True)
            results[name] = run_all(names, args.model, workspace, env, log)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "model": args.model, **results}, indent=1))

    print(f"\nnotebooks on {device}, MODEL={args.model} (cells in an IPython shell, one process per notebook)")
    head = f"{'notebook':<24} {'s':>7} {'with start':>10} {'slowest cell':>14} {'stated CPU s':>12} {'ratio':>6}"
    print(head + (f" {'this CPU s':>10} {'ratio':>6}" if args.baseline_cpu else "") + "  error")
    for i, row in enumerate(results["default"]):
        stated = stated_cpu_seconds(ROOT / "notebooks" / row["notebook"])
        s = row["seconds"]
        slow = max(range(len(row["cells_s"])), key=row["cells_s"].__getitem__) if row["cells_s"] else None
        slowest = f"{row['cells_s'][slow]:.1f} (#{slow + 1})" if slow is not None else "-"
        ratio = f"{s / stated:.2f}" if s is not None and stated else "-"
        line = (f"{row['notebook']:<24} {s if s is not None else float('nan'):>7.1f} {row['process_s']:>10.1f} "
                f"{slowest:>14} {stated if stated else '-':>12} {ratio:>6}")
        if args.baseline_cpu:
            cpu = results["cpu"][i]["seconds"]
            line += f" {cpu if cpu is not None else float('nan'):>10.1f} " + (
                f"{s / cpu:>6.2f}" if s is not None and cpu else f"{'-':>6}")
        print(line + f"  {row['error'] or ''}")


if __name__ == "__main__":
    main()
