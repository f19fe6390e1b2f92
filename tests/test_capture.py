"""Capture into the IR and run it with the reference executor, against transformers."""

import pytest
import torch

from conftest import rel_err
from workbench.graph.capture import capture
from workbench.graph.executor import Program
from workbench.graph.ir import Graph
from workbench.models import load_model
from workbench.pipeline import CaptureOptions, capture_source, program_for

TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-llama31", "tiny-phi3", "tiny-gpt2",
        "tiny-neox", "tiny-falcon", "tiny-gemma2", "tiny-gemma3"]  # (tiny-falcon-mqa: test_paged and test_families)


@pytest.fixture(scope="module", params=TINY)
def tiny(request, checked_optimize):
    lm = load_model(request.param)
    captured = checked_optimize(request.param).captured  # capture_source(lm.source), made once per session
    # through JSON, as every later stage will read it
    graph = Graph.loads(captured.graph.dumps())
    return lm, program_for(graph, captured.constants, lm.source)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 33), (3, 64)])
def test_logits_match_transformers(tiny, shape):
    lm, program = tiny
    ids = torch.randint(0, lm.model.config.vocab_size, shape)
    with torch.no_grad():
        ref = lm.model(ids, use_cache=False).logits
    out = torch.full_like(ref, float("nan"))  # poisoned: every element must be written
    out[:] = program(ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


def test_packed_sequences_are_independent(tiny):
    """One row holding two prompts back to back (positions restart) equals each prompt alone."""
    lm, program = tiny
    v = lm.model.config.vocab_size
    a, b = torch.randint(0, v, (23,)), torch.randint(0, v, (40,))
    out = program(torch.cat([a, b]), torch.cat([torch.arange(23), torch.arange(40)]))
    with torch.no_grad():
        ra = lm.model(a[None], use_cache=False).logits[0]
        rb = lm.model(b[None], use_cache=False).logits[0]
    assert rel_err(out[:23], ra) < 1e-5
    assert rel_err(out[23:], rb) < 1e-5


def test_offset_positions_match_transformers(tiny):
    """Positions offset by 100 (a continuation) give transformers' logits for those positions.

    RoPE is relative, so a constant offset leaves the logits unchanged; where positions
    matter (a restart starts a new sequence) is tested by the packing test above."""
    lm, program = tiny
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 9))
    pos = torch.arange(100, 109)[None]
    with torch.no_grad():
        ref = lm.model(ids, position_ids=pos, use_cache=False).logits
    assert rel_err(program(ids, pos), ref) < 1e-5


def test_graph_structure(tiny):
    lm, program = tiny
    g = program.graph
    cfg = lm.model.config
    assert set(g.inputs) == {"input_ids", "position_ids"}
    assert g.inputs["input_ids"].shape == ["batch", "tokens"]
    assert g.nodes[-1].out.shape == ["batch", "tokens", cfg.vocab_size]
    # every decoder layer owns its projections
    # (GPT-2's are Conv1D: addmm on a weight stored [in, out], c_attn packing q, k and v; Falcon's matmul(x, W.T);
    # neither has a gated MLP)
    matmul = {"gpt2": "aten.addmm.default", "falcon": "aten.matmul.default"}.get(cfg.model_type, "aten.linear.default")
    for layer in range(cfg.num_hidden_layers):
        linears = [n for n in g.nodes if n.layer == layer and n.op == matmul]
        packed = cfg.model_type in ("phi3", "gpt2", "gpt_neox", "falcon")  # q/k/v (gate/up) packed in the checkpoint
        assert len(linears) == (4 if packed else 7)  # q, k, v, o, gate, up, down
    # SDPA, or the eager attention's one softmax (Gemma 2, whose soft cap SDPA cannot express)
    attn = [n for n in g.nodes if n.op in ("aten.scaled_dot_product_attention.default", "aten.softmax.int")]
    assert len(attn) == cfg.num_hidden_layers
    weights = {n for n, p in g.params.items() if p.kind == "parameter"}
    assert weights <= set(dict(lm.model.named_parameters(remove_duplicate=False)))


def test_qwen2_biases_and_tied_llama_embeddings(checked_optimize):
    qwen = checked_optimize("tiny-qwen2").captured.graph
    assert "model.layers.0.self_attn.q_proj.bias" in qwen.params
    llama = checked_optimize("tiny-llama").captured.graph
    assert "model.embed_tokens.weight" in llama.params["lm_head.weight"].aliases


def test_bf16_capture_runs_in_bf16():
    lm = load_model("tiny-llama", dtype=torch.bfloat16)
    captured = capture_source(lm.source, CaptureOptions(dtype="bfloat16"))
    program = program_for(captured.graph, captured.constants, lm.source)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = lm.model(ids, use_cache=False).logits
    out = program(ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_llama_3_8b_captures_on_meta_without_weights(llama_3_8b_meta):
    lm, captured = llama_3_8b_meta
    assert all(p.is_meta for p in lm.model.parameters())
    g = captured.graph
    assert len([n for n in g.nodes if n.op == "aten.linear.default"]) == 32 * 7 + 1
    assert g.meta["dtype"] == "bfloat16"
    # buffers computed from the config are real, so the graph can run later
    inv_freq = captured.constants["model.rotary_emb.inv_freq"]
    assert not inv_freq.is_meta and inv_freq.dtype == torch.float32 and inv_freq.shape == (64,)
    assert torch.allclose(inv_freq[1], torch.tensor(500000.0 ** (-2 / 128)))
    from workbench.graph.views import summary

    s = summary(g)
    assert s["parameters"] == 8_030_261_248
    assert 14.5e9 < s["per_token"][512]["flops_per_token"] < 16.5e9  # ~2 FLOPs per parameter


def test_graph_json_round_trip_is_exact(checked_optimize):
    g = checked_optimize("tiny-mistral").captured.graph
    again = Graph.loads(g.dumps())
    assert again.to_json() == g.to_json()


def test_program_reports_bad_inputs():
    from workbench.errors import WorkbenchError

    lm = load_model("tiny-llama")
    captured = capture(lm.model)
    with pytest.raises(WorkbenchError, match="have no value"):
        Program(captured.graph, {})
    program = program_for(captured.graph, captured.constants, lm.source)
    with pytest.raises(WorkbenchError, match="does not match"):
        program(torch.zeros(1, 5, dtype=torch.long), torch.arange(4)[None])
