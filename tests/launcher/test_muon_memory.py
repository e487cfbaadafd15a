"""The memory plan's optimizer bytes with Muon, against the states a real DeepSpeed engine holds after one step
(one CPU rank, fp32, ZeRO 0-3): Muon's momentum for the hidden matrices, Adam's two moments for the rest."""
from __future__ import annotations

import pytest
import torch

from launcher.config import build_run_config
from launcher.planning import model_sizes
from launcher.planning.memory import Layout, estimate_memory, optimizer_state_bytes
from tests.conftest import SMALL_MODEL


def engine_optimizer_state_bytes(stage: int) -> tuple[int, int]:
    """(bytes of every tensor in the optimizer's state after one step, including ZeRO-1/2's staged Muon momentum;
    number of parameters) for the SMALL_MODEL tiny model with Muon."""
    import deepspeed

    from engine.optimizer import optimizer_arguments
    from model import create_model

    run = build_run_config(preset="tiny", overrides=[*SMALL_MODEL, "training.optimizer=muon"])
    torch.manual_seed(0)
    model = create_model(run.model.model_type, run.model)
    zero = {"stage": stage, **({"reduce_scatter": False} if stage == 3 else {})}
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": zero,
        "steps_per_print": 2**31 - 1}, **optimizer_arguments(model, run.training, on_cuda=False))
    batch = torch.randint(0, run.model.vocab_size, (1, 17))
    _, loss = engine(batch[:, :-1], batch[:, 1:])
    engine.backward(loss)
    engine.step()
    inner = engine.optimizer.optimizer if stage else engine.optimizer
    tensors = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    if stage in (1, 2):
        tensors += [staged for staged, _ in engine.optimizer._muon_pending_momentum.values()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    engine.destroy()
    return total, run


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_planned_optimizer_bytes_are_what_deepspeed_holds(process_group, stage):
    held, run = engine_optimizer_state_bytes(stage)
    muon, largest = model_sizes.muon_stats(run.model)
    total = model_sizes.count_parameters(run.model)
    layout = Layout(world_size=1, zero_stage=stage, precision="fp32", optimizer="muon")
    assert optimizer_state_bytes(total, layout, muon_params=muon, largest_muon=largest) == held
    adamw = optimizer_state_bytes(total, Layout(world_size=1, zero_stage=stage, precision="fp32"))
    if stage in (1, 2):  # a committed and a staged momentum, each in the gradient's dtype (fp32 here): no saving
        assert held == adamw
    else:
        assert held < adamw  # one fp32 momentum instead of two fp32 moments on most parameters


def test_dry_run_plan_counts_muon():
    """1b_transformer on 8 x 80 GB: Muon's optimizer column is below AdamW's by what the momentum saves."""
    run = build_run_config(preset="1b_transformer", overrides=["training.optimizer=muon"])
    muon, largest = model_sizes.muon_stats(run.model)
    total = model_sizes.count_parameters(run.model)
    for stage in (0, 3):
        layouts = {opt: Layout(world_size=8, zero_stage=stage, precision="bf16", optimizer=opt, seq_len=2048)
                   for opt in ("adamw", "muon")}
        adamw, with_muon = (estimate_memory(run.model, layouts[opt]).model_states.optimizer_states
                            for opt in ("adamw", "muon"))
        share = 1 if stage == 0 else 8
        assert adamw - with_muon == pytest.approx(muon * 4 / share, rel=1e-3)  # 8 - 4 bytes per Muon parameter
    assert 0.5 * total < muon < total and largest > 0
