"""Train a few steps of a small model and save the final fp32 weights: run in-process (one rank) or under torchrun
(two ranks) by tests/engine/test_rank_equivalence.py. argv: DATA_CACHE OUT_DIR MICRO_BATCH ACCUM STAGE [STAGE...]."""
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

STEPS = 3
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64"]


def train_and_save(data_cache: str, out_dir: Path, micro_batch: int, accum: int, stage: int) -> Path:
    """STEPS optimizer steps of the tiny preset (small model) at this layout; rank 0 writes the fp32 weights and
    the sample positions each step read."""
    from data import sample_indices
    from engine import distributed
    from engine.checkpoint import gather_fp32_state_dict
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.plan import choose_plan

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    tag = f"ws{world_size}_mb{micro_batch}_acc{accum}_zero{stage}"
    run = build_run_config(preset="tiny", overrides=[
        *MODEL, f"training.zero_stage={stage}", f"training.batch_size={micro_batch}",
        f"training.gradient_accumulation_steps={accum}", "training.learning_rate=3e-3", "training.warmup_steps=1",
        f"training.max_steps={STEPS}", f"training.checkpoint_dir={out_dir / tag / 'ckpt'}",
        f"training.output_dir={out_dir / tag / 'out'}", f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, world_size)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    trainer = Trainer(model_config=run.model, training=run.training, data=run.data, ds_config=ds_config,
                      run_record=record, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    trainer.setup()
    losses = []
    for _ in range(STEPS):
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1
    val_loss = trainer.evaluate()  # a collective: every rank takes part
    val_tokens = sum(tokens for _, tokens in trainer.last_eval.values())
    weights = gather_fp32_state_dict(trainer.engine.module)  # a collective under ZeRO-3
    samples = [sorted(i for micro in range(accum) for rank in range(world_size)
                      for i in sample_indices(step=step, micro_step=micro, rank=rank, world_size=world_size,
                                              micro_batch=micro_batch, grad_accum=accum))
               for step in range(STEPS)]
    path = out_dir / f"{tag}.pt"
    if distributed.is_main_process():
        torch.save({"weights": weights, "losses": losses, "samples": samples, "val_loss": val_loss,
                    "val_tokens": val_tokens}, path)
    trainer.engine.destroy()
    distributed.barrier()
    return path


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    data_cache, out_dir, micro_batch, accum, *stages = sys.argv[1:]
    init_distributed()
    for stage in stages:
        train_and_save(data_cache, Path(out_dir), int(micro_batch), int(accum), int(stage))
    teardown_distributed()


if __name__ == "__main__":
    main()
