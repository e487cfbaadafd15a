"""Train a few steps of tiny models in several checkpoint layouts (ZeRO stage x precision x family) and keep, beside
each resumable checkpoint, the live fp32 master weights at the moment it was saved: the oracle that
tests/engine/test_export.py compares every conversion against. In-process (one rank) or under torchrun (two
ranks): argv DATA_CACHE OUT_DIR LAYOUT [LAYOUT...], LAYOUT = family-stage-precision (e.g. transformer-3-bf16)."""
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
FAMILIES = {
    "transformer": ("tiny", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]),
    "mamba2": ("tiny_mamba", ["model.d_model=64", "model.n_layers=2", "model.d_state=16", "model.headdim=32",
                              "model.chunk_size=32"]),
    "mamba1": ("tiny_mamba", ["model.d_model=64", "model.n_layers=2", "model.d_state=8", "model.ssm_type=mamba1"]),
    "hybrid": ("tiny_hybrid", ["model.d_model=64", "model.n_layers=2", "model.layer_pattern=MA", "model.n_heads=4",
                               "model.n_kv_heads=2", "model.d_state=16", "model.headdim=32", "model.chunk_size=32"]),
}


def train_layout(data_cache: str, out_dir: Path, layout: str) -> Path:
    """Folder OUT_DIR/<layout>-ws<N> with ckpt/ (checkpoint_step_STEPS) and live.pt (fp32 master weights)."""
    from engine import distributed
    from engine.checkpoint.manager import gather_fp32_state_dict
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    family, stage, precision = layout.split("-")
    preset, model = FAMILIES[family]
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    folder = out_dir / f"{layout}-ws{world_size}"
    run = build_run_config(preset=preset, overrides=[
        *model, "model.max_seq_len=64", f"training.zero_stage={stage}", f"training.bf16={precision == 'bf16'}",
        "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.learning_rate=3e-3",
        "training.warmup_steps=1", f"training.max_steps={STEPS}", f"training.save_interval={STEPS}",
        f"training.eval_interval={STEPS}", "training.eval_batches=1", "training.sample_tokens=0",
        f"training.checkpoint_dir={folder / 'ckpt'}", f"training.output_dir={folder / 'out'}",
        f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, world_size)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    trainer = Trainer(model_config=run.model, training=run.training.model_copy(update={"zero_stage": int(stage)}),
                      data=run.data, ds_config=ds_config, run_record=record,
                      local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    trainer.train()
    live = gather_fp32_state_dict(trainer.engine.module, trainer.engine.optimizer)  # collective under ZeRO-3
    if distributed.is_main_process():
        torch.save(live, folder / "live.pt")
    trainer.engine.destroy()
    distributed.barrier()
    return folder


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    for layout in sys.argv[3:]:
        train_layout(sys.argv[1], Path(sys.argv[2]), layout)
    teardown_distributed()


if __name__ == "__main__":
    main()
