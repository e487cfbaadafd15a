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


# ---- Muon: which parameters it orthogonalizes ------------------------------------------------------------------
# Muon is defined for the 2-D weight matrices of hidden layers (Jordan et al. 2024, "Muon: An optimizer for hidden
# layers in neural networks"; Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982, section 2):
# the embedding, the output head, norm gains, biases and other scalar/vector parameters stay with AdamW. Here that
# is the decay rule above narrowed to nn.Linear: a Linear weight that is not the output head and not tied to an
# embedding. So Mamba's conv1d filters (3-D, nn.Conv1d), A_log (2-D in Mamba-1, but an SSM parameter, not a
# Linear), D and dt_proj.bias go to AdamW, while in_proj, x_proj, dt_proj and out_proj weights go to Muon. The rule
# reads module types, not names or ndim, for the reasons the module docstring gives (ZeRO-3's 1-D partitions), so a
# new family (a hybrid of attention and Mamba blocks) is covered by what its modules are, with no list to extend.
# DeepSpeed 0.19.8 has its own rule (deepspeed/__init__.py set_optimizer_flags: every tensor of >= 2 dims whose
# name lacks "embed"/"lm_head"), which would put Mamba's conv1d filters and Mamba-1's A_log into Muon;
# engine/optimizer.py says how this rule replaces it.

OUTPUT_HEAD_ATTRIBUTE = "lm_head"
"""The attribute every model family names its output projection with (an nn.Linear, maybe tied to the embedding)."""


def muon_parameter_ids(model: torch.nn.Module) -> set[int]:
    """id() of every parameter Muon updates: hidden nn.Linear weights (see the comment above)."""
    head = getattr(model, OUTPUT_HEAD_ATTRIBUTE, None)
    excluded = {id(head.weight)} if isinstance(head, torch.nn.Linear) else set()
    excluded |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {id(m.weight) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in excluded
            and not getattr(m.weight, "_no_weight_decay", False)}


def muon_fan_in(model: torch.nn.Module) -> dict[int, int]:
    """id() of each Muon parameter -> its layer's input width (nn.Linear.in_features: read from the module, since
    under ZeRO-3 the tensor itself is a 1-D partition)."""
    muon = muon_parameter_ids(model)
    return {id(m.weight): m.in_features for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) in muon}


MOONLIGHT_RMS = 0.2
"""Target RMS of a Muon update, matched to AdamW's typical update RMS of 0.2-0.4 (arXiv:2502.16982, section 2.2,
"Consistent update RMS")."""


def muon_lr_multiplier(fan_in: int) -> float:
    """Muon lr / AdamW lr for a matrix with `fan_in` columns, so that AdamW's learning rate and weight decay carry
    over to Muon unchanged.

    Moonlight (arXiv:2502.16982, eq. 4) updates a (A, B) matrix by lr * (0.2 * sqrt(max(A, B)) * O + wd * W), O the
    orthogonalized momentum, whose RMS is 1 / sqrt(max(A, B)): every update then has RMS 0.2 * lr, like AdamW's.
    DeepSpeed's muon_update already multiplies O by sqrt(max(1, A / B)) (Keller Jordan's scale,
    deepspeed/runtime/zero/muon/original_muon.py `_aspect_ratio_scale`), so the lr that gives Moonlight's update is
    lr * 0.2 * sqrt(max(A, B)) / sqrt(max(1, A / B)) = lr * 0.2 * sqrt(B) whether A > B or not: B = fan_in.
    """
    return MOONLIGHT_RMS * fan_in ** 0.5


def muon_param_groups(model: torch.nn.Module, *, learning_rate: float, weight_decay: float
                      ) -> list[dict[str, Any]]:
    """DeepSpeed MuonWithAuxAdam groups: Muon groups by fan-in, each with its Moonlight lr and a weight decay that
    keeps the decay step at lr * weight_decay (DeepSpeed decays by group lr * group weight_decay), then the AdamW
    groups of `param_groups` (decayed, not decayed) with use_muon False.

    Each Muon group's params are sorted by `size()`, largest first, as MuonWithAuxAdam sorts them itself (a stable
    sort on the same key): the order here is then the order the optimizer holds (engine/checkpoint/export.py
    matches ZeRO-0 master weights by it)."""
    fan_in = muon_fan_in(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = []
    for width in sorted(set(fan_in.values())):
        members = sorted((p for p in params if fan_in.get(id(p)) == width), key=lambda p: p.size(), reverse=True)
        scale = muon_lr_multiplier(width)
        groups.append({"params": members, "use_muon": True, "lr": learning_rate * scale,
                       "weight_decay": weight_decay / scale, "name": f"muon_fan_in_{width}"})
    adam = [dict(group, params=[p for p in group["params"] if id(p) not in fan_in])
            for group in param_groups(model, weight_decay)]
    for group, name in zip(adam, ("adamw_decay", "adamw_no_decay")):
        groups.append({**group, "use_muon": False, "lr": learning_rate, "name": name})
    return [group for group in groups if group["params"]]
