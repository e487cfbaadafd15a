"""Run under torchrun (2 or 4 ranks) by tests/model/test_sequence_parallel.py: the loss and every gradient of one
model on whole sequences (no sequence parallelism, the oracle, computed on every rank) against the same model with
each sequence split over the ranks (Ulysses / head-sharded Mamba), the shard losses combined by group_mean_loss and
the gradients summed over the group, as DeepSpeed sums them. argv: names of CASES. Rank 0 prints one line per case:
'CASE loss_diff=.. grad_diff=..' (the gradient difference relative to each tensor's largest reference entry)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


SMALL = {"d_model": 64, "n_layers": 2, "max_seq_len": 32, "vocab_size": 128}
CASES = {
    "transformer_gqa": {"model_type": "transformer", "n_heads": 4, "n_kv_heads": 2, **SMALL},  # K=2: split or replicated
    "transformer_mqa": {"model_type": "transformer", "n_heads": 4, "n_kv_heads": 1, **SMALL},  # K=1: replicated
    "mamba2_one_group": {"model_type": "mamba", "d_state": 16, "headdim": 16, "chunk_size": 8, **SMALL},
    "mamba2_four_groups": {"model_type": "mamba", "d_state": 16, "headdim": 16, "chunk_size": 8, "ngroups": 4,
                           **SMALL},
    "mamba2_two_groups": {"model_type": "mamba", "d_state": 16, "headdim": 16, "chunk_size": 8, "ngroups": 2,
                          **SMALL},
    "mamba1": {"model_type": "mamba", "ssm_type": "mamba1", "d_state": 8, **SMALL},
    # Every block recomputed in backward (non-reentrant checkpointing re-runs the all-to-alls).
    "hybrid_checkpointed": {"model_type": "hybrid", "layer_pattern": "MMAM", "n_layers": 4, "n_heads": 4,
                            "n_kv_heads": 2, "d_state": 16, "headdim": 16, "chunk_size": 8, "checkpointed": 4,
                            **{k: v for k, v in SMALL.items() if k != "n_layers"}},
    # Mamba-2 and GQA layers ("MMAM"): the hybrid family gets the split from the two mixer classes.
    "hybrid": {"model_type": "hybrid", "layer_pattern": "MMAM", "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
               "d_state": 16, "headdim": 16, "chunk_size": 8, **{k: v for k, v in SMALL.items() if k != "n_layers"}},
}


def main() -> None:
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    group = dist.new_group(list(range(dist.get_world_size())))
    for name in sys.argv[1:]:
        loss_diff, grad_diff = compare(CASES[name], group)
        if dist.get_rank() == 0:
            print(f"{name} loss_diff={loss_diff:.3e} grad_diff={grad_diff:.3e}", flush=True)
    teardown_distributed()


def compare(fields: dict, group) -> tuple[float, float]:
    from model import ModelConfig, create_model, sequence_parallel

    torch.manual_seed(0)
    fields = dict(fields)
    checkpointed = fields.pop("checkpointed", 0)
    config = ModelConfig(**fields)
    family = config.model_type
    # fp32; on CUDA (tools/gpu_check.sh, NCCL) each rank on its own GPU, the fused kernels under the split.
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    model = create_model(family, config).to(device)
    model.num_checkpointed_blocks = checkpointed  # recomputed in backward while training (the default mode)
    batch = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 1)).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    _, reference_loss = model(inputs, targets)
    reference_loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    sequence_parallel.set_sequence_parallel_group(group)
    local_inputs = sequence_parallel.shard_sequence(inputs)
    local_targets = sequence_parallel.shard_sequence(targets)
    _, local_loss = model(local_inputs, local_targets)
    loss = sequence_parallel.group_mean_loss(local_loss, local_targets.numel())
    loss.backward()
    grad_diff = 0.0
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)  # DeepSpeed's sum over the sequence-parallel ranks
        scale = reference[name].abs().max().item() or 1.0
        grad_diff = max(grad_diff, (grad - reference[name]).abs().max().item() / scale)
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.item())  # every rank of the group must report the same group loss
    sequence_parallel.set_sequence_parallel_group(None)
    return max(abs(value - reference_loss.item()) for value in losses), grad_diff


if __name__ == "__main__":
    main()
