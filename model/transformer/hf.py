"""The Transformer family's facts for Hugging Face `transformers`: it is LlamaForCausalLM.

Same architecture (pre-norm RMSNorm, SwiGLU, grouped-query attention, half-split rotary embeddings, no biases),
so the mapping is names only; every tensor keeps its layout (RotaryEmbedding pairs channel i with i + D/2 like
HF's `rotate_half`, so wq/wk need no permutation). transformers itself is not imported here.
"""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.hf_names import LayerNameMap

HF_ARCHITECTURE = "LlamaForCausalLM"

# (ours, transformers') per block; the rest are whole-model names below.
_BLOCK_NAMES = [("attn_norm.weight", "input_layernorm.weight"), ("attn.wq.weight", "self_attn.q_proj.weight"),
                ("attn.wk.weight", "self_attn.k_proj.weight"), ("attn.wv.weight", "self_attn.v_proj.weight"),
                ("attn.wo.weight", "self_attn.o_proj.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"),
                ("mlp.w1.weight", "mlp.gate_proj.weight"), ("mlp.w3.weight", "mlp.up_proj.weight"),
                ("mlp.w2.weight", "mlp.down_proj.weight")]
_MODEL_NAMES = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                ("lm_head.weight", "lm_head.weight")]
NAMES = LayerNameMap(block=_BLOCK_NAMES, model=_MODEL_NAMES)
to_transformers_name = NAMES.to_hf
from_transformers_name = NAMES.from_hf
to_transformers_state_dict = NAMES.to_hf_state_dict
from_transformers_state_dict = NAMES.from_hf_state_dict


def transformers_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' LlamaConfig describing the same architecture."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
                num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
                max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=config.tie_embeddings,
                initializer_range=config.init_std)


def model_config_from_transformers(hf: dict[str, Any]) -> ModelConfig:
    """A LlamaConfig (as its config.json dict) -> our ModelConfig; ValueError naming each setting this
    Transformer cannot express (biases, another activation, scaled RoPE, a head size other than d/heads)."""
    problems = []
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = {"attention_bias": (hf.get("attention_bias", False), False), "mlp_bias": (hf.get("mlp_bias", False), False),
              "hidden_act": (hf.get("hidden_act", "silu"), "silu"), "rope type": (rope_type, "default"),
              "head_dim": (hf.get("head_dim") or hidden // heads, hidden // heads)}
    for key, (got, supported) in checks.items():
        if got != supported:
            problems.append(f"{key}={got!r} (this project's Transformer supports only {supported!r})")
    if problems:
        raise ValueError("; ".join(problems))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(model_type="transformer", vocab_size=hf["vocab_size"], d_model=hidden,
                       n_layers=hf["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       rope_theta=float(theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_std=hf.get("initializer_range", 0.02))
