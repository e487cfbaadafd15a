"""The memory plan's tiled MLP and tiled loss terms (training.tiled_mlp / tiled_loss, model/tiling.py) against the
tensors autograd really saves, measured as tests/launcher/test_memory.py measures the untiled ones."""
from __future__ import annotations

import pytest
import torch

from launcher.planning import model_sizes
from launcher.planning.memory import DTYPE_BYTES, Layout, estimate_memory
from model import ModelConfig, create_model
from model.tiling import configure_tiling
from tests.launcher.test_memory import _saved_bytes

CASES = [
    ("transformer", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160)),
    ("hybrid", dict(layer_pattern="MA", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, d_state=16,
                    headdim=16, ngroups=2, chunk_size=32)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type,fields", CASES)
def test_tiled_blocks_save_the_stated_bytes(model_type, fields, dtype, native_linear):
    """Every block (both hybrid kinds) untiled saves layer bytes, tiled 4 ffn x bytes per token less."""
    config = ModelConfig(model_type=model_type, vocab_size=256, max_seq_len=128, **fields)
    torch.manual_seed(0)
    model = create_model(model_type, config).to(dtype)
    batch, seq_len = 2, 128
    ab = DTYPE_BYTES["fp32" if dtype == torch.float32 else "bf16"]
    x = torch.randn(batch, seq_len, config.d_model, requires_grad=True, dtype=dtype)
    cos, sin = model.rope.cos[:seq_len], model.rope.sin[:seq_len]
    stated = model_sizes.activation_bytes_per_layer(config, ab, seq_len=seq_len, on_cuda=False)
    saved, _ = model_sizes.tiled_mlp_bytes(config, ab, tokens=batch * seq_len, tile_tokens=batch * seq_len // 4)
    assert saved == 4 * config.ffn_dim * ab
    for block, per_token in zip(model.layers, stated):
        untiled = _saved_bytes(model, lambda: block(x, cos, sin))
        configure_tiling(model, tiled_mlp=4)
        tiled = _saved_bytes(model, lambda: block(x, cos, sin))
        configure_tiling(model, tiled_mlp=False)
        assert untiled == pytest.approx(batch * seq_len * per_token, rel=0.01)
        assert tiled == pytest.approx(batch * seq_len * (per_token - saved), rel=0.01)


def test_plan_counts_tiled_mlp_and_tiled_loss_as_the_whole_model_saves(native_linear):
    """Whole model, bf16 on CPU, tiled MLP and chunked loss: autograd keeps the tiled blocks, the head and the chunked
    loss's grad-hidden (d per token) and grad-W (V x d); the plan's activations hold that plus one block's backward
    workspace and the tile's, and its logits term covers what the chunked loss keeps."""
    config = ModelConfig(model_type="transformer", vocab_size=512, d_model=128, n_layers=3, n_heads=4,
                         n_kv_heads=2, ffn_hidden=320, max_seq_len=256)
    model = create_model("transformer", config).to(torch.bfloat16)
    batch, seq_len, ab = 2, 256, 2
    tokens = batch * seq_len
    idx = torch.randint(0, 512, (batch, seq_len))
    untiled_measured = _saved_bytes(model, lambda: model(idx, idx))
    configure_tiling(model, tiled_mlp=True, tiled_loss=True)  # true: ceil(256 / 128) = 2 tiles
    measured = _saved_bytes(model, lambda: model(idx, idx))

    layer = model_sizes.layer_activation_bytes(config, ab, seq_len=seq_len, on_cuda=False)
    head = model_sizes.head_activation_bytes(config, ab, on_cuda=False)
    saved, workspace = model_sizes.tiled_mlp_bytes(config, ab, tokens=tokens, tile_tokens=tokens // 2)
    loss_kept = tokens * config.d_model * ab + config.vocab_size * config.d_model * ab
    # The chunked loss saves its gradients instead of lm_head's input (d per token) and the int64 targets.
    head = head - config.d_model * ab - 8
    untiled_head = head + config.d_model * ab + 8
    assert untiled_measured == pytest.approx(tokens * (3 * layer + untiled_head + 4 * config.vocab_size), rel=0.01)
    assert measured == pytest.approx(tokens * (3 * (layer - saved) + head) + loss_kept, rel=0.01)

    base = dict(world_size=1, zero_stage=0, precision="bf16", micro_batch=batch, seq_len=seq_len, on_cuda=False)
    untiled, tiled = estimate_memory(config, Layout(**base)), estimate_memory(
        config, Layout(**base, tiled_mlp=True, tiled_loss=True))
    blocks_and_head = measured - loss_kept + tokens * (config.d_model * ab + 8)  # head as the plan counts it
    assert blocks_and_head + workspace < tiled.activations <= blocks_and_head + workspace + tokens * (layer - saved)
    # The drop: what the blocks no longer save (measured), plus the smaller backward workspace, less the tile's.
    assert untiled.activations - tiled.activations == pytest.approx(
        (untiled_measured - tokens * 4 * config.vocab_size) - blocks_and_head + tokens * saved - workspace, rel=0.01)
    assert loss_kept < tiled.logits  # (at 512 tokens, one chunk, both loss terms happen to equal 3.5 MiB)
    long = dict(base, seq_len=8192, micro_batch=1)
    assert (estimate_memory(config, Layout(**long, tiled_loss=True)).logits
            < estimate_memory(config, Layout(**long)).logits / 2)
