"""Runs for tests/engine/test_universal_resume.py: train a small model for STEPS steps straight, or stop after the
checkpoint at SAVE_AT, or resume from it; record each step's loss and the final fp32 weights. In-process (one
rank) or under torchrun (two ranks): argv ROLE DATA_CACHE RUN_DIR STAGE, ROLE one of first|resume.

The global batch is 8 sequences at every world size (micro-batch 4, accumulation 8 / (4 * ranks)), so a run
that changes its rank count mid-way reads the same samples as one that does not (samples are chosen by global
position, data/sampler.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH, MICRO_BATCH = 6, 3, 8, 4
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64"]
MUON_MODEL = [*MODEL, "model.n_layers=3"]
"""With 3 layers the Muon group of fan-in 64 (110,592 elements) splits in the middle of a layer's w1 at 2 ranks, so
ZeRO-1/2's momentum for that matrix is held whole by both ranks (engine/checkpoint/muon_universal.py) and its layout
differs from the fp32 partition's: with 2 layers every split fell between matrices and the two layouts coincided,
which hid a lost ZeRO-1/2 momentum restore."""


class Stop(Exception):
    """Ends a 'first' run right after its checkpoint at SAVE_AT, as a preemption would."""


def make_recording_trainer(run_dir: Path, data_cache: str, stage: int, *, stop_after_save: bool,
                           optimizer: str = "adamw"):
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    world_size = int(os.environ.get("WORLD_SIZE", 1))

    class Recording(Trainer):
        losses: dict[int, float] = {}

        def train_step(self):
            if stop_after_save and self.step == SAVE_AT:
                raise Stop()
            metrics = super().train_step()
            self.losses[self.step + 1] = metrics["loss"]
            return metrics

    run = build_run_config(preset="tiny", overrides=[
        *(MUON_MODEL if optimizer == "muon" else MODEL), f"training.zero_stage={stage}", f"training.batch_size={MICRO_BATCH}",
        f"training.gradient_accumulation_steps={GLOBAL_BATCH // (MICRO_BATCH * world_size)}",
        "training.learning_rate=3e-3", "training.warmup_steps=2", f"training.max_steps={STEPS}",
        # Ten times the usual weight decay: a universal load that gave the no-decay group (norms) weight decay, as
        # DeepSpeed's ZeRO-3 universal load does (engine/checkpoint/universal.py), then moves those weights ~1e-2 in the
        # steps after the switch, far above what WEIGHT_TOL allows (test_universal_resume.py).
        "training.weight_decay=1.0",
        f"training.save_interval={SAVE_AT}", f"training.eval_interval={STEPS}", "training.eval_batches=1",
        "training.sample_tokens=0", f"training.checkpoint_dir={run_dir / 'ckpt'}",
        f"training.output_dir={run_dir / 'out'}", f"data.cache_dir={data_cache}", f"training.optimizer={optimizer}"])
    plan = choose_plan(run.model, run.training, world_size)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    return Recording(model_config=run.model, training=run.training.model_copy(update={"zero_stage": stage}),
                     data=run.data, ds_config=ds_config, run_record=record,
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def optimizer_state_keys(zero_optimizer) -> list[list[str]]:
    """The names of the states the base optimizer keeps for each ZeRO flat group (rank 0's partition)."""
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        flats = zero_optimizer.single_partition_of_fp32_groups  # ZeRO-1/2
    return [sorted(zero_optimizer.optimizer.state.get(flat, {})) for flat in flats]


def run(role: str, data_cache: str, run_dir: Path, stage: int, optimizer: str = "adamw") -> Path:
    """role 'straight' (all STEPS), 'first' (stops after SAVE_AT) or 'resume'; rank 0 writes
    RUN_DIR/<role>_ws<N>.pt with {'losses': {step: loss}, 'weights': fp32 state dict, 'start_step'}."""
    from engine import distributed
    from engine.checkpoint.manager import gather_fp32_state_dict

    trainer = make_recording_trainer(run_dir, data_cache, stage, stop_after_save=role == "first", optimizer=optimizer)
    trainer.losses = {}
    trainer.setup()
    start_step = trainer.step
    try:
        trainer.train()
    except Stop:
        pass
    weights = gather_fp32_state_dict(trainer.engine.module, trainer.engine.optimizer)  # collective, ZeRO-3
    path = run_dir / f"{role}_ws{distributed.world_size()}.pt"
    if distributed.is_main_process():
        torch.save({"losses": trainer.losses, "weights": weights, "start_step": start_step,
                    "state_keys": optimizer_state_keys(trainer.engine.optimizer)}, path)
    trainer.engine.destroy()
    distributed.barrier()
    return path


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    data_cache, out = sys.argv[1], Path(sys.argv[2])
    init_distributed()
    for job in sys.argv[3:]:  # ROLE:STAGE:RUN_SUBDIR[:OPTIMIZER]
        role, stage, subdir, *optimizer = job.split(":")
        run(role, data_cache, out / subdir, int(stage), *optimizer)
    teardown_distributed()


if __name__ == "__main__":
    main()
