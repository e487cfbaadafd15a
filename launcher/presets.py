"""Named run configurations, the one place they are defined.

Each preset is a partial YAML tree merged over the defaults of `RunConfig`; a config file or --set overrides
merge on top. Architecture numbers for the 1B/7B sizes come from published models (source beside each).
"""
from __future__ import annotations

from typing import Any

# Training section shared by the CPU-sized presets. 200 steps of 16 x 256 tokens (0.8M tokens, about half an
# epoch of the embedded corpus) take about 4 minutes on two idle CPU cores for 'tiny' and bring its validation
# loss to ~5.2 nats, against the corpus's unigram cross-entropy of ~6.6 (measured on the quick start).
_CPU_TRAINING: dict[str, Any] = {
    "batch_size": 16, "gradient_accumulation_steps": 1, "max_steps": 200, "learning_rate": 2e-3,
    "warmup_steps": 20, "weight_decay": 0.1, "eval_interval": 50, "eval_batches": 8, "save_interval": 100,
    "log_interval": 10,
}

PRESETS: dict[str, dict[str, Any]] = {
    # A few M parameters: trains on two CPU cores in a few minutes and reaches a validation loss well
    # below the corpus's unigram entropy. The quick start and the tests use it.
    "tiny": {
        "model_type": "transformer",
        "model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 8192,
                  "max_seq_len": 256, "dropout": 0.0},
        "training": dict(_CPU_TRAINING),
    },
    # The Mamba counterpart of 'tiny': 5.6M parameters (3.5M without embeddings, tiny's 3.0M), two Mamba-2 blocks
    # per Transformer block (as the published Mamba sizes, above); d_state 64 and chunk 64 keep the CPU SSD scan
    # cheap. Same training section as 'tiny'.
    "tiny_mamba": {
        "model_type": "mamba",
        "model": {"d_model": 256, "n_layers": 8, "ssm_type": "mamba2", "d_state": 64, "headdim": 64, "expand": 2,
                  "chunk_size": 64, "vocab_size": 8192, "max_seq_len": 256, "dropout": 0.0},
        "training": dict(_CPU_TRAINING),
    },
    # The hybrid counterpart of 'tiny' and 'tiny_mamba': four layers, the third attention ("MMAM": published hybrids
    # keep attention away from the first layers, e.g. Bamba-9B's layers 9, 18, 27 of 32); Mamba layers shaped as
    # tiny_mamba's, attention as tiny's, a SwiGLU after every mixer as in Bamba. 5.8M parameters, 3.7M without
    # embeddings (tiny 3.0M, tiny_mamba 3.5M). A four-layer model cannot hold the 1-in-8 ratio of the large presets.
    "tiny_hybrid": {
        "model_type": "hybrid",
        "model": {"d_model": 256, "n_layers": 4, "layer_pattern": "MMAM", "n_heads": 4, "n_kv_heads": 2,
                  "ssm_type": "mamba2", "d_state": 64, "headdim": 64, "expand": 2, "chunk_size": 64,
                  "vocab_size": 8192, "max_seq_len": 256, "dropout": 0.0},
        "training": dict(_CPU_TRAINING),
    },
    # ~48M parameters (the original's 'test_small', 50M): quick validation of a real GPU setup.
    "test_small": {
        "model_type": "transformer",
        "model": {"d_model": 512, "n_layers": 10, "n_heads": 8, "vocab_size": 32000, "max_seq_len": 1024},
        "training": {"max_steps": 5000, "learning_rate": 6e-4, "warmup_steps": 200, "bf16": True,
                     "eval_interval": 500, "save_interval": 1000, "tokens_per_step": 262144},
    },
    # TinyLlama-1.1B (Zhang et al. 2024, arXiv:2401.02385, Table 1): 22 layers, d 2048, 32 heads with 4 KV
    # heads, SwiGLU 5632, LLaMA-2 32k vocabulary, 2048 context. 1.10B parameters.
    "1b_transformer": {
        "model_type": "transformer",
        "model": {"d_model": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "ffn_hidden": 5632,
                  "vocab_size": 32000, "max_seq_len": 2048, "tie_embeddings": False},
        "training": {"max_steps": 50000, "learning_rate": 4e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 1048576, "save_interval": 5000},
    },
    # LLaMA-2-7B (Touvron et al. 2023, arXiv:2307.09288, Table 1; HF config.json): 32 layers, d 4096,
    # 32 heads (no GQA at 7B), SwiGLU 11008, 32k vocabulary, 4096 context. 6.74B parameters.
    "7b_transformer": {
        "model_type": "transformer",
        "model": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "ffn_hidden": 11008, "vocab_size": 32000,
                  "max_seq_len": 4096, "tie_embeddings": False},
        "training": {"max_steps": 50000, "learning_rate": 3e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 4194304, "save_interval": 5000},
    },
    # Mamba-2 1.3B (state-spaces/mamba2-1.3b config.json: d_model 2048, n_layer 48, ssm_cfg layer Mamba2 with
    # mamba-ssm's defaults d_state 128, d_conv 4, expand 2, headdim 64, ngroups 1; tied embeddings; Dao & Gu 2024,
    # arXiv:2405.21060, section 9.2). The same 48 x 2048 shape as Mamba-1's mamba-1.4b (Gu & Dao 2023,
    # arXiv:2312.00752, section 4.2): Mamba stacks two blocks per Transformer layer, since one block has ~6 d^2
    # parameters against attention + MLP's ~12 d^2. The original project's "1B Mamba" of d_model 1536 x 24 layers
    # would hold only 0.40B parameters (0.35B without embeddings); 1536 wide is mamba-790m's width, at 48 layers.
    # With this project's 32k vocabulary (the source uses GPT-NeoX's, 50280): 1.31B parameters, 1.24B non-embedding.
    "1b_mamba": {
        "model_type": "mamba",
        "model": {"d_model": 2048, "n_layers": 48, "ssm_type": "mamba2", "d_state": 128, "headdim": 64,
                  "expand": 2, "vocab_size": 32000, "max_seq_len": 2048},
        "training": {"max_steps": 50000, "learning_rate": 4e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 1048576, "save_interval": 5000},
    },
    # Mamba-Codestral-7B (mistralai/Mamba-Codestral-7B-v0.1 params.json: dim 4096, n_layers 64, n_groups 8,
    # untied embeddings, vocabulary 32768; Mamba-2 defaults d_state 128, headdim 64, expand 2, chunk 256).
    # With this project's 32k vocabulary: 7.28B parameters (the source: 7.29B).
    "7b_mamba": {
        "model_type": "mamba",
        "model": {"d_model": 4096, "n_layers": 64, "ssm_type": "mamba2", "d_state": 128, "headdim": 64,
                  "ngroups": 8, "expand": 2, "vocab_size": 32000, "max_seq_len": 4096, "tie_embeddings": False},
        "training": {"max_steps": 50000, "learning_rate": 3e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 4194304, "save_interval": 5000},
    },
    # Granite-4.0-H-1B's shape (ibm-granite/granite-4.0-h-1b config.json, GraniteMoeHybrid with no experts): d 1536,
    # 40 layers of which 5, 15, 25, 35 are attention (1 in 10), SwiGLU 4096, Mamba-2 with 48 heads of 64 (expand
    # 2), d_state 128, one group, conv 4, chunk 256. Differences, ours: 12 attention heads of 128 with 4 KV heads
    # (not read from the source), rotary positions where Granite 4.0-H uses none (NoPE), no muP multipliers, the 32k
    # vocabulary (the source's is 100k). 1.36B parameters, 1.31B without embeddings.
    "1b_hybrid": {
        "model_type": "hybrid",
        "model": {"d_model": 1536, "n_layers": 40, "layer_pattern": [5, 15, 25, 35], "n_heads": 12, "n_kv_heads": 4,
                  "ffn_hidden": 4096, "ssm_type": "mamba2", "d_state": 128, "headdim": 64, "expand": 2,
                  "ngroups": 1, "chunk_size": 256, "vocab_size": 32000, "max_seq_len": 2048},
        "training": {"max_steps": 50000, "learning_rate": 4e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 1048576, "save_interval": 5000},
    },
    # Bamba-9B (ibm-ai-platform/Bamba-9B config.json): d 4096, 32 layers of
    # which 9, 18, 27 are attention (about 1 in 10), 32 heads with 8 KV heads, SwiGLU 14336, Mamba-2 with 128 heads
    # of 64 (expand 2), d_state 128, one group, conv 4, chunk 256, untied embeddings. Ours: rotary over the whole head
    # (Bamba rotates half, partial_rotary_factor 0.5), the 32k vocabulary (the source's is 128k). The nearest
    # published hybrid of this block to 7B: 8.99B parameters with the 32k vocabulary; with its 128,256-token
    # vocabulary the same shape counts 9.78B, the published size, which confirms the numbers above.
    "7b_hybrid": {
        "model_type": "hybrid",
        "model": {"d_model": 4096, "n_layers": 32, "layer_pattern": [9, 18, 27], "n_heads": 32, "n_kv_heads": 8,
                  "ffn_hidden": 14336, "ssm_type": "mamba2", "d_state": 128, "headdim": 64, "expand": 2,
                  "ngroups": 1, "chunk_size": 256, "vocab_size": 32000, "max_seq_len": 4096, "tie_embeddings": False},
        "training": {"max_steps": 50000, "learning_rate": 3e-4, "warmup_steps": 2000, "bf16": True,
                     "tokens_per_step": 4194304, "save_interval": 5000},
    },
}


def _long_context(base: str, max_seq_len: int, *, model: dict[str, Any] = (), training: dict[str, Any] = ()) -> dict:
    """`base` at max_seq_len tokens, the sequence split over as many ranks as the memory plan needs
    (training.sequence_parallel: auto, docs/long_context.md)."""
    tree = PRESETS[base]
    return {**tree, "model": {**tree["model"], "max_seq_len": max_seq_len, **dict(model)},
            "training": {**tree["training"], "sequence_parallel": "auto", **dict(training)}}


# Long-context variants: 16x the context of the 1B presets (32k tokens), one million tokens per step as before.
# The Transformer raises the RoPE base to 500,000 as LLaMA 3 did for long context (Dubey et al. 2024,
# arXiv:2407.21783, section 3.2); Mamba has no positions to rescale.
PRESETS["1b_transformer_32k"] = _long_context("1b_transformer", 32768, model={"rope_theta": 500000.0})
PRESETS["1b_mamba_32k"] = _long_context("1b_mamba", 32768)
# CPU-sized: 'tiny' at 1024 tokens, for the tests and for trying sequence parallelism on 2-4 CPU ranks.
PRESETS["tiny_long"] = _long_context("tiny", 1024, training={"batch_size": 4})
