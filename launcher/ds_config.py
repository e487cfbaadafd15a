"""Render the DeepSpeed JSON config from the run config and the plan (never hand-edited)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from launcher.config import RunConfig
from launcher.planning.memory import DEEPSPEED_BUCKET_ELEMENTS
from launcher.planning.plan import Plan


def build_ds_config(run: RunConfig, plan: Plan, *, pin_memory: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict that `deepspeed.initialize` receives for this run and plan."""
    training = run.training
    optimizer_params: dict[str, Any] = {
        "lr": training.learning_rate,
        "betas": [training.adam_beta1, training.adam_beta2],
        "eps": training.adam_eps,
        "weight_decay": training.weight_decay,
    }
    if not plan.offload_optimizer:
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam: no JIT C++/CUDA build at start-up (~100 s on
        # CPU, and nvcc on GPU). With optimizer offload DeepSpeed must pick DeepSpeedCPUAdam instead.
        optimizer_params["torch_adam"] = True
        if plan.budget.on_cuda:
            # GPU: torch's fused AdamW (one multi-tensor CUDA kernel for the whole step, torch >= 2.0), passed
            # through by DeepSpeed's torch_adam path; as fast as DeepSpeed's FusedAdam without its nvcc JIT build.
            # CPU keeps the foreach implementation it always ran (the CPU path stays bit-identical).
            optimizer_params["fused"] = True
    # Bucket sizes and ZeRO-3 limits: the values launcher/planning/memory.py's estimate assumes, defined there only.
    zero: dict[str, Any] = {"stage": plan.zero_stage, **DEEPSPEED_BUCKET_ELEMENTS}
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if plan.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    if plan.zero_stage == 3 and plan.sequence_parallel > 1:
        # DeepSpeed 0.19.8's ZeRO-3 reduce-scatter path (stage3.py __avg_scatter_grads) averages gradients over
        # the whole sequence-data-parallel group, sequence-parallel ranks included, so they came out N times too
        # small (measured: half the gradient norm at N = 2); its all-reduce path divides by the data-parallel size
        # only, as ZeRO 0-2 do (tests/engine/test_sequence_parallel_training.py).
        zero["reduce_scatter"] = False
    if plan.zero_hpz_partition_size > 1:  # across nodes: launcher/planning/internode.py
        zero["zero_hpz_partition_size"] = plan.zero_hpz_partition_size
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        # No "scheduler" section: the engine passes its own warm-up + cosine (engine/schedule.py says why).
        "zero_optimization": zero,
        "bf16": {"enabled": training.bf16},
        "fp16": {"enabled": training.fp16, "loss_scale": 0, "initial_scale_power": 16},
        # The trainer logs its own metrics and progress; DeepSpeed's per-step prints would interleave.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # Always written: DeepSpeed 0.19.8's default is 1.0 (runtime/constants.py GRADIENT_CLIPPING_DEFAULT), so leaving
    # the key out for grad_clip 0 kept clipping on.
    config["gradient_clipping"] = training.grad_clip
    if training.optimizer == "muon":
        # DeepSpeed's Muon is passed as a client optimizer built from the project's parameter groups
        # (engine/optimizer.py says why), so the config names no optimizer: DeepSpeed refuses one in both places.
        del config["optimizer"]
        if plan.zero_stage == 3:
            # ZeRO-3 orthogonalizes full gradients it all-gathers itself; stage3.py raises "Muon and reduce
            # scatter cannot be used together" otherwise (DeepSpeed 0.19.8).
            zero["reduce_scatter"] = False
    if training.node_local_checkpoints:  # each node's local rank 0 writes the model states (docs/multinode.md)
        config["checkpoint"] = {"use_node_local_storage": True}
    return config


def write_ds_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write the rendered config atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)
    return path
