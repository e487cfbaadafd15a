"""Load trained weights for evaluation from any of the forms a run leaves: a plain `.pt` (final_model.pt,
best_model.pt), a resumable DeepSpeed folder (the checkpoint directory or one `checkpoint_step_N`), or an
exported folder (safetensors with this project's config, or a `transformers` folder). The weights come out through
engine/checkpoint/export.py, the checkpoint-conversion code, so evaluation reads exactly what conversion writes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint.manager import TAG_PATTERN, latest_tag
from engine.errors import CheckpointError, first_line
from engine.checkpoint.safe_load import check_tree, load_weights_file
from model import ModelConfig, create_model


@dataclass(kw_only=True)
class LoadedModel:
    """A model ready for evaluation and where it came from."""

    model: nn.Module
    """The model in eval mode (this project's, or a transformers model for a foreign exported folder)."""
    model_config: ModelConfig | None
    """This project's config of it; None for a transformers model."""
    kind: str
    """'pt', 'deepspeed', 'safetensors' or 'transformers'."""
    source: Path
    """The file or folder the weights came from."""
    run_config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved config when the checkpoint holds it (data and output folders for the report)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other facts stored with the weights (step, val_loss)."""


def _build(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: Path) -> nn.Module:
    model = create_model(config.model_type, config)
    # safetensors stores a tied matrix once (it refuses shared tensors): its second name may be absent.
    first_name: dict[int, str] = {}
    aliases = {name for name, p in model.named_parameters(remove_duplicate=False)
               if first_name.setdefault(id(p), name) != name}
    # torch's load_state_dict lists every size mismatch on its own line: say the count and the first, on one.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [name for name, t in state_dict.items() if name in expected and tuple(t.shape) != expected[name]]
    if wrong:
        first = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} weight(s) have another shape than the stored model config builds (first: "
            f"{first} is {tuple(state_dict[first].shape)} in the file, {expected[first]} for the config): the config "
            "saved with them does not describe them; export the weights again from their training checkpoint")
    try:
        result = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: the weights do not match the stored model config "
                              f"({first_line(err)})") from None
    if set(result.missing_keys) - aliases or result.unexpected_keys:
        raise CheckpointError(f"{source}: the weights do not match the stored model config (missing "
                              f"{sorted(set(result.missing_keys) - aliases)}, unexpected {result.unexpected_keys})")
    return model.eval()


def _load_pt(path: Path) -> LoadedModel:
    ckpt = load_weights_file(path)  # CheckpointError names the file (unreadable, or naming foreign code)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} lacks 'config' and 'model_state_dict': not a final_model.pt / best_model.pt "
                              "of this project")
    config = ModelConfig(**ckpt["config"])
    extra = {k: v for k, v in ckpt.items() if k in ("step", "val_loss")}
    return LoadedModel(model=_build(config, ckpt["model_state_dict"], path), model_config=config, kind="pt",
                       source=path, run_config=ckpt.get("run_config") or {}, extra=extra)


def _is_deepspeed_folder(folder: Path) -> bool:
    return (TAG_PATTERN.match(folder.name) is not None and any(folder.glob("*model_states.pt"))) or \
        latest_tag(folder) is not None


def _load_deepspeed(path: Path) -> LoadedModel:
    # engine/checkpoint/export.py (checkpoint conversion): the fp32 master weights of any ZeRO stage and world size, through
    # DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (ZeRO-1/2/3) or the optimizer's masters (ZeRO-0).
    from engine.checkpoint.export import fp32_state_dict, load_model_config, resolve_checkpoint

    folder = resolve_checkpoint(path)
    config, run_config = load_model_config(folder)
    step = TAG_PATTERN.match(folder.name)
    return LoadedModel(model=_build(config, fp32_state_dict(folder, config), folder), model_config=config,
                       kind="deepspeed", source=folder, run_config=run_config,
                       extra={"step": int(step.group(1))} if step else {})


def _load_exported(folder: Path) -> LoadedModel:
    # tools/convert_checkpoint.py (issue 9) writes this project's ModelConfig as model_config.json beside the
    # safetensors shards; a transformers folder has config.json with `architectures`.
    check_tree(folder)  # a pytorch_model.bin that transformers could fall back to is a pickle too
    own = folder / "model_config.json"
    config_json = json.loads((own if own.is_file() else folder / "config.json").read_text())
    if "architectures" in config_json and (folder / "run_config.json").is_file():
        # This project's own Hugging Face export (convert_checkpoint.py --to hf): its weights in our names, its
        # run config (model and data) from the file the export writes; not "a model of another tokenizer".
        from engine.checkpoint.hugging_face import read_hf_folder

        run_config = json.loads((folder / "run_config.json").read_text())
        _, state = read_hf_folder(folder)
        config = ModelConfig(**run_config["model"])
        return LoadedModel(model=_build(config, state, folder), model_config=config, kind="hf-export",
                           source=folder, run_config=run_config)
    if "architectures" in config_json:  # a transformers folder: let transformers read it
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        return LoadedModel(model=model, model_config=None, kind="transformers", source=folder)
    from engine.checkpoint.export import read_safetensors_folder

    state = read_safetensors_folder(folder)
    fields = config_json.get("model_config", config_json.get("config", config_json))
    config = ModelConfig(**{k: v for k, v in fields.items() if k in ModelConfig.model_fields})
    return LoadedModel(model=_build(config, state, folder), model_config=config, kind="safetensors", source=folder,
                       run_config=config_json.get("run_config") or {})


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load weights from a `.pt`, a DeepSpeed checkpoint folder (root or `checkpoint_step_N`) or an exported
    folder (`model_config.json` or `config.json` + `*.safetensors`); CheckpointError says what was found instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass --checkpoint a .pt file, a checkpoint folder or an "
                              "exported folder")
    if path.is_file():
        loaded = _load_pt(path)
    elif _is_deepspeed_folder(path):
        loaded = _load_deepspeed(path)
    elif ((path / "model_config.json").is_file() or (path / "config.json").is_file()) and \
            any(path.glob("*.safetensors")):
        loaded = _load_exported(path)
    else:
        raise CheckpointError(f"{path} is neither a DeepSpeed checkpoint folder (no 'latest' file or "
                              "checkpoint_step_N with model states) nor an exported folder (model_config.json or "
                              "config.json + *.safetensors)")
    loaded.model.to(device)
    return loaded
