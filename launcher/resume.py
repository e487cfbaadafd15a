"""Resume fidelity: a relaunch continues the run its checkpoint holds, or says why it cannot.

The newest checkpoint folder records the resolved run config (`run_config.json`) and the DeepSpeed config
(`ds_config.json`). Before planning, the new config is compared with the checkpoint's, key by key:

- the global batch is the checkpoint's: the sampler reads windows by global position `step x global batch`
  (data/sampler.py), so another global batch would skip or repeat data. Only its split, micro-batch x
  accumulation x ranks, is planned again (so a different number of ranks works when it divides the global batch);
  batch_size / gradient_accumulation_steps given explicitly and changed since the checkpoint must multiply to it;
- ZeRO stage and offload are the checkpoint's when the config leaves them `auto` (DeepSpeed loads a checkpoint
  only under the stage that wrote it);
- activation checkpointing (true, false or a number of blocks) is planned again: recomputation changes memory and
  speed, not what is computed, so any value resumes the same training;
- keys that change what is trained (the model, the data, the seed, precision, the optimizer and the schedule,
  which the checkpoint's optimizer and scheduler states restore anyway) are errors naming every such key;
- the rest (evaluation, saving and logging intervals, paths, max_steps, grad_clip, ...) are reported as warnings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoint.commit import MANIFEST, damage_of, list_checkpoint_tags
from engine.errors import START_OVER, CheckpointError
from launcher.config import ConfigError, RunConfig

LAYOUT_KEYS = ("training.batch_size", "training.gradient_accumulation_steps", "training.zero_stage",
               "training.offload", "training.activation_checkpointing", "num_gpus", "training.sequence_parallel")
"""Planned again on resume (the stage and offload kept unless given explicitly)."""

HARMLESS_KEYS = ("training.eval_interval", "training.eval_batches", "training.save_interval",
                 "training.keep_last_checkpoints", "training.log_interval", "training.sample_tokens",
                 "training.output_dir", "training.checkpoint_dir", "training.max_steps", "training.grad_clip",
                 "training.tokens_per_step", "training.resume", "training.max_runtime", "data.cache_dir",
                 "system.auto_shutdown", "system.shutdown_delay")
"""May differ from the checkpoint's: reported, then the new value is used (tokens_per_step: the checkpoint's
global batch is kept instead)."""

WHY_HARMLESS = {
    "training.max_steps": "training continues to the new max_steps; the lr schedule is the checkpoint's (its "
                          "cosine ends at step {old}, and later steps run at min_lr_ratio)",
    "training.tokens_per_step": "ignored: the checkpoint's global batch is kept",
}


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    """The checkpoint a launch will resume from, as its folder describes it."""

    folder: Path
    """The newest intact `checkpoint_step_N` folder (the one the trainer loads)."""
    run_config: dict[str, Any]
    """Its resolved run config (run_config.json)."""
    global_batch: int
    """Sequences per optimizer step it was trained with (ds_config.json's train_batch_size)."""


def find_resume_point(run: RunConfig) -> ResumePoint | None:
    """The checkpoint this launch resumes from, or None (resume: false, or no checkpoint yet)."""
    if not run.training.resume:
        return None
    folder = _newest_intact(Path(run.training.checkpoint_dir))
    if folder is None:
        return None
    try:
        run_config = json.loads((folder / "run_config.json").read_text(encoding="utf-8"))
        global_batch = int(json.loads((folder / "ds_config.json").read_text(encoding="utf-8"))["train_batch_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder} cannot be resumed: its run_config.json / ds_config.json are missing or "
                              f"unreadable ({err}); move the folder away, or {START_OVER}") from None
    return ResumePoint(folder=folder, run_config=run_config, global_batch=global_batch)


def _newest_intact(root: Path) -> Path | None:
    """The folder the trainer will load: the newest one whose manifest matches its files (a damaged newest one is
    skipped, as CheckpointCommitter.load_latest does), or one written before manifests existed."""
    for _, folder in reversed(list_checkpoint_tags(root)):
        if (folder / MANIFEST).exists() and damage_of(folder) is None:
            return folder
        if not (folder / MANIFEST).exists() and any(folder.glob("*model_states.pt")):
            return folder
    return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare_with_checkpoint(run: RunConfig, point: ResumePoint) -> tuple[list[str], list[str]]:
    """(errors, warnings): one line per key whose value differs from the checkpoint's."""
    saved = _flatten(point.run_config)
    current = _flatten(json.loads(run.model_dump_json()))
    errors, warnings = [], []
    for key in sorted(set(saved) | set(current)):
        if key in LAYOUT_KEYS or saved.get(key) == current.get(key):
            continue
        old, new = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if key not in saved:  # a key this version added: the checkpoint cannot say what it was
            warnings.append(f"{key}: not in the checkpoint's run_config.json (an older version wrote it), {new!r} now")
        elif key in HARMLESS_KEYS:
            why = WHY_HARMLESS.get(key, "the new value is used").format(old=old)
            warnings.append(f"{key}: {old!r} in the checkpoint, {new!r} now: {why}")
        else:
            errors.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    for key in ("zero_stage", "offload"):
        new, old = getattr(run.training, key), point.run_config["training"].get(key)
        if new != "auto" and new != old:
            errors.append(f"training.{key}: {old!r} in the checkpoint, {new!r} now (DeepSpeed loads a checkpoint "
                          "under the ZeRO layout that wrote it)")
    return errors, warnings


def pin_to_checkpoint(run: RunConfig, point: ResumePoint) -> tuple[RunConfig, list[str]]:
    """The run config to plan with when resuming from `point`, and warnings to print.

    Raises ConfigError naming every key that differs in a way that matters, and how to proceed.
    """
    errors, warnings = compare_with_checkpoint(run, point)
    if errors:
        raise ConfigError(
            f"cannot resume from {point.folder}: these keys differ from the checkpoint's run_config.json and change "
            f"what is trained: {'; '.join(errors)}. Set them back to the checkpoint's values, or {START_OVER}")
    saved = point.run_config["training"]
    training = run.training.model_copy(update={
        "zero_stage": saved["zero_stage"], "offload": saved["offload"],
        "tokens_per_step": point.global_batch * run.model.max_seq_len})
    return run.model_copy(update={"training": training}), warnings


def split_global_batch(global_batch: int, world_size: int, *, largest_micro_batch: int,
                       batch_size: int | None, gradient_accumulation_steps: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro x accumulation x world_size == global_batch: the largest micro-batch
    up to `largest_micro_batch` (what fits in memory) that divides the per-rank share, or the explicit values."""
    if global_batch % world_size:
        raise ConfigError(
            f"the checkpoint was trained with a global batch of {global_batch} sequences, which {world_size} ranks "
            f"cannot split evenly: resume on a number of ranks that divides {global_batch} (set --num_gpus), or "
            f"{START_OVER}")
    per_rank = global_batch // world_size
    if batch_size is not None or gradient_accumulation_steps is not None:
        micro = batch_size or per_rank // (gradient_accumulation_steps or 1)
        accum = gradient_accumulation_steps or (per_rank // micro if micro else 0)
        if micro < 1 or micro * accum != per_rank:
            raise ConfigError(
                f"training.batch_size={batch_size} x training.gradient_accumulation_steps="
                f"{gradient_accumulation_steps} x {world_size} rank(s) is not the checkpoint's global batch of "
                f"{global_batch} sequences: give values whose product with the ranks is {global_batch}, or null "
                "for automatic")
        return micro, accum
    micro = max(d for d in range(1, min(per_rank, largest_micro_batch) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def plan_resumed_run(run: RunConfig, point: ResumePoint, world_size: int, budget, *, report: bool = True):
    """The plan for resuming from `point`: the checkpoint's ZeRO layout and global batch, its split over
    `world_size` ranks chosen for memory. Prints the harmless differences (when `report`)."""
    import sys

    from launcher.planning.plan import choose_plan

    pinned, warnings = pin_to_checkpoint(run, point)
    if report:
        for line in warnings:
            print(f"warning: resuming from {point.folder.name}: {line}", file=sys.stderr, flush=True)
    free_split = pinned.training.model_copy(update={"batch_size": None, "gradient_accumulation_steps": None})
    best = choose_plan(pinned.model, free_split, world_size, budget)
    # Values equal to the checkpoint's are the old split carried over (a preset's, or the same command on another
    # number of ranks), not a request: they are re-planned. Values changed since are kept and must fit the batch.
    saved = point.run_config["training"]
    requested = {key: getattr(run.training, key) for key in ("batch_size", "gradient_accumulation_steps")
                 if getattr(run.training, key) != saved.get(key)}
    # Sequence parallelism is a layout: the weights and ZeRO partitions do not depend on it, so a resume may change
    # it (the ranks of one group read one sample: the batch splits over the data-parallel ranks only).
    micro, accum = split_global_batch(point.global_batch, best.data_parallel_size,
                                      largest_micro_batch=best.micro_batch,
                                      batch_size=requested.get("batch_size"),
                                      gradient_accumulation_steps=requested.get("gradient_accumulation_steps"))
    fixed = pinned.training.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum,
                                               "sequence_parallel": best.sequence_parallel})
    return choose_plan(pinned.model, fixed, world_size, budget)
