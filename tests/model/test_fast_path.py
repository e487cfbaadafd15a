"""The GPU fast path beside its references: model construction on a device/dtype, compiled blocks, the fused
optimizer choice, and (on CUDA only, marked gpu) fused RMSNorm, the chunked loss inside the models and Mamba-1's
mamba_inner_fn against the unfused lines they replace."""
from __future__ import annotations

import pytest
import torch

from model import ModelConfig, create_model
from model.compile import block_lists, compile_blocks
from model.registry import create_model_on

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
TINY = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
TINY_MAMBA = dict(model_type="mamba", vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, d_state=8, headdim=16,
                  chunk_size=8)
TINY_HYBRID = dict(model_type="hybrid", layer_pattern="MA", vocab_size=97, max_seq_len=32, d_model=32, n_layers=2,
                   n_heads=4, n_kv_heads=2, d_state=8, headdim=16, chunk_size=8)


@pytest.mark.parametrize("fields", [TINY, TINY_MAMBA, TINY_HYBRID], ids=["transformer", "mamba", "hybrid"])
def test_create_model_on_builds_in_dtype_and_keeps_ties(fields):
    config = ModelConfig(**fields)
    torch.manual_seed(0)
    model = create_model_on(config.model_type, config, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    reference = create_model(config.model_type, config)
    assert [(n, p.shape) for n, p in model.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]  # same tensors, a tied matrix still once
    if config.model_type in ("transformer", "hybrid"):
        assert model.lm_head.weight is model.tok_embeddings.weight
        assert model.rope.cos.dtype == torch.float32  # the rotary tables stay fp32
        torch.testing.assert_close(model.rope.cos, reference.rope.cos)
    else:
        assert model.lm_head.weight is model.backbone.embedding.weight
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, idx)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 1.0


def test_meta_build_costs_no_memory_and_matches_shapes():
    config = ModelConfig(**TINY)
    meta = create_model_on("transformer", config, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = create_model("transformer", config)
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}


@pytest.mark.parametrize("fields", [TINY, TINY_MAMBA], ids=["transformer", "mamba"])  # hybrid: their blocks, 34 s
def test_compiled_blocks_match_eager(fields):
    """Each block compiled in place; aot_eager traces and replays the graphs without needing a C++ toolchain."""
    config = ModelConfig(**fields)
    torch.manual_seed(0)
    eager = create_model(config.model_type, config)
    compiled = create_model(config.model_type, config)
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled, backend="aot_eager") == config.n_layers
    idx = torch.randint(0, 97, (2, 16))
    results = []
    for model in (eager, compiled):
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_compile_refuses_a_model_without_blocks():
    assert block_lists(torch.nn.Linear(2, 2)) == []
    with pytest.raises(ValueError, match="no `layers`"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_fused_optimizer_only_when_planning_for_gpus():
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.hardware import MemoryBudget
    from launcher.planning.plan import choose_plan

    run = build_run_config(preset="tiny")
    for on_cuda, gpu_bytes in ((False, 20 * 2**30), (True, 20 * 2**30)):
        budget = MemoryBudget(gpu_bytes=gpu_bytes, cpu_bytes=64 * 2**30, ranks_per_node=1, on_cuda=on_cuda,
                              source="test")
        plan = choose_plan(run.model, run.training, world_size=1, budget=budget)
        params = build_ds_config(run, plan)["optimizer"]["params"]
        assert params["torch_adam"] is True
        assert params.get("fused", False) is on_cuda


# ---- CUDA only ---------------------------------------------------------------------------------------------------

@gpu
@needs_cuda
def test_fused_rmsnorm_matches_reference_formula_on_gpu():
    x = torch.randn(4, 256, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm = torch.nn.RMSNorm(2048, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=2e-2, atol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("fields", [TINY, TINY_MAMBA, TINY_HYBRID], ids=["transformer", "mamba", "hybrid"])
def test_models_chunked_loss_on_gpu_matches_reference(fields):
    from model.losses import linear_cross_entropy_ref

    config = ModelConfig(**fields)
    torch.manual_seed(0)
    model = create_model_on(config.model_type, config, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 97, (2, 32), device="cuda")
    logits, loss = model(idx, idx)
    assert logits is None  # the logits were never built whole
    if config.model_type in ("transformer", "hybrid"):
        hidden = model._hidden(idx)
    else:
        h = model.backbone.embedding(idx).float()
        for block in model.backbone.layers:
            h = block(h)
        hidden = model.backbone.norm_f(h).to(torch.bfloat16)
    expected = linear_cross_entropy_ref(hidden, model.lm_head.weight, idx)
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)


@gpu
@needs_cuda
def test_mamba1_inner_fn_matches_unfused_reference():
    from model.mamba.ssm_ops import fused_kernel, fused_ops_report, reference_ops

    if fused_kernel("mamba_inner_fn") is None:
        pytest.skip(f"mamba_inner_fn unavailable (nvcc build of mamba-ssm): {fused_ops_report()['mamba_inner_fn']}")
    config = ModelConfig(model_type="mamba", ssm_type="mamba1", vocab_size=97, max_seq_len=256, d_model=64,
                         n_layers=1, d_state=16)
    torch.manual_seed(0)
    mixer = create_model("mamba", config).backbone.layers[0].mixer.cuda()
    u = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    outputs = []
    for context in (torch.enable_grad, reference_ops):
        with context():
            out = mixer(u)
        (grad_u,) = torch.autograd.grad(out.square().sum(), u)
        outputs.append((out.detach(), grad_u))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)
