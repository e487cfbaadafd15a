"""Activation checkpointing of the first N blocks: Megatron-LM's "block" recompute method
(--recompute-granularity full --recompute-method block --recompute-num-layers N).

A checkpointed block keeps only its input; its activations are recomputed when the backward pass reaches it. The
first blocks are the ones checkpointed because the backward pass reaches them last: by the time they are
recomputed, the saved activations of every later block have been freed, so one recomputed block costs no more
than one kept block (launcher/planning/memory.py activation_bytes counts the two moments).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor
from torch.utils.checkpoint import checkpoint


class BlockCheckpointing:
    """Mixed into a model family whose `config.n_layers` blocks run in order: `num_checkpointed_blocks` of them,
    from the first, are recomputed in the backward pass while training. `gradient_checkpointing` is the
    all-or-nothing switch (True = every block, False = none)."""

    _num_checkpointed_blocks: int = 0

    @property
    def num_checkpointed_blocks(self) -> int:
        """Blocks, from the first, recomputed in the backward pass (0 = none, config.n_layers = all)."""
        return self._num_checkpointed_blocks

    @num_checkpointed_blocks.setter
    def num_checkpointed_blocks(self, value: int) -> None:
        num_layers = self.config.n_layers
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_layers:
            raise ValueError(f"num_checkpointed_blocks must be an integer 0-{num_layers} (model.n_layers), got "
                             f"{value!r}; set gradient_checkpointing=True/False for all or none")
        self._num_checkpointed_blocks = value

    @property
    def gradient_checkpointing(self) -> bool:
        """True when every block is checkpointed; setting it checkpoints every block (True) or none (False)."""
        return self._num_checkpointed_blocks == self.config.n_layers

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.num_checkpointed_blocks = self.config.n_layers if enabled else 0

    def run_block(self, index: int, block: Callable[..., Tensor], *args) -> Tensor:
        """block(*args), recomputed in backward when it is one of the first num_checkpointed_blocks and the model
        is training. Non-reentrant: works with ZeRO-3's parameter hooks and keeps dropout masks (RNG is restored)."""
        if self.training and index < self._num_checkpointed_blocks:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
