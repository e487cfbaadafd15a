"""Tests of model/transformer/model.py: shapes, initial loss, learning, causality, attention and RoPE against explicit
references written here, GQA/tied parameter counts, KV-cache generation, gradient checkpointing, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch

import model.block_checkpointing as block_checkpointing
from model import ModelConfig, create_model
from model.transformer.model import (CausalSelfAttention, KVCache, Transformer, grouped_query_attention,
                                     reference_attention)
from tests.model.overfit import overfit_fixed_batch


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return ModelConfig(**(fields | overrides))


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides))


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal mask) v in fp64, written out; k, v already have one head per query head."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def test_output_shapes():
    model = make_model()
    idx = torch.randint(0, 64, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 64) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, 64) and loss.shape == () and loss.dtype == torch.float32


def test_initial_loss_is_near_uniform():
    model = make_model(vocab_size=512)
    idx = torch.randint(0, 512, (4, 32))
    targets = torch.randint(0, 512, (4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


def test_loss_falls_when_overfitting_a_fixed_batch():
    model = make_model()
    initial, final = overfit_fixed_batch(model, steps=40)
    assert final < 0.5 * initial


def test_changing_a_token_changes_only_later_logits():
    model = make_model().eval()
    idx = torch.randint(0, 64, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("enable_gqa", [None, True, False])
def test_sdpa_attention_matches_explicit_softmax(n_kv_heads, enable_gqa):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8)  # (B, H, T, D)
    k, v = torch.randn(2, n_kv_heads, 10, 8), torch.randn(2, n_kv_heads, 10, 8)  # (B, K, T, D)
    groups = 4 // n_kv_heads
    expected = explicit_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
    got = grouped_query_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_attention(q, k, v, is_causal=True).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_attention_layer_matches_complex_rope_reference():
    """Whole layer against RoPE written with complex numbers (Su et al. 2021, eq. 12), pairs (i, i + D/2)."""
    cfg = small_config(n_heads=4, n_kv_heads=2, rope_theta=500.0)
    model = make_model(n_heads=4, n_kv_heads=2, rope_theta=500.0)
    attn: CausalSelfAttention = model.layers[0].attn
    B, T, C, H, K, D = 2, 12, cfg.d_model, 4, 2, cfg.head_dim
    x = torch.randn(B, T, C)
    got = attn(x, model.rope.cos[:T], model.rope.sin[:T])

    angles = torch.arange(T, dtype=torch.float64)[:, None] * 500.0 ** (-torch.arange(0, D, 2) / D)  # (T, D/2)
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, D/2)

    def rope(t):  # (B, heads, T, D)
        halves = torch.complex(t[..., :D // 2].double(), t[..., D // 2:].double()) * rot
        return torch.cat((halves.real, halves.imag), dim=-1)

    xd = x.double()
    q = (xd @ attn.wq.weight.double().T).view(B, T, H, D).transpose(1, 2)
    k = (xd @ attn.wk.weight.double().T).view(B, T, K, D).transpose(1, 2)
    v = (xd @ attn.wv.weight.double().T).view(B, T, K, D).transpose(1, 2)
    y = explicit_attention(rope(q), rope(k).repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1))
    expected = y.transpose(1, 2).reshape(B, T, C) @ attn.wo.weight.double().T
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def expected_num_parameters(cfg: ModelConfig) -> int:
    d, kv_width = cfg.d_model, cfg.kv_heads * cfg.head_dim
    attention = d * d + 2 * d * kv_width + d * d  # wq, wk, wv, wo
    mlp = 3 * d * cfg.ffn_dim  # w1, w3, w2
    per_block = attention + mlp + 2 * d  # two RMSNorm weights
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_block + d  # + final norm


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_gqa_parameter_count(n_kv_heads):
    cfg = small_config(n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden=96)
    model = Transformer(cfg)
    assert model.layers[0].attn.wk.weight.shape == (cfg.kv_heads * cfg.head_dim, cfg.d_model)
    assert model.num_parameters() == expected_num_parameters(cfg)
    model(torch.randint(0, 64, (1, 8)))  # runs


def test_tied_and_untied_parameter_counts():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    assert tied.num_parameters() == expected_num_parameters(tied.config)
    assert untied.num_parameters() == expected_num_parameters(untied.config)
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 64 * 32
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 64 * 32


def test_init_scales_output_projections():
    model = make_model(d_model=128, n_layers=8, ffn_hidden=384, init_std=0.02)
    block = model.layers[3]
    assert block.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.attn.wo, block.mlp.w2):
        assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(128))


def test_rope_tables_are_not_saved_and_stay_fp32():
    model = make_model()
    assert not any("rope" in key or key.endswith(("cos", "sin")) for key in model.state_dict())
    cos = model.rope.cos.clone()
    model.bfloat16()
    assert model.rope.cos.dtype == torch.float32 and torch.equal(model.rope.cos, cos)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    model.to_empty(device="cpu")  # leaves parameters uninitialised; the tables must be rebuilt
    assert torch.equal(model.rope.cos, cos)


def greedy_by_full_recompute(model: Transformer, idx: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(idx[:, -model.config.max_seq_len:])[0]  # (B, T, V)
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt_len, steps", [(5, 20), (10, 30)])  # the second slides past max_seq_len=32
def test_kv_cache_generation_matches_full_recompute(prompt_len, steps):
    model = make_model().eval()
    prompt = torch.randint(0, 64, (2, prompt_len))
    fed = []
    hook = model.tok_embeddings.register_forward_hook(lambda m, inp, out: fed.append(inp[0].size(1)))
    got = model.generate(prompt, steps, temperature=0)
    hook.remove()
    assert torch.equal(got, greedy_by_full_recompute(model, prompt, steps))
    # The prompt, then one token per step while the cache has room, then the whole 32-token window.
    cached = [prompt_len + i for i in range(steps - 1)]  # positions held before each later step
    assert fed == [prompt_len] + [1 if n < 32 else 32 for n in cached]


def test_prefilling_the_cache_in_chunks_matches_one_pass():
    """Later chunks attend to the cache through the bottom-right causal mask."""
    model = make_model().eval()
    idx = torch.randint(0, 64, (2, 20))
    cache = KVCache(model.config, batch_size=2, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        chunks = [model._hidden(idx[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 20))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model._hidden(idx), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="max_seq_len"):
            model._hidden(idx[:, :13], cache)  # 20 + 13 > 32


def test_generate_top_k_one_is_greedy_and_eos_stops():
    model = make_model().eval()
    prompt = torch.randint(0, 64, (1, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    eos = greedy[0, 6].item()  # the third generated token
    stopped = model.generate(prompt, 6, temperature=0, eos_id=eos)
    first_eos = (greedy[0, 4:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, greedy[:, :4 + first_eos + 1])


def _count_checkpointed_blocks(monkeypatch) -> list:
    """The blocks model/block_checkpointing.py hands to torch's checkpoint, in call order."""
    calls = []
    real_checkpoint = block_checkpointing.checkpoint
    monkeypatch.setattr(block_checkpointing, "checkpoint",
                        lambda block, *a, **kw: calls.append(block) or real_checkpoint(block, *a, **kw))
    return calls


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_checkpointing_the_first_blocks_gives_same_loss_and_gradients(num_blocks, monkeypatch):
    """Megatron-LM's block method: the first num_blocks blocks are recomputed, the rest keep their activations;
    the loss and every gradient are those of the model without checkpointing (3 = every block)."""
    calls = _count_checkpointed_blocks(monkeypatch)
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    results = []
    for blocks in (0, num_blocks):
        model = make_model(dropout=0.1, n_layers=3).train()  # dropout: recomputation must replay the same masks
        model.num_checkpointed_blocks = blocks
        torch.manual_seed(1)
        loss = model(idx, targets)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == list(model.layers[:num_blocks])  # the first ones, once each, only when asked
    assert model.gradient_checkpointing is (num_blocks == 3)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_switch_means_every_block_or_none(monkeypatch):
    calls = _count_checkpointed_blocks(monkeypatch)
    model = make_model(n_layers=3).train()
    model.gradient_checkpointing = True
    assert model.num_checkpointed_blocks == 3
    model(torch.randint(0, 64, (1, 8)))
    assert len(calls) == 3
    model.eval()(torch.randint(0, 64, (1, 8)))  # no recomputation outside training
    model.gradient_checkpointing = False
    assert (model.num_checkpointed_blocks, model.gradient_checkpointing) == (0, False)
    model.train()(torch.randint(0, 64, (1, 8)))
    assert len(calls) == 3
    for bad in (4, -1, True, 1.5):
        with pytest.raises(ValueError, match="0-3"):
            model.num_checkpointed_blocks = bad


def test_zero3_init_and_gradient_checkpointing(process_group, monkeypatch):
    """Under deepspeed.zero.Init parameters are partitioned as each module is built: the init must still land,
    and checkpointed blocks must re-gather their parameters in the backward pass."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = small_config(n_layers=4, d_model=64, vocab_size=256)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(cfg)
    assert model.num_parameters() == expected_num_parameters(cfg)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert model.layers[1].attn.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
        assert torch.equal(model.norm.weight, torch.ones(64))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config)
    calls = _count_checkpointed_blocks(monkeypatch)
    idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    results = []
    for blocks in (0, 4, 1):
        engine.module.num_checkpointed_blocks = blocks
        loss = engine(idx, targets=targets)[1]
        engine.backward(loss)
        results.append((loss.item(), {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}))
        engine.optimizer.zero_grad()
    assert calls == [*engine.module.layers, engine.module.layers[0]]
    assert abs(results[0][0] - math.log(256)) < 0.15 and results[1][0] == results[0][0] == results[2][0]
    for name, grad in results[0][1].items():
        assert grad.abs().sum() > 0
        for checkpointed in results[1:]:
            torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-6, atol=1e-7)


def test_dropout_only_in_training():
    model = make_model(dropout=0.2)
    idx = torch.randint(0, 64, (2, 8))
    assert not torch.equal(model.train()(idx)[0], model(idx)[0])
    assert torch.equal(model.eval()(idx)[0], model(idx)[0])


def test_sequence_longer_than_max_seq_len_raises():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_checkpoint_round_trip_with_original_load_snippet(tmp_path):
    cfg = small_config(tie_embeddings=False)
    model = create_model(cfg.model_type, cfg).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"config": cfg.model_dump(), "model_state_dict": model.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)
    loaded_cfg = ModelConfig(**ckpt["config"])
    loaded = create_model(loaded_cfg.model_type, loaded_cfg)
    loaded.load_state_dict(ckpt["model_state_dict"])
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 FlashAttention path)")
def test_bf16_cuda_matches_fp32_reference():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 128, 64, device="cuda")  # (B, H, T, D)
    k, v = torch.randn(2, 2, 128, 64, device="cuda"), torch.randn(2, 2, 128, 64, device="cuda")  # (B, K, T, D)
    expected = reference_attention(q, k, v, is_causal=True)
    got = grouped_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)

    model = make_model(d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=64).cuda().eval()
    idx = torch.randint(0, 64, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_bf16 = model(idx)[0]
    torch.testing.assert_close(logits_bf16.float(), model(idx)[0], rtol=5e-2, atol=5e-2)
