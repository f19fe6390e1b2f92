"""Engine directories on the CPU (tiny-llama with a small word-level tokenizer): export and load give the
workspace's exact tokens and logits (bf16 and FP8 with an FP8 KV cache), every kind of damage fails with a
message that names it, a tuned engine loaded elsewhere warns and runs default kernels, `workbench build`
resumes, and `LLM(engine)` generates what `LLM(workspace)` does."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import prefill_then_decode

from workbench.engine import EngineLimits, export_engine, load_engine, read_engine
from workbench.errors import WorkbenchError
from workbench.evaluate import paged_greedy
from workbench.graph.paged import PagedLayout
from workbench.pipeline import CaptureOptions, QuantOptions, capture_stage, load_program, passes_stage, quant_stage
from workbench.runtime.engine import LLM
from workbench.runtime.sampling import SamplingParams
from workbench.workspace import Workspace, sha256_file

WORDS = ["the", "capital", "of", "france", "is", "paris", "a", "city", "and", "river", "hello", "world"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"


def hf_model_dir(d):
    """tiny-llama as a Hugging Face directory (weights, config) with a word-level tokenizer and a chat template."""
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workbench.models import load_model

    lm = load_model("tiny-llama")
    d.mkdir()
    save_model(lm.model, str(d / "model.safetensors"))
    lm.model.config.to_json_file(str(d / "config.json"))
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model = hf_model_dir(root / "model")
    ws = Workspace(root / "ws")
    capture_stage(ws, str(model), CaptureOptions(dtype="bfloat16"))
    passes_stage(ws)
    return ws


@pytest.fixture(scope="module")
def engine(ws):
    return export_engine(ws, ws.root.parent / "engine")


def copy_ws(ws, tmp_path):
    return Workspace(shutil.copytree(ws.root, tmp_path / "ws"))  # copy2 keeps mtimes: every stage stays ok


def same_run(a, b):
    """The same tokens from paged greedy decoding and the same logits of a prefill + decode step."""
    prompt = torch.tensor([5, 9, 11, 2, 7])
    assert paged_greedy(a, prompt, 6) == paged_greedy(b, prompt, 6)
    for step_a, step_b in zip(prefill_then_decode(a), prefill_then_decode(b)):
        (la,), (lb,) = a.run(**step_a), b.run(**step_b)
        assert torch.equal(la, lb)


def test_round_trip_gives_the_workspace_program(ws, engine):
    names = {p.relative_to(engine).as_posix() for p in engine.rglob("*") if p.is_file()}
    assert {"engine.json", "manifest.json", "weights.safetensors", "tokenizer/tokenizer.json",
            "tokenizer/chat_template.jinja"} <= names
    e = load_engine(engine)
    same_run(e.program, load_program(ws, stage="passes"))
    assert e.limits == EngineLimits(max_model_len=512, max_num_seqs=512, max_num_batched_tokens=8192, block_size=16,
                                    kv_cache_dtype="bfloat16")
    assert e.config["hidden_size"] == 64 and e.choices is None and e.precision is None
    assert e.chat_template == TEMPLATE and e.tokenizer("the capital of france").input_ids == [2, 3, 4, 5]
    assert e.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "<user> hello "
    graph = json.loads((engine / "engine.json").read_text())["graph"]
    assert not any(p.get("derived") for p in graph["params"].values())  # fused weights are stored, not re-derived
    manifest = e.manifest
    assert set(manifest["files"]) == names - {"manifest.json"} and manifest["tuned_for"] is None
    assert manifest["requires"]["workbench"] == manifest["versions"]["workbench"] and manifest["versions"]["torch"]
    assert ws.status("export") == "ok" and ws.read_json("export", "manifest.json") == manifest


def test_workbench_run_from_a_source_tree_exports_and_loads(ws, tmp_path, monkeypatch):
    """workbench on PYTHONPATH, not pip-installed (as on a GPU machine that runs a checkout): the manifest
    records the running package's version, and loading checks against it."""
    from importlib import metadata

    import workbench

    real = metadata.version

    def version(name):
        if name == "workbench":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    out = export_engine(copy_ws(ws, tmp_path), tmp_path / "engine")
    e = load_engine(out)
    assert e.manifest["requires"]["workbench"] == workbench.__version__ == e.manifest["versions"]["workbench"]


def test_shared_tensors_are_stored_once():
    from workbench.engine.export import _dedupe

    w = torch.randn(4, 3)
    tensors, tied = _dedupe({"embed": w, "lm_head": w, "rows": w[1:], "norm": torch.ones(3)})
    assert list(tensors) == ["embed", "rows", "norm"] and tied == {"lm_head": "embed"}
    assert tensors["rows"].data_ptr() != w.data_ptr() and torch.equal(tensors["rows"], w[1:])  # a view: copied


def test_round_trip_of_an_fp8_workspace(ws, tmp_path):
    from safetensors import safe_open

    qws = copy_ws(ws, tmp_path)
    plan, _, _ = quant_stage(qws, options=QuantOptions(fmt="fp8", kv_cache="fp8", samples=4, seq_len=32),
                             progress=False)
    out = export_engine(qws, tmp_path / "engine")  # latest: the quant stage
    e = load_engine(out)
    same_run(e.program, load_program(qws, stage="quant"))
    assert e.limits.kv_cache_dtype == "float8_e4m3fn" and e.precision == plan.to_json()
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        fp8 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"]
    assert len(fp8) == 8  # qkv, o, gate_up, down of both layers; lm_head stays in bf16
    assert e.manifest["workspace"]["stage"] == "quant"
    scales = PagedLayout.from_graph(e.program.graph).scales
    assert scales is not None and len(scales) == 2

    # an engine written before the KV scales went by name held them at positions 10 and 11: it loads the same
    def positional(info):
        for n in info["graph"]["nodes"]:
            if n["op"] == "workbench.paged_attention":
                n["args"] += [n["kwargs"].pop("k_scale"), n["kwargs"].pop("v_scale")]

    edit_json(out / "engine.json", positional)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["engine.json"] = {"sha256": sha256_file(out / "engine.json"),
                                        "bytes": (out / "engine.json").stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    old = load_engine(out)
    assert PagedLayout.from_graph(old.program.graph).scales == scales
    same_run(old.program, e.program)


def test_llm_on_an_engine_generates_what_the_workspace_does(ws, tmp_path):
    out = export_engine(ws, tmp_path / "engine", limits={"max_model_len": 256, "max_num_seqs": 3,
                                                         "max_num_batched_tokens": 40})
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = ["the capital of france is", "hello world", [5, 9, 11, 2, 7, 3, 3]]
    from_engine, from_ws = LLM(out, num_blocks=32), LLM(ws.root, num_blocks=32)
    a, b = from_engine.generate(prompts, greedy), from_ws.generate(prompts, greedy)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and [o.text for o in a] == [o.text for o in b]
    config = from_engine.engine.scheduler.config
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (3, 40)  # the engine's limits
    assert from_engine.loaded_engine.limits.max_model_len == 256
    with pytest.raises(WorkbenchError, match="holds one graph"):
        LLM(out, stage="quant")


def test_loading_needs_neither_the_workspace_nor_model_code(engine, tmp_path):
    moved = shutil.copytree(engine, tmp_path / "elsewhere")
    code = ("import sys, warnings, torch; from workbench.engine import load_engine; "
            "from workbench.evaluate import paged_greedy; "
            f"e = load_engine({str(moved)!r}); "
            "print(paged_greedy(e.program, torch.tensor([5, 9, 11, 2, 7]), 6)); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and 'modeling' in m "
            "and not m.startswith('transformers.models.auto')))")  # auto: the name -> class tables only
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    tokens, modeling = run.stdout.strip().splitlines()[-2:]
    assert tokens == str(paged_greedy(load_engine(engine).program, torch.tensor([5, 9, 11, 2, 7]), 6))
    assert modeling == "[]"


def damaged(engine, tmp_path):
    return shutil.copytree(engine, tmp_path / "damaged")


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def rehash(d, fn):
    """Edit engine.json and record its new hash, as a hand-made engine would."""
    edit_json(d / "engine.json", fn)
    edit_json(d / "manifest.json", lambda m: m["files"].update({"engine.json": {
        "sha256": sha256_file(d / "engine.json"), "bytes": (d / "engine.json").stat().st_size}}))


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "weights.safetensors").unlink(), r"missing weights\.safetensors, which its manifest lists"),
    (lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), r"missing tokenizer/tokenizer\.json"),
    (lambda d: (d / "manifest.json").unlink(), r"has no manifest\.json"),
    (lambda d: edit_json(d / "engine.json", lambda e: e.update(format_version=99)),
     r"engine\.json has engine format version 99, newer than this workbench reads \(1\).*upgrade workbench"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m.update(format_version="one")),
     r"unknown engine format version 'one'"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m["requires"].update(workbench="99.0")),
     r"requires workbench >= 99\.0.*this is workbench 0\.1\.0: upgrade workbench"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m["requires"].update(torch="99.1")),
     r"requires torch >= 99\.1.*upgrade torch"),
    (lambda d: edit_json(d / "engine.json", lambda e: e["limits"].update(max_num_seqs=1000)),
     r"engine\.json was altered since the engine was exported \(sha256"),
    (lambda d: edit_json(d / "manifest.json", lambda m: m["files"].update({"weights.safetensors": "abc"})),
     r"manifest\.json: its entry for 'weights\.safetensors' is 'abc', not .*re-export the engine"),
    (lambda d: rehash(d, lambda e: e.pop("graph")), r"engine\.json has no 'graph'.*re-export the engine"),
])
def test_a_damaged_engine_fails_and_says_how(engine, tmp_path, damage, match):
    d = damaged(engine, tmp_path)
    damage(d)
    with pytest.raises(WorkbenchError, match=match):
        load_engine(d)


def test_flipped_bytes_in_the_weights_name_the_file(engine, tmp_path):
    d = damaged(engine, tmp_path)
    with open(d / "weights.safetensors", "r+b") as f:
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WorkbenchError, match=r"weights\.safetensors was altered since the engine was exported "
                                             r"\(sha256 .*re-export the engine \(`workbench export .*ws --out"):
        load_engine(d)


def test_what_is_not_an_engine(ws, engine, tmp_path):
    with pytest.raises(WorkbenchError, match="not an engine directory.*it is a workspace: export it"):
        load_engine(ws.root)
    with pytest.raises(WorkbenchError, match="not an engine directory"):
        load_engine(tmp_path)
    with pytest.raises(WorkbenchError, match="not a directory"):
        load_engine(tmp_path / "nothing")
    with pytest.raises(WorkbenchError, match="retune=True times kernels on a CUDA GPU"):
        load_engine(engine, retune=True)


def test_export_refuses_what_it_cannot_export(ws, tmp_path):
    with pytest.raises(WorkbenchError, match="cannot export the 'capture' stage"):
        export_engine(ws, tmp_path / "e", stage="capture")
    with pytest.raises(WorkbenchError, match="the quant stage of .* is missing"):
        export_engine(ws, tmp_path / "e", stage="quant")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="is not an engine directory; refusing to replace it"):
        export_engine(ws, tmp_path / "notes")
    with pytest.raises(WorkbenchError, match="max_model_len 4096 is beyond the model's context \\(512"):
        export_engine(ws, tmp_path / "e", limits={"max_model_len": 4096})
    with pytest.raises(WorkbenchError, match="block_size is fixed by the graph"):
        export_engine(ws, tmp_path / "e", limits={"block_size": 32})
    flat = copy_ws(ws, tmp_path)
    passes_stage(flat, ["eliminate_noops"])
    with pytest.raises(WorkbenchError, match="has no paged attention.*workbench optimize"):
        export_engine(flat, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_an_interrupted_export_keeps_the_previous_engine(ws, tmp_path, monkeypatch):
    from workbench.engine import export as export_module

    out = export_engine(ws, tmp_path / "engine", limits={"max_num_seqs": 2})

    def killed(tmp, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_swap_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        export_engine(ws, out, limits={"max_num_seqs": 7})
    assert load_engine(out).limits.max_num_seqs == 2  # the old engine, whole
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no half-written directory left beside it


def test_the_next_export_removes_a_killed_exports_leftovers(ws, engine, tmp_path):
    """A process killed mid-export leaves .engine.tmp-PID-*; the next export of the same --out removes it even
    when PID is alive again (a container reuses process ids: here our parent's), unless a live export holds it."""
    from workbench.engine.export import _hold

    out = tmp_path / "engine"
    stale = shutil.copytree(engine, tmp_path / f".engine.tmp-{os.getppid()}-dead")
    running = tmp_path / f".engine.tmp-{os.getppid()}-live"
    running.mkdir()
    lock = _hold(running)
    try:
        export_engine(ws, out, limits={"max_num_seqs": 3})
        assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "engine"] and not stale.exists()
    finally:
        os.close(lock)
    export_engine(ws, out, limits={"max_num_seqs": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_a_tuned_engine_elsewhere_warns_and_runs_default_kernels(ws, tmp_path, monkeypatch):
    from test_autotune import TINY_PROFILE

    from workbench.engine import load as load_module
    from workbench.kernels.profiles import OptimizationProfile
    from workbench.pipeline import tune_stage

    tws = copy_ws(ws, tmp_path)
    # timings without running kernels: every Triton tactic "wins", so the choices name them
    tune_stage(tws, OptimizationProfile(**TINY_PROFILE), device="cpu", progress=False,
               timer=lambda call, op, tactic, config: 1.0 if tactic == "reference" else 0.5)
    with pytest.raises(WorkbenchError, match="beyond the tuned profile's max_tokens \\(24\\)"):
        export_engine(tws, tmp_path / "engine", limits={"max_num_batched_tokens": 64})
    out = export_engine(tws, tmp_path / "engine")
    assert (out / "timings.json").is_file() and read_engine(out)[0]["tuned_for"]["gpu"] == "cpu"
    with pytest.warns(UserWarning, match="tuned on cpu, but it runs on the CPU here: its kernel choices do not "
                                         "apply, so it runs the default kernels"):
        e = load_engine(out)
    assert e.choices is None and e.program.tuned is None and e.limits.max_num_batched_tokens == 24
    assert e.profile == OptimizationProfile(**TINY_PROFILE)
    same_run(e.program, load_program(tws, stage="passes"))
    edit_json(out / "manifest.json", lambda m: m["tuned_for"].update(gpu="NVIDIA H100 80GB HBM3"))
    with pytest.warns(UserWarning, match="tuned on NVIDIA H100 80GB HBM3, but .*retune=True"):
        load_engine(out)
    # where the environment matches, the choices run: one per bucket of the profile
    monkeypatch.setattr(load_module, "tuning_mismatch", lambda tuned_for, device: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = load_engine(out)
    assert e.tuning == "engine" and e.program.tuned.edges == [2, 24]
    assert any(t != "reference" for t, _ in e.program.tuned.choices[0].values())


def test_build_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    from workbench import pipeline
    from workbench.cli import main

    out, ws = tmp_path / "engine", tmp_path / "engine.workspace"
    real = pipeline.passes_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "passes_stage", interrupted)
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(out)]) == 130
    assert Workspace(ws).status("capture") == "ok" and not out.exists()
    monkeypatch.setattr(pipeline, "passes_stage", real)
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[1/5] capture: up to date, skipped" in log and "[2/5] passes: done in" in log
    assert "[3/5] quant: not needed" in log and "[4/5] tune: skipped (no GPU here" in log
    assert "[5/5] export: done in" in log
    e = load_engine(out)
    same_run(e.program, load_program(Workspace(ws), stage="passes"))
    assert e.config["hidden_size"] == 64 and e.program.graph.meta["dtype"] == "bfloat16"
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("up to date, skipped") == 3 and "running" not in log  # capture, passes, export
    assert main(["build", "tiny-qwen2", "--precision", "bf16", "--out", str(out)]) == 2
    assert "holds a capture of 'tiny-llama', not 'tiny-qwen2'" in capsys.readouterr().err
    assert main(["export", str(ws), "--out", str(tmp_path / "small"), "--max-model-len", "128"]) == 0
    assert "max_model_len 128" in capsys.readouterr().out
    assert main(["export", str(ws), "--out", str(tmp_path / "e2"), "--stage", "quant"]) == 2
    assert "the quant stage of" in capsys.readouterr().err


def test_build_with_another_kv_block_size(tmp_path, capsys):
    """``--kv-block-size`` reaches the paged graph (and the cache the runtime allocates); the same greedy tokens
    come out, and a build at another size runs the passes again."""
    from workbench.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(a)]) == 0
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(b), "--kv-block-size", "8"]) == 0
    assert PagedLayout.from_graph(load_engine(a).program.graph).block_size == 16
    assert PagedLayout.from_graph(load_engine(b).program.graph).block_size == 8
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 11, 2, 7, 3, 3, 1, 4, 4, 6], [8, 2]]
    outs = [[o.token_ids for o in LLM(e, num_blocks=16).generate(prompts, greedy)] for e in (a, b)]
    assert outs[0] == outs[1]
    capsys.readouterr()
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(b), "--kv-block-size", "32"]) == 0
    assert "[2/5] passes: done in" in capsys.readouterr().out
    assert PagedLayout.from_graph(load_engine(b).program.graph).block_size == 32
    assert main(["build", "tiny-llama", "--precision", "bf16", "--out", str(b), "--kv-block-size", "0"]) == 2
    assert "tokens per KV-cache block" in capsys.readouterr().err


def _json_paths(value, path=()):
    """Every (path, value) in a JSON tree, the root's children first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,), v
            yield from _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):  # a graph has hundreds of nodes: a few of each list are enough
            yield path + (i,), v
            yield from _json_paths(v, path + (i,))


_REPLACEMENTS = [None, -1, 0, 2**70, 1.5, float("nan"), "", "x" * 3, [], {}, [1, "a"], {"a": None}, True]


def test_a_mutated_engine_loads_or_fails_in_one_line(engine, tmp_path):
    """Fuzzing the loader: a field of engine.json or manifest.json replaced by a value of another type, removed,
    or the bytes of a file cut or flipped (engine.json re-hashed, as a hand-made engine would be). Loading either
    works or raises a one-line WorkbenchError; never another exception. Bounded: 60 examples."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    docs = {name: json.loads((engine / name).read_text()) for name in ("engine.json", "manifest.json")}
    paths = {name: [p for p, _ in _json_paths(doc)] for name, doc in docs.items()}
    base = tmp_path / "base"
    shutil.copytree(engine, base)
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        d = tmp_path / "mutated"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        kind = data.draw(st.sampled_from(["field", "field", "field", "remove", "bytes"]))
        name = data.draw(st.sampled_from(["engine.json", "manifest.json"]))
        if kind == "bytes":
            target = d / data.draw(st.sampled_from(["engine.json", "manifest.json", "weights.safetensors"]))
            raw = bytearray(target.read_bytes())
            at = data.draw(st.integers(0, min(len(raw) - 1, 4096)))  # the safetensors header, the JSON's start
            if data.draw(st.booleans()):
                raw = raw[:at]
            else:
                raw[at] ^= data.draw(st.integers(1, 255))
            target.write_bytes(bytes(raw))
            if target.name == "engine.json":
                edit_json(d / "manifest.json", lambda m: m["files"].update({"engine.json": {
                    "sha256": sha256_file(target), "bytes": target.stat().st_size}}))
        else:
            path = data.draw(st.sampled_from(paths[name]))
            new = None if kind == "remove" else data.draw(st.sampled_from(_REPLACEMENTS))

            def mutate(doc):
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                if kind == "remove":
                    parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
                else:
                    parent[path[-1]] = new

            (rehash(d, mutate) if name == "engine.json" else edit_json(d / name, mutate))
        try:
            load_engine(d)
            seen["ok"] += 1
        except WorkbenchError as e:
            assert "\n" not in str(e).strip() and str(e).strip(), repr(str(e))
            seen["refused"] += 1

    check()
    assert seen["refused"] > 20, seen  # most mutations break something, and each said so in one line
