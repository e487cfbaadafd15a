"""CPU offload through the real Trainer (CPU, gloo, one rank): ZeRO-2 with the optimizer offloaded to
DeepSpeedCPUAdam, and ZeRO-3 with the optimizer and the parameters offloaded. Each run must really offload, lower
the loss, resume bit-exactly after a crash, export the live fp32 weights and match a run without offload.

The first test JIT-builds DeepSpeed's cpu_adam op with ninja (38 s on two idle cores, over 2 minutes on a busy
machine; once per TORCH_EXTENSIONS_DIR, which tests/conftest.py keeps in the repository, clearing stale locks).
"""
from __future__ import annotations

import pytest
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from engine.checkpoint.manager import latest_tag
from launcher.planning.memory import STAGE3_PARAM_PERSISTENCE_THRESHOLD
from model import ModelConfig, create_model
from tests.conftest import wait_for_build_locks
from tests.engine.test_trainer import make_crashing_trainer, make_trainer, params_of

STEPS = 7
CASES = [pytest.param(2, "optimizer", "fp32", id="zero2-optimizer-fp32"),
         pytest.param(3, "optimizer+params", "bf16", id="zero3-optimizer+params-bf16")]


@pytest.fixture(scope="module", autouse=True)
def no_dead_build_lock():
    """torch waits forever on a cpu_adam lock a killed build left behind; wait for a live build instead."""
    wait_for_build_locks()


def offload_trainer(tmp_path, data_cache, stage: int, offload: str, precision: str, *, crash: bool = False):
    extra = [f"training.offload={offload}", f"training.bf16={precision == 'bf16'}"]
    make = make_crashing_trainer if crash else make_trainer
    return make(tmp_path, data_cache, zero_stage=stage, max_steps=STEPS, extra=extra)


def assert_really_offloaded(engine, stage: int, offload: str) -> None:
    """What DeepSpeed built, not what the config asked for (on a CPU host every tensor is in host RAM anyway)."""
    zero = engine.optimizer
    assert isinstance(zero.optimizer, DeepSpeedCPUAdam), type(zero.optimizer)
    assert engine.zero_cpu_offload()
    if stage == 2:
        assert zero.cpu_offload
        assert all(t.device.type == "cpu" for t in zero.single_partition_of_fp32_groups)
    else:
        assert zero.offload_optimizer and zero.offload_param == (offload == "optimizer+params")
        assert engine.zero_offload_param() is not None and engine.zero_offload_param().device == "cpu"
        assert zero.parameter_offload.offload_device == "cpu"  # None without parameter offload
        params = list(engine.module.parameters())
        assert all(p.ds_tensor.device.type == "cpu" for p in params)
        # Between uses the parameters are partitioned: no full weight is held outside the persistent small ones.
        large = [p for p in params if p.ds_numel >= STAGE3_PARAM_PERSISTENCE_THRESHOLD]
        assert large and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in large)


@pytest.mark.parametrize("stage,offload,precision", CASES)
def test_offload_trains_resumes_exactly_and_exports(tmp_path, data_cache, process_group, stage, offload, precision):
    straight = offload_trainer(tmp_path / "a", data_cache, stage, offload, precision)
    straight.setup()
    assert straight.engine.zero_optimization_stage() == stage
    assert_really_offloaded(straight.engine, stage, offload)
    initial = straight.evaluate()
    result = straight.train()
    assert result.final_step == STEPS
    assert result.final_val_loss < initial - 0.25, (initial, result.final_val_loss)  # 9.02 -> 8.69 seen
    assert_really_offloaded(straight.engine, stage, offload)
    expected = params_of(straight)

    # final_model.pt holds exactly the live fp32 master weights (in DeepSpeedCPUAdam's host partition).
    ckpt = torch.load(result.final_model_path, weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["run_config"]["training"]["offload"] == offload
    model = create_model("transformer", ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model_state_dict"])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)

    # A crash after the step-3 checkpoint, then a resume, ends with the uninterrupted run's weights, bit for bit.
    interrupted = offload_trainer(tmp_path / "b", data_cache, stage, offload, precision, crash=True)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert latest_tag(tmp_path / "b" / "ckpt") == "checkpoint_step_3"
    resumed = offload_trainer(tmp_path / "b", data_cache, stage, offload, precision)
    resumed.setup()
    assert resumed.step == 3
    assert_really_offloaded(resumed.engine, stage, offload)
    resumed.train()
    got = params_of(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)

    # The same run without offload (torch AdamW in place of DeepSpeedCPUAdam) does the same math.
    reference = offload_trainer(tmp_path / "c", data_cache, stage, "none", precision)
    reference_result = reference.train()
    assert not isinstance(reference.engine.optimizer.optimizer, DeepSpeedCPUAdam)
    assert_same_training(expected, params_of(reference), precision)
    assert result.final_val_loss == pytest.approx(reference_result.final_val_loss, abs=1e-3)  # 1e-5 seen


def assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], precision: str) -> None:
    """fp32: every weight agrees to rounding. bf16: a 16-bit weight that rounds the other way changes later
    gradients, so ~1-10% of the elements differ slightly; the whole tensor still agrees to 1e-3 relative (4e-4
    seen), where skipping weight decay alone would move it by ~1.5e-3 (0.1 x the sum of the learning rates) and a
    lost update by far more."""
    for name in want:
        if precision == "fp32":
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            relative = float((got[name] - want[name]).norm() / want[name].norm())
            assert relative < 1e-3, (name, relative)
