"""Which parameters AdamW decays: one rule for every model family.

Decayed: the `weight` of every `nn.Linear` and `nn.Embedding` (the model's projection and embedding matrices),
unless the parameter carries `_no_weight_decay = True`.
Not decayed: everything else, i.e. norm weights, biases, the depthwise conv filters of the Mamba mixers
(`conv1d.weight`, `conv1d.bias`), and the SSM parameters `A_log`, `D` and the dt biases (which the Mamba mixers
mark with `_no_weight_decay`, as mamba-ssm does, arXiv:2312.00752 / mamba_ssm/modules/mamba_simple.py).

The rule reads module types and marks rather than `param.ndim`: ndim put Mamba-1's 2-D `A_log` and the 3-D conv
filters in the decayed group, and under ZeRO-3 (`deepspeed.zero.Init`) every parameter is a 1-D partition, so
ndim put all of them in the undecayed one.
"""
from __future__ import annotations

from typing import Any

import torch

DECAYED_MODULE_TYPES = (torch.nn.Linear, torch.nn.Embedding)
"""Modules whose `weight` is decayed."""


def decayed_parameter_ids(model: torch.nn.Module) -> set[int]:
    """id() of every parameter the rule decays (a tied weight counts once)."""
    decayed = set()
    for module in model.modules():
        if isinstance(module, DECAYED_MODULE_TYPES):
            weight = module.weight
            if weight is not None and not getattr(weight, "_no_weight_decay", False):
                decayed.add(id(weight))
    return decayed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [decayed with `weight_decay`, not decayed with 0]."""
    decayed_ids = decayed_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    return [{"params": [p for p in params if id(p) in decayed_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed_ids], "weight_decay": 0.0}]
