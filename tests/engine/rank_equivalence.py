"""Train a few steps of a small model and save the final fp32 weights: run in-process (one rank) or under torchrun
(two ranks) by tests/engine/test_rank_equivalence.py, and on two DeepSpeed "nodes" by tests/launcher/test_multinode.py.
argv: DATA_CACHE OUT_DIR MICRO_BATCH ACCUM STAGE [STAGE...]; a STAGE may name the family, e.g. mamba:3."""
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

STEPS = 5
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64"]
FAMILIES = {"transformer": ("tiny", MODEL),
            "mamba": ("tiny_mamba", ["model.d_model=64", "model.n_layers=2", "model.d_state=16", "model.headdim=32",
                                     "model.chunk_size=32", "model.max_seq_len=64"])}


def train_and_save(data_cache: str, out_dir: Path, micro_batch: int, accum: int, stage: int,
                   family: str = "transformer") -> Path:
    """STEPS optimizer steps of the tiny preset (small model) at a real learning rate (warm-up 1: step 1 runs at
    the peak); rank 0 writes the fp32 weights, each step's loss and pre-clip gradient norm, and the window indices
    the trainers of all ranks actually read."""
    from engine import distributed
    from engine.checkpoint.manager import gather_fp32_state_dict
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    tag = f"ws{world_size}_mb{micro_batch}_acc{accum}_zero{stage}" + ("" if family == "transformer" else f"_{family}")
    preset, model = FAMILIES[family]
    run = build_run_config(preset=preset, overrides=[
        *model, f"training.zero_stage={stage}", f"training.batch_size={micro_batch}",
        f"training.gradient_accumulation_steps={accum}", "training.learning_rate=3e-3", "training.warmup_steps=1",
        f"training.max_steps={STEPS}", f"training.checkpoint_dir={out_dir / tag / 'ckpt'}",
        f"training.output_dir={out_dir / tag / 'out'}", f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, world_size)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    trainer = Trainer(model_config=run.model, training=run.training, data=run.data, ds_config=ds_config,
                      run_record=record, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    trainer.setup()
    read: list[list[int]] = []  # token offsets of the windows this rank's trainer read, per micro-batch
    windows = trainer.train_windows
    windows_batch = windows.batch
    windows.batch = lambda indices: (read.append([int(windows.window_start(i)) for i in indices]),
                                     windows_batch(indices))[1]
    losses, grad_norms, samples = [], [], []
    for _ in range(STEPS):
        read.clear()
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])  # before clipping: a missing 1/N would show here, not in Adam's step
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, [i for micro in read for i in micro])
        samples.append(sorted(i for rank_read in everyone for i in rank_read))
        trainer.step += 1
    val_loss = trainer.evaluate()  # a collective: every rank takes part
    val_tokens = sum(tokens for _, tokens in trainer.last_eval.values())
    weights = gather_fp32_state_dict(trainer.engine.module)  # a collective under ZeRO-3
    # What the exports use: the same collectives, but only rank 0 keeps a copy.
    exported = gather_fp32_state_dict(trainer.engine.module, trainer.engine.optimizer, main_process_only=True)
    if distributed.is_main_process():
        assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    else:
        assert exported == {}, "a rank other than 0 kept a copy of the weights"
    path = out_dir / f"{tag}.pt"
    if distributed.is_main_process():
        torch.save({"weights": weights, "losses": losses, "grad_norms": grad_norms, "samples": samples,
                    "val_loss": val_loss, "val_tokens": val_tokens}, path)
    trainer.engine.destroy()
    distributed.barrier()
    return path


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    # The DeepSpeed launcher puts --local_rank=N before the script's own arguments.
    data_cache, out_dir, micro_batch, accum, *stages = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_distributed()
    for stage in stages:
        family, _, number = stage.rpartition(":")
        train_and_save(data_cache, Path(out_dir), int(micro_batch), int(accum), int(number), family or "transformer")
    teardown_distributed()


if __name__ == "__main__":
    main()
