"""Resume on a different number of ranks through DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint holds the fp32 master weights and Adam moments partitioned over the ranks that saved it:
DeepSpeed refuses to load it with another world size ("Automatic adjustment of ZeRO's optimizer state
partitioning with a new world size is not currently supported", docs/machine_notes.md). Its answer is the
*universal* checkpoint: `deepspeed.checkpoint.ds_to_universal` rewrites the partitions as one file per parameter
and state (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`), and an engine with
`checkpoint.load_universal` slices them for its own ranks.

`CheckpointManager.load_latest` calls `needs_universal()` and, when the world size differs, `ensure_universal()`
(rank 0 converts once, into `checkpoint_step_N/universal/`, written under a temporary name and renamed, so a
crash never leaves a half-converted folder that a later resume would trust), then loads with
`universal_load_tag()`. ZeRO-0 keeps whole, unpartitioned states and loads at any world size as it is.

One command does the same by hand: `python tools/convert_checkpoint.py CKPT_DIR --to universal`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from data.output import leftovers, remove, staged_output
from engine.errors import CheckpointError
from engine.checkpoint import muon_universal
from engine.checkpoint.safe_load import convert_to_universal, load_deepspeed_checkpoint, load_weights_file

UNIVERSAL_SUBDIR = "universal"
"""The converted copy lives inside the checkpoint it came from, so pruning that checkpoint removes it too."""

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(folder: str | Path) -> int | None:
    """The number of data-parallel ranks that wrote a ZeRO-1/2/3 checkpoint (one optimizer partition file per
    rank), or None for a ZeRO-0 checkpoint, whose optimizer state is whole and fits any world size."""
    ranks = {int(m.group(1)) for p in Path(folder).iterdir() if (m := _OPTIM_FILE.match(p.name))}
    return len(ranks) or None


def needs_universal(folder: str | Path, world_size: int) -> bool:
    """Whether loading `folder` with `world_size` ranks has to go through the universal format."""
    saved = saved_world_size(folder)
    return saved is not None and saved != world_size


def universal_folder(folder: str | Path) -> Path:
    return Path(folder) / UNIVERSAL_SUBDIR


def universal_load_tag(tag: str) -> str:
    """The tag to pass to `engine.load_checkpoint(checkpoint_dir, tag=...)` for the converted copy of `tag`."""
    return f"{tag}/{UNIVERSAL_SUBDIR}"


def ensure_universal(folder: str | Path) -> Path:
    """Convert the DeepSpeed checkpoint `folder` to `folder/universal` unless that exists; returns it.

    Single process (rank 0 only), through engine/checkpoint/safe_load.py (every pickle of `folder` is checked first) and
    data/output.py (written under a temporary name inside `folder` and renamed, so a crash never leaves a
    half-converted folder that a later resume would trust)."""
    folder = Path(folder)
    out = universal_folder(folder)
    if out.is_dir():
        return out
    if saved_world_size(folder) is None:
        raise CheckpointError(f"{folder} holds no ZeRO optimizer partitions (*_optim_states.pt): only ZeRO-1/2/3 "
                              "checkpoints need (and can take) the universal format; ZeRO-0 loads at any world size")
    for leftover in leftovers(folder, UNIVERSAL_SUBDIR):  # a conversion that was killed
        remove(leftover)
    try:
        # The converted copy belongs to the checkpoint it came from (pruned with it): the one output that is
        # written inside a checkpoint folder.
        with staged_output(out, folder=True, inside_checkpoint_ok=True, what="the universal copy") as tmp:
            remove(tmp)  # ds_to_universal creates its output folder itself
            try:
                if _saved_optimizer(folder) == "muon":  # DeepSpeed's converter takes Adam's states only
                    muon_universal.convert(folder, tmp, convert_to_universal)
                else:
                    convert_to_universal(folder, tmp)
            except CheckpointError:
                raise
            except Exception as error:
                raise CheckpointError(f"could not convert {folder} to DeepSpeed's universal format: "
                                      f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    finally:
        # ds_to_universal points a `latest_universal` file in the output's parent at the output; we load by
        # explicit tag, so the pointer (to the temporary name) would only mislead.
        (folder / "latest_universal").unlink(missing_ok=True)
    return out


def _saved_optimizer(folder: Path) -> str:
    """training.optimizer of the run that saved `folder` (its run_config.json; 'adamw' when not recorded)."""
    import json

    try:
        return json.loads((folder / "run_config.json").read_text())["training"].get("optimizer", "adamw")
    except (OSError, ValueError, KeyError, TypeError):
        return "adamw"


def load_universal(engine, checkpoint_dir: str | Path, tag: str):
    """Load checkpoint `tag`, saved at another world size, into `engine` (all ranks call this): rank 0 converts it
    once, then every rank loads its own slice. Returns what `engine.load_checkpoint` returns."""
    from engine import distributed

    folder = Path(checkpoint_dir) / tag
    if distributed.is_main_process():
        done = universal_folder(folder).is_dir()
        print(f"{tag} was saved by {saved_world_size(folder)} ranks, this run has {distributed.world_size()}: "
              f"{'loading its' if done else 'converting it to'} DeepSpeed universal checkpoint "
              f"{universal_folder(folder)}", flush=True)
        ensure_universal(folder)
    distributed.barrier()
    # `checkpoint.load_universal` is read only inside load_checkpoint (deepspeed/runtime/engine.py and the ZeRO
    # optimizers' load_state_dict), so switching it on for this one load is the ds_config setting
    # `"checkpoint": {"load_universal": true}` without rebuilding the engine; later saves are normal checkpoints.
    # DeepSpeed 0.19.8's ZeRO-3 universal load copies the hyperparameters of param_groups[0] into every group
    # (zero/stage3.py `_load_universal_checkpoint`: "Generally, the hyperparameters of each parameter should be
    # the same"), which gives the no-decay group (norms, SSM scalars) weight decay, and every group group 0's
    # learning rate, which the next step uses before the schedule sets it again (Muon's groups each have their own
    # lr, engine/param_groups.py). The engine was just built with the right groups, so their hyperparameters are
    # kept; each group's lr at the checkpoint is read from the checkpoint's own param_groups.
    groups = engine.optimizer.param_groups
    kept = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")} for group in groups]
    engine._config.load_universal_checkpoint = True
    try:
        result = load_deepspeed_checkpoint(engine, checkpoint_dir, universal_load_tag(tag))
    finally:
        engine._config.load_universal_checkpoint = False
    saved = load_weights_file(universal_folder(folder) / "zero" / "optimizer_state.pt", mmap=True)["param_groups"]
    for group, hyperparameters, at_checkpoint in zip(engine.optimizer.param_groups, kept, saved, strict=True):
        group.update(hyperparameters, **{k: at_checkpoint[k] for k in ("lr", "initial_lr") if k in at_checkpoint})
    # DeepSpeed 0.19.8's ZeRO-3 universal load puts one and the same `step` tensor into every sub-group's state
    # (stage3.py `load_hp_checkpoint_state_from_checkpoint_dir_stage3`); torch's AdamW increments it in place, so
    # with k sub-groups the count ran k steps per step after the resume and every group after the first took its
    # bias correction from a wrong step (seen: the weights 2e-4 off the uninterrupted run within 3 steps; the same
    # on the same rank count through the universal format). Each state gets its own copy.
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if muon_universal.has_momentum(universal_folder(folder)):  # DeepSpeed's loader restores Adam's states only
        muon_universal.restore_momentum(engine.optimizer, universal_folder(folder))
    return result
