"""Train a few steps of a small model with sequences split over SP ranks, under torchrun (run by
tests/engine/test_sequence_parallel_training.py). Rank 0 writes the fp32 weights, each step's loss and gradient
norm, and the validation loss and token count.
argv: FAMILY DATA_CACHE OUT_FILE CKPT_DIR SP MICRO_BATCH MAX_STEPS [RESUME]."""
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

MODELS = {
    # 4 heads, 2 KV heads: with SP=4 each KV head is replicated on two ranks.
    "transformer": ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                    "model.max_seq_len=64"],
    "mamba": ["model.d_model=64", "model.n_layers=2", "model.d_state=16", "model.headdim=16", "model.chunk_size=16",
              "model.max_seq_len=64"],
}


def main() -> None:
    from engine import distributed
    from engine.checkpoint.manager import gather_fp32_state_dict
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    family, data_cache, out_file, ckpt_dir, sp, micro_batch, max_steps, *resume = sys.argv[1:]
    distributed.init_distributed()
    world_size = distributed.world_size()
    run = build_run_config(preset="tiny" if family == "transformer" else "tiny_mamba", overrides=[
        *MODELS[family], f"training.zero_stage={os.environ.get('SP_TEST_ZERO_STAGE', 1)}",
        f"training.sequence_parallel={sp}",
        f"training.batch_size={micro_batch}", "training.gradient_accumulation_steps=1", "training.learning_rate=3e-3",
        "training.warmup_steps=1", f"training.max_steps={max_steps}", "training.save_interval=2",
        "training.eval_batches=2", f"training.resume={bool(resume)}", f"training.checkpoint_dir={ckpt_dir}",
        f"training.output_dir={ckpt_dir}/out", f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, world_size)
    assert plan.sequence_parallel == int(sp), plan
    ds_config = build_ds_config(run, plan)
    training = run.training.model_copy(update={"activation_checkpointing": 0})
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    trainer = Trainer(model_config=run.model, training=training, data=run.data, ds_config=ds_config,
                      run_record=record, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    trainer.setup()
    start = trainer.step
    losses, grad_norms = [], []
    while trainer.step < int(max_steps):
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
        trainer.step += 1
        if trainer.step % 2 == 0:
            trainer.checkpoints.save(trainer.engine, trainer.step, trainer._client_state())
    val_loss = trainer.evaluate()
    val_tokens = sum(tokens for _, tokens in trainer.last_eval.values())
    weights = gather_fp32_state_dict(trainer.engine.module)
    if distributed.is_main_process():
        torch.save({"weights": weights, "losses": losses, "grad_norms": grad_norms, "start": start,
                    "val_loss": val_loss, "val_tokens": val_tokens, "tokens_per_step": trainer.tokens_per_step},
                   out_file)
    trainer.engine.destroy()
    distributed.teardown_distributed()


if __name__ == "__main__":
    main()
