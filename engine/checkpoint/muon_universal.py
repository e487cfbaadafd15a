"""Muon's momentum through DeepSpeed's universal checkpoint, so a Muon run resumes on another rank count.

Written here because no library does it: DeepSpeed 0.19.8's `ds_to_universal` reads Adam's states only
(`extract_zero_shards` takes `exp_avg` and `exp_avg_sq` of every group: KeyError on a Muon group, whose state is
just `momentum_buffer`), and its universal loaders restore Adam's states only (ZeRO-3 reads exactly `fp32`,
`exp_avg` and `exp_avg_sq` of every parameter). Everything else stays DeepSpeed's: the conversion of the fp32
master weights and of AdamW's moments, the universal load, the slicing for the new ranks.

Where a running engine keeps Muon's momentum (DeepSpeed 0.19.8, read in its source, confirmed by the shapes in
saved checkpoints and by tests/engine/test_universal_resume.py):
- ZeRO-1/2 (`stage_1_and_2.py` `_muon_momentum_buffer`): per parameter group, one flat buffer holding the WHOLE
  momentum of every parameter that has a fragment in the rank's partition, in group order (Newton-Schulz needs the
  whole matrix, so a matrix split between two partitions is held whole by both ranks). Its dtype follows the
  gradients (bf16 in bf16 runs), and the engine converts a restored fp32 buffer on first use.
- ZeRO-3 (`stage3.py` `_create_momentum_buffer`): per sub-group, a flat partition laid out exactly like the fp32
  master partition (each parameter's `partition_numel()` slice, padded, one after another).

Conversion (`convert`, rank 0, once, into the folder engine/checkpoint/universal.py stages):
1. an Adam-shaped view of the checkpoint in a temporary folder (`adam_view` in the output): each rank's
   optimizer file with every Muon group's state given Adam's keys (ZeRO-3: its momentum as `exp_avg`, which has
   the fp32 layout there; ZeRO-1/2: zeros, the momentum being taken out in step 3), the model files linked;
2. DeepSpeed's converter on that view;
3. each Muon parameter's whole momentum written as `zero/<name>/momentum_buffer.pt` ({'param': fp32 tensor}, the
   universal format's own file layout), and its `exp_avg.pt` / `exp_avg_sq.pt` replaced by zero placeholders of
   one stored element (a stride-0 tensor): DeepSpeed's ZeRO-3 loader requires the two files for every parameter,
   and zeros are harmless to anything that reads them as Adam's moments.
The view costs temporary disk space of about the optimizer files' size; it lives inside the staged output and
goes with it.

Load (`restore_momentum`, every rank, right after DeepSpeed's universal load): every Muon group's state is set to
what a running engine holds (above), from the `momentum_buffer.pt` files; the placeholders DeepSpeed loaded as
`exp_avg`/`exp_avg_sq` (and ZeRO-3's `step`) are dropped, so the state is the same as a straight run's.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from tqdm import tqdm

from engine.errors import CheckpointError
from engine.checkpoint.safe_load import load_weights_file

MOMENTUM_FILE = "momentum_buffer.pt"
_OPTIM_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _zeros_placeholder(numel: int) -> torch.Tensor:
    """`numel` fp32 zeros stored as one element (torch.save keeps the stride-0 view of a 1-element storage)."""
    return torch.zeros(1).expand(numel)


def _optim_files(folder: Path) -> dict[int, Path]:
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _OPTIM_FILE.match(p.name))}
    if not files:
        raise CheckpointError(f"{folder} holds no zero_pp_rank_*_optim_states.pt files to convert")
    return dict(sorted(files.items()))


def _muon_groups(param_groups: list[dict]) -> list[int]:
    return [index for index, group in enumerate(param_groups) if group.get("use_muon")]


def _zero12_momenta(optim_state: dict, param_shapes: list[dict], momenta: dict[str, torch.Tensor]) -> None:
    """Add to `momenta` the whole momentum of every Muon parameter in one rank's ZeRO-1/2 optimizer state: the
    group's flat buffer is the parameters with a fragment in this rank's partition (`param_slice_mappings`, in
    group order), each whole."""
    groups = optim_state["base_optimizer_state"]
    for index in _muon_groups(groups["param_groups"]):
        buffer = groups["state"].get(index, {}).get("momentum_buffer")
        if buffer is None:  # no Muon step yet: a fresh engine starts from zeros as well
            continue
        names = list(optim_state["param_slice_mappings"][index])
        sizes = [math.prod(param_shapes[index][name]) for name in names]
        if sum(sizes) != buffer.numel():
            raise CheckpointError(
                f"Muon group {index}'s momentum holds {buffer.numel()} elements, not the {sum(sizes)} of its "
                f"parameters {names}: this checkpoint's layout is not DeepSpeed 0.19.8's, which this converter "
                "reads; resume it on the rank count that saved it")
        for name, piece in zip(names, buffer.split(sizes)):
            momenta.setdefault(name, piece.float().reshape(param_shapes[index][name]))


def _adam_view(optim_state: dict) -> dict:
    """One rank's optimizer state with Adam's keys in every Muon group, as DeepSpeed's converter reads them."""
    if "fp32_flat_groups" in optim_state:  # ZeRO-3
        inner = optim_state["optimizer_state_dict"]
        step = next((s["step"] for s in inner["state"].values() if "step" in s), 0)
        for index in _muon_groups(inner["param_groups"]):
            numel = optim_state["fp32_flat_groups"][index].numel()
            state = inner["state"].setdefault(index, {})
            momentum = state.pop("momentum_buffer", None)
            state["exp_avg"] = _zeros_placeholder(numel) if momentum is None else momentum.float()
            state["exp_avg_sq"] = _zeros_placeholder(numel)
            state["step"] = step  # the ZeRO-3 loader reads the step of group 0
        return optim_state
    groups = optim_state["base_optimizer_state"]
    for index in _muon_groups(groups["param_groups"]):
        numel = optim_state["single_partition_of_fp32_groups"][index].numel()
        groups["state"][index] = {"exp_avg": _zeros_placeholder(numel), "exp_avg_sq": _zeros_placeholder(numel)}
    return optim_state


def _muon_parameter_shapes(folder: Path, stage3: bool) -> dict[str, torch.Size]:
    """The shapes of the parameters in Muon groups, by name (from the first rank's files: every rank has the same
    groups)."""
    files = _optim_files(folder)
    first = min(files)
    optim_state = load_weights_file(files[first], mmap=True)["optimizer_state_dict"]
    if stage3:
        model_file = next(folder.glob(f"zero_pp_rank_{first}_mp_rank_*_model_states.pt"))
        groups = optim_state["optimizer_state_dict"]["param_groups"]
    else:
        model_file = next(folder.glob("mp_rank_*_model_states.pt"))
        groups = optim_state["base_optimizer_state"]["param_groups"]
    shapes = load_weights_file(model_file, mmap=True)["param_shapes"]
    return {name: shape for index in _muon_groups(groups) for name, shape in shapes[index].items()}


def _tensor(saved) -> torch.Tensor:
    """A universal file's tensor: ZeRO-1/2 files hold {'param': tensor}, DeepSpeed's ZeRO-3 merge the bare tensor."""
    return saved["param"] if isinstance(saved, dict) else saved


def convert(folder: str | Path, output: str | Path, convert_adam) -> None:
    """Write the universal checkpoint of the Muon checkpoint `folder` into `output` (which must not exist).
    `convert_adam(input, output)` is DeepSpeed's converter behind the project's checks (safe_load)."""
    folder, output = Path(folder), Path(output)
    view = output / "adam_view"  # inside the output, so a killed conversion leaves it in the staged folder only
    view.mkdir(parents=True)
    momenta: dict[str, torch.Tensor] = {}
    stage3 = not any(folder.glob("mp_rank_*_model_states.pt"))  # ZeRO-3 writes one model file per rank instead
    shapes = None if stage3 else load_weights_file(next(folder.glob("mp_rank_*_model_states.pt")),
                                                   mmap=True)["param_shapes"]
    for path in tqdm(list(_optim_files(folder).values()), desc="Muon: Adam-shaped view", unit="rank"):
        optim = load_weights_file(path, mmap=True)
        if not stage3:
            _zero12_momenta(optim["optimizer_state_dict"], shapes, momenta)
        optim["optimizer_state_dict"] = _adam_view(optim["optimizer_state_dict"])
        torch.save(optim, view / path.name)
        del optim
    for model_file in folder.glob("*model_states.pt"):
        os.symlink(model_file.resolve(), view / model_file.name)
    convert_adam(view, output)
    for path in view.iterdir():
        path.unlink()
    view.rmdir()
    for name, shape in tqdm(_muon_parameter_shapes(folder, stage3).items(), desc="Muon: momenta", unit="tensor"):
        param_dir = output / "zero" / name
        if stage3:  # DeepSpeed merged the momentum it read as exp_avg
            momentum = _tensor(load_weights_file(param_dir / "exp_avg.pt")).reshape(shape)
        else:  # a parameter no rank stepped with Muon yet has zero momentum, as in a fresh engine
            momentum = momenta.get(name, torch.zeros(shape))
        # clone: a piece of a rank's flat buffer is a view, and torch.save writes a view's whole storage
        torch.save({"param": momentum.float().clone()}, param_dir / MOMENTUM_FILE)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": _zeros_placeholder(math.prod(shape)).reshape(shape)}, param_dir / f"{key}.pt")


def has_momentum(universal_dir: str | Path) -> bool:
    """Whether a universal checkpoint carries Muon momenta (written by `convert`)."""
    return any((Path(universal_dir) / "zero").glob(f"*/{MOMENTUM_FILE}"))


def _momentum(universal_dir: Path, name: str) -> torch.Tensor:
    path = universal_dir / "zero" / name / MOMENTUM_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {universal_dir} is not a complete universal copy of a Muon "
                              "checkpoint; delete that folder and resume again to convert anew")
    return _tensor(load_weights_file(path)).reshape(-1)


def restore_momentum(zero_optimizer, universal_dir: str | Path) -> None:
    """Set every Muon group's state of `zero_optimizer` (DeepSpeed's ZeRO-1/2 or ZeRO-3 optimizer, just loaded
    from `universal_dir` by DeepSpeed) to the momentum layout a running engine keeps (module docstring)."""
    universal_dir = Path(universal_dir)
    base = zero_optimizer.optimizer
    names = zero_optimizer.param_names
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: per sub-group, in the fp32 layout
        import deepspeed.comm as dist

        if getattr(zero_optimizer, "save_muon_momentum_buffer_in_memory", False) or zero_optimizer.swap_optimizer:
            raise CheckpointError("resuming Muon on another rank count with an offloaded optimizer is not "
                                  "supported; resume on the rank count that saved the checkpoint")
        for index, params in enumerate(zero_optimizer.fp16_groups):
            if not zero_optimizer.sub_groups_using_muon[index]:
                continue
            flat = zero_optimizer.fp32_partitioned_groups_flat[index]
            momentum = torch.zeros_like(flat)
            offset = 0
            for param in params:
                size = param.partition_numel()  # as DeepSpeed's own ZeRO-3 universal load slices fp32
                rank = dist.get_rank(group=zero_optimizer._get_param_partition_group(param))
                whole = _momentum(universal_dir, names[param])
                piece = whole[rank * size:(rank + 1) * size]
                momentum.narrow(0, offset, piece.numel()).copy_(piece)
                offset += size
            base.state[flat] = {"momentum_buffer": momentum}
        return
    for index, group in enumerate(base.param_groups):  # ZeRO-1/2: whole momenta of the partition's parameters
        if not group.get("use_muon"):
            continue
        params = zero_optimizer.params_in_partition[index]
        flat = group["params"][0]
        momentum = torch.cat([_momentum(universal_dir, names[param]) for param in params]) if params else None
        base.state[flat] = {} if momentum is None else {"momentum_buffer": momentum.to(flat.device)}
        for param in zero_optimizer.bit16_groups[index]:  # the loader's views of the placeholders
            if param._hp_mapping is not None:
                param._hp_mapping.optim_fragment = {}
