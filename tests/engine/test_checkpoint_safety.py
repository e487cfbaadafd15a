"""Checkpoint storage errors and the weights-only check, in-process (no training): fast unit tests.

Oracle: the files on disk before and after (byte-identical). The weights-only check of every file a command reads
is tested in tests/engine/test_checkpoint_trust.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint.manager import CheckpointManager
from engine.checkpoint.commit import MANIFEST, damage_of
from engine.errors import CheckpointError


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeEngine:
    """Just enough of a DeepSpeed engine for CheckpointManager.save: a module, and a save that writes part of a
    file and then fails the way the disk would."""

    def __init__(self, error: OSError | None):
        self.module = torch.nn.Linear(4, 4)
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"module": self.module.state_dict()}, folder / "mp_rank_00_model_states.pt")
        if self.error is not None:
            (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 100)
            raise self.error


def committed_run(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3, run_record={"run_config": {"x": 1}})
    manager.prepare(resume=True)
    manager.save(FakeEngine(None), 2, {"step": 2})
    return manager, tmp_path / "ckpt"


# A full disk is tested with the kernel's own error in test_storage_errors.py (torch reports it as RuntimeError, which
# a fake OSError here never showed). These two cannot be made real on the test machines (tests run as root, which
# ignores permissions; a read-only mount needs privileges), so they stay simulated: they test the wording only.
@pytest.mark.parametrize("code, hint", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_a_failing_save_says_why_and_loses_nothing(tmp_path, code, hint):
    manager, root = committed_run(tmp_path)
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=hint) as raised:
        manager.save(FakeEngine(OSError(code, os.strerror(code), str(root / "x.pt"))), 4, {"step": 4})
    assert "training.checkpoint_dir" in str(raised.value)
    assert snapshot(root) == before  # the half-written temporary folder is gone, step 2 untouched


def test_too_little_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    manager, root = committed_run(tmp_path)
    before = snapshot(root)
    needed = sum(json.loads((root / "checkpoint_step_2" / MANIFEST).read_text())["files"].values())
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(needed * 4, 0, needed // 2))
    with pytest.raises(CheckpointError, match="not enough free disk") as raised:
        manager.save(FakeEngine(None), 4, {"step": 4})
    assert f"{needed / 2**20:,.1f} MiB" in str(raised.value)  # the size of the previous checkpoint
    assert snapshot(root) == before


def test_a_committed_checkpoint_is_never_rewritten(tmp_path):
    manager, root = committed_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (root / "checkpoint_step_2").iterdir()}
    time.sleep(0.01)
    manager.save(FakeEngine(None), 2, {"step": 2})
    assert {p: p.stat().st_mtime_ns for p in (root / "checkpoint_step_2").iterdir()} == before


def test_damage_is_found_from_the_manifest(tmp_path):
    _, root = committed_run(tmp_path)
    folder = root / "checkpoint_step_2"
    assert damage_of(folder) is None
    model = folder / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert "mp_rank_00_model_states.pt has 100 bytes" in damage_of(folder)


def test_checkpoint_dir_that_is_a_file_or_an_earlier_run(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        CheckpointManager(tmp_path / "file", keep_last=3, run_record={}).prepare(resume=True)
    _, root = committed_run(tmp_path)
    before = snapshot(root)
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run") as raised:
        CheckpointManager(root, keep_last=3, run_record={}).prepare(resume=False)
    assert "checkpoint_step_2" in str(raised.value) and "training.resume=true" in str(raised.value)
    assert snapshot(root) == before
