"""The server under load against the offline engine, same machine: `workbench build`, then `workbench serve` and a
load generator at several request rates.

    python3 bench/serve_load.py --model config.json --precision bf16 --tokenizer tok/ --out $OUT/serve.json

    python3 bench/serve_load.py --engine /tmp/e8b --requests 200 --len 1000 --rates inf   # an engine already built

1. ``workbench build MODEL --precision P --out ENGINE`` (every stage; its per-stage times are kept), unless
   ``--engine`` already holds an engine (then ``--model`` is not needed).
2. ``workbench serve ENGINE`` in a subprocess with the product's defaults (its KV cache sized from free memory,
   unless ``--num-blocks``); for each of ``--rates`` requests/s, ``--requests`` streaming ``/v1/completions``
   requests (token-id prompts, ``max_tokens`` = ``--len``, ``ignore_eos``) arrive as a Poisson process: TTFT
   (first streamed token), inter-token latency and output tok/s, from the client's side. The last row, ``inf``,
   sends every request at once: its throughput over the offline one is what the HTTP layer costs.
3. Offline, once the server has exited (so both see the same free memory): ``LLM(ENGINE).generate`` with the
   same defaults on the same prompts, all at once (output tok/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentiles(values, qs=(50, 90, 99)):
    if not values:
        return {f"p{q}": None for q in qs}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(t, q / 100)) for q in qs}


async def one_request(client, url, prompt, n, due, t0):
    import httpx  # noqa: F401

    await asyncio.sleep(max(0.0, due - (time.perf_counter() - t0)))
    start = time.perf_counter()
    times, tokens = [], 0
    body = {"model": "engine", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "body": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("token_ids")):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"start": start, "times": times, "tokens": tokens}


async def _client(port, jobs, n, t0):
    """One client process's share: ``jobs`` are ``(prompt, due)``, due in seconds after ``t0``."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=len(jobs) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        return await asyncio.gather(*(one_request(client, url, p, n, d, t0) for p, d in jobs))


def _client_process(args):
    port, jobs, n, t0 = args
    return asyncio.run(_client(port, jobs, n, t0)), time.process_time()


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server process ``pid`` and of each process it started (the
    engine's), by role: what each side spends per streamed token."""
    import psutil

    root = psutil.Process(pid)
    out = {"server": sum(root.cpu_times()[:2])}
    for child in root.children(recursive=True):
        try:
            out["engine"] = out.get("engine", 0.0) + sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return out


def run_rate(port, prompts, n, rate, seed=0, clients=1):
    """``prompts`` as a Poisson process of ``rate`` requests/s (all at once for inf), from ``clients`` processes
    (a Python client parses one server-sent event in about 80 us: one process alone caps what it can measure
    near 12k tokens/s)."""
    rng = random.Random(seed)
    due, t = [], 0.0
    for _ in prompts:
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
        due.append(t)
    jobs = list(zip(prompts, due))
    shares = [jobs[i::clients] for i in range(clients)]
    if clients == 1:
        t0 = time.perf_counter()
        results, cpu = asyncio.run(_client(port, jobs, n, t0)), [None]
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(clients) as pool:
            t0 = time.perf_counter() + 0.5  # perf_counter is CLOCK_MONOTONIC: one clock for every process
            parts = pool.map(_client_process, [(port, share, n, t0) for share in shares])
        results, cpu = [r for part, _ in parts for r in part], [c for _, c in parts]
    ok = [r for r in results if "error" not in r and r["times"]]
    seconds = max(r["times"][-1] for r in ok) - t0 if ok else float("nan")
    bad = [r for r in results if r not in ok]
    if bad:
        print(f"{len(bad)} of {len(results)} requests failed, e.g. {bad[0]}", flush=True)
    ttft = [(r["times"][0] - r["start"]) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["times"], r["times"][1:])]
    generated = sum(r["tokens"] for r in ok)
    return {"rate": rate, "seconds": seconds, "ok": len(ok), "errors": len(results) - len(ok),
            "generated": generated, "tps": generated / seconds, "ttft_ms": percentiles(ttft),
            "itl_ms": percentiles(itl), "clients": clients, "client_cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="what `workbench build` takes: preset, config.json, HF dir (not needed when "
                    "--engine already holds an engine)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--tokenizer", help="tokenizer directory for random-weight models")
    ap.add_argument("--engine", type=Path, default=Path("/tmp/serve_engine"))
    ap.add_argument("--build-args", default="", help="more `workbench build` arguments")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--rates", default="4,16,inf")
    ap.add_argument("--num-blocks", type=int, help="KV blocks for both runs (default: sized from free memory)")
    ap.add_argument("--port", type=int, default=8377)
    ap.add_argument("--clients", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="load-generating processes (default: half the cores, at most 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    from workbench.engine.format import is_engine_dir

    if is_engine_dir(args.engine):
        print(f"{args.engine} already holds an engine: not building", flush=True)
        result["build_s"], result["build_stages"] = None, []
    else:
        if not args.model:
            raise SystemExit(f"{args.engine} holds no engine: give --model to build one")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "workbench", "build", args.model, "--precision", args.precision,
               "--out", str(args.engine), *args.build_args.split()]
        build = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in build.stdout:  # streamed: a build that runs out of time still shows how far it got
            print(line, end="", flush=True)
            lines.append(line)
        if build.wait():
            raise SystemExit(f"build failed ({build.returncode})")
        result["build_s"] = time.perf_counter() - t0
        result["build_stages"] = re.findall(r"\[(\d)/5\] (\w+): (.*)", "".join(lines))
    engine_json = json.loads((args.engine / "engine.json").read_text())
    vocab = engine_json.get("config", {}).get("vocab_size") or 49152
    # what the engine holds, not --precision (an engine reused was built with its own)
    plan = engine_json.get("precision") or {}
    formats = sorted({g if isinstance(g, str) else str(g.get("format")) for g in (plan.get("groups") or {}).values()})
    result["precision"] = f"linears {'/'.join(formats)}, KV cache {plan.get('kv_cache')}" if formats else "bf16"
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.requests, args.len), generator=g).tolist()
    blocks = ["--num-blocks", str(args.num_blocks)] if args.num_blocks else []

    cmd = [sys.executable, "-m", "workbench", "serve", str(args.engine), "--device", args.device, "--port",
           str(args.port), *blocks, "--log-level", "warning", "--max-pending", str(max(4096, args.requests)),
           "--model-name", "engine"]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env)
    try:
        import httpx

        for _ in range(1200):
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode} before it was healthy")
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        result["serve_start_s"] = time.perf_counter() - t0
        run_rate(args.port, prompts[:16], 4, float("inf"))  # warm up
        result["served"] = []
        for rate in (float(r) for r in args.rates.split(",")):
            before = process_cpu(server.pid)
            r = run_rate(args.port, prompts, args.len, rate, clients=args.clients)
            after = process_cpu(server.pid)
            r["cpu_s"] = {k: after[k] - before.get(k, 0.0) for k in after}
            result["served"].append(r)
            print(f"rate {rate}: {r['tps']:.0f} tok/s, TTFT p50 {r['ttft_ms']['p50']} ms, {args.clients} client "
                  f"processes (CPU s: {r['client_cpu_s']})", flush=True)
        result["metrics"] = httpx.get(f"http://127.0.0.1:{args.port}/metrics").text[-4000:]
    finally:
        server.send_signal(signal.SIGTERM)
        result["server_exit"] = server.wait(timeout=60)

    from workbench.runtime.engine import LLM
    from workbench.runtime.sampling import SamplingParams

    llm = LLM(args.engine, device=args.device, **({"num_blocks": args.num_blocks} if args.num_blocks else {}))
    params = SamplingParams(max_tokens=args.len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm up
    torch.cuda.synchronize() if cuda else None
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize() if cuda else None
    offline_s = time.perf_counter() - t
    result["offline_tps"] = sum(len(o.token_ids) for o in outs) / offline_s
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    built = f"build {result['build_s']:.0f} s" if result["build_s"] else "engine reused"
    print(f"\n{result['gpu']}: {args.model or args.engine}, {result['precision']}; {built}; server up in "
          f"{result['serve_start_s']:.0f} s")
    for stage in result["build_stages"]:
        print(f"  build [{stage[0]}/5] {stage[1]}: {stage[2]}")
    print(f"offline LLM.generate, {args.requests} x {args.len}/{args.len}: {result['offline_tps']:.0f} output tok/s")
    print(f"{'served rate':<12} {'tok/s':>8} {'vs offline':>10} {'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>22} "
          f"{'server / engine CPU us per token':>33} errors")
    for r in result["served"]:
        t, i = r["ttft_ms"], r["itl_ms"]
        per = "/".join(f"{1e6 * r['cpu_s'].get(k, float('nan')) / max(r['generated'], 1):.0f}"
                       for k in ("server", "engine"))
        print(f"{r['rate']:<12g} {r['tps']:>8.0f} {r['tps'] / result['offline_tps']:>9.2f}x "
              f"{t['p50']:>8.1f}/{t['p90']:.1f}/{t['p99']:.1f} {i['p50']:>8.2f}/{i['p90']:.2f}/{i['p99']:.2f} "
              f"{per:>33} {r['errors']}")
    print(f"server exit code after SIGTERM: {result['server_exit']}")


if __name__ == "__main__":
    main()
