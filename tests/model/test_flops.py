"""Each family's stated training FLOPs per token against an independent count: torch's FlopCounterMode over one
forward and backward pass of the real model (it counts matmuls, convolutions and attention, 2 FLOPs per
multiply-add, backward as the ops autograd runs), and for Mamba-1's elementwise scan, which it does not see, the
recurrence's operations counted here."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, create_model
from model.registry import family_costs


def _counted_flops(model: torch.nn.Module, batch: int, seq_len: int, vocab: int) -> int:
    idx = torch.randint(0, vocab, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("fields", [
    dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160),  # grouped-query attention
    dict(d_model=96, n_layers=3, n_heads=6, tie_embeddings=False),  # plain multi-head, untied head
])
def test_transformer_flops_match_flop_counter(fields, monkeypatch):
    """Attention through model/transformer/model.py's reference_attention (explicit q k^T and softmax v matmuls over the
    full T x T square): torch's CPU SDPA kernel is not in FlopCounterMode's registry, and would not count."""
    import model.transformer.model

    monkeypatch.setattr(model.transformer.model, "grouped_query_attention", model.transformer.model.reference_attention)
    config = ModelConfig(model_type="transformer", vocab_size=211, max_seq_len=64, **fields)
    batch, seq_len = 2, 48
    counted = _counted_flops(create_model("transformer", config), batch, seq_len, config.vocab_size)
    stated = family_costs("transformer").training_flops_per_token(config, seq_len) * batch * seq_len
    assert counted == stated


def _training_flops_by_op(model: torch.nn.Module, idx: torch.Tensor) -> dict[str, int]:
    """FlopCounterMode's count per aten op of one forward and backward pass on idx (targets = idx)."""
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("fields", [
    dict(ssm_type="mamba2", d_state=16, headdim=16, chunk_size=16),
    dict(ssm_type="mamba2", d_state=8, headdim=32, ngroups=2, chunk_size=8),
])
def test_mamba2_flops_match_flop_counter(fields):
    """The SSD reference runs exactly the four chunk matmuls per chunk that the formula counts. FlopCounterMode's
    convolution_backward formula ignores `groups` (it counts the depthwise conv's backward as a dense conv, ~conv_dim
    times too much), so the conv's backward is taken as twice its counted forward (grad input + grad weight)."""
    config = ModelConfig(model_type="mamba", vocab_size=211, max_seq_len=64, d_model=64, n_layers=2, **fields)
    batch, seq_len = 2, 32
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    model = create_model("mamba", config)
    by_op = _training_flops_by_op(model, idx)
    assert set(by_op) == {"aten.mm", "aten.bmm", "aten.convolution", "aten.convolution_backward"}
    counted = by_op["aten.mm"] + by_op["aten.bmm"] + 3 * by_op["aten.convolution"]
    stated = family_costs("mamba").training_flops_per_token(config, seq_len) * batch * seq_len
    assert counted == stated


def _selective_scan_forward_flops(d_inner: int, d_state: int) -> int:
    """Multiplies and adds per token of the recurrence model/mamba/selective_scan.py runs (Gu & Dao 2023, Algorithm 2),
    for each channel d and state index n; the exp and the per-channel delta * u (1/N as many) are not counted."""
    ops_per_channel_and_state = {
        "delta * A, the decay's exponent": 1,
        "(delta u) * B, the input": 1,
        "a * h + b, the state update": 2,
        "C * h summed over N, the output": 2,
    }
    return sum(ops_per_channel_and_state.values()) * d_inner * d_state


@pytest.mark.parametrize("fields", [
    dict(d_state=8),
    dict(d_state=16, dt_rank=5, d_conv=3, expand=3, tie_embeddings=False),
])
def test_mamba1_flops_match_flop_counter_and_the_recurrence(fields):
    """FlopCounterMode sees the projections (in_proj, x_proj, dt_proj, out_proj, lm_head: aten.mm) and the conv,
    which must equal the formula's matmul and conv parts exactly; of the scan it sees only the output contraction
    C . h, which model/mamba/selective_scan.py runs as a bmm. The scan term is checked against the recurrence's own
    count (above); training is 3x forward, as for the projections. The conv's backward as in the Mamba-2 test."""
    config = ModelConfig(model_type="mamba", ssm_type="mamba1", vocab_size=211, max_seq_len=64, d_model=64,
                         n_layers=2, **fields)
    batch, seq_len = 2, 32
    tokens = batch * seq_len
    d_inner = config.expand * config.d_model
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    model = create_model("mamba", config)
    by_op = _training_flops_by_op(model, idx)
    assert set(by_op) == {"aten.mm", "aten.bmm", "aten.convolution", "aten.convolution_backward"}
    costs = family_costs("mamba")
    assert by_op["aten.mm"] == 6 * costs.matmul_parameters(config) * tokens
    assert by_op["aten.convolution"] == config.n_layers * costs.conv_forward_flops_per_token(config) * tokens
    scan = _selective_scan_forward_flops(d_inner, config.d_state)
    stated = costs.training_flops_per_token(config, seq_len) * tokens
    assert stated == by_op["aten.mm"] + 3 * by_op["aten.convolution"] + 3 * config.n_layers * scan * tokens

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx)
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.bmm"] == config.n_layers * 2 * d_inner * config.d_state * tokens  # y = C . h


def test_flops_grow_with_sequence_only_through_attention():
    config = ModelConfig(model_type="transformer", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32,
                         n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048)
    costs = family_costs("transformer")
    # PaLM appendix B: 6 N + 12 L H Q T; TinyLlama-1.1B at T = 2048 (N = 1.03B matmul weights incl. lm_head).
    assert costs.training_flops_per_token(config, 2048) - costs.training_flops_per_token(config, 1024) == \
        12 * 22 * 2048 * 1024


@pytest.mark.parametrize("fields", [
    dict(layer_pattern="MAM", n_heads=4, n_kv_heads=2, ffn_hidden=160, d_state=16, headdim=16, chunk_size=16),
    dict(layer_pattern=[0], n_heads=8, ffn_hidden=96, d_state=8, headdim=32, ngroups=2, chunk_size=8,
         tie_embeddings=False),
])
def test_hybrid_flops_match_flop_counter(fields, monkeypatch):
    """Each layer counted as its kind: attention layers as the Transformer's (through reference_attention, which
    FlopCounterMode sees), Mamba layers as Mamba-2's (the conv's backward taken as twice its forward, see above)."""
    import model.transformer.model

    monkeypatch.setattr(model.transformer.model, "grouped_query_attention", model.transformer.model.reference_attention)
    config = ModelConfig(model_type="hybrid", vocab_size=211, max_seq_len=64, d_model=64, n_layers=3, **fields)
    batch, seq_len = 2, 32
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    by_op = _training_flops_by_op(create_model("hybrid", config), idx)
    assert set(by_op) == {"aten.mm", "aten.bmm", "aten.convolution", "aten.convolution_backward"}
    counted = by_op["aten.mm"] + by_op["aten.bmm"] + 3 * by_op["aten.convolution"]
    stated = family_costs("hybrid").training_flops_per_token(config, seq_len) * batch * seq_len
    assert counted == stated
