"""Run under torchrun (2 or 4 ranks) by tests/model/test_sequence_parallel.py: the loss and every gradient of one
model on whole sequences (no sequence parallelism, the oracle, computed on every rank) against the same model with
each sequence split over the ranks (Ulysses / head-sharded Mamba), the shard losses combined by group_mean_loss and
the gradients summed over the group, as DeepSpeed sums them. argv: FAMILY [key=value ...] (ModelConfig fields).
Prints 'max_loss_diff=..' and 'max_grad_diff=..' (relative to the gradient's scale) on rank 0."""
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


def main() -> None:
    import yaml

    from engine.distributed import init_distributed, teardown_distributed
    from model import ModelConfig, create_model, sequence_parallel

    family, *pairs = sys.argv[1:]
    fields = {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}
    init_distributed()
    torch.manual_seed(0)
    config = ModelConfig(model_type=family, **fields)
    model = create_model(family, config).double()  # float64: the two orders of summation agree to ~1e-13
    batch = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:]

    _, reference_loss = model(inputs, targets)
    reference_loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    sequence_parallel.set_sequence_parallel_group(dist.new_group(list(range(dist.get_world_size()))))
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
    loss_diff = abs(loss.item() - reference_loss.item())
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.item())
    if dist.get_rank() == 0:
        print(f"loss={reference_loss.item():.12f} group_losses={losses}")
        print(f"max_loss_diff={loss_diff:.3e}")
        print(f"max_grad_diff={grad_diff:.3e}")
    sequence_parallel.set_sequence_parallel_group(None)
    teardown_distributed()


if __name__ == "__main__":
    main()
