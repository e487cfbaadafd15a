"""The hybrid family's facts for Hugging Face `transformers`: it is BambaForCausalLM.

Same layers (pre-norm RMSNorm, Mamba-2 with mamba-ssm's parameter layout, grouped-query attention with half-split
rotary embeddings, a SwiGLU MLP after every mixer, no biases), so the mapping is names only. Bamba's traps, each
pinned here:
- rotary embeddings: BambaConfig forces `partial_rotary_factor` 0.5 (rotate half of each head) unless
  `rope_parameters` carries its own; this project's attention (model/transformer/model.py) rotates the whole head, so
  the export writes partial_rotary_factor 1.0 into rope_parameters and the import refuses any other value;
- `time_step_limit`: our SSD scan does not clamp dt, so only (0, inf), Bamba's default, maps;
- `mamba_proj_bias` False, `mamba_conv_bias` True, `attention_bias` / `mlp_bias` False, `hidden_act` silu;
- `pad_token_id`: Bamba's embedding takes it as padding_idx (0 by default), which freezes that row's gradient;
  the exporter and the throughput peer set it to None.
transformers itself is not imported here.
"""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.hf_names import LayerNameMap
from model.hybrid.config import attention_layers

HF_ARCHITECTURE = "BambaForCausalLM"
HF_CONFIG_CLASS = "BambaConfig"

# (ours, transformers') inside a layer; Mamba-2 names are the same on both sides below `mamba.`.
_BLOCK_NAMES = [("mixer_norm.weight", "input_layernorm.weight"), ("attn.wq.weight", "self_attn.q_proj.weight"),
                ("attn.wk.weight", "self_attn.k_proj.weight"), ("attn.wv.weight", "self_attn.v_proj.weight"),
                ("attn.wo.weight", "self_attn.o_proj.weight"), ("mlp_norm.weight", "pre_ff_layernorm.weight"),
                ("mlp.w1.weight", "feed_forward.gate_proj.weight"), ("mlp.w3.weight", "feed_forward.up_proj.weight"),
                ("mlp.w2.weight", "feed_forward.down_proj.weight")]
_MAMBA_NAMES = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                "out_proj.weight"]
_BLOCK_NAMES += [(f"mamba.{name}", f"mamba.{name}") for name in _MAMBA_NAMES]
_MODEL_NAMES = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.final_layernorm.weight"),
                ("lm_head.weight", "lm_head.weight")]
NAMES = LayerNameMap(block=_BLOCK_NAMES, model=_MODEL_NAMES)
to_transformers_name = NAMES.to_hf
from_transformers_name = NAMES.from_hf
to_transformers_state_dict = NAMES.to_hf_state_dict
from_transformers_state_dict = NAMES.from_hf_state_dict


def transformers_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' BambaConfig describing the same architecture."""
    d_inner = config.expand * config.d_model
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
                num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                num_key_value_heads=config.kv_heads, hidden_act="silu", rms_norm_eps=config.norm_eps,
                max_position_embeddings=config.max_seq_len, attn_layer_indices=attention_layers(config),
                mamba_n_heads=d_inner // config.headdim, mamba_d_head=config.headdim, mamba_n_groups=config.ngroups,
                mamba_d_state=config.d_state, mamba_d_conv=config.d_conv, mamba_expand=config.expand,
                mamba_chunk_size=config.chunk_size, mamba_conv_bias=True, mamba_proj_bias=False,
                time_step_limit=(0.0, float("inf")), attention_bias=False, mlp_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
                tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std)


def _float(x: Any) -> float:
    # transformers writes inf into config.json as {"__float__": "Infinity"} (JSON has no infinity).
    return float(x["__float__"]) if isinstance(x, dict) else float(x)


def model_config_from_transformers(hf: dict[str, Any]) -> ModelConfig:
    """A BambaConfig (as its config.json dict) -> our ModelConfig; ValueError naming each setting this hybrid
    cannot express."""
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    expand = hf.get("mamba_expand", 2)
    rope = hf.get("rope_parameters") or {}
    mamba_heads = hf.get("mamba_n_heads", 128)
    d_head = hf.get("mamba_d_head", "auto")
    d_head = expand * hidden // mamba_heads if d_head == "auto" else d_head
    limit = [_float(x) for x in (hf.get("time_step_limit") or (0.0, float("inf")))]
    checks = {"attention_bias": (hf.get("attention_bias", False), False), "mlp_bias": (hf.get("mlp_bias", False), False),
              "mamba_proj_bias": (hf.get("mamba_proj_bias", False), False),
              "mamba_conv_bias": (hf.get("mamba_conv_bias", True), True),
              "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
              "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
              # BambaConfig's own default is 0.5 (rotate half of each head); ours rotates all of it.
              "partial_rotary_factor": (rope.get("partial_rotary_factor", 0.5), 1.0),
              "head_dim": (hf.get("head_dim") or hidden // heads, hidden // heads),
              "mamba_n_heads * mamba_d_head": (mamba_heads * d_head, expand * hidden),
              "time_step_limit": (limit, [0.0, float("inf")])}
    problems = [f"{key}={got!r} (this project's hybrid supports only {supported!r})"
                for key, (got, supported) in checks.items() if got != supported]
    if problems:
        raise ValueError("; ".join(problems))
    return ModelConfig(model_type="hybrid", vocab_size=hf["vocab_size"], d_model=hidden,
                       n_layers=hf["num_hidden_layers"], layer_pattern=sorted(hf.get("attn_layer_indices") or []) or "M",
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                       ffn_hidden=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                       norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(rope.get("rope_theta", 10000.0)),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       init_std=hf.get("initializer_range", 0.02), ssm_type="mamba2", d_state=hf.get("mamba_d_state", 256),
                       d_conv=hf.get("mamba_d_conv", 4), expand=expand, headdim=d_head,
                       ngroups=hf.get("mamba_n_groups", 1), chunk_size=hf.get("mamba_chunk_size", 256))
