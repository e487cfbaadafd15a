"""training.optimizer: which parameters Muon gets, by name, for every model family; the settings around it.

The expected names are written here by hand per family; a family registered without an entry fails
`test_every_family_has_its_muon_names_stated`, so a new family (the hybrid) is checked once its names are added.
"""
from __future__ import annotations

import re

import pytest
import torch

from engine.config import TrainingConfig
from engine.param_groups import muon_lr_multiplier, muon_param_groups, muon_parameter_ids, param_groups
from launcher.config import build_run_config
from launcher.presets import PRESETS
from model.registry import create_model_on, list_models

MUON_NAMES = {
    # attention q/k/v/o and SwiGLU gate/up/down of every block
    "transformer": r"layers\.\d+\.(attn\.w[qkvo]|mlp\.w[123])\.weight",
    # mixer projections (Mamba-1 also x_proj and dt_proj); not conv1d (3-D), A_log, D, dt biases, norms
    "mamba": r"backbone\.layers\.\d+\.mixer\.(in_proj|x_proj|dt_proj|out_proj)\.weight",
    # attention layers' q/k/v/o, Mamba-2 layers' in/out projections, every layer's SwiGLU; not conv1d, A_log, D,
    # dt_bias, the gated norm
    "hybrid": r"layers\.\d+\.(attn\.w[qkvo]|mamba\.(in_proj|out_proj)|mlp\.w[123])\.weight",
}


def named_muon(model: torch.nn.Module) -> set[str]:
    muon = muon_parameter_ids(model)
    return {name for name, p in model.named_parameters() if id(p) in muon}


def test_every_family_has_its_muon_names_stated():
    assert set(list_models()) <= set(MUON_NAMES), "state the new family's Muon parameter names in MUON_NAMES"


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p.startswith("tiny")) + ["1b_mamba"])
@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false"], ["model.ssm_type=mamba1"]])
def test_muon_takes_exactly_the_hidden_matrices(preset, overrides):
    run = build_run_config(preset=preset, overrides=overrides if run_is(preset, overrides) else [])
    model = create_model_on(run.model.model_type, run.model, device="meta")
    names = {name for name, _ in model.named_parameters()}
    expected = {n for n in names if re.fullmatch(MUON_NAMES[run.model.model_type], n)}
    assert expected and named_muon(model) == expected
    assert not any(re.search(r"embed|lm_head|norm|conv1d|A_log|\.D$|bias", n) for n in named_muon(model))
    # Every Muon matrix is one AdamW decays, and the Muon groups plus the AdamW groups hold each parameter once.
    decayed = param_groups(model, 0.1)[0]["params"]
    assert muon_parameter_ids(model) <= {id(p) for p in decayed}
    groups = muon_param_groups(model, learning_rate=1e-3, weight_decay=0.1)
    held = [id(p) for group in groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters()) and len(held) == len(set(held))
    assert {id(p) for g in groups if g["use_muon"] for p in g["params"]} == muon_parameter_ids(model)


def run_is(preset: str, overrides: list[str]) -> bool:
    """ssm_type only means something for Mamba; the tie override for every family."""
    return not any("ssm_type" in o for o in overrides) or "mamba" in preset


def test_deepspeed_own_rule_would_give_mamba_filters_to_muon():
    """Why engine/optimizer.py tags parameters itself: DeepSpeed 0.19.8's rule (set_optimizer_flags, run by
    deepspeed.initialize when the config names Muon) tags Mamba's 3-D conv1d filters and Mamba-1's 2-D A_log."""
    from deepspeed import set_optimizer_flags

    run = build_run_config(preset="tiny_mamba", overrides=["model.ssm_type=mamba1"])
    model = create_model_on("mamba", run.model, device="meta")

    class MuonConfig:
        optimizer_name = "muon"
        optimizer_params = {}

    set_optimizer_flags(MuonConfig(), model)
    deepspeed_muon = {name for name, p in model.named_parameters() if p.use_muon}
    assert {n for n in deepspeed_muon if "conv1d.weight" in n or "A_log" in n}
    assert named_muon(model) < deepspeed_muon


def test_muon_lr_matches_moonlight_update_rms():
    """The group lr times DeepSpeed's aspect factor sqrt(max(1, A / B)) is Moonlight's 0.2 sqrt(max(A, B)) lr,
    for wide, square and tall matrices; the decay step stays lr x weight_decay."""
    for rows, cols in [(64, 256), (256, 256), (1024, 64), (8192, 2)]:
        deepspeed_factor = max(1.0, rows / cols) ** 0.5
        assert muon_lr_multiplier(cols) * deepspeed_factor == pytest.approx(0.2 * max(rows, cols) ** 0.5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    groups = muon_param_groups(model, learning_rate=3e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["muon_fan_in_64", "muon_fan_in_256", "adamw_no_decay"]  # biases
    for group in groups[:2]:
        assert group["lr"] * group["weight_decay"] == pytest.approx(3e-3 * 0.1)


def test_muon_settings_are_checked():
    assert TrainingConfig(optimizer="muon").grad_clip == 0.0  # AdamW's default 1.0 is not carried over
    assert TrainingConfig().grad_clip == 1.0
    with pytest.raises(ValueError, match="training.grad_clip=1.0 with training.optimizer=muon"):
        TrainingConfig(optimizer="muon", grad_clip=1.0)
    with pytest.raises(ValueError, match="training.offload 'optimizer' is not supported with training.optimizer"):
        TrainingConfig(optimizer="muon", offload="optimizer", zero_stage=2)
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        TrainingConfig(optimizer="sgd")
