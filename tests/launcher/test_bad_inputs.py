"""Every user-caused problem the trainer meets: one `error: ...` line naming the file or key and the fix, the
right exit code, no traceback (unless --debug), and every file that was there before byte-identical."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from data import TokenShardWriter
from engine.checkpoint.commit import damage_of
from tests.launcher.reliability_runs import clean_env, finish, run_args, snapshot, start

CACHE_NAME = "shakespeare-v8192-s1234-f0.05"


def copy_cache(data_cache, tmp_path, name: str = CACHE_NAME):
    cache = tmp_path / "cache"
    shutil.copytree(data_cache / CACHE_NAME, cache / name)
    return cache, cache / name


def run_and_check(tmp_path, args, *, expected_code: int = 2, watched=(), debug: bool = False):
    before = {str(folder): snapshot(folder) for folder in watched}
    code, out, err = finish(start([*args, *(["--debug"] if debug else [])], cwd=tmp_path, env=clean_env()))
    assert code == expected_code, out[-2000:] + err[-3000:]
    assert ("Traceback" in err) == debug, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    for folder in watched:  # every earlier file still there, byte for byte
        after = snapshot(folder)
        assert {name: after.get(name) for name in before[str(folder)]} == before[str(folder)], f"{folder} changed"
    return errors[0]


def test_token_ids_outside_the_vocabulary(tmp_path, data_cache):
    cache, folder = copy_cache(data_cache, tmp_path)
    with TokenShardWriter(folder / "train", vocab_size=70_000) as writer:  # a bigger tokenizer's ids
        writer.add_document(np.arange(60_000, 60_500))
    line = run_and_check(tmp_path, run_args(cache), watched=[cache])
    assert str(folder / "train.bin") in line and "token id 60499" in line and "8192" in line


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_missing_truncated_or_empty_shard(tmp_path, data_cache, damage):
    cache, folder = copy_cache(data_cache, tmp_path)
    if damage == "missing":
        (folder / "val.bin").unlink()
        expected = f"{folder / 'val.bin'} does not exist"
    elif damage == "truncated":
        data = (folder / "val.bin").read_bytes()
        (folder / "val.bin").write_bytes(data[: len(data) // 2])
        expected = f"{folder / 'val.bin'}: {len(data) // 2} bytes"
    else:
        with TokenShardWriter(folder / "val", vocab_size=8192):
            pass
        expected = f"token shard {folder / 'val'}.bin has 0 tokens"
    line = run_and_check(tmp_path, run_args(cache), watched=[cache])
    assert expected in line, line


def test_tokenizer_that_does_not_match_the_model(tmp_path, data_cache):
    # The 8192-token tokenizer where the cache for a 4096-token model should be.
    cache, folder = copy_cache(data_cache, tmp_path, name=CACHE_NAME.replace("v8192", "v4096"))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": 4096}))
    line = run_and_check(tmp_path, run_args(cache, "model.vocab_size=4096"), watched=[cache])
    assert str(folder / "tokenizer.model") in line and "model.vocab_size" in line


def test_checkpoint_dir_that_is_a_file(tmp_path, data_cache):
    (tmp_path / "checkpoints").write_text("not a folder")
    line = run_and_check(tmp_path, run_args(data_cache), watched=[tmp_path])
    assert "checkpoints is a file" in line and "training.checkpoint_dir" in line
    run_and_check(tmp_path, run_args(data_cache), watched=[tmp_path], debug=True)  # --debug adds the traceback


@pytest.mark.slow
def test_fresh_run_into_an_earlier_runs_folder(tmp_path, data_cache):
    code, out, err = finish(start(run_args(data_cache, max_steps=4), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    root = tmp_path / "checkpoints"
    line = run_and_check(tmp_path, run_args(data_cache, "training.resume=false"), watched=[root])
    assert "checkpoints holds checkpoints of an earlier run (checkpoint_step_2, checkpoint_step_4)" in line
    assert "training.checkpoint_dir" in line and "training.resume=true" in line



@pytest.mark.slow
def test_a_loss_that_becomes_nan_stops_before_saving_or_pruning(tmp_path, data_cache):
    # lr 1e30 from the first step: the weights are huge but finite after step 1, then the gradients (or loss) go NaN (CPU,
    # fp32, fixed seed). A checkpoint every step with keep_last=1: a save after the NaN would prune the last good one.
    code, out, err = finish(start(run_args(data_cache, "training.learning_rate=1e30", "training.grad_clip=0",
                                           "training.save_interval=1", "training.keep_last_checkpoints=1",
                                           max_steps=12), cwd=tmp_path, env=clean_env()))
    assert code == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    # The gradient norm (measured by the trainer under ZeRO-0) turns NaN a step before the loss does.
    match = re.search(r"error: step (\d+): the training loss is (\S+) and the gradient norm (\S+);", errors[0])
    assert match and "training.learning_rate" in errors[0], errors[0]
    assert not (math.isfinite(float(match.group(2))) and math.isfinite(float(match.group(3)))), errors[0]
    step = int(match.group(1))
    root = tmp_path / "checkpoints"
    assert f"the newest checkpoint is ./checkpoints/checkpoint_step_{step - 1}" in errors[0]
    assert sorted(p.name for p in root.glob("checkpoint_step_*")) == [f"checkpoint_step_{step - 1}"]
    assert damage_of(root / f"checkpoint_step_{step - 1}") is None
    assert not (root / "final_model.pt").exists() and not list(root.glob(".tmp-*"))
