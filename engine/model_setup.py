"""Building the model a rank trains: where it is created, in which dtype, and whether its blocks are compiled.

One function for the trainer, tools/throughput.py and tools/check_memory_gpu.py, so the benchmark and the memory
check measure the model exactly as training builds it.
"""
from __future__ import annotations

from typing import Any

import deepspeed
from torch import nn

from model import ModelConfig, create_model
from model.compile import compile_blocks
from model.registry import TRAINING_DTYPES, create_model_on


def build_model(model_config: ModelConfig, *, ds_config: dict[str, Any], precision: str, device: str,
                compiled: bool = False, mpu=None) -> nn.Module:
    """The model for one rank, before deepspeed.initialize.

    ZeRO-3: built under deepspeed.zero.Init, each layer partitioned as it is created. ZeRO 0-2 on CUDA: built
    directly on `device` in the training dtype, so no rank holds the whole fp32 model in host RAM (the memory
    plan counts no host copy). CPU: built in fp32 on the host as always (DeepSpeed casts it), so CPU runs stay
    bit-identical to earlier ones. mpu: DeepSpeed's sequence-parallel state (engine/trainer.py), which tells
    zero.Init the data-parallel size the batch divides over and the group ZeRO-3 partitions over.
    """
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3, mpu=mpu):
        if not zero3 and device.startswith("cuda"):
            model = create_model_on(model_config.model_type, model_config, device=device,
                                    dtype=TRAINING_DTYPES[precision])
        else:
            model = create_model(model_config.model_type, model_config)
    if compiled:
        compile_blocks(model)
    return model
