"""Bytes a real DeepSpeed engine's tensors hold on CPU, for comparison with launcher.planning.memory.

Run in-process (world size 1) or as a script under torchrun (world size 2: rank 0 prints one JSON line per case).
Every live tensor storage in the process is summed once (gc finds them: the module's weights, DeepSpeed's flat
buffers and fp32 partitions, Adam's moments); the sum before the model is built is subtracted.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from launcher.planning.memory import DEEPSPEED_BUCKET_ELEMENTS  # noqa: E402
from model import ModelConfig, create_model  # noqa: E402

ACCUMULATION = 2
"""Micro-steps per optimizer step: gradients are measured while they accumulate."""
TEST_REDUCE_BUCKET = 100_000
"""reduce_bucket_size for these runs: small, so ZeRO-3's up-front bucket does not hide the model states."""
MODEL = ModelConfig(model_type="transformer", vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    ffn_hidden=192, max_seq_len=32, tie_embeddings=False)
"""~0.3M parameters: the embedding and head (131k elements) are above ZeRO-3's persistence threshold, the rest below."""


def held_bytes(model: torch.nn.Module | None = None) -> int:
    """Bytes of every distinct tensor storage alive in this process.

    gc sees tensors that have a Python object; a gradient autograd wrote into param.grad has none until Python
    reads it, so the model's .grad (and DeepSpeed's .grad_accum) are added explicitly.
    """
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches torch.distributed's deprecated reduce_op object
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    if model is not None:
        for param in model.parameters():
            tensors += [t for t in (param.grad, getattr(param, "grad_accum", None)) if isinstance(t, torch.Tensor)]
    storages: dict[int, int] = {}
    for tensor in tensors:
        try:
            if tensor.device.type == "cpu" and not tensor.is_meta:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            continue
    return sum(storages.values())


def ds_config(stage: int, precision: str, offload: str = "none") -> dict[str, Any]:
    """offload as in launcher.planning.memory.Layout: 'optimizer' runs DeepSpeedCPUAdam (a JIT build of cpu_adam)."""
    zero = {"stage": stage, **DEEPSPEED_BUCKET_ELEMENTS, "reduce_bucket_size": TEST_REDUCE_BUCKET}
    adam = {"lr": 1e-3, "weight_decay": 0.1}
    if offload == "none":
        adam["torch_adam"] = True
    else:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUMULATION,
            "optimizer": {"type": "AdamW", "params": adam},
            "zero_optimization": zero, "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 8}, "steps_per_print": 2**31 - 1}


def measure(stage: int, precision: str, offload: str = "none") -> dict[str, int]:
    """Build MODEL under DeepSpeed and run two optimizer steps: bytes held while gradients accumulate, after a step
    and inside the optimizer's step. On a CPU host, offloaded states are counted with the rest."""
    import deepspeed

    from engine.trainer import param_groups

    rank = int(os.environ.get("RANK", 0))
    base = held_bytes()
    config = ds_config(stage, precision, offload)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3):
        model = create_model(MODEL.model_type, MODEL)
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    step_fn, in_step = inner.step, [0]

    def probed_step(*args, **kwargs):  # DeepSpeed calls it once per parameter group (or ZeRO-3 sub-group)
        in_step[-1] = max(in_step[-1], held_bytes(model) - base - buffers)
        return step_fn(*args, **kwargs)

    inner.step = probed_step
    generator = torch.Generator().manual_seed(rank)
    after_backward = after_step = 0
    for micro_step in range(2 * ACCUMULATION):  # Adam's moments appear in the first step; the second is steady
        idx = torch.randint(0, MODEL.vocab_size, (2, MODEL.max_seq_len), generator=generator)
        in_step.append(0)
        loss = engine(idx, idx)[1]
        engine.backward(loss)
        del loss, idx
        if micro_step == ACCUMULATION:  # first micro-step of the second optimizer step: gradients accumulating
            after_backward = held_bytes(model) - base - buffers
        engine.step()
    after_step = held_bytes(model) - base - buffers
    inner.step = step_fn
    result = {"after_backward": after_backward, "after_step": after_step, "in_step": in_step[-1],
              "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
    engine.destroy()
    del engine, inner
    gc.collect()
    return result


def main() -> None:
    """torchrun entry: measure every case given on argv as STAGE:PRECISION; rank 0 prints JSON lines."""
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    for case in sys.argv[1:]:
        stage, precision = case.split(":")
        result = measure(int(stage), precision)
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps({"stage": int(stage), "precision": precision, **result}), flush=True)
    teardown_distributed()


if __name__ == "__main__":
    main()
