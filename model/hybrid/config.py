"""The hybrid family's own config rules: which layers mix with Mamba-2 and which with attention.

`model.layer_pattern` says it in one of three forms (all give one letter per layer, 'M' Mamba-2, 'A' attention):
- a string of M/A letters repeated to n_layers, e.g. "MMMMMMMA" (one attention layer in eight, Nemotron-H's and
  Granite-4.0-H's rhythm); n_layers must be a multiple of its length;
- a list of n_layers letters, e.g. ["M", "M", "A", "M"];
- a list of the attention layers' indices, e.g. [9, 18, 27] (transformers' Bamba `attn_layer_indices`).
Everything else a hybrid layer needs is checked here too (attention heads, Mamba-2 heads), so a bad config gives
every problem in one error, as ModelConfig's own validation does for the other families.
"""
from __future__ import annotations

from typing import Any

# model/config.py calls config_problems while it validates, so this module takes the config untyped (importing
# ModelConfig here would be an import cycle).
MAMBA, ATTENTION = "M", "A"


def expand_layer_pattern(pattern: str | list, n_layers: int) -> list[str]:
    """One letter per layer from any of the three forms; ValueError naming model.layer_pattern otherwise."""
    if isinstance(pattern, str):
        letters = list(pattern.strip().upper())
        if not letters or set(letters) - {MAMBA, ATTENTION}:
            raise ValueError(f"model.layer_pattern {pattern!r} must be a string of 'M' (Mamba-2) and 'A' (attention) "
                             "letters, e.g. \"MMMMMMMA\"")
        if n_layers % len(letters):
            raise ValueError(f"model.layer_pattern {pattern!r} has {len(letters)} letters, which do not repeat to "
                             f"model.n_layers={n_layers}: make n_layers a multiple of {len(letters)} or give "
                             f"{n_layers} letters")
        return letters * (n_layers // len(letters))
    if not isinstance(pattern, list) or not pattern:
        raise ValueError(f"model.layer_pattern must be a string like \"MMMMMMMA\", a list of M/A letters or a list "
                         f"of attention layer indices, got {pattern!r}")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in pattern):
        bad = [i for i in pattern if not 0 <= i < n_layers]
        if bad or len(set(pattern)) != len(pattern):
            raise ValueError(f"model.layer_pattern lists attention layer indices {pattern}: each must appear once "
                             f"and lie in 0..{n_layers - 1} (model.n_layers={n_layers})")
        return [ATTENTION if i in pattern else MAMBA for i in range(n_layers)]
    letters = [str(x).upper() for x in pattern]
    if set(letters) - {MAMBA, ATTENTION}:
        raise ValueError(f"model.layer_pattern {pattern!r} mixes other values with M/A letters: give only 'M' and "
                         "'A', or only integer attention layer indices")
    if len(letters) != n_layers:
        raise ValueError(f"model.layer_pattern lists {len(letters)} layers but model.n_layers={n_layers}: give one "
                         "letter per layer, or a string that repeats to n_layers")
    return letters


def layer_kinds(config: Any) -> list[str]:
    """'M' or 'A' for each of the config's n_layers layers."""
    return expand_layer_pattern(config.layer_pattern, config.n_layers)


def attention_layers(config: Any) -> list[int]:
    """Indices of the attention layers."""
    return [i for i, kind in enumerate(layer_kinds(config)) if kind == ATTENTION]


def config_problems(config: Any) -> list[str]:
    """The hybrid's own reasons `config` cannot build a hybrid model (empty when it can); the rules of its
    attention and Mamba-2 layers are the Transformer's and Mamba-2's, checked in model/config.py."""
    problems = []
    if config.layer_pattern is None:
        problems.append("model.layer_pattern is required for model_type hybrid: e.g. \"MMMMMMMA\" (one attention "
                        "layer in eight), a list of M/A letters, or the attention layer indices")
    elif config.n_layers >= 1:
        try:
            expand_layer_pattern(config.layer_pattern, config.n_layers)
        except ValueError as error:
            problems.append(str(error))
    if config.ssm_type != "mamba2":
        problems.append(f"model.ssm_type={config.ssm_type!r}: the hybrid's Mamba layers are Mamba-2 (as Bamba, "
                        "Nemotron-H, Granite-4.0-H): set ssm_type mamba2")
    return problems
