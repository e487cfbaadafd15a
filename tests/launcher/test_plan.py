"""launcher/planning/plan.py and launcher/planning/report.py: layouts chosen for real hardware sizes, explicit values kept and
checked, useful errors when nothing fits, and a readable table for every preset."""
from __future__ import annotations

import pytest

from launcher.config import build_run_config
from launcher.planning.hardware import (GIB, UNLIMITED, GpuInfo, HardwareError, MemoryBudget, detect_gpus, memory_budget,
                                        parse_memory_size)
from launcher.planning import plan as plan_module
from launcher.planning.memory import Layout, estimate_memory
from launcher.planning.plan import MAX_MICRO_BATCH, SAFETY_MARGIN, Plan, PlanError, choose_plan, evaluate_layouts
from launcher.presets import PRESETS
from launcher.planning.report import render_candidates, render_plan

WORKSTATION_HOST = 128 * GIB
"""Host RAM of the hypothetical machines below (a typical 4-GPU workstation)."""


def plan_for(preset: str, num_gpus: int, gpu_memory: str, host: int = WORKSTATION_HOST,
             overrides: tuple[str, ...] = ()) -> tuple[Plan, object]:
    run = build_run_config(preset=preset, overrides=list(overrides))
    budget = memory_budget(num_gpus, parse_memory_size(gpu_memory), host_bytes=host)
    return choose_plan(run.model, run.training, num_gpus, budget), run


@pytest.mark.parametrize("text, expected", [("24GB", 24 * GIB), ("24 GiB", 24 * GIB), ("80g", 80 * GIB),
                                            ("512MB", 512 << 20), ("1.5TB", int(1.5 * (1 << 40))),
                                            ("4096 B", 4096)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["24", "lots", "24 GBs", "-3GB", ""])
def test_parse_memory_size_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="e.g. 24GB"):
        parse_memory_size(text)


def test_tiny_on_a_24gb_gpu_is_plain_data_parallel():
    plan, _ = plan_for("tiny", 1, "24GB")
    assert (plan.zero_stage, plan.offload, plan.num_checkpointed_blocks) == (0, "none", 0)
    assert (plan.micro_batch, plan.grad_accum) == (16, 1)  # the preset's explicit values
    assert plan.memory.gpu_total < 4 * GIB


def test_automatic_micro_batch_is_the_largest_power_of_two_that_fits_and_accumulation_reaches_the_target():
    plan, run = plan_for("test_small", 1, "24GB")
    assert plan.micro_batch & (plan.micro_batch - 1) == 0 and plan.micro_batch <= MAX_MICRO_BATCH
    assert plan.global_batch_tokens == run.training.tokens_per_step
    bigger = choose_plan(run.model, run.training.model_copy(update={"batch_size": plan.micro_batch * 2}), 1,
                         plan.budget) if plan.micro_batch < MAX_MICRO_BATCH else None
    assert bigger is None or bigger.zero_stage > plan.zero_stage or bigger.offload != "none" \
        or bigger.num_checkpointed_blocks > 0


def test_7b_transformer_on_four_24gb_gpus_needs_offload():
    plan, _ = plan_for("7b_transformer", 4, "24GB", host=512 * GIB)
    # The figures docs/memory.md states for this claim ("ZeRO-2 + optimizer offload + checkpointing of 31 of the 32
    # blocks ... 21.9 GiB at micro-batch 2, the plan's choice"): the last block's recomputation would hold what
    # keeping its activations holds, so the fewest blocks that fit stop one short of all.
    assert (plan.zero_stage, plan.offload, plan.num_checkpointed_blocks) == (2, "optimizer", 31)
    assert (plan.micro_batch, plan.grad_accum) == (2, 128)
    assert round(plan.memory.gpu_total / GIB, 1) == 21.9
    assert plan.memory.gpu_total <= 24 * GIB * 0.95
    no_offload = [c for c in plan.candidates if c.offload == "none"]
    assert no_offload and not any(c.fits for c in no_offload)  # 20 bytes/parameter over 4 ranks alone is 31 GiB


def test_7b_transformer_on_eight_80gb_gpus_trains_without_offload():
    plan, run = plan_for("7b_transformer", 8, "80GB", host=1024 * GIB)
    assert plan.offload == "none" and plan.num_checkpointed_blocks == 0
    assert plan.global_batch_tokens == run.training.tokens_per_step


def test_explicit_values_are_kept():
    plan, _ = plan_for("test_small", 2, "80GB", overrides=(
        "training.zero_stage=1", "training.offload=none", "training.activation_checkpointing=true",
        "training.batch_size=4", "training.gradient_accumulation_steps=3"))
    assert (plan.zero_stage, plan.offload, plan.num_checkpointed_blocks) == (1, "none", 10)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (4, 3, 24)
    assert "training.zero_stage=1" in plan.reason and len(plan.candidates) == 1


def _fewest_blocks_by_brute_force(run, budget: MemoryBudget, micro_batch: int) -> int | None:
    """The oracle: every count of checkpointed blocks estimated, the smallest (>= 1) whose GPU total fits."""
    training = run.training
    for blocks in range(1, run.model.n_layers + 1):
        estimate = estimate_memory(run.model, Layout(
            world_size=1, zero_stage=training.zero_stage, offload=training.offload, precision=training.precision,
            micro_batch=micro_batch, seq_len=run.model.max_seq_len, num_checkpointed_blocks=blocks))
        if estimate.gpu_total <= budget.gpu_bytes * (1 - SAFETY_MARGIN):
            return blocks
    return None


@pytest.mark.parametrize("batch_size, gpu_gib", [(None, 25), (8, 20), (8, 28), (8, 36), (8, 44), (8, 60)])
def test_auto_checkpoints_the_fewest_blocks_that_fit(batch_size, gpu_gib, monkeypatch):
    """1B Transformer (22 blocks), ZeRO-2 on one GPU (16 bytes per parameter: 23.5 GiB before any activation):
    between the budgets where nothing fits and where no block needs recomputing, the plan checkpoints the first N
    blocks, N the smallest that fits at its micro-batch (the largest that fits with every block checkpointed)."""
    run = build_run_config(preset="1b_transformer", overrides=["training.zero_stage=2", "training.offload=none",
                                                                f"training.batch_size={batch_size or 'null'}"])
    budget = memory_budget(1, int(gpu_gib * GIB), host_bytes=WORKSTATION_HOST)
    calls = []
    real_estimate = plan_module.estimate_memory
    monkeypatch.setattr(plan_module, "estimate_memory", lambda *a, **kw: calls.append(1) or real_estimate(*a, **kw))
    try:
        plan = choose_plan(run.model, run.training, 1, budget)
    except PlanError:
        assert _fewest_blocks_by_brute_force(run, budget, batch_size or 1) is None
        return
    # Micro-batches tried twice (without, then with checkpointing), and log2(22) < 5 blocks counts for the second.
    assert len(calls) <= 2 * len(plan_module._micro_batches(run.model, run.training, 1)) + 5
    if plan.num_checkpointed_blocks == 0:
        return
    # Checkpointing was needed: not even micro-batch 1 fits without it.
    assert not any(c.fits for c in plan.candidates if c.num_checkpointed_blocks == 0)
    assert plan.num_checkpointed_blocks == _fewest_blocks_by_brute_force(run, budget, plan.micro_batch)
    bigger = plan.micro_batch * 2
    assert batch_size or bigger > MAX_MICRO_BATCH or _fewest_blocks_by_brute_force(run, budget, bigger) is None
    assert plan.memory.layout.num_checkpointed_blocks == plan.num_checkpointed_blocks


def test_a_partial_count_is_chosen_shown_and_explained():
    run = build_run_config(preset="1b_transformer", overrides=["training.zero_stage=2", "training.offload=none",
                                                                "training.batch_size=8"])
    budget = memory_budget(1, 36 * GIB, host_bytes=WORKSTATION_HOST)
    plan = choose_plan(run.model, run.training, 1, budget)
    blocks = plan.num_checkpointed_blocks
    assert 0 < blocks < 21 and plan.num_layers == 22
    text = render_plan(plan, run.model, run.training)
    assert f"Chosen: ZeRO-2 +ckpt {blocks}/22, micro-batch 8" in text
    assert f"checkpointing the first {blocks} of 22 blocks, the fewest that fit" in text


def test_an_explicit_block_count_is_kept_and_checked():
    plan, _ = plan_for("test_small", 1, "80GB", overrides=("training.activation_checkpointing=4",))
    assert plan.num_checkpointed_blocks == 4 and all(c.num_checkpointed_blocks == 4 for c in plan.candidates)
    assert "training.activation_checkpointing=4" in plan.reason and plan.checkpointing_label == " +ckpt 4/10"
    assert plan.memory.layout.num_checkpointed_blocks == 4
    with pytest.raises(PlanError) as error:  # 2 blocks are too few at micro-batch 8; auto finds how many are not
        plan_for("1b_transformer", 1, "36GB", overrides=("training.activation_checkpointing=2",
                                                           "training.zero_stage=2", "training.offload=none",
                                                           "training.batch_size=8"))
    assert "- training.activation_checkpointing=auto: ZeRO-2 +ckpt " in str(error.value)


def test_explicit_batch_size_that_does_not_fit_names_the_key_and_what_fits():
    with pytest.raises(PlanError) as error:
        plan_for("1b_transformer", 1, "24GB", overrides=("training.batch_size=64",))
    message = str(error.value)
    assert "training.batch_size=64 does not fit" in message
    assert "set training.batch_size=" in message
    assert error.value.candidates  # the dry run can still show the table


def test_nothing_fits_says_what_would():
    with pytest.raises(PlanError) as error:
        plan_for("7b_transformer", 1, "24GB", host=512 * GIB, overrides=("training.offload=none",))
    message = str(error.value)
    assert "no layout fits: 8 tried" in message
    # micro-batch 2: the chunked loss (model/losses.py) holds one 2048-token chunk of logits, not the whole batch's
    assert "- training.offload=auto: ZeRO-2 +opt offload +ckpt 31/32 fits at micro-batch 2" in message
    assert "- more GPUs: 8 of this size" in message
    assert "GPUs with at least" in message
    with pytest.raises(PlanError) as error:
        plan_for("7b_transformer", 8, "24GB", host=512 * GIB,
                 overrides=("training.offload=none", "training.activation_checkpointing=false"))
    assert "- training.activation_checkpointing=auto: ZeRO-3 +ckpt 27/32 fits" in str(error.value)
    assert "- a shorter sequence: model.max_seq_len=1024 (ZeRO-3, micro-batch 1)" in str(error.value)


def test_offload_is_refused_when_host_ram_cannot_hold_it():
    plan, _ = plan_for("7b_mamba", 2, "24GB", host=1024 * GIB)
    assert plan.offload != "none"
    with pytest.raises(PlanError, match="host RAM"):
        plan_for("7b_mamba", 2, "24GB", host=32 * GIB)


def test_without_cuda_the_plan_uses_host_ram_and_says_so():
    budget = memory_budget(2, gpus=[], host_bytes=20 * GIB)
    assert not budget.on_cuda and budget.gpu_bytes == 10 * GIB and "host RAM" in budget.source
    run = build_run_config(preset="tiny")
    plan = choose_plan(run.model, run.training, 2, budget)
    assert plan.memory.cuda_context == 0 and "no CUDA GPU" in plan.budget.source


def test_detected_gpus_set_the_budget():
    gpus = [GpuInfo(index=i, name="NVIDIA GeForce RTX 4090", free_bytes=free, total_bytes=24 * GIB)
            for i, free in enumerate([23 * GIB, 22 * GIB, 23 * GIB])]
    budget = memory_budget(2, gpus=gpus, host_bytes=64 * GIB)
    assert budget.gpu_bytes == 22 * GIB and "2 x NVIDIA GeForce RTX 4090" in budget.source
    with pytest.raises(HardwareError, match="only 3 GPU"):
        memory_budget(4, gpus=gpus, host_bytes=64 * GIB)


def test_detect_gpus_is_empty_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert detect_gpus() == []


def test_unlimited_budget_keeps_the_fastest_layout():
    run = build_run_config(preset="7b_transformer")
    plan = choose_plan(run.model, run.training, 1)  # no budget: explicit values and the token target only
    assert plan.budget is UNLIMITED and (plan.zero_stage, plan.offload) == (0, "none")
    assert plan.micro_batch == MAX_MICRO_BATCH or plan.global_batch_tokens == run.training.tokens_per_step


def test_candidates_are_ordered_and_the_first_fitting_one_is_chosen():
    plan, run = plan_for("1b_transformer", 2, "24GB")
    fitting = [c for c in plan.candidates if c.fits]
    best = fitting[0]
    assert (best.zero_stage, best.offload, best.num_checkpointed_blocks, best.micro_batch) == (
        plan.zero_stage, plan.offload, plan.num_checkpointed_blocks, plan.micro_batch)
    tiers = [(["none", "optimizer", "optimizer+params"].index(c.offload), c.num_checkpointed_blocks > 0,
              c.zero_stage == 3) for c in plan.candidates]
    assert tiers == sorted(tiers)
    assert evaluate_layouts(run.model, run.training, 2, plan.budget) == list(plan.candidates)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_gpus, gpu_memory", [(1, "24GB"), (2, "24GB"), (4, "24GB"), (8, "80GB"),
                                                  (1, "141GB")])
def test_report_renders_for_every_preset(name, num_gpus, gpu_memory):
    run = build_run_config(preset=name, num_gpus=num_gpus)
    budget = memory_budget(num_gpus, parse_memory_size(gpu_memory), host_bytes=256 * GIB)
    try:
        plan = choose_plan(run.model, run.training, num_gpus, budget)
    except PlanError as error:
        table = render_candidates(error.candidates)
        assert len(table.splitlines()) == len(error.candidates) + 1 and "no:" in table
        return
    text = render_plan(plan, run.model, run.training, name=name)
    assert f"Memory plan for {name}" in text and "Chosen: " in text and "Why: " in text
    assert f"{plan.global_batch_tokens:,} tokens per step" in text
    assert sum(line.startswith("*") for line in text.splitlines()) == 1
    assert len([line for line in text.splitlines() if "ZeRO-" in line]) >= len(plan.candidates)


def test_budget_is_a_plain_value():
    budget = MemoryBudget(gpu_bytes=GIB, cpu_bytes=None, source="test")
    assert budget.ranks_per_node == 1 and budget.on_cuda


def test_fused_ssm_kernels_are_judged_for_the_mixer_being_trained(monkeypatch):
    """A Triton-only mamba-ssm (Mamba-2's kernels import, Mamba-1's CUDA ones do not) serves mamba2 only."""
    from model.mamba import ssm_ops

    triton_only = {name: object() for name in ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined",
                                               "rmsnorm_fn", "causal_conv1d_fn")}
    monkeypatch.setattr(ssm_ops, "_load_kernels", lambda: triton_only)
    monkeypatch.setattr(ssm_ops, "_failures", {name: "no nvcc build" for name in ssm_ops._KERNEL_SOURCES},
                        raising=False)
    gpus = [GpuInfo(index=0, name="H200", free_bytes=139 * GIB, total_bytes=141 * GIB)]
    assert memory_budget(1, gpus=gpus, host_bytes=64 * GIB, ssm_type="mamba2").fused_ssm_kernels
    assert not memory_budget(1, gpus=gpus, host_bytes=64 * GIB, ssm_type="mamba1").fused_ssm_kernels
