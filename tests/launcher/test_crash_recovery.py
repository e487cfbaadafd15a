"""kill -9 at many points, including inside every kind of save, then relaunch: the run ends with exactly the
weights of an uninterrupted run (CPU, fp32, bit for bit). The oracle is that uninterrupted run.

The kills are made deterministic by the test-only hook RAG_TEST_KILL_AT (engine/faults.py).
"""
from __future__ import annotations

import json
import signal

import pytest

from engine.checkpoint.commit import MANIFEST
from tests.launcher.reliability_runs import (assert_same_weights, clean_env, finish, run_args, snapshot, start,
                                             weights)

# Each launch dies at the named point; the comment says what is on disk afterwards (save/eval every 2 steps, 6 steps).
KILLS = [
    "train.step_done@3",       # step 3 done, checkpoint_step_2 committed
    "checkpoint.deepspeed",    # resumed at 2; the save of step 4 dies with a model file half written
    "checkpoint.publish",      # step 4's files complete and verified, not yet renamed into place
    "checkpoint.latest",       # checkpoint_step_4 published, `latest` still names step 2
    "export.best_model.pt",    # resumed at 4 (not 2); dies writing best_model.pt at step 6
    "export.final_model.pt",   # checkpoint_step_6 committed; dies writing final_model.pt
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    folder = tmp_path_factory.mktemp("uninterrupted")
    code, out, err = finish(start(run_args(data_cache), cwd=folder, env=clean_env()))
    assert code == 0, out[-2000:] + err[-3000:]
    return folder / "checkpoints"


@pytest.mark.slow
def test_kills_anywhere_then_relaunch_give_the_uninterrupted_weights(tmp_path, data_cache, uninterrupted):
    root = tmp_path / "checkpoints"
    for point in KILLS:
        code, out, err = finish(start(run_args(data_cache), cwd=tmp_path, env=clean_env(RAG_TEST_KILL_AT=point)))
        assert code == -signal.SIGKILL, f"{point}: expected a kill, got {code}\n{err[-3000:]}"
        if point == "checkpoint.latest":
            assert (root / "latest").read_text() == "checkpoint_step_2" and (root / "checkpoint_step_4").is_dir()
    code, out, err = finish(start(run_args(data_cache), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "at step 6" in out  # the last kill came after checkpoint_step_6
    assert_same_weights(root / "final_model.pt", uninterrupted / "final_model.pt")
    assert_same_weights(root / "best_model.pt", uninterrupted / "best_model.pt")
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("zero_to")) == sorted(
        p.name for p in uninterrupted.iterdir() if not p.name.startswith("zero_to"))  # no temporaries left

    # After the run finished: a relaunch changes nothing (checkpoint_step_6 is not saved again).
    before = snapshot(root / "checkpoint_step_6")
    code, out, err = finish(start(run_args(data_cache), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    assert snapshot(root / "checkpoint_step_6") == before
    assert_same_weights(root / "final_model.pt", uninterrupted / "final_model.pt")

    # The newest checkpoint damaged on disk: the loader warns, resumes from step 4, and still ends the same.
    model = root / "checkpoint_step_6" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    code, out, err = finish(start(run_args(data_cache), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    assert "checkpoint_step_6 is damaged" in err and "at step 4" in out
    assert_same_weights(root / "final_model.pt", uninterrupted / "final_model.pt")
    assert any(p.name.startswith("checkpoint_step_6.damaged-") for p in root.iterdir())  # kept aside, not deleted
    assert json.loads((root / "checkpoint_step_6" / MANIFEST).read_text())["step"] == 6


@pytest.mark.slow
def test_a_tampered_checkpoint_is_refused_and_its_code_never_runs(tmp_path, data_cache, uninterrupted):
    import shutil

    import torch

    root = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted, root)
    folder = root / "checkpoint_step_6"
    marker = tmp_path / "pwned"
    state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    state["evil"] = _Payload(str(marker))
    torch.save(state, folder / "mp_rank_00_model_states.pt")
    manifest = json.loads((folder / MANIFEST).read_text())  # a careful attacker fixes the manifest too
    manifest["files"]["mp_rank_00_model_states.pt"] = (folder / "mp_rank_00_model_states.pt").stat().st_size
    (folder / MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(root)
    code, out, err = finish(start(run_args(data_cache, max_steps=8), cwd=tmp_path, env=clean_env()))
    assert code == 2, err[-3000:]
    assert "error: " in err and "refers to code" in err and "Traceback" not in err
    assert not marker.exists() and snapshot(root) == before
    assert weights(root / "final_model.pt").keys()  # the earlier exports are intact and loadable


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
