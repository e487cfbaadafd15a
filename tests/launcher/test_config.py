"""Run config: presets, the original's YAML files, overrides, and the messages bad input gets."""
from __future__ import annotations

import pytest

from launcher.config import ConfigError, build_run_config, load_yaml, parse_override
from launcher.ds_config import build_ds_config
from launcher.planning.plan import choose_plan
from launcher.presets import PRESETS
from model import create_model
from tests.conftest import REPO_ROOT


def test_the_original_presets_are_all_there():
    assert {"tiny", "test_small", "1b_transformer", "7b_transformer", "1b_mamba", "7b_mamba"} <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_gpus", [1, 4])
def test_every_preset_validates_and_renders_a_ds_config(name, num_gpus):
    run = build_run_config(preset=name, num_gpus=num_gpus)
    assert run.model_type == PRESETS[name]["model_type"] == run.model.model_type
    plan = choose_plan(run.model, run.training, world_size=num_gpus)
    ds = build_ds_config(run, plan)
    assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
                                      * num_gpus)
    assert ds["zero_optimization"]["stage"] == plan.zero_stage
    assert ds["bf16"]["enabled"] == run.training.bf16


@pytest.mark.parametrize("name, low, high", [("tiny", 2e6, 8e6), ("test_small", 40e6, 60e6),
                                             ("1b_transformer", 1.0e9, 1.2e9)])
def test_preset_sizes_match_their_names(name, low, high):
    run = build_run_config(preset=name)
    with __import__("torch").device("meta"):
        model = create_model(run.model_type, run.model)
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_original_default_config_loads_unchanged():
    run = build_run_config(config_path=str(REPO_ROOT / "config.yaml"))
    assert run.model_type == "mamba" and run.num_gpus == 1
    assert (run.model.d_model, run.model.n_layers, run.model.dropout) == (1536, 24, 0.1)
    assert run.training.learning_rate == pytest.approx(3e-4)  # YAML reads '3e-4' as a string: coerced
    assert run.training.batch_size is None and run.training.fp16 is True and run.training.max_steps == 50000
    assert run.system.auto_shutdown is False and run.system.shutdown_delay == 60


def test_original_multi_gpu_example_loads_unchanged():
    run = build_run_config(config_path=str(REPO_ROOT / "config_transformer_4gpu.yaml"))
    assert run.num_gpus == 4 and run.training.batch_size == 8 and run.training.gradient_accumulation_steps == 2
    plan = choose_plan(run.model, run.training, world_size=4)
    assert (plan.micro_batch, plan.grad_accum) == (8, 2)  # explicit values are respected


@pytest.mark.parametrize("path", ["config_1b_transformer.yaml", "config_7b_transformer.yaml"])
def test_shipped_config_files_load(path):
    assert build_run_config(config_path=str(REPO_ROOT / path)).model_type == "transformer"


def test_precedence_preset_then_file_then_flags_then_set(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("num_gpus: 2\ntraining:\n  max_steps: 7\n  learning_rate: 1.0e-3\n")
    run = build_run_config(preset="tiny", config_path=str(config), num_gpus=3,
                           overrides=["training.max_steps=9", "model.n_layers=2"])
    assert run.num_gpus == 3 and run.training.max_steps == 9 and run.training.learning_rate == 1e-3
    assert run.model.n_layers == 2 and run.model.d_model == PRESETS["tiny"]["model"]["d_model"]


def test_parse_override_types_values():
    assert parse_override("training.bf16=true") == {"training": {"bf16": True}}
    assert parse_override("training.batch_size=null") == {"training": {"batch_size": None}}
    assert parse_override("data.cache_dir=/tmp/x=y") == {"data": {"cache_dir": "/tmp/x=y"}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("training.max_steps")


def test_misspelled_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"training\.max_step: unknown key \(did you mean 'training\.max_steps'"):
        build_run_config(preset="tiny", overrides=["training.max_step=3"])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        build_run_config(preset="tiny", overrides=["model.d_model=255", "training.fp16=maybe",
                                                   "training.zero_stage=4", "sytem.auto_shutdown=true"])
    message = str(info.value)
    for key in ("model.d_model", "training.fp16", "training.zero_stage", "sytem"):
        assert key in message, message


@pytest.mark.parametrize("overrides, fragment", [
    (["training.fp16=true", "training.bf16=true"], "set one of them to false"),
    (["training.offload=optimizer+params", "training.zero_stage=2"], "needs ZeRO-3"),
    (["training.offload=optimizer", "training.zero_stage=0"], "needs ZeRO stage 1-3"),
    (["model.n_kv_heads=3"], "multiple of model.n_kv_heads"),
    (["training.max_steps=0"], "training.max_steps must be >= 1"),
    (["num_gpus=0"], "num_gpus"),
])
def test_impossible_combinations_name_the_fix(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
        build_run_config(preset="tiny", overrides=overrides)


@pytest.mark.parametrize("value, expected, blocks", [("true", True, 4), ("false", False, 0), ("auto", "auto", None),
                                                     ("0", 0, 0), ("1", 1, 1), ("3", 3, 3), ("4", 4, 4)])
def test_activation_checkpointing_takes_a_switch_or_a_block_count(value, expected, blocks):
    run = build_run_config(preset="tiny", overrides=[f"training.activation_checkpointing={value}"])  # 4 blocks
    assert run.training.activation_checkpointing == expected
    assert type(run.training.activation_checkpointing) is type(expected)  # 1 stays one block, not True
    assert run.training.checkpointed_blocks(4) == blocks


@pytest.mark.parametrize("value", ["-1", "1.5", "some", "[2]"])
def test_activation_checkpointing_refuses_what_is_not_a_count(value):
    with pytest.raises(ConfigError, match="training.activation_checkpointing must be true .* got"):
        build_run_config(preset="tiny", overrides=[f"training.activation_checkpointing={value}"])


def test_unknown_preset_and_model_type():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        build_run_config(preset="tiny_")
    with pytest.raises(ConfigError, match="model_type 'gpt' is not available"):
        build_run_config(preset="tiny", model_type="gpt")


def test_duplicate_yaml_key_is_rejected(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("training:\n  max_steps: 5\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match="'max_steps' is given twice"):
        load_yaml(config)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_run_config(config_path=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listy)


def test_ds_config_follows_the_training_section():
    run = build_run_config(preset="tiny", overrides=["training.grad_clip=0.5", "training.warmup_steps=7",
                                                     "training.zero_stage=2", "training.offload=optimizer"])
    ds = build_ds_config(run, choose_plan(run.model, run.training, world_size=2))
    assert ds["gradient_clipping"] == 0.5
    assert "scheduler" not in ds  # the engine's own schedule (engine/schedule.py); a DeepSpeed one would win over it
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload needs DeepSpeedCPUAdam
    plain = build_run_config(preset="tiny", overrides=["training.zero_stage=1"])
    assert build_ds_config(plain, choose_plan(plain.model, plain.training, 1))["optimizer"]["params"]["torch_adam"]


def test_a_mamba_section_is_validated_as_mamba():
    # d_model 250 is not divisible by the Transformer's default n_heads (4): irrelevant to a Mamba model.
    run = build_run_config(preset="tiny_mamba", overrides=["model.ssm_type=mamba1", "model.d_model=250"])
    assert (run.model_type, run.model.model_type, run.model.d_model) == ("mamba", "mamba", 250)
    from_yaml_family = build_run_config(overrides=["model_type=mamba", "model.ssm_type=mamba1", "model.d_model=250"])
    assert from_yaml_family.model.model_type == "mamba"
    with pytest.raises(ConfigError, match="divisible by model.n_heads"):  # the Transformer check still applies
        build_run_config(preset="tiny", overrides=["model.d_model=250"])
