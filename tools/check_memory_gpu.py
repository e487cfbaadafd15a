"""GPU check of the memory estimate: predicted vs measured peak memory for a few presets and layouts on one GPU.

    python tools/check_memory_gpu.py [--steps 2] [--json results.json]

For each case it plans against the GPU found (as `launcher/run.py` does), builds the model, runs a few optimizer
steps through `deepspeed.initialize` with the plan's ds_config, and prints the estimate's allocated peak next to
torch.cuda.max_memory_allocated, its reserved-memory figure next to max_memory_reserved, and the CUDA context
(device memory in use that the caching allocator does not account for). Goal: allocated within 10%.
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from launcher.config import RunConfig, build_run_config  # noqa: E402
from launcher.planning.memory import DEEPSPEED_BUCKET_ELEMENTS  # noqa: E402
from launcher.planning.hardware import GIB, MemoryBudget, memory_budget  # noqa: E402
from launcher.planning.plan import Plan, PlanError, choose_plan  # noqa: E402

ACCUMULATION = 2
"""Micro-steps per optimizer step: enough to hold accumulated gradients, few enough to be quick."""
CASES: list[tuple[str, tuple[str, ...]]] = [
    ("tiny", ()),
    ("test_small", ()),
    ("1b_transformer", ()),
    ("1b_transformer", ("training.zero_stage=3", "training.activation_checkpointing=true", "training.offload=none")),
    ("1b_transformer", ("training.zero_stage=2", "training.activation_checkpointing=11", "training.offload=none")),
    ("1b_mamba", ()),
    ("1b_mamba", ("training.zero_stage=2", "training.activation_checkpointing=true", "training.offload=none")),
]
"""(preset, overrides): each preset's own plan, and for the 1B models a second layout (ZeRO-3 / ZeRO-2 with
activation checkpointing), and for the 1B Transformer the first 11 of its 22 blocks checkpointed (Megatron-LM's
block method). Offload is left out: its GPU side is small and DeepSpeedCPUAdam needs a C++ build."""


@dataclass(frozen=True, kw_only=True)
class Case:
    """One run to measure: its config and the plan made for this GPU."""

    name: str
    run: RunConfig
    plan: Plan


@dataclass(frozen=True, kw_only=True)
class Result:
    """Predicted and measured memory of one case, bytes."""

    name: str
    layout: str
    micro_batch: int
    predicted_allocated: int
    measured_allocated: int
    predicted_reserved: int
    measured_reserved: int
    predicted_context: int
    measured_context: int
    seconds: float

    @property
    def error(self) -> float:
        return self.predicted_allocated / self.measured_allocated - 1.0


def build_cases(budget: MemoryBudget) -> list[Case | tuple[str, str]]:
    """The cases planned against `budget`; a (name, error) pair for a case that cannot be planned."""
    cases: list[Case | tuple[str, str]] = []
    for preset, overrides in CASES:
        name = preset + (" [" + ", ".join(o.split("=")[0].split(".")[-1] + "=" + o.split("=")[1]
                                          for o in overrides) + "]" if overrides else "")
        run = build_run_config(preset=preset, overrides=[*overrides,
                                                         f"training.gradient_accumulation_steps={ACCUMULATION}"])
        try:
            cases.append(Case(name=name, run=run, plan=choose_plan(run.model, run.training, 1, budget)))
        except PlanError as error:
            cases.append((name, str(error).splitlines()[0]))
    return cases


def layout_label(plan: Plan) -> str:
    offload = {"none": "", "optimizer": " +opt offload", "optimizer+params": " +opt+param offload"}[plan.offload]
    return f"ZeRO-{plan.zero_stage}{offload}{plan.checkpointing_label}"


def ds_config_for(case: Case) -> dict:
    """The plan's ds_config, with the bucket sizes the estimate assumes (if ds_config.py does not set them)."""
    from launcher.ds_config import build_ds_config

    config = build_ds_config(case.run, case.plan, pin_memory=True)
    zero = config.setdefault("zero_optimization", {})
    for key, value in DEEPSPEED_BUCKET_ELEMENTS.items():
        zero.setdefault(key, value)
    return config


def measure(case: Case, steps: int) -> Result:
    """Train `steps` optimizer steps of random tokens on GPU 0 and read the allocator's peaks."""
    import deepspeed
    import torch

    from engine.model_setup import build_model
    from engine.param_groups import param_groups

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free_before, total = torch.cuda.mem_get_info()
    base_allocated, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    context = total - free_before - base_reserved  # what the process holds outside the caching allocator
    start = time.perf_counter()
    config = ds_config_for(case)
    model_config, plan = case.run.model, case.plan
    # Built as the Trainer builds it (on the GPU in the training dtype, or partitioned under ZeRO-3).
    model = build_model(model_config, ds_config=config, precision=case.run.training.precision, device="cuda:0")
    model.num_checkpointed_blocks = plan.num_checkpointed_blocks
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    for _ in range(steps * plan.grad_accum):
        tokens = torch.randint(0, model_config.vocab_size, (plan.micro_batch, model_config.max_seq_len + 1),
                               device=engine.device)
        _, loss = engine(tokens[:, :-1], targets=tokens[:, 1:])  # as in the Trainer
        engine.backward(loss)
        engine.step()
        del loss
    torch.cuda.synchronize()
    measured_allocated = torch.cuda.max_memory_allocated() - base_allocated
    measured_reserved = torch.cuda.max_memory_reserved() - base_reserved
    seconds = time.perf_counter() - start
    engine.destroy()
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    memory = plan.memory
    return Result(name=case.name, layout=layout_label(plan), micro_batch=plan.micro_batch,
                  predicted_allocated=memory.allocated, measured_allocated=measured_allocated,
                  predicted_reserved=memory.allocated + memory.fragmentation, measured_reserved=measured_reserved,
                  predicted_context=memory.cuda_context, measured_context=context, seconds=seconds)


def render_results(results: list[Result], failures: list[tuple[str, str]]) -> str:
    """The table: per case, predicted vs measured allocated peak (GiB), reserved peak and CUDA context."""
    header = f"{'case':<46} {'layout':<14} {'mb':>3} {'pred':>7} {'meas':>7} {'err':>6}  " \
             f"{'pred res':>8} {'meas res':>8}  {'ctx':>5} {'meas':>5} {'s':>5}"
    lines = [header]
    for r in results:
        lines.append(f"{r.name:<46} {r.layout:<14} {r.micro_batch:>3} {r.predicted_allocated / GIB:>7.2f} "
                     f"{r.measured_allocated / GIB:>7.2f} {r.error:>+6.1%}  {r.predicted_reserved / GIB:>8.2f} "
                     f"{r.measured_reserved / GIB:>8.2f}  {r.predicted_context / GIB:>5.2f} "
                     f"{r.measured_context / GIB:>5.2f} {r.seconds:>5.0f}")
    lines += [f"{name:<46} not planned: {why}" for name, why in failures]
    within = sum(abs(r.error) <= 0.10 for r in results)
    lines.append(f"{within}/{len(results)} cases within 10% (allocated peak; GiB; ctx = memory outside the allocator)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per case")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("check_memory_gpu: no CUDA device here, nothing measured (skipped). Run it on a machine with a GPU.")
        return 0
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29561")})
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    budget = memory_budget(1, ssm_type="mamba2")  # the Mamba preset measured here (1b_mamba) is Mamba-2
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; {budget.source}", flush=True)
    results, failures = [], []
    for case in build_cases(budget):
        if isinstance(case, tuple):
            failures.append(case)
            continue
        try:
            results.append(measure(case, args.steps))
            print(render_results(results[-1:], []).splitlines()[1], flush=True)
        except Exception as error:  # noqa: BLE001 - report every case, then the table
            failures.append((case.name, f"{type(error).__name__}: {error}"[:300]))
            gc.collect()
            torch.cuda.empty_cache()
    print(render_results(results, failures))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                               "results": [asdict(r) for r in results], "failures": failures},
                                              indent=2))
    teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
