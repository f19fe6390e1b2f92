"""The README is tested: every fenced code block of README.md runs as written.

How each kind of block runs (in README order, one test per block, in a temporary directory):
- ```python: executed in a fresh namespace (each block carries its own imports, so a reader can paste one alone);
  async engines a block leaves running are shut down afterwards.
- ```bash: line continuations joined, comments stripped, ``&&`` chains split; then each command:
  - ``workbench ...``: ``workbench.cli.main(argv)`` in this process, exit status 0 required;
  - ``workbench serve ...``: started as ``python -m workbench serve ...`` on a free port (``--port`` rewritten),
    waited on through ``/health``, then stopped with SIGTERM: exit status 0 required;
  - ``curl ...``: a block of requests runs against the server of the first ``workbench serve`` line of the bash
    block before it (the README starts a server, then shows requests to it), its port rewritten; curl's exit
    status 0 and an OpenAI response body required (replayed with httpx where curl is not installed);
  - the set-up commands in ``SKIPPED_COMMANDS``; anything else fails the test.
- ```text: sample output, not code; counted, not run.

Marks, in README.md itself, on the line before a fence (each counted in ``EXPECTED_MARKED_LINES``):
  ``<!-- readme-test: skip (REASON) -->`` skips the block; ``<!-- readme-test: skip "PREFIX" (REASON) -->``
  skips the block's commands that start with PREFIX. A skipped ``workbench`` command is still parsed by the
  command line's parser, so its command and flags must exist.

Substitution (time: the whole file takes about 2 minutes on 2 idle cores): in every block but those in
``REAL_MODEL_BLOCKS``, ``smollm2-135m`` is replaced by ``tiny-smol/``, a Hugging Face directory that the
``workdir`` fixture writes: SmolLM2's config shrunk to 2 layers of width 64 (same vocabulary and context), random
seeded weights, and SmolLM2's tokenizer and chat template. It is a model source like the default model (text
prompts, chat, perplexity all work; the text is nonsense), where the real model would take minutes per block
(``workbench eval ws/ --reference`` alone takes 3.5 minutes on the CPU, ``quantize --auto`` longer).

The ``workdir`` fixture also makes what the blocks name but do not make themselves (``my_plan.json``,
``my_prompts.jsonl``, ``held_out.txt``) and a tiny ``ws/`` (captured, optimized, quantized) and ``engine/``,
so that any one block also runs alone (``-k``).

Needs the default model prepared by ``install.sh`` (``workbench fetch smollm2-135m``), as tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

#: Blocks that run on the real default model, without the substitution, and why.
REAL_MODEL_BLOCKS = {
    # The main job, as written: the whole fp8 build of SmolLM2-135M (about 50 s on 2 idle cores: capture 16 s,
    # passes 5 s, calibration 13 s, the accuracy gate 15 s, export 1 s) and `workbench serve` of that engine. It
    # is the README's first promise, and only the real model shows that it builds, passes its accuracy gate
    # (+3% perplexity, limit +5%) and serves. Every other block runs on the stand-in: on the real model
    # `workbench eval ws/ --reference` alone takes 3.5 minutes and `quantize --auto` longer, and even
    # `LLM("smollm2-135m")` (20 s) would take the file past its budget; tests/test_smollm2.py checks the real
    # model's tokens and text.
    "the-main-job-1",
}
SUBSTITUTIONS = {"smollm2-135m": "tiny-smol/"}
TINY = "tiny-smol"

#: Commands of the set-up block that this suite does not run, and why.
SKIPPED_COMMANDS = {
    ("bash", "install.sh"): "installs the packages and fetches the model: CI's set-up step, done before this suite",
    ("python3", "-m", "pytest"): "the test suite itself, which runs this file",
}

#: Fenced blocks by language: a block added or removed changes these counts, on purpose.
EXPECTED_BLOCKS = {"bash": 10, "python": 7, "text": 5}
#: Commands (or whole blocks) the README marks as not runnable here: keep these few.
EXPECTED_MARKED_LINES = 2  # `workbench tune ws/` (GPU only); `torchrun ...` (torch's launcher: test_tensor_parallel)

MARK = re.compile(r'<!--\s*readme-test:\s*skip(?:\s+"(?P<prefix>[^"]+)")?\s*\((?P<reason>[^)]+)\)\s*-->')


@dataclass
class Block:
    id: str               # "<section slug>-<n>": the n-th block of its section
    lang: str
    code: str
    line: int             # of the opening fence
    section: str
    skip_block: str | None = None              # a mark's reason
    skip_prefix: tuple[str, str] | None = None  # (prefix, reason)

    def text(self) -> str:
        """The code as run: with the substitutions unless the block runs on the real model."""
        if self.id in REAL_MODEL_BLOCKS:
            return self.code
        code = self.code
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        return code


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, section, per_section, i = [], "", {}, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            lang = line[3:].strip()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"README.md:{i + 1}: a fence that is never closed"
            per_section[section] = per_section.get(section, 0) + 1
            block = Block(f"{slug(section)}-{per_section[section]}", lang, "\n".join(lines[i + 1:end]) + "\n",
                          i + 1, section)
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if "readme-test" in before:
                m = MARK.search(before)
                assert m, f"README.md:{i}: a readme-test comment this test does not understand: {before.strip()}"
                if m["prefix"]:
                    block.skip_prefix = (m["prefix"], m["reason"])
                else:
                    block.skip_block = m["reason"]
            blocks.append(block)
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()
CODE_BLOCKS = [b for b in BLOCKS if b.lang in ("python", "bash")]


# ---- bash: commands ------------------------------------------------------------------------------------------

@dataclass
class Command:
    argv: list[str]
    line: int
    skip: str | None = None   # why it is not run

    @property
    def kind(self) -> str:
        if self.skip:
            return "skip"
        if self.argv[:2] == ["workbench", "serve"]:
            return "serve"
        return {"workbench": "workbench", "curl": "curl"}.get(self.argv[0], "unknown")


def commands(block: Block) -> list[Command]:
    """The block's commands: continuations joined, comments stripped, ``&&`` chains split, skips attached."""
    out, pending, first = [], "", None
    for n, raw in enumerate(block.text().splitlines(), start=block.line + 1):
        first = first or n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        argv, pending, line = shlex.split(pending + raw, comments=True), "", first
        first = None
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            cmd, argv = Command(argv[:cut], line), argv[cut + 1:]
            for prefix, reason in SKIPPED_COMMANDS.items():
                if tuple(cmd.argv[:len(prefix)]) == prefix:
                    cmd.skip = reason
            if block.skip_block:
                cmd.skip = block.skip_block
            elif block.skip_prefix and shlex.join(cmd.argv).startswith(block.skip_prefix[0]):
                cmd.skip = block.skip_prefix[1]
            out.append(cmd)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``workbench serve ...`` as a child process on a free port."""

    def __init__(self, cmd: Command, cwd: Path) -> None:
        argv = list(cmd.argv[1:])
        self.port = free_port()
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(self.port)
        else:
            argv += ["--port", str(self.port)]
        self.what = f"README.md:{cmd.line}: `{shlex.join(cmd.argv)}`"
        self.log = (cwd / f"serve-{self.port}.log").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "workbench", *argv], cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.what} exited {self.proc.returncode}:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.what} did not come up in {timeout} s:\n{self.output()}"
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM: the server must finish and exit with status 0."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=60)
            assert code == 0, f"{self.what} exited {code} after SIGTERM:\n{self.output()}"
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def run_curl(cmd: Command, server: Server) -> None:
    """One curl line against ``server`` (its URL's port rewritten); the body must be an OpenAI response."""
    argv = [re.sub(r"^http://(127\.0\.0\.1|localhost):\d+", server.url, a) for a in cmd.argv]
    where = f"README.md:{cmd.line}: `{shlex.join(cmd.argv)}`"
    data = json.loads(argv[argv.index("-d") + 1]) if "-d" in argv else {}
    if shutil.which("curl"):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{where} exited {done.returncode}: {done.stderr[-2000:]}"
        body = done.stdout
    else:  # the same request, replayed: URL, -H headers, -d body
        url = next(a for a in argv if a.startswith("http"))
        headers = dict(h.split(": ", 1) for flag, h in zip(argv, argv[1:]) if flag == "-H")
        r = httpx.request("POST" if "-d" in argv else "GET", url, headers=headers,
                          content=argv[argv.index("-d") + 1] if "-d" in argv else None, timeout=120)
        body = r.text
    if data.get("stream"):
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"{where}: not a finished event stream: {body[-2000:]}"
        assert all("choices" in json.loads(e) for e in events[:-1]), f"{where}: {body[-2000:]}"
    else:
        reply = json.loads(body)
        assert "error" not in reply and reply["choices"], f"{where}: {body[-2000:]}"


def run_bash(block: Block, cwd: Path) -> None:
    from workbench.cli import build_parser, main

    cmds = commands(block)
    servers: list[Server] = []
    requests_to: Server | None = None  # the server this block's curl lines talk to
    try:
        for cmd in cmds:
            where = f"README.md:{cmd.line}: `{shlex.join(cmd.argv)}`"
            if cmd.kind == "skip":
                if cmd.argv[0] == "workbench":  # not run, but the command and its flags must exist
                    build_parser().parse_args(cmd.argv[1:])
            elif cmd.kind == "workbench":
                assert main(cmd.argv[1:]) == 0, f"{where} did not exit 0 (its output is above)"
            elif cmd.kind == "serve":
                server = Server(cmd, cwd)
                servers.append(server)
                server.wait_healthy()
                assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"], f"{where}: no model listed"
                server.stop()
            elif cmd.kind == "curl":
                if requests_to is None:
                    requests_to = Server(server_for_requests(block), cwd)
                    servers.append(requests_to)
                    requests_to.wait_healthy()
                run_curl(cmd, requests_to)
            else:
                pytest.fail(f"{where}: this test does not know how to run `{cmd.argv[0]}`; run it here, or add "
                            "it to SKIPPED_COMMANDS (set-up) or mark it in the README, with the reason")
        if requests_to is not None:
            requests_to.stop()
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


def server_for_requests(block: Block) -> Command:
    """The server a block of requests talks to: the first ``workbench serve`` line of the bash block before it
    (the README starts a server, then shows requests to it)."""
    bash = [b for b in BLOCKS if b.lang == "bash"]
    at = next(i for i, b in enumerate(bash) if b.line == block.line)
    serve = next((c for c in commands(bash[at - 1]) if c.kind == "serve"), None) if at else None
    assert serve is not None, f"README.md:{block.line}: requests, but the bash block before them starts no server"
    assert not any(c.kind == "serve" for c in commands(block)), f"README.md:{block.line}: serve and curl in one block"
    return serve


# ---- python ---------------------------------------------------------------------------------------------------

def run_python(block: Block) -> None:
    """Runs the block; the ops and passes a block registers (the plugin example) are unregistered after it."""
    from workbench.graph.passes import PASSES, PLACES
    from workbench.kernels.registry import REGISTRY
    from workbench.runtime.async_engine import AsyncLLMEngine

    registries = [(r, dict(r)) for r in (PASSES, PLACES, REGISTRY._ops)]
    namespace = {"__name__": "__main__"}  # a block's `if __name__ == "__main__":` body runs, as in a script
    try:
        exec(compile(block.text(), f"README.md:{block.line}", "exec"), namespace)  # noqa: S102 - the README's code
    finally:
        for value in list(namespace.values()):
            if isinstance(value, AsyncLLMEngine):
                value.shutdown(5)
        for registry, before in registries:
            registry.clear()
            registry.update(before)


# ---- fixtures -------------------------------------------------------------------------------------------------

def make_tiny_smol(root: Path) -> Path:
    """``tiny-smol/``: SmolLM2's config at 2 layers of width 64, random seeded weights, SmolLM2's tokenizer."""
    from safetensors.torch import save_model

    from workbench.models import load_model
    from workbench.models.cache import is_fetched, model_dir

    real = model_dir("smollm2-135m")
    assert is_fetched("smollm2-135m"), "run `workbench fetch smollm2-135m` (install.sh does) before this test"
    out = root / TINY
    out.mkdir()
    config = json.loads((real / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (real / name).exists():
            shutil.copy(real / name, out / name)
    lm = load_model(str(out / "config.json"))  # a config.json source: random weights, seeded
    save_model(lm.model, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from workbench.engine import export_engine
    from workbench.evaluate import dataset_text
    from workbench.pipeline import QuantOptions, capture_stage, passes_stage, quant_stage
    from workbench.workspace import Workspace

    root = tmp_path_factory.mktemp("readme")
    make_tiny_smol(root)
    ws = Workspace(root / "ws")
    capture_stage(ws, str(root / TINY))
    passes_stage(ws)
    quant_stage(ws, options=QuantOptions(fmt="fp8", samples=4))
    export_engine(ws, root / "engine")
    shutil.copy(ws.path("quant", "plan.json"), root / "my_plan.json")
    docs = dataset_text("calibration").split("\n\n---\n\n")
    (root / "my_prompts.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:8]))
    (root / "held_out.txt").write_text(dataset_text("evaluation")[:6000])
    return root


@pytest.fixture
def in_workdir(request, workdir, monkeypatch):
    """The directory a block runs in: ``workdir``, or for a block on the real model ``workdir/real``, so that the
    real model's workspaces and engines never meet the stand-in's (a build rightly refuses to reuse a workspace
    captured from another model, which the substitution would otherwise cause)."""
    block = request.node.callspec.params["block"]
    where = workdir / "real" if block.id in REAL_MODEL_BLOCKS else workdir
    where.mkdir(exist_ok=True)
    monkeypatch.chdir(where)
    return where


# ---- the tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", CODE_BLOCKS, ids=[b.id for b in CODE_BLOCKS])
def test_readme_block_runs(block, in_workdir):
    if block.lang == "python":
        assert not block.skip_block and not block.skip_prefix, "python blocks are run whole: no marks"
        run_python(block)
    else:
        run_bash(block, in_workdir)


def test_every_block_runs_or_is_marked():
    """Every fenced block is python, bash or text (output); the counts are pinned, every command is one this
    test runs, and the skips are exactly the set-up commands and the README's marks."""
    langs = {}
    for b in BLOCKS:
        assert b.lang in EXPECTED_BLOCKS, f"README.md:{b.line}: a ```{b.lang} block; give it a language this test runs"
        langs[b.lang] = langs.get(b.lang, 0) + 1
    assert langs == EXPECTED_BLOCKS, "a block was added or removed: update EXPECTED_BLOCKS (it runs automatically)"
    assert REAL_MODEL_BLOCKS <= {b.id for b in CODE_BLOCKS}, "a REAL_MODEL_BLOCKS id no longer names a block"
    cmds = [c for b in BLOCKS if b.lang == "bash" for c in commands(b)]
    assert not [c for c in cmds if c.kind == "unknown"], "commands this test cannot run"
    set_up = [c for c in cmds if c.skip in SKIPPED_COMMANDS.values()]
    marked = [c for c in cmds if c.skip and c.skip not in SKIPPED_COMMANDS.values()]
    assert [tuple(c.argv[:3]) for c in set_up] == [("bash", "install.sh"), ("python3", "-m", "pytest")]
    assert len(marked) == EXPECTED_MARKED_LINES, [shlex.join(c.argv) for c in marked]
    for b in BLOCKS:  # a mark that matches nothing is stale
        if b.skip_prefix:
            assert any(c.skip == b.skip_prefix[1] for c in commands(b)), f"README.md:{b.line}: stale mark"
    main_job = "workbench build smollm2-135m --precision fp8 --out engine/ && workbench serve engine/ --port 8000"
    assert main_job in next(b for b in BLOCKS if b.id == "the-main-job-1").code
    print(f"README: {len(BLOCKS)} blocks ({langs}); {len(cmds)} shell commands, {len(set_up)} set-up commands "
          f"skipped, {len(marked)} marked; real model in {sorted(REAL_MODEL_BLOCKS)}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(workdir, capsys):
    from workbench.cli import main
    from workbench.engine import load_engine
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError) as e:
        load_engine(workdir / "engine", device="cuda")
    message = str(e.value)
    assert "\n" not in message and "CUDA GPU" in message and "there is none here" in message, message
    capsys.readouterr()
    assert main(["serve", str(workdir / "engine"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == f"workbench: error: {message}\n", err


def test_parsing_of_marks_and_commands():
    text = """## A
```bash
workbench capture smollm2-135m ws/   # a comment
workbench build m --out e/ && workbench serve e/ --port 1 \\
  --host 127.0.0.1
```
<!-- readme-test: skip "workbench tune" (GPU only) -->
```bash
workbench tune ws/
workbench info ws/
```
"""
    a, b = readme_blocks(text)
    assert (a.id, a.lang, a.line, b.id, b.skip_prefix) == ("a-1", "bash", 2, "a-2", ("workbench tune", "GPU only"))
    assert [(c.argv, c.line, c.kind) for c in commands(a)] == [
        (["workbench", "capture", "tiny-smol/", "ws/"], 3, "workbench"),
        (["workbench", "build", "m", "--out", "e/"], 4, "workbench"),
        (["workbench", "serve", "e/", "--port", "1", "--host", "127.0.0.1"], 4, "serve")]
    assert [c.kind for c in commands(b)] == ["skip", "workbench"]
    with pytest.raises(AssertionError, match="does not understand"):
        readme_blocks("<!-- readme-test: run later -->\n```bash\nls\n```\n")
