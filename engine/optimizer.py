"""The optimizer DeepSpeed steps: AdamW from the DeepSpeed config, or DeepSpeed's Muon with the project's groups.

AdamW is the DeepSpeed config's `"optimizer": {"type": "AdamW"}` (launcher/ds_config.py), given the groups of
engine/param_groups.py `param_groups`.

Muon (training.optimizer: muon) is DeepSpeed 0.19.8's own `MuonWithAuxAdam`
(deepspeed/runtime/zero/muon/muon_optimizer.py), which every ZeRO stage recognises by type and steps with its
Muon code (stage_1_and_2.py get_flat_partition, stage3.py _apply_muon_to_accumulated_grads, bf16_optimizer.py
_prepare_muon_updates). It is handed to `deepspeed.initialize(optimizer=...)` as a callable rather than named in
the DeepSpeed config, because the config path decides by itself which parameters are Muon's: `initialize` calls
`set_optimizer_flags`, which sets `param.use_muon` on every parameter of >= 2 dims whose name lacks "embed" or
"lm_head", overwriting any tag set before, and the engine then splits the groups by that tag
(engine.py `_muon_param_groups`); no hook runs between the two. That rule would give Mamba's 3-D conv1d filters
and Mamba-1's A_log to Muon. With a client optimizer `set_optimizer_flags` does nothing (it runs only when the
config names Muon), so the tags set here, by the project's one rule (engine/param_groups.py
`muon_parameter_ids`), are the ones the ZeRO stages read, and the groups are the project's, with the
learning-rate scaling of `muon_param_groups`. What the config path would add beyond that is the choice of the
auxiliary Adam class (`get_optimizer_configuration`), which this module makes the same way the AdamW path does:
torch's AdamW, foreach on CPU, fused on CUDA.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from engine.config import TrainingConfig
from engine.param_groups import muon_param_groups, muon_parameter_ids, param_groups


def tag_muon_parameters(model: torch.nn.Module) -> set[int]:
    """Set `use_muon` on every parameter (True for the rule's hidden matrices): the attribute DeepSpeed's ZeRO
    stages read at each step to decide which gradients to orthogonalize."""
    muon = muon_parameter_ids(model)
    for param in model.parameters():
        param.use_muon = id(param) in muon
    return muon


def muon_optimizer(model: torch.nn.Module, training: TrainingConfig, *, fused_adam: bool = False
                   ) -> Callable[[Any], torch.optim.Optimizer]:
    """What deepspeed.initialize(optimizer=...) takes for training.optimizer=muon: a callable that ignores the
    parameters DeepSpeed passes and builds MuonWithAuxAdam from the project's groups of `model`."""

    def build(_model_parameters: Any) -> torch.optim.Optimizer:
        # Imported here: importing DeepSpeed's Muon compiles its kernels (DeepSpeed's own comment, engine.py).
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        tag_muon_parameters(model)
        groups = muon_param_groups(model, learning_rate=training.learning_rate, weight_decay=training.weight_decay)
        for group in groups:
            if group["use_muon"]:
                group.update(momentum=training.muon_momentum, ns_method=training.muon_ns_method)
            else:
                group.update(betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps)
        return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                               adam_optimizer_kwargs={"fused": True} if fused_adam else {"foreach": None},
                               adam_w_mode=True)

    return build


def optimizer_arguments(model: torch.nn.Module, training: TrainingConfig, *, on_cuda: bool) -> dict[str, Any]:
    """The optimizer keywords of deepspeed.initialize for `training.optimizer`, for the trainer and the step timing
    alike: AdamW's groups for the DeepSpeed config's optimizer, or Muon built here (the module docstring says why)."""
    if training.optimizer == "muon":
        return {"optimizer": muon_optimizer(model, training, fused_adam=on_cuda)}
    return {"model_parameters": param_groups(model, training.weight_decay)}
