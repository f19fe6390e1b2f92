"""Plugins from the command line: a .py file with an op and a placed pass, loaded by `--plugin`, runs in
`workbench build`'s passes, is recorded in the engine, and is loaded again by `LLM(engine)` in a process that
was never told of it; a plugin that is not there is refused in one line. Each run is its own process, so the
plugin's op and pass stay out of the rest of the suite."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = Path(__file__).parent / "data" / "silu_plugin.py"


def run(args, env=None, **kw):
    env = {**{k: v for k, v in os.environ.items() if k != "WORKBENCH_PLUGINS"}, "TRITON_INTERPRET": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_a_plugin_file_runs_in_build_and_comes_back_with_the_engine(tmp_path):
    plugin = PLUGIN
    engine = tmp_path / "engine"
    r = run(["-m", "workbench", "build", "tiny-llama", "--precision", "bf16", "--device", "cpu", "--out",
             str(engine), "--plugin", str(plugin)])
    assert r.returncode == 0, r.stderr[-2000:]
    reports = json.loads((tmp_path / "engine.workspace" / "passes" / "report.json").read_text())
    names = [rep["name"] for rep in reports]  # in its place, where its pattern still is
    assert names[names.index("fuse_rms_norm") + 1] == "myplugin_own_silu"
    assert len(reports[names.index("myplugin_own_silu")]["matches"]) == 2
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["plugins"] == [str(plugin.resolve())]
    ops = {n["op"] for n in json.loads((engine / "engine.json").read_text())["graph"]["nodes"]}
    assert "myplugin.silu" in ops and "aten.silu.default" not in ops

    # a new process, told nothing: the engine loads its plugin, and its tokens are the reference graph's
    check = textwrap.dedent(f'''
        import torch
        from workbench import LLM, SamplingParams
        from workbench.models import load_model
        llm = LLM({str(engine)!r}, device="cpu")
        out = llm.generate([[5, 9, 11, 3]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        hf = load_model("tiny-llama", dtype=torch.float32).model
        ref = hf.generate(torch.tensor([[5, 9, 11, 3]]), max_new_tokens=6, do_sample=False)[0, 4:].tolist()
        print(out.token_ids, ref)
        assert out.token_ids == ref
    ''')
    r = run(["-c", check])
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_missing_plugin_is_one_line(tmp_path):
    for spec, says in (("no_such_plugin_module", "plugin no_such_plugin_module: No module named"),
                       (str(tmp_path / "gone.py"), "no such file")):
        r = run(["-m", "workbench", "models", "--plugin", spec])
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half written')\n")
    r = run(["-m", "workbench", "models"], env={"WORKBENCH_PLUGINS": str(broken)})
    assert r.returncode == 2 and "failed to import (RuntimeError: half written)" in r.stderr
