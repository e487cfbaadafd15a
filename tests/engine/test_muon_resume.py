"""Muon's momentum is in the checkpoint: a run stopped and resumed equals the run uninterrupted on the same rank
count (ZeRO-1 and ZeRO-3, bit-exact). Reuses tests/engine/universal_resume.py's runs (tiny model, 6 steps,
checkpoint at step 3) with optimizer muon; the resume on another rank count is in test_universal_resume.py."""
from __future__ import annotations

import pytest
import torch

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
