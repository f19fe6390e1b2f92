"""The ``workbench`` command line.

    workbench fetch smollm2-135m                      prepare the default model
    workbench models                                  presets and fetchable models
    workbench capture MODEL ws/                       writes ws/capture: the graph; prints its summary
    workbench optimize ws/                            writes ws/passes: the graph passes; prints what each did
    workbench quantize ws/ --format fp8               writes ws/quant: calibration and a precision plan
    workbench tune ws/                                writes ws/tune: kernel timings and choices (GPU)
    workbench info ws/                                stages, status, artifacts
    workbench generate ws/ "The capital of France is" greedy tokens from the latest up-to-date stage
    workbench eval ws/ --dataset evaluation           perplexity of the latest up-to-date stage (or --reference)
    workbench diff ws/ --against hf                   where the latest stage first diverges from transformers
    workbench diff engine/ --steps 8                  ... in the prefill and 8 decode steps through the KV cache
    workbench diff ws/ --stage quant --groups         each quantized linear group's share of the quant stage's error
    workbench compare fp8/ bf16/                      two engines layer by layer: precision, latency, error
    workbench export ws/ --out engine/                the engine directory of the latest stage; records ws/export
    workbench build MODEL --precision fp8 --out engine/   every stage, resuming from its workspace
    workbench serve engine/ --port 8000               the OpenAI-compatible HTTP server (engine or workspace)
    workbench build MODEL --precision fp8 --tp 2 --out engine/   an engine for 2 GPUs (tensor parallelism)
    torchrun --nproc-per-node 2 -m workbench serve engine/       its ranks launched by torchrun (or: serve --tp 2)

The workspace is the first positional argument of every command that reads one, and the second of
``capture`` (after the model); the stage folder a verb writes is named in its help. ``capture`` still
accepts ``--workspace DIR``, the spelling before the workspace became positional.
Errors in the user's input print one line (``workbench: error: ...``) and exit 2; a refused command
leaves no directory it made (see ``Workspace.run``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import WorkbenchError
from .plugins import load_plugins


def _cmd_fetch(args) -> None:
    from .models.cache import fetch

    print(fetch(args.model, force=args.force))


def _cmd_models(args) -> None:
    from .models.presets import NAMED_MODELS, PRESETS, make_config

    print("presets (random weights):")
    for name, p in PRESETS.items():
        c = make_config(p)  # the config's own names (GPT-2's n_layer, ...) read through the standard ones
        extra = f" head_dim={p['head_dim']}" if "head_dim" in p else ""
        if p.get("rope_scaling"):
            extra += f" rope={p['rope_scaling']['rope_type']} x{p['rope_scaling']['factor']:g}"
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        print(f"  {name:<14} {p['architectures'][0]:<20} layers={c.num_hidden_layers} "
              f"hidden={c.hidden_size} heads={c.num_attention_heads}/{kv_heads}{extra}")
    print("real models (`workbench fetch NAME`):")
    for name, info in NAMED_MODELS.items():
        print(f"  {name:<14} {info['description']}")


def _cmd_capture(args) -> None:
    from .graph.views import format_summary, op_histogram, summary
    from .pipeline import CaptureOptions, capture_stage
    from .workspace import Workspace

    ws = Workspace(_capture_workspace(args))
    captured = capture_stage(ws, args.model, CaptureOptions(dtype=args.dtype, seed=args.seed), force=args.force)
    g = captured.graph
    print(format_summary(summary(g), op_histogram(g, tokens=512)))
    print(f"wrote {ws.root / 'capture'} (graph.json, constants.safetensors, summary.json, record.json)")


def _capture_workspace(args) -> Path:
    """``capture``'s workspace: the positional argument, or the older ``--workspace`` option (hidden from the help,
    kept for scripts that use it)."""
    given, old = args.workspace, args.workspace_option
    if old is None:
        if given is None:
            raise WorkbenchError("capture needs a workspace: workbench capture MODEL WORKSPACE")
        return given
    if given is not None and given != old:
        raise WorkbenchError(f"two workspaces given ({given} and --workspace {old}); give one, after the model")
    print("workbench: note: `capture MODEL --workspace DIR` is now `capture MODEL DIR`", file=sys.stderr)
    return old


def _cmd_optimize(args) -> None:
    import pandas as pd

    from .graph.passes import PASSES, default_pipeline, summary_table
    from .pipeline import passes_stage, unfused_notes
    from .workspace import Workspace

    names = args.passes.split(",") if args.passes else default_pipeline()
    skip = set(args.skip.split(",")) if args.skip else set()
    unknown = (set(names) | skip) - set(PASSES)
    if unknown:
        raise WorkbenchError(f"unknown pass(es) {', '.join(sorted(unknown))}; passes: {', '.join(PASSES)}")
    ws = Workspace(args.workspace, create=False)
    with warnings.catch_warnings(record=True) as caught:  # one line each, not Python's warning format
        warnings.simplefilter("always")
        graph, reports = passes_stage(ws, [n for n in names if n not in skip], force=args.force,
                                      device=args.device, kv_block_size=args.kv_block_size)
    for w in caught:
        print(f"workbench: warning: {w.message}", file=sys.stderr)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summary_table(reports).to_string(index=False))
    for line in unfused_notes(ws):
        print(line)
    print(f"wrote {ws.root / 'passes'} (graph.json with {len(graph.nodes)} nodes, report.json, record.json)")


def _cmd_tune(args) -> None:
    import collections

    from .kernels.profiles import OptimizationProfile
    from .pipeline import tune_stage
    from .workspace import Workspace

    edges = tuple(int(e) for e in args.buckets.split(",")) if args.buckets else ()
    profile = OptimizationProfile(max_tokens=args.max_tokens, max_seqs=args.max_seqs, context=args.context,
                                  max_context=max(args.max_context, args.context), edges=edges)
    ws = Workspace(args.workspace, create=False)
    tuned = tune_stage(ws, profile, device=args.device, reset=args.reset_cache, force=args.force, top_k=args.top_k,
                       graph=args.graph, tensor_parallel_size=args.tp, batch_invariant=args.batch_invariant)
    print(f"tuned the {ws.record('tune')['params']['graph']} graph"
          + (" for the batch-invariant mode (one choice per node for every bucket)" if tuned.batch_invariant else ""))
    for edge, chosen in zip(tuned.edges, tuned.choices):
        counts = collections.Counter(t for t, _ in chosen.values())
        print(f"bucket <= {edge:>5} tokens: " + ", ".join(f"{n} nodes {t}" for t, n in counts.most_common()))
    if tuned.batch_invariant:
        from .kernels.invariant import cost_lines

        for line in cost_lines(tuned.costs):
            print(line)
    print(f"wrote {ws.root / 'tune'} (timings.json: every timing; choices.json: per bucket; record.json)")


def _cmd_quantize(args) -> None:
    from .pipeline import QuantOptions, quant_stage
    from .workspace import Workspace

    options = QuantOptions(fmt=args.format, kv_cache=args.kv_cache, weights=args.weights,
                           activations=args.activations, alpha=args.alpha, samples=args.samples, seq_len=args.seq_len,
                           observer=args.observer, calib_data=args.calib_data, auto_budget=args.auto,
                           probe_tokens=args.probe_tokens, full_sweep=args.full_sweep)
    ws = Workspace(args.workspace, create=False)
    plan, stats, report = quant_stage(ws, args.plan, options, device=args.device, force=args.force,
                                      log=lambda line: print(line, flush=True))
    counts = ", ".join(f"{n} group{'' if n == 1 else 's'} {f}" for f, n in plan.summary().items())
    print(f"plan: {counts}; KV cache {plan.kv_cache}")
    auto = report.get("auto_plan")
    if auto:
        kept = [g for g in auto["bf16_groups"] if g != "lm_head"]
        print(f"auto plan within +{auto['budget_pct']:g}%: perplexity {auto['ppl']:.4f} "
              f"({auto['ppl_delta_pct']:+.2f}%, "
              f"{'within' if auto['within_budget'] else 'NOT within'} budget) on {auto['probe_tokens']} tokens after "
              f"{auto['rounds']} verified rounds; in bf16: {', '.join(kept) or 'no group'}")
    print(f"wrote {ws.root / 'quant'} (stats, plan.json, graph.json, weights.safetensors, report.json, record.json); "
          f"run `workbench eval {ws.root} --stage quant` for its perplexity")


def _cmd_info(args) -> None:
    import pandas as pd

    from .engine.format import is_engine_dir
    from .workspace import Workspace

    if is_engine_dir(args.workspace):  # not a workspace: say what it is and where its stages are
        from .engine.load import read_engine

        manifest, info, _ = read_engine(args.workspace)
        limits, made = info.get("limits") or {}, manifest.get("workspace") or {}
        formats = sorted({g.get("format") for g in ((info.get("precision") or {}).get("groups") or {}).values()})
        print(f"{args.workspace}: an engine directory ({'/'.join(formats) or 'bf16'} linears, "
              f"{'tuned' if info.get('tuned') else 'not tuned'}, max_model_len {limits.get('max_model_len')}), "
              f"exported from the {made.get('stage', '?')} stage of {made.get('root', '?')}: `workbench info "
              f"{made.get('root', 'WORKSPACE')}` lists its stages")
        return
    ws = Workspace(args.workspace, create=False)
    df = ws.info()
    if df.empty:
        print(f"{ws.root}: no stages yet")
        return
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print(df.to_string(index=False))


def _runnable(target: str, device: str, stage: str, purpose: str):
    """What ``target`` (an engine, a workspace or a model source) runs, through ``runnable.open_runnable``;
    ``purpose`` needs real text, so a model without a tokenizer is refused."""
    from .runnable import open_runnable

    runnable = open_runnable(target, device=device, stage=stage, paged=False)
    if runnable.tokenizer is None:
        raise WorkbenchError(f"{target}'s model has random weights and no tokenizer; {purpose} needs a real model")
    return runnable


def _cmd_generate(args) -> None:
    import torch

    from .evaluate import program_greedy

    if args.max_tokens < 1:
        raise WorkbenchError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    r = _runnable(args.workspace, args.device, args.stage, "generation")
    tokenizer = r.tokenizer
    ids = torch.tensor(tokenizer(args.prompt).input_ids)
    if ids.numel() == 0:
        raise WorkbenchError("the prompt is empty (no tokens); give it at least one token")
    new = program_greedy(r.program, ids, args.max_tokens, eos_token_id=tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))  # no <|im_end|> at the end


def _cmd_eval(args) -> None:
    import torch

    from .evaluate import dataset_text, hf_logits, logits_fn, perplexity
    from .models.intake import load_model

    r = _runnable(args.workspace, args.device, args.stage, "perplexity")
    ids = torch.tensor(r.tokenizer(dataset_text(args.dataset)).input_ids)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    fns = {f"workbench {r.stage}": logits_fn(r.program)}
    if args.reference:
        if r.source is None:
            raise WorkbenchError(f"{args.workspace} does not record the model it came from; --reference needs it")
        fns["transformers"] = hf_logits(load_model(r.source, device=str(r.device)).model)
    for label, fn in fns.items():
        r = perplexity(fn, ids, window=args.window, stride=args.stride, progress=True)
        print(f"{label:>16}: perplexity {r.perplexity:.4f} over {r.tokens_scored} tokens ({r.windows} windows)")


def _cmd_diff(args) -> None:
    from .debug.diff import HF, diff

    if args.groups is not None:
        _cmd_diff_groups(args)
        return
    if args.top is not None:
        raise WorkbenchError("--top sets how many rows of --groups print; give --groups with it")
    if args.hf_dtype and args.against not in (None, HF):
        raise WorkbenchError(f"--hf-dtype sets the transformers model's dtype; --against {args.against} compares with "
                             "a graph, which runs in its own")
    result = diff(args.workspace, stage=args.stage, against=args.against or HF, ids=_token_ids(args.ids),
                  prompt=args.prompt, device=args.device, tol=args.tol, steps=args.steps, hf_dtype=args.hf_dtype)
    print(result)
    first = result.first_step
    if args.nodes and first is not None and isinstance(first.first.layer, int):
        import pandas as pd

        from .debug.diff import FORMATTERS

        with pd.option_context("display.width", 160, "display.max_columns", 10):
            print(first.nodes(first.first.layer)[["key", "node", "op", "rel_err", "cosine", "max_abs"]]
                  .to_string(index=False, formatters=FORMATTERS))


def _cmd_diff_groups(args) -> None:
    """``workbench diff WS --stage quant --groups [NAMES]``: each quantized group's contribution."""
    from .debug.contributions import group_contributions

    if args.stage != "quant" or args.against not in (None, "passes"):
        raise WorkbenchError("--groups quantizes each group of the quant stage's plan alone and compares it with the "
                             "passes stage: give --stage quant (and --against passes, or no --against)")
    extra = next((f for f, on in (("--nodes", args.nodes), ("--steps", args.steps), ("--hf-dtype", args.hf_dtype))
                  if on), None)
    if extra:
        raise WorkbenchError(f"{extra} goes with a diff of one stage, not with --groups (which compares each group's "
                             "logits on the prompt with the passes stage's)")
    if args.top is not None and args.top < 1:
        raise WorkbenchError(f"--top must be at least 1, got {args.top}")
    names = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups != "*" else None
    if names == []:
        raise WorkbenchError(f"--groups takes comma-separated group names, e.g. layers.0.qkv,lm_head; got "
                             f"{args.groups!r}")
    result = group_contributions(args.workspace, ids=_token_ids(args.ids), prompt=args.prompt, device=args.device,
                                 groups=names, tol=args.tol)
    print(result.to_string(top=args.top or 10))


def _token_ids(text: str | None) -> list[int] | None:
    """``--ids 1,2,3`` as a list (None when not given)."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise WorkbenchError(f"--ids takes comma-separated token ids, e.g. 1,2,3; got {text!r}") from None


def _cmd_compare(args) -> None:
    from .debug.engines import compare_engines

    if args.repeats < 1:
        raise WorkbenchError(f"--repeats must be at least 1, got {args.repeats}")
    print(compare_engines(args.a, args.b, ids=_token_ids(args.ids), prompt=args.prompt, device=args.device,
                          reference=args.reference, latency=args.latency, repeats=args.repeats,
                          stages=(args.stage_a, args.stage_b)))


def _cmd_export(args) -> None:
    import json

    from .engine import export_engine

    limits = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens}
    out = export_engine(args.workspace, args.out, stage=args.stage, limits=limits, force=args.force,
                        tensor_parallel_size=args.tp, batch_invariant=args.batch_invariant)
    manifest = json.loads((out / "manifest.json").read_text())
    lim, tuned = json.loads((out / "engine.json").read_text())["limits"], manifest.get("tuned_for")
    size = sum(e["bytes"] for e in manifest["files"].values())
    ranks = manifest.get("tensor_parallel_size", 1)
    print(f"wrote engine {out} from the {manifest['workspace']['stage']} stage ({size / 1e6:.1f} MB"
          f"{f', for {ranks} ranks' if ranks > 1 else ''}): "
          f"{'tuned on ' + tuned['gpu'] if tuned else 'not tuned (default kernels)'}; max_model_len "
          f"{lim['max_model_len']}, max_num_seqs {lim['max_num_seqs']}, max_num_batched_tokens "
          f"{lim['max_num_batched_tokens']}, KV blocks of {lim['block_size']} tokens in {lim['kv_cache_dtype']}")


def _cmd_build(args) -> None:
    from .engine import BuildOptions, build_engine

    options = BuildOptions(precision=args.precision, dtype=args.dtype, seed=args.seed, auto_budget=args.budget,
                           max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens, samples=args.samples,
                           seq_len=args.seq_len, calib_data=args.calib_data, eval_data=args.eval_data,
                           max_ppl_increase=args.max_ppl_increase, device=args.device,
                           kv_block_size=args.kv_block_size, kv_cache=args.kv_cache, force=args.force,
                           tensor_parallel_size=args.tp, batch_invariant=args.batch_invariant)
    build_engine(args.model, args.out, options, workspace=args.workspace, log=lambda line: print(line, flush=True))


def _cmd_serve(args) -> None:
    from .serve import serve

    serve(args.path, host=args.host, port=args.port, device=args.device, tokenizer=args.tokenizer,
          model_name=args.model_name, max_pending=args.max_pending, num_blocks=args.num_blocks,
          memory_fraction=args.memory_fraction, max_num_seqs=args.max_num_seqs,
          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, allowed_hosts=_csv(args.allowed_hosts),
          allowed_origins=_csv(args.allowed_origins), tensor_parallel_size=args.tp,
          batch_invariant=args.batch_invariant, read_timeout=args.read_timeout)


API_KEY_ENV = "WORKBENCH_API_KEY"


def _csv(values: list[str]) -> list[str]:
    """Repeated and comma-separated values of one option, as one list."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _add_device_arg(s, what: str) -> None:
    s.add_argument("--device", default="auto", help=f"{what}: auto (the default: cuda when there is a GPU, else cpu), "
                   "cpu, cuda or cuda:N")


def _add_limit_args(s) -> None:
    s.add_argument("--max-model-len", type=int,
                   help="longest sequence, prompt and output (default: the model's context)")
    s.add_argument("--max-num-seqs", type=int, help="most sequences in one step (default: the engine's, "
                   "or 512)")
    s.add_argument("--max-num-batched-tokens", type=int,
                   help="most tokens in one step (default: the engine's, or 8192)")


def _add_calibration_args(s) -> None:
    s.add_argument("--calib-data", type=Path, metavar="PATH",
                   help="calibration text: plain text, or JSONL with a \"text\" field per line (default "
                        "datasets/calibration.txt)")
    s.add_argument("--samples", type=int, help="calibration sequences (default: what the data holds, up to 512 on a "
                   "GPU and 32 on a CPU)")
    s.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default 512 on a GPU, 256 on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench",
                                description="Optimize and serve decoder LLMs, one inspectable stage at a time.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch", help="download and convert a named real model into the model cache")
    s.add_argument("model", help="e.g. smollm2-135m")
    s.add_argument("--force", action="store_true", help="download and convert again")
    s.set_defaults(fn=_cmd_fetch)

    s = sub.add_parser("models", help="list presets and fetchable models")
    s.set_defaults(fn=_cmd_models)

    s = sub.add_parser("capture", help="capture a model's graph into WORKSPACE/capture and print its summary",
                       usage="%(prog)s [-h] [--dtype {auto,float32,bfloat16,float16}] [--seed SEED] [--force] "
                             "model workspace")
    s.add_argument("model", help="HF directory, .gguf file, config.json, preset or model name")
    s.add_argument("workspace", type=Path, nargs="?", help="the workspace directory (made if missing; a refused "
                   "capture leaves none behind)")
    s.add_argument("--workspace", "-w", dest="workspace_option", type=Path, help=argparse.SUPPRESS)
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the graph's precision: auto (the default) is bfloat16 on a machine with a GPU, as "
                        "`workbench build` and LLM(model) make, and float32 on the CPU")
    s.add_argument("--seed", type=int, default=0, help="seed of random weights (presets and config.json)")
    s.add_argument("--force", action="store_true", help="overwrite artifacts edited by hand")
    s.set_defaults(fn=_cmd_capture)

    s = sub.add_parser("optimize", help="run the graph passes (elimination, fusion, paged attention) on the captured "
                                        "graph into WORKSPACE/passes")
    s.add_argument("workspace", type=Path)
    s.add_argument("--passes", help="comma-separated passes to run, in order (default: the standard pipeline)")
    s.add_argument("--skip", help="comma-separated passes to leave out")
    s.add_argument("--force", action="store_true", help="overwrite artifacts edited by hand")
    _add_device_arg(s, "where each pass's numeric check runs")
    s.add_argument("--kv-block-size", type=int, help="tokens per KV-cache block (default 16; 64 decodes an FP8 cache "
                                                     "faster on Hopper, see BENCHMARKS.md, 2026-12-01)")
    s.set_defaults(fn=_cmd_optimize)

    s = sub.add_parser("tune", help="autotune the kernels of the latest graph (quant if up to date, else passes) on "
                                    "this GPU for an optimization profile, into WORKSPACE/tune")
    s.add_argument("workspace", type=Path)
    s.add_argument("--max-tokens", type=int, default=2048, help="most tokens in one step (prefill and decode mixed)")
    s.add_argument("--max-seqs", type=int, default=64, help="most sequences in one step (decode batch)")
    s.add_argument("--context", type=int, default=1024, help="context length decode steps are tuned at")
    s.add_argument("--max-context", type=int, default=4096)
    s.add_argument("--buckets", help="comma-separated token-count bucket edges (default: 1,4,16,... up to max-tokens)")
    _add_device_arg(s, "the GPU to tune on")
    s.add_argument("--top-k", type=int, help="time only the N configs a tactic's cost model ranks best (GEMMs); "
                   "default: every config that fits")
    s.add_argument("--reset-cache", action="store_true", help="discard the workspace's timing cache and time afresh")
    s.add_argument("--force", action="store_true", help="overwrite artifacts edited by hand")
    s.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tune the graph one rank of N runs (tensor parallelism; an engine exported from it runs on "
                        "N GPUs), default 1")
    s.add_argument("--graph", default="auto", choices=["auto", "passes", "quant"],
                   help="which graph to tune (default: the quantized one when `workbench quantize` ran, else the "
                        "optimized one)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="tune for the batch-invariant mode: one invariant tactic and config per node for every bucket")
    s.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("quantize", help="calibrate the optimized graph (passes) and apply a precision plan (FP8/INT8) "
                                        "into WORKSPACE/quant")
    s.add_argument("workspace", type=Path)
    s.add_argument("--plan", type=Path, help="a precision plan JSON (default: every group in --format, lm_head kept)")
    s.add_argument("--format", default="fp8", choices=["bf16", "fp8", "int8_sq", "int8_wo"])
    s.add_argument("--weights", choices=["channel", "tensor"], help="weight scale granularity (default: channel)")
    s.add_argument("--activations", choices=["static", "dynamic"],
                   help="activation scales: calibrated per tensor, or per token at run time")
    s.add_argument("--alpha", type=float, help="SmoothQuant migration strength (int8_sq; default 0.5)")
    s.add_argument("--kv-cache", default="bf16", choices=["bf16", "fp8"])
    _add_calibration_args(s)
    s.add_argument("--observer", default="max", choices=["max", "percentile", "mse", "entropy"])
    _add_device_arg(s, "where calibration runs")
    s.add_argument("--auto", type=float, metavar="BUDGET",
                   help="choose the plan: each group's sensitivity to --format, then the most groups in --format whose "
                        "verified perplexity increase stays within BUDGET %% (groups --plan marks edited are kept)")
    s.add_argument("--probe-tokens", type=int, default=2048,
                   help="evaluation tokens the sensitivity and the auto plan are measured on (default 2048)")
    s.add_argument("--full-sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="--auto: measure every group's sensitivity (default on a GPU); on a CPU the default measures "
                        "a subset sized to about 3 minutes (every kind of group, layers spread over the model; the "
                        "others stay bf16) and prints the full sweep's estimate")
    s.add_argument("--force", action="store_true", help="overwrite artifacts edited by hand")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("info", help="list a workspace's stages, their status and artifacts")
    s.add_argument("workspace", type=Path)
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("generate", help="greedy-decode a prompt with an engine, a workspace's latest up-to-date stage "
                                        "or a model")
    s.add_argument("workspace", metavar="target", help="an engine directory, a workspace or a model source")
    s.add_argument("prompt")
    s.add_argument("--max-tokens", type=int, default=32)
    _add_device_arg(s, "where the graph runs")
    s.add_argument("--stage", default="latest", choices=["latest", "capture", "passes", "quant", "tune"],
                   help="a workspace's graph to run (default: the latest up-to-date stage; tuned choices on a GPU only)")
    s.set_defaults(fn=_cmd_generate)

    s = sub.add_parser("eval", help="perplexity of an engine, a workspace's latest up-to-date stage or a model on a "
                                    "text set")
    s.add_argument("workspace", metavar="target", help="an engine directory, a workspace or a model source")
    s.add_argument("--dataset", default="evaluation",
                   help="a text set of datasets/ by name (evaluation, calibration) or a text file's path")
    s.add_argument("--window", type=int, default=512)
    s.add_argument("--stride", type=int, default=256)
    s.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N tokens")
    s.add_argument("--reference", action="store_true", help="also evaluate the transformers model")
    _add_device_arg(s, "where the graph runs")
    s.add_argument("--stage", default="latest", choices=["latest", "capture", "passes", "quant", "tune"],
                   help="a workspace's graph to evaluate (default: the latest up-to-date stage; tuned choices on a GPU "
                        "only)")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("diff", help="where a workspace's stage (or an engine) first diverges from transformers or "
                                    "another stage, layer by layer")
    s.add_argument("workspace", metavar="target", help="a workspace, an engine directory or a model source")
    s.add_argument("--stage", default="latest", choices=["latest", "capture", "passes", "quant", "tune"],
                   help="a workspace's graph to check (default: the latest up-to-date stage)")
    s.add_argument("--against", help="the reference: hf (the transformers model, the default), a stage "
                   "of the same workspace (capture, passes, quant) or another engine directory or workspace")
    given = s.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="text to run (default: a fixed sentence; random ids for random weights)")
    given.add_argument("--ids", help="comma-separated token ids to run instead of a prompt, e.g. 1,2,3")
    s.add_argument("--tol", type=float, help="relative error that counts as diverged (default: by precision: 1e-4 "
                   "float32, 2e-2 bf16/fp16, 1e-1 quantized)")
    s.add_argument("--hf-dtype", choices=["float32", "bfloat16", "float16"],
                   help="with --against hf: the transformers model's dtype (default: the graph's own; float32 shows "
                        "a bf16 engine's whole error against the exact model)")
    s.add_argument("--steps", type=int, default=0, metavar="N",
                   help="also N decode steps after the prompt, one token each through the paged KV cache (the "
                        "subject's greedy tokens, fed to both sides): the table shows each layer's error by step")
    s.add_argument("--nodes", action="store_true", help="also print every module of the first diverging layer")
    s.add_argument("--groups", nargs="?", const="*", metavar="NAMES",
                   help="with --stage quant: each linear group the precision plan quantizes (or the comma-separated "
                        "NAMES), quantized alone, against the passes stage: its logits error beside the whole plan's "
                        "and its sensitivity, largest first")
    s.add_argument("--top", type=int, help="rows of --groups to print (default 10)")
    _add_device_arg(s, "where both sides run")
    s.set_defaults(fn=_cmd_diff)

    s = sub.add_parser("compare", help="two engines (or workspaces, model sources) layer by layer: each layer's linear "
                                       "formats, latency and output error on one prompt, with the speed-up and the "
                                       "accuracy cost of A against B")
    s.add_argument("a", help="side A: an engine directory, a workspace or a model source")
    s.add_argument("b", help="side B, the baseline: speed-up is B's time over A's, accuracy cost A's error minus B's")
    given = s.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="text to run (default: a fixed sentence; random ids for random weights)")
    given.add_argument("--ids", help="comma-separated token ids to run instead of a prompt, e.g. 1,2,3")
    s.add_argument("--reference", default="auto", choices=["auto", "hf", "b"],
                   help="what errors are measured against: hf (transformers in float32, when both come from one "
                        "model), b (side B), auto (the default: hf when it can, else b)")
    s.add_argument("--latency", default="auto", choices=["auto", "tuning", "profile"],
                   help="tuning (the engines' timing caches, both tuned in one environment), profile (the prompt's "
                        "prefill under the profiler on --device), auto (the default: tuning when it can, else profile)")
    s.add_argument("--repeats", type=int, default=5, help="profiled prefills per side; each layer takes the median "
                   "(default 5)")
    for side in ("a", "b"):
        s.add_argument(f"--stage-{side}", default="latest", choices=["latest", "capture", "passes", "quant", "tune"],
                       help=f"side {side.upper()}'s stage when it is a workspace (default: its latest up-to-date one)")
    _add_device_arg(s, "where both sides run")
    s.set_defaults(fn=_cmd_compare)

    s = sub.add_parser("export", help="write the latest up-to-date stage's graph (tune, else quant, else passes), its "
                                      "weights, tuning and tokenizer as an engine directory; recorded as "
                                      "WORKSPACE/export")
    s.add_argument("workspace", type=Path)
    s.add_argument("--out", "-o", required=True, type=Path, help="the engine directory (replaced if it is one)")
    s.add_argument("--stage", default="latest", choices=["latest", "passes", "quant", "tune"],
                   help="which stage's graph to export (default: the latest up-to-date of tune, quant, passes)")
    _add_limit_args(s)
    s.add_argument("--tp", type=int, metavar="N", help="the ranks (GPUs) the engine is for, recorded in its manifest "
                   "(default: the tune stage's size when exporting it, else 1)")
    s.add_argument("--force", action="store_true", help="overwrite the workspace's export record if edited by hand")
    s.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="record the batch-invariant mode in the manifest, the default of LLM(engine) and serve "
                        "(default: as the tune stage ran; off when untuned)")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("build", help="capture, optimize, quantize, tune (on a GPU) and export an engine in one go, "
                                     "with every stage in --workspace")
    s.add_argument("model", help="HF directory, .gguf file, config.json, preset or model name")
    s.add_argument("--precision", required=True, choices=["bf16", "fp8", "int8", "auto"],
                   help="linears in the model's precision, FP8, INT8 (SmoothQuant W8A8), or auto: FP8 where the "
                        "perplexity budget allows")
    s.add_argument("--out", "-o", required=True, type=Path)
    s.add_argument("--workspace", "-w", type=Path, help="where the stages' artifacts go (default: OUT.workspace); "
                   "a re-run resumes from it")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="the model's precision in the engine (default bfloat16)")
    s.add_argument("--seed", type=int, default=0, help="seed of random weights (presets and config.json)")
    s.add_argument("--kv-block-size", type=int, help="tokens per KV-cache block (default 16)")
    s.add_argument("--kv-cache", default="bf16", choices=["bf16", "fp8"],
                   help="the KV cache's format (fp8: with a quantized --precision; half a bf16 cache, a quarter of a "
                        "float32 one; as TensorRT-LLM's FP8 recipes)")
    s.add_argument("--budget", type=float, default=1.0, help="--precision auto: perplexity increase allowed, in %% "
                   "(default 1)")
    _add_calibration_args(s)
    s.add_argument("--eval-data", type=Path, metavar="PATH",
                   help="the accuracy gate's text: plain text, or JSONL with a \"text\" field per line (default "
                        "datasets/evaluation.txt; its first 2048 tokens on a CPU)")
    s.add_argument("--max-ppl-increase", type=float, default=5.0, metavar="PCT",
                   help="the accuracy gate: the most perplexity increase in %% of the quantized graph over the "
                        "unquantized one that is exported (default 5)")
    _add_device_arg(s, "calibration, accuracy gate and tuning device")
    _add_limit_args(s)
    s.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: build the engine for N ranks (GPUs): the graph must shard over N, tuning "
                        "times one rank's graph, and the engine records N (what serve and LLM run it at), default 1")
    s.add_argument("--force", action="store_true", help="re-run stages whose artifacts were edited by hand, and "
                   "export even over the accuracy gate's limit")
    s.add_argument("--batch-invariant", action="store_true",
                   help="the batch-invariant mode: tune one invariant tactic and config per op for every step (a "
                        "request's output then does not depend on the others in its step), print what it costs, and "
                        "record it in the manifest so that LLM(engine) and serve run it by default")
    s.set_defaults(fn=_cmd_build)

    s = sub.add_parser("serve", help="serve an engine directory (or a workspace, or a model) over an OpenAI-compatible "
                                     "HTTP API")
    s.add_argument("path", help="an engine directory (engine.json), a workspace or a model source")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _add_device_arg(s, "where the engine runs")
    s.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    s.add_argument("--tokenizer", help="a model directory or name whose tokenizer to use (e.g. for random weights)")
    s.add_argument("--max-pending", type=int, default=256,
                   help="most unfinished requests; more are answered 429 (default 256)")
    s.add_argument("--tp", type=int, metavar="N",
                   help="tensor parallelism: shard the engine over N ranks (GPUs; processes on the CPU); default: the "
                        "size an engine was built for (torchrun's process count under torchrun), else 1")
    s.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: what --memory-fraction of the GPU's free "
                   "memory holds; a fixed 256 MiB on the CPU)")
    s.add_argument("--memory-fraction", type=float, help="share of the GPU's free memory, once the weights are "
                   "loaded, that the KV cache takes (default 0.9)")
    _add_limit_args(s)
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (headers and body) before it gets 408 and its "
                        "connection is closed (default 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--api-key", help="the key clients send as 'Authorization: Bearer KEY' on every /v1 route "
                   f"(default: ${API_KEY_ENV}; none: no key needed)")
    s.add_argument("--allowed-hosts", action="append", default=[], metavar="NAMES",
                   help="more Host header names to answer for (comma-separated, repeatable; '*' for any); by default "
                        "the --host address, plus localhost and 127.0.0.1 when it is a loopback one")
    s.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGINS",
                   help="browser origins allowed to read responses (CORS; comma-separated, repeatable; '*' for any); "
                        "by default none")
    s.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="run the batch-invariant mode: a request's output does not depend on the requests sharing its "
                        "steps (default: the engine's setting, from `workbench build --batch-invariant`)")
    s.set_defaults(fn=_cmd_serve)
    for s in sub.choices.values():
        s.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                       help="import a plugin (a module or .py file registering ops and passes) first; repeatable. "
                            "WORKBENCH_PLUGINS and installed workbench.plugins entry points are loaded too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_plugins(args.plugin)
        args.fn(args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
