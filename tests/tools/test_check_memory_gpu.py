"""tools/check_memory_gpu.py: its CPU-side parts (cases planned for a GPU, ds_config, the table) and a clean skip
without CUDA. The measurement itself is the script run on a GPU machine (docs/memory.md)."""
from __future__ import annotations

import pytest
import torch

from launcher.planning.hardware import GIB, MemoryBudget
from tools import check_memory_gpu as check
from tools.check_memory_gpu import layout_label

H200 = MemoryBudget(gpu_bytes=139 * GIB, cpu_bytes=128 * GIB, fused_ssm_kernels=False, source="H200 (test)")


def test_cases_are_planned_for_one_large_gpu():
    cases = check.build_cases(H200)
    assert len(cases) == len(check.CASES)
    planned = [c for c in cases if isinstance(c, check.Case)]
    assert len(planned) == len(cases)
    assert {c.run.model.model_type for c in planned} == {"transformer", "mamba"}
    assert any(c.plan.zero_stage == 3 and c.plan.num_checkpointed_blocks == 22 for c in planned)
    assert any(c.plan.num_checkpointed_blocks == 11 and layout_label(c.plan) == "ZeRO-2 +ckpt 11/22"
               for c in planned)
    for case in planned:
        assert case.plan.grad_accum == check.ACCUMULATION and case.plan.memory.gpu_total < 139 * GIB
        zero = check.ds_config_for(case)["zero_optimization"]
        assert zero["reduce_bucket_size"] == check.DEEPSPEED_BUCKET_ELEMENTS["reduce_bucket_size"]


def test_results_table():
    result = check.Result(name="tiny", layout="ZeRO-0", micro_batch=16, predicted_allocated=11 * GIB // 10,
                          measured_allocated=GIB, predicted_reserved=GIB, measured_reserved=GIB,
                          predicted_context=GIB, measured_context=GIB // 2, seconds=3.0)
    text = check.render_results([result], [("7b", "no layout fits")])
    assert "+10.0%" in text and "not planned: no layout fits" in text and "1/1 cases within 10%" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check runs instead")
def test_skips_cleanly_without_cuda(capsys):
    assert check.main([]) == 0
    assert "skipped" in capsys.readouterr().out
