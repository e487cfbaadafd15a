"""engine/numerics.py on a real DeepSpeed engine (one rank, in-process): the gradient norm where DeepSpeed reports
none (ZeRO-0 in fp32, clipping on and off), and the finite-weights check that guards every commit.

Oracle: the same model and batch run by plain PyTorch, its gradient norm taken with torch.nn.utils.get_total_norm
before any clipping.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.numerics import GradNormProbe, weights_finite


def engine_and_reference(clip: float, zero_stage: int = 0):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    reference = copy.deepcopy(model)
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 2**31 - 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": zero_stage}}
    if clip:
        config["gradient_clipping"] = clip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, reference


def reference_norm(reference: torch.nn.Module, x: torch.Tensor) -> float:
    reference(x).sum().backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))


@pytest.mark.parametrize("clip", [0.0, 0.01], ids=["no clipping", "clipping"])
def test_zero0_fp32_gradient_norm_is_measured_before_clipping(process_group, clip):
    engine, reference = engine_and_reference(clip)
    probe = GradNormProbe(engine)
    assert engine.get_global_grad_norm() is None and probe.active  # DeepSpeed keeps none here
    x = torch.randn(4, 8)
    expected = reference_norm(reference, x)
    assert expected > 0.01  # so clipping would change it
    engine.backward(engine(x).sum())
    engine.step()
    assert probe.read() == pytest.approx(expected, rel=1e-6)


def test_nan_gradients_show_in_the_norm_and_the_weights(process_group):
    engine, _ = engine_and_reference(clip=1.0)
    probe = GradNormProbe(engine)
    first = next(engine.module.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, math.nan))
    loss = engine(torch.randn(4, 8)).sum()
    assert math.isfinite(loss.item())  # the loss alone would not tell
    assert weights_finite(engine)
    engine.backward(loss)
    engine.step()
    assert math.isnan(probe.read())
    assert not weights_finite(engine)


def test_deepspeeds_own_norm_is_used_where_it_has_one(process_group):
    engine, reference = engine_and_reference(clip=0.0, zero_stage=1)
    probe = GradNormProbe(engine)
    assert not probe.active
    x = torch.randn(4, 8)
    expected = reference_norm(reference, x)
    engine.backward(engine(x).sum())
    engine.step()
    assert probe.read() == pytest.approx(expected, rel=1e-5)
