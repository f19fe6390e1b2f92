"""The real default model, SmolLM2-135M-Instruct: the IR against transformers, end to end.

Needs the model prepared by the README's install command (`workbench fetch smollm2-135m`);
it is not fetched here, so a missing install step fails these tests instead of hiding.
"""

import contextlib
import io

import pytest
import torch

from conftest import rel_err
from workbench.cli import main
from workbench.evaluate import dataset_text, greedy, hf_logits, logits_fn, perplexity, program_greedy as cached_greedy
from workbench.graph.capture import capture
from workbench.models import load_model, resolve_source
from workbench.pipeline import load_graph, load_program, program_for
from workbench.workspace import Workspace

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To bake bread at home, you first need to",
]


@pytest.fixture(scope="module")
def captured_ws(tmp_path_factory):
    """`workbench capture smollm2-135m ws/`, run once (9 s of torch.export on 2 cores): the workspace and what the
    command printed. Its graph is the one every test here runs (``smol``); test_cli_capture_info_generate goes on
    with the workspace."""
    ws_dir = tmp_path_factory.mktemp("smol") / "ws"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["capture", "smollm2-135m", str(ws_dir)]) == 0
    return ws_dir, printed.getvalue()


@pytest.fixture(scope="module")
def smol(captured_ws):
    source = resolve_source("smollm2-135m", fetch=False)
    lm = load_model(source)
    graph, constants = load_graph(Workspace(captured_ws[0]), "capture")
    return lm, program_for(graph, constants, source), graph


@pytest.fixture(scope="module")
def smol_optimized(smol):
    """Every pass, each checked, over the graph ``smol`` captured: what ``pipeline.optimize(source, check=True)``
    does after its capture, without capturing SmolLM2 once more (9 s of torch.export on 2 cores)."""
    from workbench.graph.executor import Program, resolve_params
    from workbench.graph.passes import run_passes

    _, captured_program, graph = smol
    params = captured_program.params  # the captured graph's tensors by name: the base derived weights come from
    optimized, reports = run_passes(graph, params, check=True, device="cpu")
    return Program(optimized, resolve_params(optimized, params)), reports


@pytest.fixture(scope="module")
def hf_greedy(smol):
    """transformers' greedy tokens (with its KV cache) for each prompt: the reference."""
    lm = smol[0]
    eos = lm.tokenizer.eos_token_id
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor(lm.tokenizer(prompt).input_ids)
        with torch.no_grad():
            out[prompt] = lm.model.generate(ids[None], max_new_tokens=32, do_sample=False, eos_token_id=eos,
                                            pad_token_id=eos)[0, ids.numel():].tolist()
    return out


def test_graph_shape(smol):
    lm, program, graph = smol
    assert graph.meta["architecture"] == "LlamaForCausalLM"
    assert len({n.layer for n in graph.nodes if n.layer is not None}) == 30
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008


def test_logits_match_transformers(smol):
    lm, program, _ = smol
    ids = torch.tensor(lm.tokenizer(PROMPTS[0] + " Paris, and the capital of Italy is").input_ids)
    with torch.no_grad():
        ref = lm.model(ids[None], use_cache=False).logits[0]
    assert rel_err(program(ids), ref) < 1e-4


def test_greedy_tokens_match_transformers(smol, hf_greedy):
    lm, program, _ = smol
    eos = lm.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = torch.tensor(lm.tokenizer(prompt).input_ids)
        assert greedy(program, ids, 32, eos_token_id=eos) == hf_greedy[prompt], prompt
    assert lm.tokenizer.decode(greedy(program, torch.tensor(lm.tokenizer(PROMPTS[0]).input_ids), 2)).strip() \
        .startswith("Paris")


def test_perplexity_agrees_with_transformers(smol):
    lm, program, _ = smol
    ids = torch.tensor(lm.tokenizer(dataset_text("evaluation")).input_ids)[:1536]
    ours = perplexity(program, ids, window=512, stride=256)
    ref = perplexity(hf_logits(lm.model), ids, window=512, stride=256)
    assert ours.tokens_scored == ref.tokens_scored == 1535
    assert abs(ours.perplexity - ref.perplexity) / ref.perplexity < 1e-3
    assert 5 < ref.perplexity < 60  # a working language model on plain English


def test_cli_capture_info_generate(captured_ws, capsys):
    ws_dir, out = captured_ws  # `workbench capture smollm2-135m ws/` and its output
    assert "LlamaForCausalLM (float32)" in out and "30 decoder layers" in out and "134.5 M" in out
    assert "GFLOP/token" in out and "aten.linear.default" in out
    ws = Workspace(ws_dir)
    assert ws.status("capture") == "ok"
    rec = ws.record("capture")
    assert rec["params"]["source"]["kind"] == "hf"
    assert any(p.endswith("model.safetensors") for p in rec["input_files"])
    assert main(["info", str(ws_dir)]) == 0
    assert "capture" in capsys.readouterr().out
    assert main(["generate", str(ws_dir), "The capital of France is", "--max-tokens", "3"]) == 0
    assert "The capital of France is Paris" in capsys.readouterr().out
    assert main(["generate", str(ws_dir), "", "--max-tokens", "3"]) == 2  # one line each, no traceback
    assert main(["generate", str(ws_dir), "hi", "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "the prompt is empty" in err and "--max-tokens must be >= 1" in err and "Traceback" not in err
    assert load_program(ws).graph.meta["architecture"] == "LlamaForCausalLM"
    # the passes stage: its report, its record, and the optimized graph generating the same text
    assert main(["optimize", str(ws_dir), "--skip", "fuse_rope"]) == 0
    out = capsys.readouterr().out
    assert "fuse_attention" in out and "fuse_rope" not in {line.split()[0] for line in out.splitlines() if line.strip()}
    assert ws.status("passes") == "ok" and ws.record("passes")["upstream"].keys() == {"capture"}
    assert [r["name"] for r in ws.read_json("passes", "report.json")][-1] == "fuse_qk_norm_into_attention"
    assert main(["generate", str(ws_dir), "The capital of France is", "--max-tokens", "3", "--stage", "passes"]) == 0
    assert "The capital of France is Paris" in capsys.readouterr().out


def test_gguf_file_intake_matches_the_converted_directory(smol):
    """The GGUF kept by `fetch` loads directly, with the same weights and tokens as the converted directory."""
    from workbench.env import sha256_file

    from workbench.models.cache import gguf_path

    lm, _, graph = smol
    from workbench.models.intake import hf_directory

    source = resolve_source(gguf_path("smollm2-135m"))
    assert source.kind == "gguf"
    direct = load_model(source)
    # dequantized once into the model cache, keyed by the file's sha256; every later load reads safetensors
    converted_dir = hf_directory(source)
    assert (converted_dir / ".complete").is_file() and converted_dir.parent.name == "gguf-converted"
    assert (converted_dir / "SOURCE.txt").read_text().split()[-1] == sha256_file(gguf_path("smollm2-135m"))
    converted = lm.model.state_dict()
    for name, value in direct.model.state_dict().items():
        assert torch.equal(value, converted[name]), name
    assert direct.tokenizer(PROMPTS[2]).input_ids == lm.tokenizer(PROMPTS[2]).input_ids
    # Captured from real CPU tensors rather than the meta device, the graph differs only in
    # stride-dependent copies (meta SDPA reports other output strides); its compute is the same.
    gguf_graph = capture(direct.model).graph

    def compute_ops(g):
        return [(n.op, n.layer) for n in g.nodes if n.op in (
            "aten.linear.default", "aten.scaled_dot_product_attention.default", "aten.embedding.default")]

    assert compute_ops(gguf_graph) == compute_ops(graph)


def test_optimized_graph_matches_and_fuses_once_per_layer(smol, smol_optimized, hf_greedy):
    from collections import Counter

    lm, captured_program, _ = smol
    program, reports = smol_optimized
    assert all(r.accepted for r in reports)
    ops = Counter((n.op, n.layer) for n in program.graph.nodes)
    for layer in range(30):
        assert ops[("workbench.paged_attention", layer)] == 1 and ops[("workbench.rope", layer)] == 0  # inside it
        assert ops[("workbench.silu_mul", layer)] == 1
    linears = Counter(m.what for r in reports if r.name == "fuse_parallel_linears" for m in r.matches)
    assert linears == {"qkv": 30, "gate_up": 30}
    assert ops[("aten.scaled_dot_product_attention.default", None)] == 0
    ids = torch.tensor(lm.tokenizer(PROMPTS[2]).input_ids)
    assert rel_err(logits_fn(program)(ids[None])[0], captured_program(ids)) < 1e-5
    eos = lm.tokenizer.eos_token_id
    for prompt in PROMPTS:  # decoded through the paged KV cache, one token per step
        ids = torch.tensor(lm.tokenizer(prompt).input_ids)
        assert cached_greedy(program, ids, 32, eos_token_id=eos) == hf_greedy[prompt], prompt


def test_inflight_batching_matches_transformers_greedy(smol, smol_optimized, hf_greedy):
    """The runtime's engine on the optimized graph: the prompts arrive staggered, share a KV pool too small
    for all of them (preemptions) and are decoded together; each gets transformers' greedy tokens, and the
    text is the tokenizer's decoding of them."""
    from workbench.runtime.engine import LLMEngine
    from workbench.runtime.sampling import SamplingParams
    from workbench.runtime.scheduler import SchedulerConfig

    lm = smol[0]
    program, _ = smol_optimized
    # asynchronous scheduling, as on a GPU: EOS is seen a step late and the extra token dropped
    engine = LLMEngine(program, lm.tokenizer, num_blocks=8, config=SchedulerConfig(max_num_batched_tokens=32),
                       async_scheduling=True)
    greedy = SamplingParams(max_tokens=32, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, greedy)
        engine.step()
    while engine.has_unfinished:
        engine.step()
    for i, prompt in enumerate(PROMPTS):
        out = engine.output(str(i))
        assert out.token_ids == hf_greedy[prompt], prompt
        assert out.text == lm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert engine.timeline()["preempted"].sum() > 0
