"""Resume fidelity: a relaunch keeps the checkpoint's global batch and ZeRO layout, names every key that differs,
and refuses what would change the training it continues."""
from __future__ import annotations

import json
import re

import pytest

from engine.errors import START_OVER, CheckpointError
from launcher.config import ConfigError, build_run_config
from launcher.planning.hardware import UNLIMITED
from launcher.resume import find_resume_point, pin_to_checkpoint, plan_resumed_run, split_global_batch
from tests.conftest import SMALL_MODEL, run_cli
from tests.launcher.test_cli import small_run_args


def run_config(tmp_path, *extra):
    # The split of the first run, carried over to the relaunch as a user's repeated command would.
    return build_run_config(preset="tiny", overrides=[*SMALL_MODEL, f"training.checkpoint_dir={tmp_path / 'ckpt'}",
                                                      "training.batch_size=4", "training.gradient_accumulation_steps=2",
                                                      *extra])


def fake_checkpoint(tmp_path, *, micro=4, accum=2, world_size=1, zero_stage=2, checkpointed=0, extra=()):
    """A checkpoint folder as launcher/run.py's train() describes one (run_config.json, ds_config.json)."""
    run = run_config(tmp_path, *extra)
    resolved = run.training.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum,
                                               "zero_stage": zero_stage, "offload": "none",
                                               "activation_checkpointing": checkpointed})
    folder = tmp_path / "ckpt" / "checkpoint_step_3"
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(run.model_copy(update={"training": resolved}).model_dump_json())
    (folder / "ds_config.json").write_text(json.dumps({"train_batch_size": micro * accum * world_size}))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")  # a folder from before manifests: taken as intact
    (tmp_path / "ckpt" / "latest").write_text("checkpoint_step_3")
    return folder


def test_the_same_command_resumes_without_remarks(tmp_path):
    fake_checkpoint(tmp_path)
    point = find_resume_point(run_config(tmp_path))
    assert point is not None and point.global_batch == 8
    pinned, warnings = pin_to_checkpoint(run_config(tmp_path), point)
    assert warnings == []
    assert pinned.training.zero_stage == 2 and pinned.training.offload == "none"


def test_keys_that_change_the_training_are_refused_and_all_named(tmp_path):
    fake_checkpoint(tmp_path)
    run = run_config(tmp_path, "model.d_model=128", "training.seed=7", "training.bf16=true",
                     "training.eval_interval=77", "training.max_steps=99")
    with pytest.raises(ConfigError) as raised:
        pin_to_checkpoint(run, find_resume_point(run))
    message = str(raised.value)
    for key in ("model.d_model: 64 in the checkpoint, 128 now", "training.seed: 42 in the checkpoint, 7 now",
                "training.bf16: False in the checkpoint, True now", "set training.checkpoint_dir to a new folder"):
        assert key in message
    assert "eval_interval" not in message and "max_steps" not in message


def test_harmless_differences_are_warnings_naming_each_key(tmp_path):
    fake_checkpoint(tmp_path)
    run = run_config(tmp_path, "training.eval_interval=77", "training.max_steps=99", "training.tokens_per_step=512",
                     "training.max_runtime=2h")
    _, warnings = pin_to_checkpoint(run, find_resume_point(run))
    keys = sorted(line.split(":")[0] for line in warnings)
    assert keys == ["training.eval_interval", "training.max_runtime", "training.max_steps",
                    "training.tokens_per_step"]
    assert any("global batch is kept" in line for line in warnings)


@pytest.mark.parametrize("saved, now, planned", [(0, "1", 1), (1, "true", 2), (True, "false", 0), (2, "auto", 0)])
def test_another_count_of_checkpointed_blocks_resumes_without_remarks(tmp_path, saved, now, planned):
    """Recomputation changes memory, not the training: like the older true/false, the count is planned again
    (false/true from a checkpoint written before counts existed included; SMALL_MODEL has 2 blocks)."""
    fake_checkpoint(tmp_path, checkpointed=saved)
    run = run_config(tmp_path, f"training.activation_checkpointing={now}")
    point = find_resume_point(run)
    _, warnings = pin_to_checkpoint(run, point)
    assert warnings == []
    assert plan_resumed_run(run, point, 1, UNLIMITED, report=False).num_checkpointed_blocks == planned


def test_an_explicit_other_zero_stage_is_refused(tmp_path):
    fake_checkpoint(tmp_path, zero_stage=2)
    run = run_config(tmp_path, "training.zero_stage=3")
    with pytest.raises(ConfigError, match=r"training.zero_stage: 2 in the checkpoint, 3 now"):
        pin_to_checkpoint(run, find_resume_point(run))


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_the_global_batch_is_kept_on_any_number_of_ranks(tmp_path, world_size):
    fake_checkpoint(tmp_path, micro=4, accum=2, world_size=1, zero_stage=1)
    run = run_config(tmp_path)  # tokens_per_step 65536 would ask for 1024 sequences per step
    plan = plan_resumed_run(run, find_resume_point(run), world_size, budget=_unlimited(), report=False)
    assert plan.micro_batch * plan.grad_accum * world_size == 8
    assert plan.zero_stage == 1


def test_a_global_batch_the_ranks_cannot_split_is_refused(tmp_path):
    fake_checkpoint(tmp_path, micro=4, accum=2)
    run = run_config(tmp_path)
    with pytest.raises(ConfigError, match="global batch of 8 sequences, which 3 ranks cannot split"):
        plan_resumed_run(run, find_resume_point(run), 3, budget=_unlimited(), report=False)
    explicit = run_config(tmp_path, "training.batch_size=3")  # changed since the checkpoint: a request
    with pytest.raises(ConfigError, match="training.batch_size=3"):
        plan_resumed_run(explicit, find_resume_point(explicit), 1, budget=_unlimited(), report=False)
    fitting = run_config(tmp_path, "training.batch_size=1", "training.gradient_accumulation_steps=4")
    plan = plan_resumed_run(fitting, find_resume_point(fitting), 2, budget=_unlimited(), report=False)
    assert (plan.micro_batch, plan.grad_accum) == (1, 4)


def test_split_takes_the_largest_micro_batch_that_fits_and_divides():
    # 24 sequences on 2 ranks = 12 each; micro-batches up to 5 fit: 4 divides 12 (5 does not) -> 4 x 3.
    assert split_global_batch(24, 2, largest_micro_batch=5, batch_size=None, gradient_accumulation_steps=None) == (4, 3)
    assert split_global_batch(24, 2, largest_micro_batch=64, batch_size=None,
                              gradient_accumulation_steps=None) == (12, 1)
    assert split_global_batch(24, 2, largest_micro_batch=64, batch_size=None, gradient_accumulation_steps=6) == (2, 6)


def test_the_advice_to_start_over_works(tmp_path):
    """The refusal's advice is followed here: a new checkpoint_dir starts afresh. What it advised before
    (training.resume=false on the same folder) is the next refusal: the folder holds an earlier run."""
    from engine.checkpoint.manager import CheckpointManager

    fake_checkpoint(tmp_path)
    changed = run_config(tmp_path, "model.d_model=128")
    with pytest.raises(ConfigError) as raised:
        pin_to_checkpoint(changed, find_resume_point(changed))
    message = str(raised.value)
    assert "\n" not in message and START_OVER in message
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run"):  # the old advice
        CheckpointManager(tmp_path / "ckpt", keep_last=1, run_record={}).prepare(resume=False)
    followed = run_config(tmp_path, "model.d_model=128", f"training.checkpoint_dir={tmp_path / 'new'}")
    assert find_resume_point(followed) is None  # plans afresh
    CheckpointManager(followed.training.checkpoint_dir, keep_last=1, run_record={}).prepare(resume=True)


def test_resume_false_and_no_checkpoint_plan_afresh(tmp_path):
    assert find_resume_point(run_config(tmp_path)) is None
    fake_checkpoint(tmp_path)
    assert find_resume_point(run_config(tmp_path, "training.resume=false")) is None


def test_an_unreadable_run_config_is_a_checkpoint_error(tmp_path):
    folder = fake_checkpoint(tmp_path)
    (folder / "run_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="set training.checkpoint_dir to a new folder to start over"):
        find_resume_point(run_config(tmp_path))


def _unlimited():
    from launcher.planning.hardware import UNLIMITED

    return UNLIMITED


@pytest.mark.slow
def test_resume_on_two_ranks_keeps_the_global_batch_and_refuses_a_new_shape(tmp_path, data_cache):
    """One rank trains 2 steps at 4 x 2; `--num_gpus 2` resumes it at a split with the same 8 sequences per step."""
    base = ["training.gradient_accumulation_steps=2", "training.zero_stage=0"]
    first = run_cli(small_run_args(data_cache, *base, "training.max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    changed = run_cli([*small_run_args(data_cache, *base, "model.d_model=128"), "--dry_run"], cwd=tmp_path,
                      timeout=120)
    assert changed.returncode == 2 and "model.d_model: 64 in the checkpoint, 128 now" in changed.stderr
    assert "Traceback" not in changed.stderr

    auto_split = ["training.batch_size=null", "training.gradient_accumulation_steps=null", "training.max_steps=4",
                  "training.eval_interval=4"]
    second = run_cli([*small_run_args(data_cache, "training.zero_stage=0", *auto_split), "--num_gpus", "2"],
                     cwd=tmp_path, timeout=400)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "resumed from" in output and "finished 4 steps" in output
    assert "warning: resuming from checkpoint_step_2: training.eval_interval" in output
    micro, accum = map(int, re.search(r"micro-batch (\d+) x accumulation (\d+)", output).groups())
    assert micro * accum * 2 == 8
    saved = json.loads((tmp_path / "checkpoints" / "checkpoint_step_4" / "ds_config.json").read_text())
    assert saved["train_batch_size"] == 8


def test_a_damaged_newest_checkpoint_is_skipped_like_the_trainer_does(tmp_path):
    from engine.checkpoint.commit import MANIFEST

    fake_checkpoint(tmp_path, micro=4, accum=2)
    newer = tmp_path / "ckpt" / "checkpoint_step_6"
    newer.mkdir()
    (newer / MANIFEST).write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 123}}))  # the file is missing
    point = find_resume_point(run_config(tmp_path))
    assert point is not None and point.folder.name == "checkpoint_step_3"
