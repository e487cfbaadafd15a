"""model/transformer/rotary.py: the fused rotary op against its reference (values, gradients, what autograd saves), eager on
CPU, through torch.compile on CPU (slow: Inductor's C++ build) and on CUDA (marked gpu)."""
from __future__ import annotations

import pytest
import torch

import model.transformer.rotary as rotary
import model.transformer.model as transformer_module
from model import ModelConfig, create_model
from model.transformer.rotary import apply_rotary, apply_rotary_fused
from model.transformer.model import RotaryEmbedding

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def _inputs(dtype: torch.dtype, seq_len: int = 24, start: int = 5, device: str = "cpu", heads: int = 4):
    """q-like x (B, H, T, D) as the model makes it (a transposed view of a linear's output) and the table slices
    of positions start..start+T-1."""
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64, theta=500.0).to(device)
    x = torch.randn(2, seq_len, heads, 16, device=device).to(dtype).transpose(1, 2).requires_grad_()  # (B, H, T, D)
    return x, rope.cos[start:start + seq_len], rope.sin[start:start + seq_len]


def _value_and_grad(fn, x, cos, sin, grad_out):
    x = x.detach().requires_grad_()
    out = fn(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_bit_for_bit_on_cpu(dtype):
    """Eager on CPU the fused op runs the reference's ops; its backward, the rotation by -theta, multiplies and adds
    the same numbers as autograd does (a - (-b) == a + b and (-a) b == a (-b) exactly), so even the gradients are
    equal, not merely close: CPU training stays bit-identical."""
    x, cos, sin = _inputs(dtype)
    grad_out = torch.randn_like(x)
    assert rotary.use_compiled(x) is False
    out, grad = _value_and_grad(apply_rotary_fused, x, cos, sin, grad_out)
    ref_out, ref_grad = _value_and_grad(apply_rotary, x, cos, sin, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_rotation_preserves_norms_and_backward_undoes_it():
    x, cos, sin = _inputs(torch.float32)
    x = x.detach()
    rotated = apply_rotary(x, cos, sin)

    def squared_pair_norms(t):  # |(t_i, t_{i+D/2})|^2, (B, H, T, D/2)
        return t.unflatten(-1, (2, -1)).pow(2).sum(-2)

    torch.testing.assert_close(squared_pair_norms(rotated), squared_pair_norms(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rotary._rotate_back(rotated, cos, sin), x, rtol=1e-5, atol=1e-6)


def _saved_tensors(fn, x, cos, sin) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x, cos, sin)
    return saved


@pytest.mark.parametrize("fn", [apply_rotary, apply_rotary_fused], ids=["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_saves_only_the_tables(fn, dtype):
    """What model/transformer/costs.py counts for the rotary: nothing per token. Both ops keep only the cos/sin
    slices, views of the tables (mul saves the other operand, and only the table's side needs no gradient), not
    x or an fp32 copy of it."""
    x, cos, sin = _inputs(dtype)
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    saved = _saved_tensors(fn, x, cos, sin)
    assert saved and {t.untyped_storage().data_ptr() for t in saved} <= tables


def test_fused_refuses_tables_that_want_a_gradient():
    x, cos, sin = _inputs(torch.float32)
    with pytest.raises(ValueError, match="no gradient"):
        apply_rotary_fused(x, cos.clone().requires_grad_(), sin)


def test_model_with_the_fused_op_equals_the_model_with_the_reference(monkeypatch):
    """The whole Transformer on CPU: loss and every gradient bit-identical to the model calling apply_rotary."""
    config = ModelConfig(vocab_size=97, max_seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    idx = torch.randint(0, 97, (2, 32))
    results = []
    for fn in (apply_rotary_fused, apply_rotary):
        monkeypatch.setattr(transformer_module, "apply_rotary_fused", fn)
        torch.manual_seed(0)
        model = create_model("transformer", config).to(torch.bfloat16)
        _, loss = model(idx, idx)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def _check_compiled_against_reference(device: str) -> None:
    """Through torch.compile (the CUDA path): fp32 to rounding (Inductor may fuse a multiply-add), bf16 to bf16
    rounding; new sequence lengths reuse the compiled graphs (dynamic shapes)."""
    from torch._dynamo.utils import counters

    for dtype, tolerance in ((torch.float32, dict(rtol=1e-6, atol=1e-6)), (torch.bfloat16, {})):
        for seq_len, heads in ((24, 4), (24, 2), (40, 4), (17, 2)):
            if (seq_len, heads) == (40, 4):
                graphs = counters["stats"]["unique_graphs"]
            x, cos, sin = _inputs(dtype, seq_len, device=device, heads=heads)
            grad_out = torch.randn_like(x)
            out, grad = _value_and_grad(apply_rotary_fused, x, cos, sin, grad_out)
            ref_out, ref_grad = _value_and_grad(apply_rotary, x, cos, sin, grad_out)
            torch.testing.assert_close(out, ref_out, **tolerance)
            torch.testing.assert_close(grad, ref_grad, **tolerance)
        assert counters["stats"]["unique_graphs"] == graphs, "a new length or head count compiled a new graph"
    assert rotary._compile_failure is None, rotary._compile_failure


@pytest.mark.slow
def test_compiled_rotation_matches_reference_on_cpu(monkeypatch):
    """The compiled path forced on CPU (Inductor's C++ backend; ~30-60 s of compiling on 2 cores, hence slow)."""
    monkeypatch.setattr(rotary, "use_compiled", lambda x: not torch.compiler.is_compiling())
    monkeypatch.setattr(rotary, "_compiled", {})
    _check_compiled_against_reference("cpu")


@gpu
@needs_cuda
def test_compiled_rotation_matches_reference_on_gpu():
    x, cos, sin = _inputs(torch.bfloat16, device="cuda")
    assert rotary.use_compiled(x)
    _check_compiled_against_reference("cuda")
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in _saved_tensors(apply_rotary_fused, x, cos, sin)} <= tables
