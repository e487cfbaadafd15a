"""Weights out of a resumable checkpoint folder: the fp32 master weights of any ZeRO stage and world size, as the
original project's plain `.pt` or as safetensors shards with an index (the Hugging Face hub's layout).

ZeRO-1/2/3 folders go through DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` in lazy mode: it maps
the optimizer partition files (mmap) and merges one parameter at a time when asked, so the full fp32 model is
never held twice. ZeRO-0 keeps no partitions; its master weights are the module itself (fp32) or, under
bf16/fp16, the optimizer's `fp32_groups` (DeepSpeed's FP16_UnfusedOptimizer), which are matched to names through
the same `param_groups` the trainer built them from.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from data.output import check_output, name_matcher, staged_output
from engine.checkpoint.commit import MANIFEST, damage_of
from engine.checkpoint.manager import TAG_PATTERN, latest_tag
from engine.errors import CheckpointError, UnsafeCheckpointError, first_line
from engine.checkpoint.safe_load import load_weights_file, tag_folder, zero_fp32_state_dict
from model import ModelConfig, create_model

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Split safetensors output above this many bytes per file (the hub's `max_shard_size` default is 5 GB)."""


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """The `checkpoint_step_N` folder meant by `path` (a checkpoint_dir, with `tag` or its `latest`, or the
    folder itself); a CheckpointError names what is missing and what to pass instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a checkpoint_dir (e.g. ./checkpoints) or one of its "
                              "checkpoint_step_N folders")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder: pass the checkpoint_dir or a "
                              "checkpoint_step_N folder (final_model.pt is already a plain .pt)")
    if tag is not None:
        folder = tag_folder(path, tag)
        if not folder.is_dir():
            present = sorted(p.name for p in path.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
            raise CheckpointError(f"no checkpoint {tag!r} in {path}; present: {', '.join(present) or 'none'}")
    elif (path / "run_config.json").is_file() or any(path.glob("*model_states.pt")):
        folder = path
    else:
        found = latest_tag(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint of this project (no 'latest' file pointing to a "
                                  "checkpoint_step_N folder): pass a checkpoint_dir written by launcher/run.py")
        folder = path / found
    if not any(folder.glob("*model_states.pt")):
        raise CheckpointError(f"{folder} is not a DeepSpeed checkpoint (no *_model_states.pt): it may be "
                              "incomplete; pick another tag")
    if not (folder / "run_config.json").is_file():
        raise CheckpointError(f"{folder} has no run_config.json: it was not written by this project's trainer, so "
                              "the model architecture is unknown")
    check_rank_files(folder)
    return folder


def check_rank_files(folder: Path) -> None:
    """Every file the checkpoint was saved with is there: its manifest's list when it has one (this project's
    trainer writes it), else one optimizer partition (and under ZeRO-3 one model-states file) per data-parallel
    rank. Without this, a ZeRO-1/2 folder missing its optimizer files converted the module's low-precision copy
    instead of the fp32 master weights, and exited 0."""
    if (folder / MANIFEST).is_file():
        problem = damage_of(folder)
        if problem is not None:
            raise CheckpointError(f"{folder} is incomplete: {problem} (its {MANIFEST} lists every file): copy the "
                                  "whole folder again, or pick another checkpoint with --tag")
        return
    try:
        stage = int(json.loads((folder / "ds_config.json").read_text())["zero_optimization"]["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not written by this project's trainer: DeepSpeed's own reader reports what it misses
    model_states = sorted(folder.glob("*model_states.pt"))
    if stage == 0 or not model_states:
        return
    # mmap: reads the pickle's small header objects, not the tensors
    header = load_weights_file(model_states[0], mmap=True)
    num_ranks = int(header.get("dp_world_size", 1)) if isinstance(header, dict) else 1
    kinds = ["optim_states"] + (["model_states"] if stage == 3 else [])
    missing = [f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt" for kind in kinds for rank in range(num_ranks)
               if not any(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_*_{kind}.pt"))]
    if missing:
        raise CheckpointError(f"{folder} is incomplete: a ZeRO-{stage} checkpoint of {num_ranks} rank(s) needs "
                              f"{missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which "
                              "is missing: copy every rank's files, or pick another checkpoint with --tag")


def load_model_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig stored in a checkpoint folder's run_config.json, and the whole run config."""
    path = Path(folder) / "run_config.json"
    try:
        run_config = json.loads(path.read_text())
        return ModelConfig(**run_config["model"]), run_config
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} does not describe a model of this project ({error})") from error


def param_names_in_group_order(config: ModelConfig, optimizer: str = "adamw") -> list[list[str]]:
    """Names of the parameters in each optimizer group, in the order the trainer gave them to DeepSpeed
    (training.optimizer `optimizer`: Muon's groups come first, engine/param_groups.py `muon_param_groups`)."""
    # the one definition of the groups, the same the trainer uses
    from engine.param_groups import muon_param_groups, param_groups

    with torch.device("meta"):
        model = create_model(config.model_type, config)
    name_of = {id(p): name for name, p in model.named_parameters()}
    groups = (muon_param_groups(model, learning_rate=1.0, weight_decay=0.0) if optimizer == "muon"
              else param_groups(model, weight_decay=0.0))
    return [[name_of[id(p)] for p in group["params"]] for group in groups]


def _zero0_master_weights(folder: Path, config: ModelConfig) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    # mmap: tensors are read when touched, so this costs one parameter at a time, not the file. The weights-only
    # load with DeepSpeed's types allowed (engine/checkpoint/safe_load.py) reads everything DeepSpeed writes here.
    state = load_weights_file(folder / "mp_rank_00_model_states.pt", mmap=True)
    optimizer = state.get("optimizer") or {}
    module = state["module"]
    if "fp32_groups" in optimizer:  # bf16/fp16 ZeRO-0: the fp32 masters live in the optimizer
        try:
            optimizer_name = json.loads((folder / "run_config.json").read_text())["training"].get("optimizer", "adamw")
        except (OSError, ValueError, KeyError, TypeError):
            optimizer_name = "adamw"
        groups = param_names_in_group_order(config, optimizer_name)
        masters = {name: tensor for names, tensors in zip(groups, optimizer["fp32_groups"])
                   for name, tensor in zip(names, tensors)}
        for name, tensor in masters.items():
            if tuple(tensor.shape) != tuple(module[name].shape):
                raise CheckpointError(f"{folder}: master weight order does not match the model ({name})")
    else:
        masters = dict(module)
    for name in module:  # the module's key order, tied names included
        key = name if name in masters else _tied_source(name, config)
        yield name, (lambda key=key: masters[key].detach().float().clone())


def _tied_source(name: str, config: ModelConfig) -> str:
    with torch.device("meta"):
        model = create_model(config.model_type, config)
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params[name]
    return next(n for n, p in model.named_parameters() if p is target)


def iter_fp32_weights(folder: str | Path, config: ModelConfig) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, load) for every tensor of the model's state dict, in order; `load()` returns that fp32 tensor.
    Nothing is read until `load()` is called, so a caller that writes and drops each tensor holds one at a time."""
    folder = Path(folder)
    if not any(folder.glob("*_optim_states.pt")):
        yield from _zero0_master_weights(folder, config)
        return
    with _quiet():
        lazy = zero_fp32_state_dict(folder, lazy_mode=True)
    for name, tensor in lazy.items():
        yield name, (lambda tensor=tensor: tensor.contiguous().float())


def check_weights(names_shapes: dict[str, tuple[int, ...]], config: ModelConfig, where: str) -> None:
    """The names and shapes must be exactly those of the model `config` builds (read from the code on meta)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in create_model(config.model_type, config).state_dict().items()}
    missing, extra = expected.keys() - names_shapes.keys(), names_shapes.keys() - expected.keys()
    wrong = [k for k in expected.keys() & names_shapes.keys() if expected[k] != names_shapes[k]]
    if missing or extra or wrong:
        raise CheckpointError(f"{where} does not match its model config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}, wrong shape {sorted(wrong)[:5]}")


def fp32_state_dict(folder: str | Path, config: ModelConfig, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict (tied names share one tensor, as in `model.state_dict()`)."""
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    for name, load in tqdm(list(iter_fp32_weights(folder, config)), desc="gathering fp32 weights", unit="tensor",
                           disable=not progress):
        state[name] = load()
    _share_tied(state, config)
    check_weights({k: tuple(v.shape) for k, v in state.items()}, config, str(folder))
    return state


def _share_tied(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Make tied names one tensor again (DeepSpeed returns the same values; one tensor halves the memory)."""
    with torch.device("meta"):
        model = create_model(config.model_type, config)
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)


def tied_duplicates(config: ModelConfig) -> set[str]:
    """Names that are a second name of an earlier parameter (a tied lm_head): safetensors stores a tensor once."""
    with torch.device("meta"):
        model = create_model(config.model_type, config)
    seen: set[int] = set()
    duplicates = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.add(name)
        seen.add(id(param))
    return duplicates


SAFETENSORS_FILES = name_matcher(r"model\.safetensors", r"model-\d+-of-\d+\.safetensors", r"model\.safetensors\.index\.json",
                                 r"model_config\.json")
"""The files write_safetensors puts in its folder (an existing folder with others is never replaced)."""


def write_plain_pt(folder: str | Path, out_path: str | Path, *, progress: bool = False,
                   overwrite: bool = False) -> Path:
    """The original project's `.pt` ({'config', 'model_state_dict', 'run_config', 'step'}) of checkpoint `folder`."""
    source = folder
    folder = resolve_checkpoint(folder)
    output_rules = dict(overwrite=overwrite, inputs=[source, folder])
    check_output(out_path, **output_rules)  # refused before anything is read
    config, run_config = load_model_config(folder)
    state = fp32_state_dict(folder, config, progress=progress)
    match = TAG_PATTERN.match(folder.name)
    record = {"config": config.model_dump(), "model_state_dict": state, "run_config": run_config,
              "step": int(match.group(1)) if match else None}
    with staged_output(out_path, **output_rules) as tmp:
        torch.save(record, tmp)
    return Path(out_path)


def write_safetensors_shards(items: Iterator[tuple[str, Callable[[], torch.Tensor]]], out_dir: Path, *,
                             max_shard_bytes: int, progress: bool = False, total: int | None = None) -> list[str]:
    """Write (name, load) tensors as `model.safetensors`, or, above max_shard_bytes, as
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (the hub's layout, as
    transformers' save_pretrained writes it). Streams: holds at most one shard's tensors at a time.

    Written here rather than with huggingface_hub's split_torch_state_dict_into_shards, which needs every tensor
    in memory at once to plan the split."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(out_dir / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, load in tqdm(items, desc="writing safetensors", unit="tensor", total=total, disable=not progress):
        tensor = load().contiguous()
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
    flush()
    if len(shards) == 1:
        os.replace(out_dir / "shard-0.tmp", out_dir / "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (file, names) in enumerate(zip(files, shards)):
        os.replace(out_dir / f"shard-{i}.tmp", out_dir / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_safetensors(folder: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = False, overwrite: bool = False) -> Path:
    """Our parameter names in safetensors (a tied lm_head stored once, under the embedding's name) plus
    `model_config.json`, the ModelConfig that rebuilds the model (`load_safetensors_model` reads both)."""
    source = folder
    folder = resolve_checkpoint(folder)
    output_rules = dict(overwrite=overwrite, inputs=[source, folder], owned=SAFETENSORS_FILES, folder=True)
    check_output(out_dir, **output_rules)  # refused before anything is read
    config, _ = load_model_config(folder)
    skip = tied_duplicates(config)
    items = [(n, load) for n, load in iter_fp32_weights(folder, config) if n not in skip]
    with staged_output(out_dir, **output_rules) as tmp:
        write_safetensors_shards(iter(items), tmp, max_shard_bytes=max_shard_bytes, progress=progress,
                                 total=len(items))
        (tmp / "model_config.json").write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    return Path(out_dir)


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` or of the shards its index names (a CheckpointError if neither)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): "
                                  f"{type(err).__name__}: {first_line(err)}") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (named in {folder}'s safetensors index): copy the whole folder")
        try:
            state.update(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (no public base class)
            raise CheckpointError(f"{path} is not a safetensors file ({first_line(err)}): give the folder that "
                                  "save_pretrained or convert_checkpoint.py wrote") from None
    return state


def load_safetensors_model(folder: str | Path) -> torch.nn.Module:
    """Rebuild the model written by `write_safetensors` (ties restored by the model itself)."""
    config = ModelConfig(**json.loads((Path(folder) / "model_config.json").read_text()))
    model = create_model(config.model_type, config)
    missing, unexpected = model.load_state_dict(read_safetensors_folder(folder), strict=False)
    if unexpected or set(missing) - tied_duplicates(config):
        raise CheckpointError(f"{folder}: missing {missing}, unexpected {unexpected}")
    return model


@contextmanager
def _quiet():
    """zero_to_fp32 prints progress lines on stdout; keep the tool's own output readable."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


# Settings that change no weight's name or shape, nor the function the weights compute at a given length.
_RUN_ONLY_SETTINGS = {"dropout", "max_seq_len", "chunk_size", "init_std"}


def load_initial_weights(model: torch.nn.Module, path: str | Path, config: ModelConfig) -> None:
    """Copy the weights of an original-format `.pt` into a freshly built `model` (before deepspeed.initialize;
    under ZeRO-3 each parameter is gathered, written by rank 0's copy of the file, and re-partitioned)."""
    import deepspeed

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training.init_from: {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6; a text file is not one
        raise CheckpointError(f"training.init_from: {path} is not a PyTorch .pt file (not a zip archive, as "
                              "torch.save writes): give a final_model.pt or best_model.pt, or the .pt that "
                              "convert_checkpoint.py --from_hf wrote")
    try:
        checkpoint = load_weights_file(path)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as err:  # a damaged archive
        raise CheckpointError(f"training.init_from: {err}") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"training.init_from: {path} is not a .pt of this project ({{'config', "
                              "'model_state_dict'}}, as final_model.pt or convert_checkpoint.py writes)")
    saved = ModelConfig(**checkpoint["config"])
    differ = {k: v for k, v in saved.model_dump().items()
              if k not in _RUN_ONLY_SETTINGS and getattr(config, k) != v and
              not (k == "ffn_hidden" and saved.ffn_dim == config.ffn_dim)}
    if differ:
        fixes = " ".join(f"{'' if k == 'model_type' else 'model.'}{k}={v}" for k, v in differ.items())
        raise CheckpointError(f"training.init_from: {path} holds another architecture; set {fixes} "
                              "(or use the YAML that convert_checkpoint.py --from_hf wrote beside it)")
    state = checkpoint["model_state_dict"]
    check_weights({k: tuple(v.shape) for k, v in state.items()}, config, f"training.init_from: {path}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
                param.copy_(state[name])

