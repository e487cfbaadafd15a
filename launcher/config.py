"""The run config: YAML presets and files plus command-line overrides, merged and validated into one typed tree.

Only the launcher reads YAML and argv. Each lower layer receives its own section (ModelConfig, TrainingConfig,
DataConfig). Validation collects every problem and raises one `ConfigError` naming each key and the fix.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data.config import DataConfig
from engine.config import TrainingConfig
from launcher.presets import PRESETS
from model.config import ModelConfig
from model.registry import list_models


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and what to change."""


class SystemConfig(BaseModel):
    """What happens around the run (the original's `system:` section)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    auto_shutdown: bool = False
    """Power the machine off when training finishes."""
    shutdown_delay: int = Field(default=60, ge=0)
    """Seconds of countdown before shutting down (Ctrl+C cancels)."""


class RunConfig(BaseModel):
    """One training run: the original project's top-level keys and sections."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    model_type: str = "transformer"
    """Model family: 'transformer', 'mamba' or 'hybrid' (see --list_models)."""
    num_gpus: int = Field(default=1, ge=1)
    """Number of GPUs (data-parallel ranks) on this node."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Architecture."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Optimisation, precision, evaluation and checkpoints."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Corpus, tokenizer and token shard cache."""
    system: SystemConfig = Field(default_factory=SystemConfig)
    """Shutdown after training."""

    @model_validator(mode="before")
    @classmethod
    def _model_type_first(cls, data: Any) -> Any:
        """Give the model section the family before it is validated: its checks depend on it (a Mamba section
        validated as a Transformer was rejected for 'd_model divisible by n_heads')."""
        if isinstance(data, dict) and isinstance(data.get("model", {}), dict):
            model = dict(data.get("model", {}))
            family = data.get("model_type") or model.get("model_type") or "transformer"
            model["model_type"] = family
            data = {**data, "model_type": family, "model": model}
        return data

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.model_type not in list_models():
            raise ValueError(f"model_type {self.model_type!r} is not available, "
                             f"choose one of: {', '.join(sorted(list_models()))}")
        # The top-level key is the original's contract; the model section carries it for checkpoints.
        if self.model.model_type != self.model_type:
            self.model = self.model.model_copy(update={"model_type": self.model_type})
            ModelConfig.model_validate(self.model.model_dump())
        blocks = self.training.activation_checkpointing
        if not isinstance(blocks, bool) and isinstance(blocks, int) and blocks > self.model.n_layers:
            raise ValueError(f"training.activation_checkpointing={blocks} is more blocks than the model has: give 0 "
                             f"to {self.model.n_layers} (model.n_layers), true for every block, or auto")
        if self.training.tiled_mlp is not False and self.model_type == "mamba":
            raise ValueError("training.tiled_mlp tiles the SwiGLU MLP, which Mamba models have none of: set "
                             "training.tiled_mlp=false (transformer and hybrid models have one)")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error (several lines: context, problem, a caret under the text) as one line with the fix."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "'\\t'" in problem or "\t" in problem:
        return f"a tab at {where}: YAML indents with spaces only; replace the tab with spaces"
    return f"{problem} at {where}: check the indentation and the `key: value` form there"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file into a plain tree."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: pass an existing file to --config, or use --preset")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (model_type, model, training, ...)")
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` over `base` (sections merge key by key; leaves replace)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'training.max_steps=20' into {'training': {'max_steps': 20}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key.path=value, e.g. --set training.max_steps=100")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    tree: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        tree = {key: tree}
    return tree


def _known_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (used to suggest the key a typo meant)."""
    for part in loc:
        field = model_cls.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model_cls = annotation
    return list(model_cls.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _known_keys(RunConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else (
            f"; valid keys here: {', '.join(known)}" if known else "")
        return f"{key}: unknown key{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        # Section validators already name their keys ('model.d_model ...'), one problem per '; '.
        return "\n  - ".join(message.split("; "))
    return f"{key}: {message} (got {error['input']!r})"


def validate_tree(tree: dict[str, Any]) -> RunConfig:
    """Validate a merged tree into a RunConfig, or raise ConfigError listing every problem."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        lines = [line for e in err.errors() for line in _describe(e).split("\n  - ")]
        if len(lines) == 1:  # one problem: one line
            raise ConfigError(f"invalid config: {lines[0]}") from None
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(lines)) from None


def build_run_config(*, preset: str | None = None, config_path: str | None = None,
                     overrides: list[str] = (), model_type: str | None = None,
                     num_gpus: int | None = None) -> RunConfig:
    """Defaults <- preset <- config file <- --model_type/--num_gpus <- --set overrides, then validate."""
    tree: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown preset {preset!r}{hint}; see --list_presets: {', '.join(PRESETS)}")
        tree = merge_trees(tree, PRESETS[preset])
    if config_path is not None:
        tree = merge_trees(tree, load_yaml(config_path))
    if model_type is not None:
        tree["model_type"] = model_type
    if num_gpus is not None:
        tree["num_gpus"] = num_gpus
    for text in overrides:
        tree = merge_trees(tree, parse_override(text))
    return validate_tree(tree)
