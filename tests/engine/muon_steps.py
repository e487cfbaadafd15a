"""A few Muon steps of a small model through DeepSpeed, for tests/engine/test_muon.py: run in-process-free as a
script, on one rank (plain python) or two (torchrun). argv: OUT_DIR FAMILY ACCUM NS_METHOD GRAD_CLIP STAGE [STAGE...].

Every rank builds the same seeded model and reads its own rows of one fixed global batch of 4 sequences (1 rank:
micro-batch 4 / ACCUM; 2 ranks: micro-batch 2). Rank 0 saves, per stage, the initial and final fp32 weights, the
`use_muon` tag of every parameter and the batch, so the test can replay the steps with its own reference Muon."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
SEQ_LEN = 32
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.1
FAMILIES = {
    "transformer": dict(model_type="transformer", vocab_size=256, max_seq_len=SEQ_LEN, d_model=64, n_layers=2,
                        n_heads=4, n_kv_heads=2),
    # Mamba-1: its A_log is 2-D, the case DeepSpeed's own rule gets wrong; d_model 32 keeps the CPU scan quick.
    "mamba": dict(model_type="mamba", vocab_size=256, max_seq_len=SEQ_LEN, d_model=32, n_layers=2, ssm_type="mamba1",
                  d_state=8, chunk_size=16),
    # Mamba-2 (1-D A_log, dt_bias, gated norm) and the hybrid (one Mamba-2 layer, one attention layer, a SwiGLU
    # after each), shaped like their tiny presets, smaller.
    "mamba2": dict(model_type="mamba", vocab_size=256, max_seq_len=SEQ_LEN, d_model=32, n_layers=2, ssm_type="mamba2",
                   d_state=8, headdim=16, expand=2, chunk_size=16),
    "hybrid": dict(model_type="hybrid", vocab_size=256, max_seq_len=SEQ_LEN, d_model=32, n_layers=2, layer_pattern="MA",
                   n_heads=2, n_kv_heads=1, ssm_type="mamba2", d_state=8, headdim=16, expand=2, chunk_size=16),
}


def model_config(family: str):
    from model import ModelConfig
    return ModelConfig(**FAMILIES[family])


def global_batch(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (STEPS, GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)


def run_stage(out_dir: Path, family: str, accum: int, ns_method: str, grad_clip: float, stage: int) -> None:
    import deepspeed
    from engine import distributed
    from engine.checkpoint.manager import gather_fp32_state_dict
    from engine.config import TrainingConfig
    from engine.optimizer import muon_optimizer
    from model import create_model

    world_size, rank = distributed.world_size(), distributed.rank()
    micro = GLOBAL_BATCH // world_size // accum
    config = model_config(family)
    torch.manual_seed(0)
    model = create_model(config.model_type, config)
    initial = {name: p.detach().clone() for name, p in model.state_dict().items()}
    training = TrainingConfig(optimizer="muon", learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                              muon_ns_method=ns_method, grad_clip=grad_clip, offload="none")
    zero = {"stage": stage}
    if stage == 3:
        zero["reduce_scatter"] = False  # what launcher/ds_config.py writes for Muon at ZeRO-3
    ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                 "train_batch_size": GLOBAL_BATCH, "zero_optimization": zero, "steps_per_print": 2**31 - 1}
    ds_config["gradient_clipping"] = grad_clip  # always written: DeepSpeed 0.19.8's default is 1.0, not off
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, optimizer=muon_optimizer(model, training))
    distributed.skip_single_rank_gradient_allreduce(engine)
    tags = {name: bool(p.use_muon) for name, p in engine.module.named_parameters()}
    batch = global_batch(config.vocab_size)
    losses = []
    for step in range(STEPS):
        rows = batch[step, rank * micro * accum:(rank + 1) * micro * accum]
        for micro_step in range(accum):
            chunk = rows[micro_step * micro:(micro_step + 1) * micro]
            _, loss = engine(chunk[:, :-1], chunk[:, 1:])
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
    final = gather_fp32_state_dict(engine.module)
    if distributed.is_main_process():
        torch.save({"initial": initial, "final": final, "tags": tags, "batch": batch, "losses": losses},
                   out_dir / f"{family}_ws{world_size}_acc{accum}_{ns_method}_clip{grad_clip}_zero{stage}.pt")
    engine.destroy()
    distributed.barrier()


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    out_dir, family, accum, ns_method, grad_clip, *stages = sys.argv[1:]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed()
    try:
        for stage in stages:
            run_stage(Path(out_dir), family, int(accum), ns_method, float(grad_clip), int(stage))
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
