"""The one door through which every checkpoint file is read: nothing unpickles a file before it is checked here.

DeepSpeed opens checkpoints with `torch.load(path, weights_only=False)` (deepspeed 0.19.8: the engine's
TorchCheckpointEngine.load, `zero_to_fp32`, `ds_to_universal`), which runs any code a tampered pickle names. So
before DeepSpeed or torch opens anything, this module unpickles EVERY file of the folder it will read, at any
depth (model states, each rank's `*_optim_states.pt`, the universal copy's `zero/<param>/*.pt`, ...), with PyTorch's
weights-only unpickler, allowing exactly the non-tensor types DeepSpeed writes (listed by
`torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-0..3 checkpoints in fp32, bf16 and fp16). A file
naming any other global is refused (UnsafeCheckpointError, one line naming the file) and never handed on. The
project's own files (`final_model.pt`, `best_model.pt`, `init_from`, a transformers `pytorch_model.bin`) are read
by `load_weights_file`, which is that same weights-only load. A checkpoint tag (the `latest` file, `--tag`) must
name a folder directly inside its checkpoint dir.

Every caller goes through the functions below: `load_deepspeed_checkpoint` (resume, the universal load),
`zero_fp32_state_dict` (zero_to_fp32: exports, evaluation), `convert_to_universal` (ds_to_universal),
`load_weights_file` (plain `.pt`/`.bin`) and `check_tree` (a folder transformers reads). tests/engine/
test_checkpoint_trust.py fails if any other module calls torch.load or a DeepSpeed loader.

`mmap=True` maps the tensor storages instead of reading them: the check costs the pickle, not the weights
(tools/bench/safe_load.py measures it).
"""
from __future__ import annotations

import importlib
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError, UnsafeCheckpointError

DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The non-tensor types found in DeepSpeed 0.19.8 checkpoints (optimizer states: loss scaler, ZeRO stage,
fp32 fragment addresses); model-state files and the universal format's files hold none."""

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
"""Names torch.load is pointed at. A file with another name is still checked when its first bytes are a zip
archive (torch's format) or a binary pickle."""


def _resolve(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def allowed_globals() -> list[type]:
    return [_resolve(name) for name in DEEPSPEED_CHECKPOINT_GLOBALS]


def _weights_only_load(path: Path, *, mmap: bool) -> Any:
    """torch.load with the weights-only unpickler and the allowlist; mmap only for the zip format (torch refuses
    mmap on the legacy format)."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def load_weights_file(path: str | Path, *, mmap: bool = False) -> Any:
    """Unpickle `path` with the weights-only unpickler (tensors, plain containers and DeepSpeed's own types).
    UnsafeCheckpointError when it names other code (nothing of it runs), CheckpointError when it is damaged."""
    path = Path(path)
    try:
        return _weights_only_load(path, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure means "do not hand this file on"
        unsafe = []
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in DEEPSPEED_CHECKPOINT_GLOBALS]
        except Exception:  # noqa: BLE001 - a truncated or non-zip file cannot be scanned either
            pass
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe or named:
            names = ", ".join(unsafe) or named.group(1)
            raise UnsafeCheckpointError(
                f"{path} refers to code that a checkpoint never contains ({names}): it was not written by this "
                "trainer or DeepSpeed and nothing was loaded; remove it (or restore the folder from a copy you "
                "trust)") from None
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {first})") from None


def check_file(path: str | Path) -> None:
    """load_weights_file, discarding the result (tensors are only mapped, not read)."""
    load_weights_file(path, mmap=True)


def _is_pickle(path: Path) -> bool:
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


STAGING_LEFTOVER = re.compile(r"^\..+\.partial-\d+-[0-9a-f]+(?:\.[^.]*)?$")
"""The temporary name data/output.py stages an output under: what a killed write leaves, which no loader opens."""


def check_tree(folder: str | Path) -> list[Path]:
    """check_file on every pickle under `folder`, at any depth (symlinked folders included, each once), except
    inside the staging leftovers of a killed write; returns the files checked. Called before anything hands
    `folder` to DeepSpeed or transformers."""
    folder = Path(folder)
    checked: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop: each real folder once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not STAGING_LEFTOVER.match(d))
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file() and _is_pickle(path):
                check_file(path)
                checked.append(path)
    return checked


def tag_folder(checkpoint_dir: str | Path, tag: str, *, source: str = "--tag") -> Path:
    """The folder `checkpoint_dir/tag`, which must lie directly inside checkpoint_dir: a tag with a path
    separator, `..`, or a symlink leading elsewhere is refused (CheckpointError naming where it came from)."""
    root = Path(checkpoint_dir)
    folder = root / tag
    inside = (tag not in ("", ".", "..") and "/" not in tag and os.sep not in tag and
              os.path.realpath(folder.parent) == os.path.realpath(root) and
              os.path.dirname(os.path.realpath(folder)) == os.path.realpath(root))
    if not inside:
        raise CheckpointError(f"{source} names {tag!r}, which is not a folder inside {root}: a checkpoint tag is "
                              "the name of one checkpoint_step_N folder of that checkpoint dir (fix or delete "
                              f"{source})")
    return folder


def load_deepspeed_checkpoint(engine, checkpoint_dir: str | Path, tag: str, **kwargs):
    """engine.load_checkpoint(checkpoint_dir, tag) after every pickle of the folder was checked. `tag` may be
    `checkpoint_step_N/universal` (the universal copy inside a checkpoint)."""
    folder = Path(checkpoint_dir)
    for part in Path(tag).parts:
        folder = tag_folder(folder, part, source=f"checkpoint tag {tag!r}")
    check_tree(folder)
    return engine.load_checkpoint(str(checkpoint_dir), tag=tag, **kwargs)


def zero_fp32_state_dict(folder: str | Path, *, lazy_mode: bool = True) -> dict[str, Any]:
    """DeepSpeed's get_fp32_state_dict_from_zero_checkpoint for one `checkpoint_step_N` folder (ZeRO-1/2/3),
    after checking every pickle in it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    check_tree(folder)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=lazy_mode)


def convert_to_universal(folder: str | Path, output_folder: str | Path) -> None:
    """DeepSpeed's ds_to_universal from `folder` into `output_folder`, after checking every pickle of `folder`.

    Single process: with one worker its extract and merge passes run in this process, off the training ranks'
    process group and bounded in memory (one parameter's fragments at a time)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    check_tree(folder)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(output_folder), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # Our engines save no UNIVERSAL_CHECKPOINT_INFO (no tensor/pipeline parallelism
                              # to describe); ds_to_universal's own flag adds the version-only record it needs.
                              inject_missing_state=True)
    ds_to_universal.main(args)
