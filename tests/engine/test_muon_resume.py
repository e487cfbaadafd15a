"""Muon's momentum is in the checkpoint: a run stopped and resumed equals the run uninterrupted on the same rank
count (ZeRO-1 and ZeRO-3, bit-exact); on another rank count DeepSpeed 0.19.8 cannot convert Muon's states, and
the launcher refuses with the fix. Reuses tests/engine/universal_resume.py's runs (tiny model, 6 steps,
checkpoint at step 3) with optimizer muon."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import run_two_ranks
from tests.engine import universal_resume
from tests.engine.universal_resume import SAVE_AT, STEPS


def losses_and_weights(straight: dict, first: dict, resumed: dict) -> tuple[list, list, float]:
    got = [(first if step <= SAVE_AT else resumed)["losses"][step] for step in range(1, STEPS + 1)]
    want = [straight["losses"][step] for step in range(1, STEPS + 1)]
    worst = max(float((resumed["weights"][n] - w).abs().max()) for n, w in straight["weights"].items())
    return got, want, worst


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_muon_resumes_exactly_on_the_same_rank_count(tmp_path, data_cache, process_group, stage):
    paths = {role: universal_resume.run(role, str(data_cache), tmp_path / ("straight" if role == "straight"
                                                                           else "stopped"), stage, "muon")
             for role in ("straight", "first", "resume")}
    straight, first, resumed = (torch.load(paths[r], weights_only=True) for r in ("straight", "first", "resume"))
    assert resumed["start_step"] == SAVE_AT
    got, want, worst = losses_and_weights(straight, first, resumed)
    print(f"ZeRO-{stage} muon same-size resume: losses {got} vs {want}, max weight deviation {worst:.2e}")
    assert got == want  # bit-exact: the momentum, Adam's moments and the schedule all came back
    assert worst == 0.0


@pytest.mark.slow
def test_muon_refuses_to_resume_on_another_rank_count(tmp_path, data_cache):
    """DeepSpeed 0.19.8's universal converter reads Adam's exp_avg only (KeyError on Muon's momentum_buffer, seen
    when this test converted a 2-rank ZeRO-2 Muon checkpoint): the launcher refuses before any rank starts, with the
    fix, and the engine's converter refuses too, before writing anything."""
    from engine.checkpoint.universal import ensure_universal, universal_folder
    from engine.errors import CheckpointError
    from launcher.config import ConfigError, build_run_config
    from launcher.planning.hardware import UNLIMITED
    from launcher.resume import find_resume_point, plan_resumed_run

    run_two_ranks(universal_resume.__file__, str(data_cache), str(tmp_path), "first:2:two_to_one:muon",
                  cwd=tmp_path, timeout=400)
    run = build_run_config(preset="tiny", overrides=[
        *universal_resume.MODEL, "training.optimizer=muon", f"data.cache_dir={data_cache}",
        "training.learning_rate=3e-3", "training.warmup_steps=2", "training.weight_decay=1.0", "training.batch_size=4",
        "training.gradient_accumulation_steps=1",
        f"training.checkpoint_dir={tmp_path / 'two_to_one' / 'ckpt'}", "training.zero_stage=2"])
    point = find_resume_point(run)
    assert point is not None and point.folder.name == f"checkpoint_step_{SAVE_AT}"
    plan_resumed_run(run, point, 2, UNLIMITED, report=False)  # the same rank count resumes
    with pytest.raises(ConfigError, match="saved by 2 ranks with training.optimizer=muon.*--num_gpus 2"):
        plan_resumed_run(run, point, 1, UNLIMITED, report=False)
    with pytest.raises(CheckpointError, match="Muon states"):
        ensure_universal(point.folder)
    assert not universal_folder(point.folder).exists()
    assert not any(p.name.startswith(".universal") for p in point.folder.iterdir())
