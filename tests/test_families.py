"""Model families beyond Llama (issue 26), on the CPU in fp32 against transformers: Qwen3 (per-head RMSNorm on q
and k, a head_dim apart from hidden / heads, no biases), Llama 3.1's scaled RoPE (``rope_type: llama3``) and Phi-3
(q/k/v and gate/up packed in the checkpoint, split by slices and a chunk); and the LayerNorm families
(``LN_FAMILIES``): GPT-2 (Conv1D weights, learned positions, GELU-tanh MLP, packed c_attn), GPT-NeoX / Pythia
(parallel residual, partial rotary) and Falcon (parallel attention + MLP; grouped KV, or Falcon-7B's multi-query
layout with one norm); and Gemma 2 and 3 (in ``FAMILIES``: (1 + w) norms before and after attention and MLP, GeGLU,
soft caps, alternating sliding windows, query_pre_attn_scalar; Gemma 3's q/k norms and RoPE base per layer type),
whose kernels are in test_kernels_gemma.

The Llama-layout families also run in the parametrized tests of test_capture (captured logits), test_passes (each
fusion once per layer, optimized logits), test_paged (cached decoding) and test_kernels_pointwise (the per-head norm
kernel); the LayerNorm families in test_capture, test_paged, test_kernels_ln and test_kernel_shapes; here: greedy tokens through
the product path, the pass reports' counts, the rotary tables, quantization, an engine built and run, a Hugging
Face directory, `workbench diff`, and the one-line refusals of what is not supported."""

from collections import Counter

import pytest
import torch

from conftest import rel_err
from workbench.evaluate import greedy, logits_fn
from workbench.graph.paged import PagedLayout
from workbench.models import PRESETS, load_model
from workbench.models.presets import make_config
from workbench.pipeline import optimize
from workbench import LLM, SamplingParams

FAMILIES = ["tiny-qwen3", "tiny-llama31", "tiny-phi3", "tiny-gemma2", "tiny-gemma3"]
LN_FAMILIES = ["tiny-gpt2", "tiny-neox", "tiny-falcon", "tiny-falcon-mqa"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only wait for each other


@pytest.fixture(scope="module")
def built(checked_optimize):
    """name -> (transformers model, ``optimize`` result with every pass checked: conftest's, one per session)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name), checked_optimize(name)
        return cache[name]

    return get


def prompts(n=5):
    g = torch.Generator().manual_seed(26)
    return [torch.randint(0, 512, (length,), generator=g) for length in (3, 8, 13, 21, 30)[:n]]


@pytest.mark.parametrize("name", FAMILIES + LN_FAMILIES)
def test_greedy_tokens_equal_transformers(built, name):
    """5 prompts, 32 greedy tokens each: transformers (recomputing), the captured graph (recomputing) and the
    optimized graph through `LLM` (paged KV cache, the 5 prompts batched in one engine) give the same tokens;
    the prompts' logits agree to < 1e-4."""
    lm, result = built(name)
    with torch.no_grad():
        def reference(ids):
            return lm.model(ids, use_cache=False).logits

        expected = [greedy(reference, p, 32) for p in prompts()]
        captured = result.captured_program()
        assert [greedy(captured, p, 32) for p in prompts()] == expected
        outs = LLM(result.program, num_blocks=32).generate(
            [p.tolist() for p in prompts()], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in outs] == expected
        for p in prompts(2):
            ref = reference(p[None])
            assert rel_err(captured(p[None]), ref) < 1e-4
            assert rel_err(logits_fn(result.program)(p[None]), ref) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_pass_reports_match_each_fusion_once_per_layer(built, name):
    """The reports' matches, layer by layer: Qwen3's per-head q and k norms are two more RMSNorms per layer, fused
    over [batch, tokens, heads, head_dim], then moved into the paged attention with the RoPE (its kernel norms and
    rotates q as it loads it, k before it writes the cache); Phi-3's packed qkv_proj and gate_up_proj are found as
    packed groups (their chunk made slices, as a fused group's outputs are), then everything matches as on Llama.
    Gemma 2: four (1 + w) norms a layer, GeGLU, the eager attention (soft-capped scores) fused like SDPA, the cap
    carried into the paged attention. Gemma 3: no caps, SDPA, two more (1 + w) norms a layer (q and k per head, moved
    into the attention as Qwen3's), two RoPE bases (four tables)."""
    lm, result = built(name)
    cfg = lm.model.config
    layers = range(cfg.num_hidden_layers)
    qwen3 = name == "tiny-qwen3"
    gemma2, gemma3 = name == "tiny-gemma2", name == "tiny-gemma3"
    gemma = gemma2 or gemma3
    qk_norm = qwen3 or gemma3

    def matched(pass_name):
        return Counter((m.what, m.layer) for r in result.reports if r.name == pass_name for m in r.matches)

    assert all(r.accepted for r in result.reports) and result.unfused() == []
    # Gemma: four (1 + w) norms a layer (input, post-attention, pre- and post-MLP), the 1 folded into the weight
    norm = "rms_norm (1 + w folded into the weight)" if gemma else "rms_norm"
    per_layer = 6 if gemma3 else 4 if qwen3 or gemma else 2  # Gemma 3: its q/k norms too
    assert matched("fuse_rms_norm") == {**{(norm, i): per_layer for i in layers}, (norm, None): 1}
    # each residual add feeding a norm; the add before layer i's input norm is layer i's, the last the final norm's
    # (Gemma's post-attention and post-MLP norms feed the adds: they stay rms_norm)
    assert matched("fuse_add_rms_norm") == {("add_rms_norm", 0): 1, ("add_rms_norm", 1): 2, ("add_rms_norm", None): 1}
    # Gemma's norms after the attention and the MLP, with the residual add and the next norm: one op each
    assert matched("fuse_norm_add_rms_norm") == ({("norm_add_rms_norm", i): 2 for i in layers} if gemma else {})
    assert matched("fuse_silu_mul") == {("gelu_mul" if gemma else "silu_mul", i): 1 for i in layers}
    # Gemma 2's soft caps: each layer's attention scores (then taken into the attention) and the final logits
    assert matched("fuse_softcap") == ({**{("softcap", i): 1 for i in layers}, ("softcap", None): 1} if gemma2
                                       else {})
    assert matched("fuse_rope") == {("rope", i): 2 for i in layers}
    assert matched("fuse_attention") == {("attention (repeat_kv removed)", i): 1 for i in layers}
    packed = " (packed in the checkpoint)" if name == "tiny-phi3" else ""
    assert matched("fuse_parallel_linears") == {**{("qkv" + packed, i): 1 for i in layers},
                                                **{("gate_up" + packed, i): 1 for i in layers}}
    assert matched("insert_paged_attention") == {("paged_attention", i): 1 for i in layers}
    assert matched("fuse_rope_into_attention") == {("rope into paged_attention", i): 1 for i in layers}
    assert matched("fuse_qk_norm_into_attention") == ({("q/k norm into paged_attention", i): 1 for i in layers}
                                                      if qk_norm else {})
    # Gemma 3: a cos and a sin table per RoPE base (sliding layers' and global layers')
    assert matched("fold_rope_tables") == {("rope table", None): 4 if gemma3 else 2}

    graph = result.graph
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert PagedLayout.from_graph(graph).head_dim == head_dim
    qkv = graph.params["model.layers.0.self_attn.qkv_proj.weight"].spec.shape
    assert qkv == [(cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim, cfg.hidden_size]
    attention = [n for n in graph.nodes if n.op == "workbench.paged_attention"]
    assert [n.layer for n in attention] == list(layers)
    # only the first layer's input norm is left unfused with an add (Gemma's post-norms are in norm_add_rms_norm)
    assert sum(n.op == "workbench.rms_norm" for n in graph.nodes) == 1
    if qwen3:
        assert head_dim * cfg.num_attention_heads != cfg.hidden_size  # the preset's point
        assert [(n.kwargs["q_norm"].name, n.kwargs["k_norm"].name, n.kwargs["norm_eps"]) for n in attention] == [
            (f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight", 1e-6)
            for i in layers]
        assert "model.layers.0.self_attn.q_proj.bias" not in result.captured.graph.params
    elif gemma3:  # the derived (1 + w) weights, fp32
        assert [(n.kwargs["q_norm"].name, n.kwargs["k_norm"].name) for n in attention] == [
            (f"model.layers.{i}.self_attn.q_norm.weight.plus_one", f"model.layers.{i}.self_attn.k_norm.weight.plus_one")
            for i in layers]
    else:
        assert all("q_norm" not in n.kwargs for n in attention)
    assert not any(n.op in ("aten.chunk.default", "aten.cat.default", "aten.silu.default") for n in graph.nodes)
    assert [n.kwargs.get("softcap") for n in attention] == [cfg.attn_logit_softcapping if gemma2 else None] * len(
        layers)
    if name == "tiny-phi3":  # the same graph as a fused Llama's
        assert len(result.captured.graph.nodes) == 231 and len(graph.nodes) == 60
        assert not any(graph.params[p].derived for p in graph.params if p.endswith(("qkv_proj.weight", "up_proj.weight")))


#: The LayerNorm families' matches per pass: (what, layer) -> count, for 2 layers; layer None is outside the layers
#: (the final norm). GPT-2: each layer's two LayerNorms, both fed by a residual add (layer 0's first by the token +
#: position embeddings' sum), its four Conv1D linears, the tanh GELU, c_attn's q/k/v split as a packed group.
LN_MATCHES = {
    "tiny-gpt2": {
        "linear_from_matmul": {("linear", i): 4 for i in (0, 1)},
        "fuse_layer_norm": {("layer_norm", 0): 2, ("layer_norm", 1): 2, ("layer_norm", None): 1},
        "fuse_add_layer_norm": {("add_layer_norm", 0): 2, ("add_layer_norm", 1): 2, ("add_layer_norm", None): 1},
        "fuse_gelu": {("gelu", i): 1 for i in (0, 1)},
        "fuse_attention": {("attention", i): 1 for i in (0, 1)},
        "fuse_parallel_linears": {("qkv (packed in the checkpoint)", i): 1 for i in (0, 1)},
        "insert_paged_attention": {("paged_attention", i): 1 for i in (0, 1)},
    },
    # NeoX: a parallel residual, so layer 0's two norms read the embedding and layer 1's the sum of layer 0's
    # attention, MLP and input (fused with the first norm, the second reading the sum); RoPE on the first quarter
    # of each head, then the rest concatenated back: rope, then partial_rope, on q and k
    "tiny-neox": {
        "fuse_layer_norm": {("layer_norm", 0): 2, ("layer_norm", 1): 2, ("layer_norm", None): 1},
        "fuse_add_layer_norm": {("add_layer_norm", 1): 1, ("add_layer_norm", None): 1},
        "fuse_gelu": {("gelu", i): 1 for i in (0, 1)},
        "fuse_rope": {("rope", i): 2 for i in (0, 1)},
        "fuse_partial_rope": {("partial_rope", i): 2 for i in (0, 1)},
        "fuse_attention": {("attention", i): 1 for i in (0, 1)},
        "insert_paged_attention": {("paged_attention", i): 1 for i in (0, 1)},
    },
}
# Falcon: attention and MLP in parallel (the residual add fuses with layer 1's first norm, as in NeoX), bias-free
# linears as matmul(x, W.T), full RoPE moved into the paged attention, grouped KV heads (repeat_kv removed); with
# new_decoder_architecture a norm per branch, else (Falcon-7B's layout, multi-query) one norm both read
LN_MATCHES["tiny-falcon"] = {
    "linear_from_matmul": {("linear", i): 4 for i in (0, 1)},
    "fuse_layer_norm": {("layer_norm", 0): 2, ("layer_norm", 1): 2, ("layer_norm", None): 1},
    "fuse_add_layer_norm": {("add_layer_norm", 1): 1, ("add_layer_norm", None): 1},
    "fuse_gelu": {("gelu", i): 1 for i in (0, 1)},
    "fuse_rope": {("rope", i): 2 for i in (0, 1)},
    "fuse_attention": {("attention (repeat_kv removed)", i): 1 for i in (0, 1)},
    "insert_paged_attention": {("paged_attention", i): 1 for i in (0, 1)},
    "fuse_rope_into_attention": {("rope into paged_attention", i): 1 for i in (0, 1)},
}
LN_MATCHES["tiny-falcon-mqa"] = {**LN_MATCHES["tiny-falcon"], "fuse_layer_norm": {
    ("layer_norm", 0): 1, ("layer_norm", 1): 1, ("layer_norm", None): 1}}

#: Which op writes each group's x (qkv, o, fc, down of layer 1) in an fp8 plan with static scales: a norm (the
#: fused add's when the residual add feeds it), the GELU, or the linear itself (the attention's output, and x that
#: two groups read: Falcon-7B's one norm)
FP8_PRODUCERS = {
    "tiny-gpt2": ["workbench.add_layer_norm", "the linear", "workbench.add_layer_norm", "workbench.gelu"],
    "tiny-neox": ["workbench.add_layer_norm", "the linear", "workbench.layer_norm", "workbench.gelu"],
    "tiny-falcon": ["workbench.add_layer_norm", "the linear", "workbench.layer_norm", "workbench.gelu"],
    "tiny-falcon-mqa": ["the linear", "the linear", "the linear", "workbench.gelu"],
}


@pytest.mark.parametrize("name", LN_FAMILIES)
def test_layernorm_families_pass_reports(built, name):
    """Every pass's matches, layer by layer (each per-layer fusion exactly as often in every layer), every pass
    accepted, no unfused layer reported; none of the Llama family's fusions match, and the ops the fusions replace
    are gone from the optimized graph."""
    _, result = built(name)
    expected = LN_MATCHES[name]
    assert all(r.accepted for r in result.reports)
    fusions = {r.name: Counter((m.what, m.layer) for m in r.matches) for r in result.reports
               if r.name.startswith(("fuse_", "insert_", "linear_"))}
    assert {k: v for k, v in fusions.items() if v} == expected
    assert result.unfused() == []
    ops = Counter(n.op for n in result.graph.nodes)
    for gone in ("aten.layer_norm.default", "aten.addmm.default", "aten.matmul.default", "aten.tanh.default",
                 "aten.gelu.default", "aten.scaled_dot_product_attention.default", "aten.split.Tensor"):
        assert ops[gone] == 0, gone
    layers = result.graph.meta["config"]["num_hidden_layers"]
    assert ops["workbench.paged_attention"] == layers and ops["aten.linear.default"] == 4 * layers + 1


def test_gpt2_bf16_pipeline_is_accepted_and_close():
    """In bf16 (the GPU's dtype) every pass is accepted within its tolerance and the optimized logits stay within
    bf16 rounding of the captured graph's: LayerNorm's fp32 statistics, GPT-2's GELU rounded step by step."""
    result = optimize("tiny-gpt2", dtype="bfloat16", device="cpu", check=True)
    assert all(r.accepted for r in result.reports) and result.unfused() == []
    assert max(r.max_rel_err or 0 for r in result.reports) < 5e-3
    ids = prompts(2)[1][None]
    ref = result.captured_program()(ids)
    assert ref.dtype == torch.bfloat16 and rel_err(logits_fn(result.program)(ids), ref) < 1e-2


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-neox", "tiny-falcon-mqa"])  # one per family
def test_layernorm_families_from_a_hugging_face_directory(tmp_path, built, name):
    """A Hugging Face directory of the architecture (config.json, safetensors, a tokenizer file): GPT-2's written
    as the Hub's checkpoints are, by the base model's names (``h.0.attn.c_attn.weight``, ``wte.weight``), the others
    by the causal LM's; a tied lm_head not stored. Optimized and run from the directory, the logits are
    transformers'."""
    from safetensors.torch import save_file

    lm, _ = built(name)
    d = tmp_path / name
    d.mkdir()
    tied = lm.model.config.tie_word_embeddings  # a tied lm_head is not stored (GPT-2's, Falcon's)
    tensors = {k: v.contiguous() for k, v in lm.model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if name == "tiny-gpt2":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    save_file({k: v for k, v in tensors.items() if not k.endswith("inv_freq")}, str(d / "model.safetensors"))
    lm.model.config.to_json_file(str(d / "config.json"))
    (d / "tokenizer.json").write_text("{}")
    result = optimize(str(d), device="cpu")
    assert result.source.kind == "hf" and result.unfused() == []
    ids = prompts(2)[1][None]
    with torch.no_grad():
        assert rel_err(logits_fn(result.program)(ids), lm.model(ids, use_cache=False).logits) < 1e-5


@pytest.mark.parametrize("name", LN_FAMILIES)
def test_layernorm_families_diff_layer_by_layer(built, name):
    """`workbench diff`'s trace finds each decoder layer's output in the fused graph (the sum an add_layer_norm
    returns, transformer.h.<i> or gpt_neox.layers.<i>) and the final LayerNorm (ln_f, final_layer_norm), and the
    optimized graph diverges nowhere."""
    from workbench.debug.diff import compare, trace_model, trace_program

    lm, result = built(name)
    ids = prompts(3)[2].tolist()
    divergence = compare(trace_program(result.program, ids), trace_model(lm.model, ids))
    assert divergence.first is None
    rows = divergence.layers
    assert list(rows["layer"]) == ["embed", 0, 1, "norm", "logits"] and (rows["rel_err"] < 1e-5).all()
    assert all(node.startswith("add_layer_norm") for node in rows["node"][1:3])


def test_llama31_rope_tables_are_the_scaled_ones(built):
    """The folded cos/sin tables are transformers' llama3-scaled ones at every position (bit for bit), not the
    unscaled ones; past original_max_position_embeddings (8192) the captured graph still matches transformers."""
    lm, result = built("tiny-llama31")
    program = result.program
    rows = PRESETS["tiny-llama31"]["max_position_embeddings"]
    tables = sorted(n for n, p in program.graph.params.items() if p.derived and p.derived["op"] == "tabulate")
    pos = torch.arange(rows)[None]
    rotary = lm.model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    assert [tuple(program.params[t].shape) for t in tables] == [(rows, 16)] * 2
    assert {torch.equal(program.params[t], cos[0]) or torch.equal(program.params[t], sin[0]) for t in tables} == {True}
    unscaled = type(rotary)(config=make_config({**PRESETS["tiny-llama31"], "rope_scaling": None}))
    plain_cos, _ = unscaled(torch.zeros(1), pos)
    assert rel_err(plain_cos[0, 9000:], cos[0, 9000:]) > 0.1  # the scaling changes the long wavelengths
    ids = torch.randint(0, 512, (1, 12))
    far = torch.arange(12000, 12012)[None]
    with torch.no_grad():
        ref = lm.model(ids, position_ids=far, use_cache=False).logits
    assert rel_err(result.captured_program()(ids, far), ref) < 1e-5


def _variant(tmp_path, name, **changes):
    """The transformers model of preset ``name`` with ``changes`` to its config (the same weights: they are
    generated by parameter name)."""
    import json

    config = tmp_path / f"{name}-variant.json"
    config.write_text(json.dumps({**PRESETS[name], **changes}))
    return load_model(str(config)).model


def test_gemma2_norms_caps_windows_and_scale(built, tmp_path):
    """Where the optimized graph keeps Gemma 2's pieces: the (1 + w) norm weights derived once (1 + the
    checkpoint's w, in fp32: ``offset``), windows alternating per layer (16, then global), the attention's soft cap
    and query_pre_attn_scalar's scale on the paged attention, the final cap as one op after the lm_head, the
    embeddings times sqrt(hidden). Each of them matters (switched off in transformers, its logits move), and the
    Triton tactics of the new ops (paged attention with cap and window, GeGLU, softcap) decode the reference
    graph's greedy tokens."""
    from workbench.evaluate import paged_greedy
    from workbench.graph.executor import Program
    from workbench.graph.passes import run_passes
    from workbench.graph.passes.rows import lm_head

    lm, result = built("tiny-gemma2")
    program, cfg = result.program, lm.model.config
    graph = program.graph
    weights = dict(lm.model.named_parameters())
    derived = [n for n, p in graph.params.items() if p.derived and p.derived["op"] == "offset"]
    assert len(derived) == 4 * cfg.num_hidden_layers + 1 and all(n.endswith("norm.weight.plus_one") for n in derived)
    assert all(torch.equal(program.params[n], 1 + weights[n.removesuffix(".plus_one")]) for n in derived)
    attention = [n for n in graph.nodes if n.op == "workbench.paged_attention"]
    assert [(n.args[8], n.args[9], n.kwargs["softcap"]) for n in attention] == [
        (24 ** -0.5, 16, 0.05), (24 ** -0.5, None, 0.05)]  # scale, window, cap: layer 0 sliding, layer 1 global
    capped = next(n for n in graph.nodes if n.op == "workbench.softcap")
    assert capped.name == graph.outputs[0] and capped.args[1] == 0.5 and lm_head(graph).op == "aten.linear.default"
    # the runtime's lm_head computes only the sampled rows: the cap after it is seen through
    rows, (report,) = run_passes(graph, program.params, ["select_logits_rows"], check=True)
    assert report.accepted and [m.what for m in report.matches] == ["logits_rows"]
    assert "logits_indices" in rows.inputs and lm_head(rows).args[0].name.startswith(lm_head(graph).name)
    scaled = [n for n in graph.nodes if n.op == "aten.mul.Tensor" and "embed_scale" in str(n.args)]
    assert len(scaled) == 1 and float(program.params["model.embed_tokens.embed_scale"]) == 8.0
    ids = prompts()[4][None]  # 30 tokens: past the window of 16
    with torch.no_grad():
        ref = lm.model(ids, use_cache=False).logits
        for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64},
                       {"query_pre_attn_scalar": 32}):
            assert rel_err(_variant(tmp_path, "tiny-gemma2", **change)(ids, use_cache=False).logits, ref) > 1e-3, change
    prompt = prompts()[2]
    reference = paged_greedy(Program(graph, program.params), prompt, 24)
    tactics = {op: "triton" for op in ("workbench.paged_attention", "workbench.gelu_mul", "workbench.softcap")}
    assert paged_greedy(Program(graph, program.params, tactics=tactics), prompt, 24) == reference


def _table_of(graph, value):
    """The folded table a cos/sin argument of the attention reads: walked back through views to its lookup."""
    producers = {n.name: n for n in graph.nodes}
    node = producers[value.name]
    while node.op != "aten.embedding.default":
        node = producers[node.args[0].name]
    return node.args[0].name


def test_gemma3_rope_base_per_layer_type_norms_and_windows(built, tmp_path):
    """Gemma 3's RoPE base per layer type: the sliding layer's attention rotates by the local tables (base 10000),
    the global layer's by the global ones (base 1e6, linear scaling x8), each bit for bit transformers' at every
    position; windows 16 then none; the q/k norms' derived fp32 (1 + w) inside the attention, no soft cap; each
    piece matters (changed in transformers, its logits move), and the Triton tactics of the paged attention (q/k
    norms, per-layer tables, window) and GeGLU decode the reference graph's greedy tokens."""
    from workbench.evaluate import paged_greedy
    from workbench.graph.executor import Program

    lm, result = built("tiny-gemma3")
    program, cfg = result.program, lm.model.config
    graph = program.graph
    attention = [n for n in graph.nodes if n.op == "workbench.paged_attention"]
    assert [(n.args[8], n.args[9], n.kwargs.get("softcap")) for n in attention] == [(24 ** -0.5, 16, None),
                                                                                  (24 ** -0.5, None, None)]
    assert all(graph.params[n.kwargs[w].name].spec.dtype == "float32" for n in attention for w in ("q_norm", "k_norm"))
    rotary = lm.model.model.rotary_emb
    positions = torch.arange(cfg.max_position_embeddings)[None]
    for node, layer_type in zip(attention, cfg.layer_types):
        cos, sin = rotary(torch.zeros(1), positions, layer_type)
        assert torch.equal(program.params[_table_of(graph, node.kwargs["cos"])], cos[0])
        assert torch.equal(program.params[_table_of(graph, node.kwargs["sin"])], sin[0])
    assert _table_of(graph, attention[0].kwargs["cos"]) != _table_of(graph, attention[1].kwargs["cos"])
    ids = prompts()[4][None]
    with torch.no_grad():
        ref = lm.model(ids, use_cache=False).logits
        for change in ({"rope_local_base_freq": 1e6}, {"rope_scaling": None}, {"sliding_window": 64}):
            assert rel_err(_variant(tmp_path, "tiny-gemma3", **change)(ids, use_cache=False).logits, ref) > 1e-3, change
    prompt = prompts()[2]
    reference = paged_greedy(Program(graph, program.params), prompt, 24)
    tactics = {op: "triton" for op in ("workbench.paged_attention", "workbench.gelu_mul")}
    assert paged_greedy(Program(graph, program.params, tactics=tactics), prompt, 24) == reference


@pytest.mark.parametrize("name", ["tiny-gemma3"])  # Gemma 3's norms are Gemma 2's and its q/k norms besides
def test_gemma_bf16_fusions_are_exact(name):
    """In bf16 the fusions before the paged attention give the captured graph's logits bit for bit: the (1 + w)
    weights stay fp32 and rms_norm multiplies by them before its one rounding, as Gemma does (1 + w rounded to bf16
    drifted 1.3e-2), fused with the residual adds or not. (The paged attention's reference, a softmax per sequence,
    is not bit-identical to SDPA over the packed batch in bf16.) The whole pipeline's checks (in float32) accept
    every pass, the RoPE tables' fold too, exactly."""
    from workbench.graph.passes import DEFAULT_PIPELINE

    paged = ("insert_paged_attention", "fuse_rope_into_attention", "fuse_qk_norm_into_attention")
    unpaged = optimize(name, dtype="bfloat16", device="cpu", passes=[n for n in DEFAULT_PIPELINE if n not in paged])
    ids = prompts()[4][None]
    out = logits_fn(unpaged.program)(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, unpaged.captured_program()(ids))
    assert {unpaged.graph.params[n].spec.dtype for n in unpaged.graph.params if n.endswith(".plus_one")} == {"float32"}
    result = optimize(name, dtype="bfloat16", device="cpu", check=True)
    assert all(r.accepted for r in result.reports) and result.unfused() == []
    assert next(r for r in result.reports if r.name == "fold_rope_tables").max_rel_err == 0.0


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("fmt,op,limit", [("fp8", "workbench.fp8_linear", 1e-3),
                                          ("int8_sq", "workbench.int8_linear", 1e-3),
                                          ("int8_wo", "workbench.w8_linear", 1e-4)])
def test_gemma_quantizes_in_every_format(built, fmt, op, limit, name):
    """Groups follow Gemma's linears (fused QKV, fused gate/up, o, down); every format rewrites them all and stays
    close. SmoothQuant folds into the derived (1 + w) weights of the input and pre-MLP norms (their only reader is
    the group), never into Gemma 3's q/k norms (inside the attention); with FP8, the GeGLU and the fused post-norm,
    add and next norm write the linears' x already quantized (gelu_mul_fp8, norm_add_rms_norm_fp8), and an FP8 KV
    cache is calibrated on the keys normed and
    rotated as the cache holds them."""
    from workbench.quant import linear_groups, quantize_graph

    _, result = built(name)
    program = result.program
    groups = linear_groups(program.graph)
    assert list(groups) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
    q, plan, stats = _quantized_close_to(program, fmt, op, limit)
    ops = Counter(n.op for n in q.graph.nodes)
    attention = [n for n in q.graph.nodes if n.op == "workbench.paged_attention"]
    if name == "tiny-gemma2":
        assert ops["workbench.softcap"] == 1 and all(n.kwargs["softcap"] == 0.05 for n in attention)
    else:
        assert all(n.kwargs["k_norm"].name.endswith("k_norm.weight.plus_one") for n in attention)
    if fmt == "fp8":  # every linear's x written in FP8 by the op before it (o's by the attention: not yet)
        assert ops["workbench.gelu_mul_fp8"] == 2 and ops["workbench.gelu_mul"] == 0
        assert ops["workbench.norm_add_rms_norm_fp8"] == 3 and ops["workbench.rms_norm_fp8"] == 1
    if fmt == "int8_sq":
        _, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
        assert report["groups"]["layers.0.qkv"]["smoothing"] == "folded into norm"
        assert report["groups"]["layers.0.gate_up"]["smoothing"] == "folded into norm"
        assert "model.layers.0.input_layernorm.weight.plus_one.smooth" in tensors
        assert "model.layers.0.pre_feedforward_layernorm.weight.plus_one.smooth" in tensors
        assert not any("q_norm" in t or "k_norm" in t for t in tensors if t.endswith(".smooth"))


def _quantized_close_to(program, fmt, op, limit):
    """``program`` with every group but lm_head in ``fmt`` (an FP8 KV cache with fp8): each of the 8 layer groups
    runs ``op``, lm_head stays a plain linear, and the logits stay within KL ``limit`` of the unquantized ones."""
    from workbench.quant import PrecisionPlan, calibrate, quantized_program

    torch.manual_seed(1)
    stats = calibrate(program, torch.randint(1, 512, (600,)), samples=4, seq_len=48, progress=False)
    plan = PrecisionPlan.uniform(program.graph, fmt, kv_cache="fp8" if fmt == "fp8" else "bf16")
    q = quantized_program(program, plan, stats)
    ops = Counter(n.op for n in q.graph.nodes)
    assert ops[op] == 8 and ops["aten.linear.default"] == 1  # lm_head stays
    ids = torch.randint(1, 512, (1, 33))
    ref, out = logits_fn(program)(ids), logits_fn(q)(ids)
    kl = torch.nn.functional.kl_div(out[0].log_softmax(-1), ref[0].log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert torch.isfinite(out).all() and 0 < kl < limit
    return q, plan, stats


@pytest.mark.parametrize("fmt,op,limit", [("fp8", "workbench.fp8_linear", 1e-3),
                                          ("int8_sq", "workbench.int8_linear", 1e-3),
                                          ("int8_wo", "workbench.w8_linear", 1e-4)])
def test_qwen3_quantizes_in_every_format(built, fmt, op, limit):
    """Groups follow Qwen3's linears (fused QKV, fused gate/up); every format rewrites them all and stays close.
    The q/k norms are inside the attention: an FP8 KV cache is calibrated on the keys normed and rotated, as the
    cache holds them; SmoothQuant folds into the input norm, never into them."""
    from workbench.quant import linear_groups, quantize_graph

    _, result = built("tiny-qwen3")
    program = result.program
    groups = linear_groups(program.graph)
    assert list(groups) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
    assert groups["layers.1.qkv"].weights == ("model.layers.1.self_attn.qkv_proj.weight",)
    q, plan, stats = _quantized_close_to(program, fmt, op, limit)
    assert all(n.kwargs["k_norm"].name.endswith("k_norm.weight") for n in q.graph.nodes
               if n.op == "workbench.paged_attention")
    if fmt == "int8_sq":
        _, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
        assert report["groups"]["layers.0.qkv"]["smoothing"] == "folded into norm"
        assert "model.layers.0.input_layernorm.weight.smooth" in tensors
        assert not any("q_norm" in t or "k_norm" in t for t in tensors if t.endswith(".smooth"))


@pytest.mark.parametrize("fmt,op,limit", [("fp8", "workbench.fp8_linear", 1e-3),
                                          ("int8_sq", "workbench.int8_linear", 1e-3),
                                          ("int8_wo", "workbench.w8_linear", 1e-4)])
def test_phi3_quantizes_in_every_format(built, fmt, op, limit):
    """Groups follow Phi-3's linears: the checkpoint's packed qkv_proj and gate_up_proj are one group each (one
    weight, not a derived concatenation); every format rewrites them all and stays close."""
    from workbench.quant import linear_groups, quantize_graph

    _, result = built("tiny-phi3")
    program = result.program
    groups = linear_groups(program.graph)
    assert list(groups) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
    assert groups["layers.1.qkv"].weights == ("model.layers.1.self_attn.qkv_proj.weight",)
    assert groups["layers.1.gate_up"].weights == ("model.layers.1.mlp.gate_up_proj.weight",)
    assert [g.kind for g in groups.values()][:4] == ["qkv", "o", "gate_up", "down"]
    _, plan, stats = _quantized_close_to(program, fmt, op, limit)
    if fmt == "int8_sq":
        _, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
        assert report["groups"]["layers.0.qkv"]["smoothing"] == "folded into norm"
        assert report["groups"]["layers.0.gate_up"]["smoothing"] == "folded into norm"


@pytest.mark.parametrize("fmt,op,limit", [("fp8", "workbench.fp8_linear", 1e-3),
                                          ("int8_sq", "workbench.int8_linear", 1e-3),
                                          ("int8_wo", "workbench.w8_linear", 1e-4)])
@pytest.mark.parametrize("name", LN_FAMILIES)
def test_layernorm_families_quantize_in_every_format(built, name, fmt, op, limit):
    """Groups follow the family's linears (GPT-2's c_attn / attn.c_proj / c_fc / mlp.c_proj, read through their
    transposed weights; NeoX's and Falcon's query_key_value / dense / dense_h_to_4h / dense_4h_to_h: qkv, o, fc,
    down); every format rewrites them all and stays close. SmoothQuant folds into
    a LayerNorm's weight and bias where one group reads the norm; an FP8 plan's static x scales make the norms and
    the GELU write fp8."""
    from workbench.quant import linear_groups, quantize_graph

    _, result = built(name)
    program = result.program
    groups = linear_groups(program.graph)
    assert list(groups) == [f"layers.{i}.{k}" for i in (0, 1) for k in ("qkv", "o", "fc", "down")] + ["lm_head"]
    q, plan, stats = _quantized_close_to(program, fmt, op, limit)
    _, tensors, report = quantize_graph(program.graph, dict(program.params), plan, stats)
    if fmt == "int8_sq":  # a norm that two groups read (Falcon-7B's) cannot take either's factors
        folded = "explicit multiply" if name == "tiny-falcon-mqa" else "folded into norm"
        assert [report["groups"][f"layers.0.{k}"]["smoothing"] for k in ("qkv", "o", "fc", "down")] == [
            folded, "explicit multiply", folded, "explicit multiply"]
        smoothed = sum(t.endswith(("weight.smooth", "bias.smooth")) for t in tensors)
        assert smoothed == (0 if name == "tiny-falcon-mqa" else 8)  # weight and bias of 2 norms in 2 layers
    if fmt == "fp8":
        assert [report["groups"][f"layers.1.{k}"]["x_quantized_by"] for k in ("qkv", "o", "fc", "down")] == \
            FP8_PRODUCERS[name]


@pytest.mark.parametrize("name,arch", [("tiny-qwen3", "Qwen3ForCausalLM"), ("tiny-phi3", "Phi3ForCausalLM"),
                                       ("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-neox", "GPTNeoXForCausalLM"),
                                       ("tiny-falcon", "FalconForCausalLM"), ("tiny-gemma2", "Gemma2ForCausalLM"),
                                       ("tiny-gemma3", "Gemma3ForCausalLM")])
def test_fp8_engine_builds_and_generates(tmp_path, capsys, name, arch):
    """`workbench build <preset> --precision fp8`, then `LLM(engine).generate`, on the CPU."""
    import json

    from workbench.cli import main

    out = tmp_path / "engine"
    assert main(["build", name, "--precision", "fp8", "--out", str(out), "--samples", "4", "--seq-len", "32",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    engine = json.loads((out / "engine.json").read_text())
    assert engine["model"]["architecture"] == arch
    outs = LLM(out, device="cpu", num_blocks=32).generate(
        [p.tolist() for p in prompts()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8] * 5
    assert all(0 <= t < 512 for o in outs for t in o.token_ids)


def test_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones(tmp_path, capsys):
    from workbench.cli import main
    from workbench.errors import WorkbenchError

    supported = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, "
                 "GPT2LMHeadModel, GPTNeoXForCausalLM, FalconForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM")
    config = tmp_path / "config.json"
    config.write_text('{"architectures": ["Gemma3nForCausalLM"], "model_type": "gemma3n_text"}')
    assert main(["capture", str(config), str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.rstrip().endswith(f"unsupported architecture 'Gemma3nForCausalLM'; supported: {supported}")
    assert not (tmp_path / "ws").exists()
    moe = "Qwen3MoeForCausalLM"
    with pytest.raises(WorkbenchError, match=f"^unsupported architecture '{moe}'; supported: {supported}$"):
        make_config({**PRESETS["tiny-qwen3"], "architectures": [moe]})


def test_a_pattern_the_passes_do_not_know_runs_on_reference_ops_and_the_build_names_the_layers(tmp_path, capsys):
    """tiny-llama with a GELU-gated MLP (gelu(gate) * up): fuse_silu_mul knows only SwiGLU, so both layers keep
    the gelu and the mul as reference ops; every other fusion (paged attention included, which the runtime needs)
    still matches. The graph matches transformers, greedy tokens are equal, and `workbench build` / `optimize`
    say which layers stayed unfused."""
    import json

    from workbench.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["tiny-llama"], "hidden_act": "gelu"}))
    lm = load_model(str(config))
    assert lm.model.config.hidden_act == "gelu"
    result = optimize(lm.source, device="cpu", check=True)
    assert all(r.accepted for r in result.reports)
    assert result.unfused() == ["fuse_silu_mul matched 0 of 2 layers: layers 0-1 stay unfused (reference ops)"]
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["aten.gelu.default"] == 2 and ops["workbench.silu_mul"] == 0 and ops["workbench.paged_attention"] == 2
    with torch.no_grad():
        def reference(ids):
            return lm.model(ids, use_cache=False).logits

        expected = [greedy(reference, p, 32) for p in prompts()]
        assert [greedy(result.captured_program(), p, 32) for p in prompts()] == expected
        outs = LLM(result.program, num_blocks=32).generate(
            [p.tolist() for p in prompts()], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in outs] == expected
        p = prompts(2)[1][None]
        assert rel_err(logits_fn(result.program)(p), reference(p)) < 1e-4

    out = tmp_path / "engine"
    assert main(["build", str(config), "--precision", "bf16", "--out", str(out), "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert "passes: fuse_silu_mul matched 0 of 2 layers: layers 0-1 stay unfused (reference ops)\n" in log
    assert log.count("stay unfused") == 1
    outs = LLM(out, device="cpu", num_blocks=32).generate(
        [p.tolist() for p in prompts()], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    ws = tmp_path / "ws"
    assert main(["capture", str(config), str(ws)]) == 0 and main(["optimize", str(ws), "--device", "cpu"]) == 0
    assert "fuse_silu_mul matched 0 of 2 layers: layers 0-1 stay unfused (reference ops)\n" in capsys.readouterr().out


def test_gemma2_with_an_exact_gelu_runs_its_mlp_on_reference_ops_and_says_so(tmp_path):
    """Gemma 2 with the exact (erf) GELU and no attention cap: GeGLU is fused only with the tanh GELU, so both
    layers keep gelu and mul as reference ops, named in the unfused lines; the uncapped eager attention still
    fuses (an SDPA reference), and the optimized graph matches transformers."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["tiny-gemma2"], "hidden_activation": "gelu",
                                  "attn_logit_softcapping": None}))
    lm = load_model(str(config))
    result = optimize(lm.source, device="cpu", check=True)
    assert all(r.accepted for r in result.reports)
    assert result.unfused() == ["fuse_silu_mul matched 0 of 2 layers: layers 0-1 stay unfused (reference ops)"]
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["aten.gelu.default"] == 2 and ops["workbench.gelu_mul"] == 0 and ops["workbench.paged_attention"] == 2
    assert all("softcap" not in n.kwargs for n in result.graph.nodes if n.op == "workbench.paged_attention")
    ids = prompts()[4][None]
    with torch.no_grad():
        assert rel_err(logits_fn(result.program)(ids), lm.model(ids, use_cache=False).logits) < 1e-4


@pytest.mark.parametrize("name", ["tiny-gemma3"])  # Gemma 2's directory reads the same way (one kept for time)
def test_gemma_hugging_face_directory_intake(tmp_path, name):
    """A Hugging Face directory of the architecture (transformers' save_pretrained: safetensors with the tied
    lm_head left out, config.json, a tokenizer file): captured and optimized from it, its weights read by name (the
    (1 + w) weights derived from the checkpoint's), the logits equal to transformers' loading the same directory."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path / name
    load_model(name).model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text("{}")
    result = optimize(str(directory), device="cpu", check=True)
    assert result.source.kind == "hf" and all(r.accepted for r in result.reports)
    ids = prompts()[4][None]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(ids, use_cache=False).logits
    assert rel_err(logits_fn(result.program)(ids), ref) < 1e-5


def test_a_layernorm_family_pattern_the_passes_do_not_know_runs_on_reference_ops(tmp_path, capsys):
    """tiny-gpt2 with a ReLU MLP: fuse_gelu knows GELUs only, so both layers keep the relu (a reference op); every
    other GPT-2 fusion matches. Greedy tokens through `LLM` equal transformers', and `workbench build` names the
    layers (the GPT-2 list of layer fusions, not the Llama family's: no line for RMSNorm or RoPE)."""
    import json

    from workbench.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["tiny-gpt2"], "activation_function": "relu"}))
    lm = load_model(str(config))
    result = optimize(lm.source, device="cpu", check=True)
    line = "fuse_gelu matched 0 of 2 layers: layers 0-1 stay unfused (reference ops)"
    assert all(r.accepted for r in result.reports) and result.unfused() == [line]
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["aten.relu.default"] == 2 and ops["workbench.gelu"] == 0 and ops["workbench.add_layer_norm"] == 5
    with torch.no_grad():
        expected = [greedy(lambda ids: lm.model(ids, use_cache=False).logits, p, 32) for p in prompts()]
    outs = LLM(result.program, num_blocks=32).generate(
        [p.tolist() for p in prompts()], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert main(["build", str(config), "--precision", "bf16", "--out", str(tmp_path / "engine"), "--device",
                 "cpu"]) == 0
    log = capsys.readouterr().out
    assert f"passes: {line}\n" in log and log.count("stay unfused") == 1


def test_unfused_lines_name_layer_ranges():
    from workbench.graph.passes import Match, PassReport, unfused_lines

    def report(name, layers, accepted=True):
        return PassReport(name, "", [Match("x", i, [], []) for i in layers], 0, 0, 0, 0, None, accepted)

    reports = [report("fuse_rope", [0, 1, 2, 3, 4, 5]), report("fuse_silu_mul", [1, 2, 4]),
               report("fuse_attention", range(6), accepted=False), report("fuse_qk_norm_into_attention", [])]
    assert unfused_lines(reports, 6) == [
        "fuse_silu_mul matched 3 of 6 layers: layers 0, 3, 5 stay unfused (reference ops)",
        "fuse_attention matched 0 of 6 layers: layers 0-5 stay unfused (reference ops)"]
    assert unfused_lines([report("fuse_rope", [0, 2])], 3) == [
        "fuse_rope matched 2 of 3 layers: layer 1 stays unfused (reference ops)"]


def test_unfused_lines_of_a_family_with_alternatives():
    """A family's list names its own fusions (no line for RMSNorm or RoPE on GPT-2), and an entry with alternatives
    (NeoX's rotary: partial, or whole-head moved into the attention) is met by either in a layer."""
    from workbench.graph.passes import Match, PassReport, unfused_lines

    def report(name, layers):
        return PassReport(name, "", [Match("x", i, [], []) for i in layers], 0, 0, 0, 0, None, True)

    neox = "GPTNeoXForCausalLM"
    assert unfused_lines([report("fuse_partial_rope", [0]), report("fuse_rope_into_attention", [1])], 2, neox) == []
    assert unfused_lines([report("fuse_partial_rope", [0]), report("fuse_rope_into_attention", [])], 2, neox) == [
        "fuse_partial_rope or fuse_rope_into_attention matched 1 of 2 layers: layer 1 stays unfused (reference ops)"]
    assert unfused_lines([report("fuse_rms_norm", []), report("fuse_rope", []), report("fuse_gelu", [0, 1])], 2,
                         "GPT2LMHeadModel") == []


def test_neox_with_a_whole_head_rotary_moves_it_into_the_attention(tmp_path):
    """rotary_pct 1 (a NeoX checkpoint rotating whole heads): the pass-through is empty, so the rotary is a plain
    RoPE, which moves into the paged attention as Llama's does; no layer is reported unfused."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["tiny-neox"], "rotary_pct": 1.0}))
    lm = load_model(str(config))
    result = optimize(lm.source, device="cpu", check=True)
    assert all(r.accepted for r in result.reports) and result.unfused() == []
    moved = next(r for r in result.reports if r.name == "fuse_rope_into_attention")
    assert [m.layer for m in moved.matches] == [0, 1]
    assert not any(n.op == "workbench.partial_rope" for n in result.graph.nodes)
    ids = prompts(2)[1][None]
    with torch.no_grad():
        assert rel_err(logits_fn(result.program)(ids), lm.model(ids, use_cache=False).logits) < 1e-5


def test_falcon_alibi_is_refused_in_one_line():
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="^FalconForCausalLM: ALiBi .* not supported yet"):
        make_config({**PRESETS["tiny-falcon-mqa"], "alibi": True})


def test_longrope_is_refused_in_one_line():
    """LongRoPE (Phi-3-128k, Phi-3.5) is length-dependent in transformers (the long factors for a whole pass once
    its largest position reaches original_max_position_embeddings): refused, naming it."""
    from workbench.errors import WorkbenchError

    rope = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    with pytest.raises(WorkbenchError, match="^Phi3ForCausalLM: LongRoPE .* not supported yet"):
        make_config({**PRESETS["tiny-phi3"], "max_position_embeddings": 2048, "rope_scaling": rope})
