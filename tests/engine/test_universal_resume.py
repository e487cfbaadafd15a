"""A checkpoint saved by N ranks resumes with M ranks (DeepSpeed's universal checkpoint, converted on resume), and
training continues as the same run uninterrupted would: 2 -> 1 and 1 -> 2 ranks, ZeRO-2 and ZeRO-3, on CPU.

Tolerance: after the switch the losses and weights match the uninterrupted one-rank run to fp32 rounding (rel
1e-5 on losses, rtol 1e-4 / atol 1e-5 on weights, as tests/engine/test_rank_equivalence.py): the samples, the
optimizer state and the LR schedule are the same, only the order of fp32 additions differs (the gradient of 8
sequences summed by two ranks' all-reduce instead of one rank's accumulation), which changes the last bits.
A resume that lost the Adam moments or the step count misses by far more (checked below)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.universal import needs_universal, saved_world_size, universal_folder
from tests.conftest import EXTENSIONS_DIR, REPO_ROOT, free_port
from tests.engine import universal_resume
from tests.engine.universal_resume import SAVE_AT, STEPS

STAGES = [2, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache, process_group) -> Path:
    """In-process one-rank runs, then one torchrun job with two ranks, then the one-rank resumes."""
    out = tmp_path_factory.mktemp("universal")
    for stage in STAGES:
        universal_resume.run("straight", str(data_cache), out / f"straight{stage}", stage)
        universal_resume.run("first", str(data_cache), out / f"one_to_two{stage}", stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    jobs = [job for stage in STAGES for job in (f"first:{stage}:two_to_one{stage}", f"resume:{stage}:one_to_two{stage}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(Path(universal_resume.__file__)), str(data_cache), str(out),
               *jobs]
    result = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in STAGES:
        universal_resume.run("resume", str(data_cache), out / f"two_to_one{stage}", stage)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("direction, first_ws, resume_ws", [("two_to_one", 2, 1), ("one_to_two", 1, 2)])
def test_resume_on_another_world_size_continues_the_run(runs, stage, direction, first_ws, resume_ws):
    run_dir = runs / f"{direction}{stage}"
    straight = torch.load(runs / f"straight{stage}" / "straight_ws1.pt", weights_only=True)
    first = torch.load(run_dir / f"first_ws{first_ws}.pt", weights_only=True)
    resumed = torch.load(run_dir / f"resume_ws{resume_ws}.pt", weights_only=True)

    folder = run_dir / "ckpt" / f"checkpoint_step_{SAVE_AT}"
    assert saved_world_size(folder) == first_ws and needs_universal(folder, resume_ws)
    assert (universal_folder(folder) / "zero").is_dir()  # converted on resume, kept beside the original
    assert resumed["start_step"] == SAVE_AT
    assert sorted(first["losses"]) == list(range(1, SAVE_AT + 1))
    assert sorted(resumed["losses"]) == list(range(SAVE_AT + 1, STEPS + 1))

    for step in range(1, STEPS + 1):
        got = (first if step <= SAVE_AT else resumed)["losses"][step]
        assert got == pytest.approx(straight["losses"][step], rel=1e-5), step
    # Losses still falling after the switch: the optimizer moments came along (a fresh Adam would jump).
    assert resumed["losses"][STEPS] < first["losses"][1] - 0.05
    assert resumed["weights"].keys() == straight["weights"].keys()
    for name, weight in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
