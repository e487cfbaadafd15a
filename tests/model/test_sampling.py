"""Sampling: top-k/top-p filtering against transformers' logits warpers, and cached (KV cache for the Transformer,
recurrent state for Mamba) sampled decoding against an uncached full recompute drawing the same random numbers."""
from __future__ import annotations

import pytest
import torch

from model import ModelConfig, create_model
from model.sampling import filter_logits, sample_next_token

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (5, None), (7, 0.5), (None, 0.05), (3, 1.0)])
def test_filter_logits_keeps_what_transformers_keeps(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50, dtype=torch.float64) * 3
    expected = logits.clone()
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    torch.testing.assert_close(got[torch.isfinite(got)], logits[torch.isfinite(got)], rtol=0, atol=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.51) == [True, True, False, False]
    assert kept(0.96) == [True, True, True, True]


def sample_by_full_recompute(model, prompt, steps, **sampling):
    """No cache, no state: the whole sequence through forward() for every new token."""
    idx = prompt
    for _ in range(steps):
        logits = model(idx)[0][:, -1]  # (B, V)
        idx = torch.cat((idx, sample_next_token(logits.float(), **sampling)), dim=1)
    return idx


@pytest.mark.parametrize("model_type, extra", [("transformer", {"n_heads": 4, "n_kv_heads": 2}),
                                               ("mamba", {"ssm_type": "mamba2", "headdim": 16, "d_state": 16}),
                                               ("mamba", {"ssm_type": "mamba1", "d_state": 8}),
                                               ("hybrid", {"layer_pattern": "MA", "n_heads": 4, "n_kv_heads": 2,
                                                           "headdim": 16, "d_state": 16})])
def test_cached_sampling_draws_the_same_tokens_as_uncached(model_type, extra):
    config = ModelConfig(model_type=model_type, vocab_size=64, max_seq_len=48, d_model=32, n_layers=2, **extra)
    torch.manual_seed(0)
    model = create_model(model_type, config).double().eval()
    prompt = torch.randint(0, 64, (3, 6))
    sampling = {"temperature": 0.9, "top_k": 20, "top_p": 0.9}
    torch.manual_seed(123)
    cached = model.generate(prompt, 12, **sampling)
    torch.manual_seed(123)
    with torch.no_grad():
        uncached = sample_by_full_recompute(model, prompt, 12, **sampling)
    assert torch.equal(cached, uncached)
    torch.manual_seed(124)
    assert not torch.equal(model.generate(prompt, 12, **sampling), cached)  # the tokens really are sampled
