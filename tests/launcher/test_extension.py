"""The launcher's extension points: a registered model family and a Trainer subclass through main()
(examples/custom_family.py), planned from the family's own facts."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, SMALL_MODEL, run_job


def test_a_registered_family_is_planned_from_the_model_itself():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import custom_family  # registers residual_mlp

    from launcher.config import build_run_config
    from launcher.planning.model_sizes import count_parameters, layer_activation_bytes
    from launcher.planning.plan import choose_plan

    run = build_run_config(preset="tiny", model_type="residual_mlp", overrides=SMALL_MODEL)
    built = custom_family.ResidualMLP(run.model)
    assert count_parameters(run.model) == sum(p.numel() for p in built.parameters())
    assert layer_activation_bytes(run.model, 2, seq_len=64) == 2 * 2 * run.model.d_model  # the family's own figure
    plan = choose_plan(run.model, run.training, world_size=1)
    assert plan.memory.num_params == sum(p.numel() for p in built.parameters())


@pytest.mark.slow
def test_a_trainer_subclass_trains_a_registered_family_through_main(tmp_path, data_cache):
    settings = [*SMALL_MODEL, "training.max_steps=3", "training.batch_size=2", "training.gradient_accumulation_steps=1",
                "training.eval_interval=3", "training.eval_batches=1", "training.warmup_steps=1",
                "training.sample_tokens=4", f"data.cache_dir={data_cache}"]
    command = [sys.executable, str(REPO_ROOT / "examples" / "custom_family.py"), "--preset", "tiny",
               "--model_type", "residual_mlp", *[a for s in settings for a in ("--set", s)]]
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = run_job(command, cwd=tmp_path, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CountingTrainer ran 3 steps on rank 0" in output and "finished 3 steps" in output
    state = torch.load(tmp_path / "checkpoints" / "final_model.pt", weights_only=True)
    assert state["config"]["model_type"] == "residual_mlp"
    assert {"embedding.weight", "layers.0.weight", "lm_head.weight"} <= set(state["model_state_dict"])
