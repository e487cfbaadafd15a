"""ALST's tiling for very long sequences on one GPU (Bekman et al. 2025, arXiv:2506.13996, section 3.2): the
SwiGLU MLP runs tile by tile along the sequence and recomputes each tile in backward, so it saves only its input
(B, T, d_model) instead of four (B, T, ffn_dim) tensors; the output projection + loss are the chunked
cross-entropy of model/losses.py. Both are chosen by the trainer (training.tiled_mlp, training.tiled_loss) and
counted by the memory plan (model/transformer/costs.py `tiled_mlp_saved_bytes`).

The tiles run through DeepSpeed's own `TiledMLP` autograd function (deepspeed.runtime.sequence_parallel.ulysses_sp),
which takes any `fn(module, x)` and, under ZeRO, marks the weights' gradients ready only after the last tile.
"""
from __future__ import annotations

import math

from torch import Tensor, nn


def mlp_tiles(setting: bool | int, seq_len: int, d_model: int) -> int:
    """Sequence tiles of one MLP call: N as configured, or for `true` ceil(T / d_model), DeepSpeed's own rule
    (its TiledMLP example), so that a tile's (tokens x ffn_dim) intermediates are at most d_model x ffn_dim, the
    size of one MLP weight; never more tiles than tokens. 1 = untiled."""
    if setting is False or setting is None:
        return 1
    tiles = math.ceil(seq_len / d_model) if setting is True else int(setting)
    return max(1, min(tiles, seq_len))


def tiled_swiglu(mlp: nn.Module, x: Tensor, tiles: int) -> Tensor:
    """mlp(x) (x: (B, T, C)) computed in `tiles` pieces along T, each recomputed in backward."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    return TiledMLP.apply(lambda module, shard: module.untiled(shard), mlp, x, tiles,
                          [mlp.w1.weight, mlp.w2.weight, mlp.w3.weight])


def configure_tiling(model: nn.Module, *, tiled_mlp: bool | int = False, tiled_loss: bool = False) -> None:
    """Set every SwiGLU's tiling and the output layer's loss choice (model/losses.py lm_head_and_loss). A SwiGLU
    is found by its `untiled` method (model/transformer/model.py imports this module, so not by its class)."""
    for module in model.modules():
        if callable(getattr(module, "untiled", None)):
            module.tiled = tiled_mlp
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        lm_head.tiled_loss = tiled_loss
