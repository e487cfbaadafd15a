"""tools/gpu_report.py: nccl-tests' bus bandwidth, a real gloo all-reduce between two processes, the plan advice
against launcher.planning.plan, and the output with and without a GPU."""
from __future__ import annotations

import pytest
import torch

from engine.diagnostics.allreduce_bandwidth import bus_bandwidth, run_all_reduce_benchmark
from launcher.advice import plan_advice
from launcher.config import build_run_config
from launcher.planning.hardware import GIB, MemoryBudget
from launcher.planning.plan import choose_plan
from tools import gpu_report


@pytest.mark.parametrize("ranks, factor", [(2, 1.0), (4, 1.5), (8, 1.75)])
def test_bus_bandwidth_is_nccl_tests_factor(ranks, factor):
    # nccl-tests doc/PERFORMANCE.md: all-reduce busbw = algbw * 2(n-1)/n.
    assert bus_bandwidth(10.0, ranks) == pytest.approx(10.0 * factor)


@pytest.mark.slow
def test_gloo_all_reduce_between_two_processes():
    results = run_all_reduce_benchmark(2, [4096, 65536], backend="gloo", iterations=3, timeout_s=300)
    assert [r.size_bytes for r in results] == [4096, 65536]
    for r in results:
        assert r.seconds > 0
        assert r.algbw_gbps == pytest.approx(r.size_bytes / r.seconds / 1e9)
        assert r.busbw_gbps == pytest.approx(r.algbw_gbps)  # 2(n-1)/n = 1 for two ranks


def test_advice_is_the_launchers_plan():
    budget = MemoryBudget(gpu_bytes=24 * GIB, cpu_bytes=64 * GIB, ranks_per_node=4, source="test")
    [row] = plan_advice({4: budget}, ["1b_transformer"])
    run = build_run_config(preset="1b_transformer")
    plan = choose_plan(run.model, run.training, 4, budget)
    assert row.fits and row.layout.startswith(f"ZeRO-{plan.zero_stage}, offload {plan.offload}")
    assert f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum}" in row.layout
    small = MemoryBudget(gpu_bytes=8 * GIB, cpu_bytes=16 * GIB, ranks_per_node=1, source="test")
    [row] = plan_advice({1: small}, ["7b_transformer"])
    assert not row.fits and row.layout.startswith("nothing fits (") and "would fit with" in row.layout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU output")
def test_without_a_gpu_it_says_so_and_still_advises(capsys):
    assert gpu_report.main(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "CPU training on this machine" in out
    assert "\ntiny " in out and "ZeRO-0" in out
    assert gpu_report.main(["--skip_config"]) == 0
    assert "memory plan" not in capsys.readouterr().out
    assert gpu_report.main(["--gpu_memory", "lots"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_it_lists_the_devices(capsys):
    assert gpu_report.main(["--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0:" in out and "compute capability" in out and "memory plan per preset, for GPUs" in out
