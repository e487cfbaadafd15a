"""SIGTERM / SIGINT / the time limit: the run finishes its step, saves, says how to resume, exits 75, and no process
of the job survives; one process and two ranks under both launch forms."""
from __future__ import annotations

import json
import re
import signal
import sys

import pytest

from engine.checkpoint.commit import MANIFEST, damage_of
from tests.launcher.reliability_runs import (clean_env, finish, group_alive, port_args, run_args, start, wait_for)

LONG = 100_000  # max_steps: only a stop request can end these runs in time


def started_training(folder):
    return lambda: any((folder / "outputs" / "tensorboard").glob("events.*"))


def assert_stopped_with_checkpoint(folder, out: str, err: str, reason: str) -> int:
    match = re.search(r"stopped at step (\d+) by " + reason, err)
    assert match, err[-3000:]
    step = int(match.group(1))
    checkpoint = folder / "checkpoints" / f"checkpoint_step_{step}"
    assert damage_of(checkpoint) is None and json.loads((checkpoint / MANIFEST).read_text())["step"] == step
    assert (folder / "checkpoints" / "latest").read_text() == checkpoint.name
    assert "to resume, run the same command again" in err and "Traceback" not in err
    assert not (folder / "checkpoints" / "final_model.pt").exists()  # not final: the run did not finish
    return step


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_one_process_stops_cleanly(tmp_path, data_cache, signum):
    process = start(run_args(data_cache, "training.save_interval=1000", max_steps=LONG), cwd=tmp_path,
                    env=clean_env())
    wait_for(started_training(tmp_path), 120, "training to start")
    wait_for(lambda: (tmp_path / "checkpoints" / "best_model.pt").exists(), 120, "a first evaluation")
    process.send_signal(signum)
    code, out, err = finish(process)
    assert code == 75, err[-3000:]
    step = assert_stopped_with_checkpoint(tmp_path, out, err, signal.Signals(signum).name)

    resumed = finish(start(run_args(data_cache, "training.save_interval=1000", max_steps=step + 1), cwd=tmp_path,
                           env=clean_env()))
    assert resumed[0] == 0 and f"at step {step}" in resumed[1], resumed[2][-3000:]


@pytest.mark.slow
def test_time_limit_saves_and_exits(tmp_path, data_cache):
    code, out, err = finish(start(run_args(data_cache, "training.save_interval=1000", "training.max_runtime=4s",
                                           max_steps=LONG), cwd=tmp_path, env=clean_env()))
    assert code == 75, err[-3000:]
    assert_stopped_with_checkpoint(tmp_path, out, err, "the time limit training.max_runtime")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["deepspeed", "num_gpus"])
def test_two_ranks_stop_together_and_leave_no_process(tmp_path, data_cache, form):
    args = [*run_args(data_cache, "training.save_interval=1000", "training.zero_stage=2", max_steps=LONG),
            *port_args()]
    env = clean_env(OMP_NUM_THREADS="1")
    if form == "deepspeed":  # `deepspeed --num_gpus 2 launcher/run.py ...`
        process = start(args, cwd=tmp_path, env=env, prefix=[sys.executable, "-m", "deepspeed.launcher.runner",
                                                              "--num_gpus", "2", *port_args()])
    else:
        process = start([*args, "--num_gpus", "2"], cwd=tmp_path, env=env)
    wait_for(started_training(tmp_path), 180, "training to start")
    wait_for(lambda: (tmp_path / "checkpoints" / "best_model.pt").exists(), 120, "a first evaluation")
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler does
    code, out, err = finish(process)
    wait_for(lambda: not group_alive(process.pid), 60, "every process of the job to end")
    if form == "num_gpus":
        assert code == 75, err[-3000:]
    reason = "SIGTERM" if form == "num_gpus" else "the launcher ending"  # the runner itself dies of SIGTERM
    step = assert_stopped_with_checkpoint(tmp_path, out, err, reason)
    files = sorted(p.name for p in (tmp_path / "checkpoints" / f"checkpoint_step_{step}").glob("*optim_states.pt"))
    assert len(files) == 2  # both ranks' ZeRO partitions are in the committed folder
