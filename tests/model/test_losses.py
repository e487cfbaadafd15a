"""model/losses.py: the chunked linear cross-entropy against the plain reference (loss and both gradients)."""
from __future__ import annotations

import pytest
import torch

from model.losses import IGNORE_INDEX, chunked_linear_cross_entropy, linear_cross_entropy_ref, loss_peak_bytes


def _case(dtype, device="cpu", batch=3, seq=37, d=24, vocab=101, ignore=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, generator=gen, dtype=torch.float64).to(device, dtype)
    weight = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 0.3).to(device, dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    if ignore:
        targets[0, :5] = IGNORE_INDEX
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets, **kwargs)
    (loss * 1.7).backward()  # a non-unit upstream gradient, as a loss scale would give
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [1, 16, 111, 4096])  # one row, uneven, exactly all, more than all
def test_chunked_matches_reference_in_float64(chunk_tokens):
    case = _case(torch.float64)
    expected = _loss_and_grads(linear_cross_entropy_ref, *case)
    got = _loss_and_grads(chunked_linear_cross_entropy, *case, chunk_tokens=chunk_tokens)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_chunked_matches_reference_in_float32_and_without_grad():
    case = _case(torch.float32, ignore=False)
    expected = _loss_and_grads(linear_cross_entropy_ref, *case)
    got = _loss_and_grads(chunked_linear_cross_entropy, *case, chunk_tokens=16)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(*case, chunk_tokens=8), expected[0])


def _softmax_calls(fn) -> int:
    """How many softmaxes `fn` runs (the loss itself uses log-softmax; only the gradient takes a softmax)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return sum(1 for event in prof.function_events if event.name == "aten::softmax")


def test_no_gradient_work_under_no_grad():
    """Evaluation runs under torch.no_grad() with weights that still require grad: no backward will come, so no
    gradient may be computed (one softmax per chunk is that work; the reference shows the loss needs none)."""
    hidden, weight, targets = _case(torch.float32)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    chunks = -(-targets.numel() // 16)
    assert _softmax_calls(lambda: chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=16)) == chunks
    with torch.no_grad():
        assert _softmax_calls(lambda: chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=16)) == 0
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=16)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden, weight, targets).detach())


def test_chunked_bf16_close_to_fp32_reference():
    hidden, weight, targets = _case(torch.bfloat16)
    expected = _loss_and_grads(linear_cross_entropy_ref, hidden.float(), weight.float(), targets)
    got = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, chunk_tokens=16)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=1e-2)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g.float(), e, rtol=5e-2, atol=2e-3)


def test_bad_chunk_size_is_an_error():
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(*_case(torch.float32), chunk_tokens=0)


def test_peak_bytes_chunked_stays_bounded():
    """The point of the chunking: the reference grows with V per token, the chunked loss with d_model per token."""
    kwargs = dict(vocab_size=32000, d_model=2048, act_bytes=2)
    full = loss_peak_bytes(tokens=8 * 2048, chunked=False, **kwargs)
    chunked = loss_peak_bytes(tokens=8 * 2048, chunked=True, **kwargs)
    assert full == 8 * 2048 * 32000 * 14
    assert chunked < full / 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_chunked_matches_reference_on_gpu_bf16():
    hidden, weight, targets = _case(torch.bfloat16, device="cuda", batch=4, seq=1024, d=256, vocab=32000)
    expected = _loss_and_grads(linear_cross_entropy_ref, hidden.float(), weight.float(), targets)
    got = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, chunk_tokens=1000)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=1e-2)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g.float(), e, rtol=5e-2, atol=2e-3)
