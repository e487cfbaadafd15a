"""A real storage failure while saving: the kernel's own EFBIG (a subprocess under `ulimit -f` with SIGXFSZ
ignored, so write() fails instead of killing the process), which torch.save reports as RuntimeError, not OSError.

Expected: one error naming the file and the cause, the temporary files removed, earlier checkpoints byte-identical.
Oracles: the files on disk before and after, and the file-size limit the test itself set.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.engine.test_checkpoint_safety import committed_run, snapshot
from tests.launcher.reliability_runs import clean_env, finish, run_args, start

LIMIT_KIB = 1024
"""`ulimit -f` in 1 KiB blocks: 1 MiB, below the 4 MiB the child writes and above the small JSON files."""


def ulimit_prefix(limit_kib: int) -> list[str]:
    """Run a command under a file-size limit with SIGXFSZ ignored: write() past the limit fails with EFBIG."""
    return ["bash", "-c", f"ulimit -f {limit_kib}; trap '' XFSZ; exec \"$0\" \"$@\""]


def run_limited(code: str, *, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*ulimit_prefix(LIMIT_KIB), sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                          timeout=120)


def test_the_limit_makes_torch_save_raise_runtime_error(tmp_path):
    """The premise: under this limit torch.save fails with a RuntimeError (no errno), a plain write with EFBIG."""
    result = run_limited("""
        import torch
        try:
            torch.save(torch.zeros(2**20), "big.pt")
        except RuntimeError as err:
            print("RuntimeError", type(err).__mro__[1].__name__)
    """, cwd=tmp_path)
    assert result.stdout.split() == ["RuntimeError", "Exception"], result.stderr[-2000:]


def test_a_checkpoint_save_past_the_file_size_limit(tmp_path):
    manager, root = committed_run(tmp_path)  # checkpoint_step_2, written without a limit
    before = snapshot(root)
    result = run_limited(f"""
        import torch
        from engine.checkpoint.manager import CheckpointManager
        from engine.errors import CheckpointError
        from tests.engine.test_checkpoint_safety import FakeEngine
        engine = FakeEngine(None)
        engine.module = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, past the 1 MiB limit
        manager = CheckpointManager({str(root)!r}, keep_last=3, run_record={{}})
        try:
            manager.save(engine, 4, {{"step": 4}})
        except CheckpointError as err:
            print("error:", err)
    """, cwd=tmp_path)
    lines = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "checkpoint_step_4" in lines[0] and "ulimit -f" in lines[0] and f"{LIMIT_KIB * 1024:,} bytes" in lines[0]
    assert "training.checkpoint_dir" in lines[0]
    assert snapshot(root) == before  # no .tmp-checkpoint_step_4, checkpoint_step_2 and `latest` untouched


def test_an_export_past_the_file_size_limit(tmp_path):
    manager, root = committed_run(tmp_path)
    torch.save({"model_state_dict": {"w": torch.ones(2)}}, root / "final_model.pt")
    before = snapshot(root)
    result = run_limited(f"""
        import torch
        from pathlib import Path
        from engine.checkpoint.manager import CheckpointManager, atomic_torch_save
        from engine.errors import CheckpointError
        manager = CheckpointManager({str(root)!r}, keep_last=3, run_record={{}})
        path = Path({str(root)!r}) / "final_model.pt"
        try:
            with manager.storage_errors(path):
                atomic_torch_save({{"model_state_dict": {{"w": torch.zeros(2**20)}}}}, path)
        except CheckpointError as err:
            print("error:", err)
    """, cwd=tmp_path)
    lines = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "final_model.pt" in lines[0] and "ulimit -f" in lines[0], result.stderr[-3000:]
    assert snapshot(root) == before  # the old final_model.pt byte-identical, no .final_model.pt.tmp


@pytest.mark.slow
def test_a_training_run_that_hits_the_file_size_limit(tmp_path, data_cache):
    """The whole command: exit 2 with one line, the temporary checkpoint folder gone, step 2 byte-identical."""
    code, out, err = finish(start(run_args(data_cache, max_steps=2), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    root = tmp_path / "checkpoints"
    before = snapshot(root / "checkpoint_step_2")
    latest = (root / "latest").read_bytes()
    # 4 MiB: the 2.4 MB weight exports fit, the 7 MB ZeRO-0 model-and-optimizer file of step 4 does not.
    code, out, err = finish(start(run_args(data_cache, max_steps=4), cwd=tmp_path, env=clean_env(),
                                  prefix=[*ulimit_prefix(4096), sys.executable]))
    assert code == 2, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "checkpoint_step_4" in errors[0] and "ulimit -f" in errors[0], errors[0]
    assert not list(root.glob(".tmp-*")) and not (root / "checkpoint_step_4").exists()
    assert snapshot(root / "checkpoint_step_2") == before and (root / "latest").read_bytes() == latest
